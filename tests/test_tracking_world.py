"""The procedural tracking world: deterministic, written in the GOT-10k layout that load_sequences reads, and
holding the hard cases it promises (out-of-view frames, occlusion, scale change)."""

import numpy as np

from visadapt.tracking.datasets import load_sequences
from visadapt.utils.worlds.video import FRAME_H, FRAME_W, generate_sequence, write_world


def test_sequences_are_a_function_of_seed_and_index():
    a, b = generate_sequence(0, 2, 12), generate_sequence(0, 2, 12)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    other = generate_sequence(1, 2, 12)
    assert not np.array_equal(a["frames"], other["frames"])
    assert a["frames"].shape == (12, FRAME_H, FRAME_W, 3) and a["frames"].dtype == np.uint8
    # the pretraining kind draws other shapes: same seed and index, other pictures
    assert not np.array_equal(a["frames"], generate_sequence(0, 2, 12, kind="pretrain")["frames"])


def test_world_holds_out_of_view_occlusion_and_scale_change():
    seqs = [generate_sequence(0, i, 40) for i in range(8)]
    absence = np.concatenate([s["absence"] for s in seqs])
    cover = np.concatenate([s["cover"] for s in seqs])
    assert absence.any() and (cover[absence == 0] < 8).any()  # out of view, and partly hidden
    assert set(np.unique(cover)) <= set(range(9))
    for s in seqs:
        visible = s["absence"] == 0
        assert np.isfinite(s["boxes"][visible]).all() and np.isnan(s["boxes"][~visible]).all()
        boxes = s["boxes"][visible]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= FRAME_W + 1e-6).all()
    areas = np.concatenate([s["boxes"][s["absence"] == 0, 2] * s["boxes"][s["absence"] == 0, 3] for s in seqs[:4]])
    assert areas.max() / areas.min() > 1.5


def test_written_world_reads_back_through_the_got10k_reader(tmp_path):
    write_world(tmp_path, "val", n_sequences=3, n_frames=10, seed=5, kind="demo")
    stamp = (tmp_path / "val" / "list.txt").stat().st_mtime_ns
    write_world(tmp_path, "val", n_sequences=3, n_frames=10, seed=5, kind="demo")  # same parameters: reused
    assert (tmp_path / "val" / "list.txt").stat().st_mtime_ns == stamp
    sequences = load_sequences("got10k", tmp_path, "val")
    assert [len(s) for s in sequences] == [10, 10, 10]
    for i, seq in enumerate(sequences):
        truth = generate_sequence(5, i, 10, "demo", "val")
        np.testing.assert_allclose(seq.boxes, truth["boxes"], atol=0.006)
        np.testing.assert_array_equal(seq.visible, truth["absence"] == 0)
        np.testing.assert_array_equal(seq.meta["cover"], truth["cover"])
        assert seq.frames[0].name == "00000001.jpg"
