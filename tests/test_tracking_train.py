"""LoRAT training: the pair sampler (quota, interval pairs, crops, augmentation order, determinism), the Trainer
(loss goes down, bit-exact resume), lockstep tracking equal to one-at-a-time, and the demo beating a static box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from visadapt.tracking.config import DataSpec, TrackConfig
from visadapt.tracking.datasets import TrackingSequence, load_sequences
from visadapt.tracking.losses import lorat_loss
from visadapt.tracking.pipeline import TrackingPipeline
from visadapt.tracking.sampling import PairSettings, TrainingPairs, collate_pairs, hflip, three_augment
from visadapt.tracking.train import build_model, model_config, train
from visadapt.utils.worlds.video import write_world

SETTINGS = PairSettings(32, 64, (4, 4), 4.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, "train", n_sequences=6, n_frames=20, seed=3, kind="demo")
    write_world(root, "val", n_sequences=4, n_frames=30, seed=3, kind="demo")
    return root


def _pairs(world, **kw):
    return TrainingPairs({"a": load_sequences("got10k", world, "train"),
                          "b": load_sequences("got10k", world, "train")[:2]}, kw.pop("settings", SETTINGS), 64, 7)


def test_pairs_shapes_boxes_and_masks(world):
    pairs = _pairs(world)
    batch = collate_pairs([pairs[(i, 11)] for i in range(8)])
    assert batch["z"].shape == (8, 3, 32, 32) and batch["x"].shape == (8, 3, 64, 64)
    assert batch["z_mask"].shape == (8, 4, 4) and batch["z_mask"].dtype == torch.int64
    box = batch["box"]
    assert ((box >= 0) & (box <= 1)).all() and (box[:, 2:] > box[:, :2]).all()
    assert ((box[:, 2:] - box[:, :2]) * 64 >= 10 - 1e-4).all()  # jitter keeps >= 10 px of the target in the crop
    assert (batch["z_mask"].flatten(1).sum(1) >= 1).all()
    # the template box is centred (no jitter), so its mask covers the middle cells
    assert (batch["z_mask"][:, 1:3, 1:3] == 1).all()


def test_official_training_crops_map_boxes_with_the_realised_window(world):
    # Official rule: the template crop is a whole-pixel image window resized onto a whole-pixel crop window, and the
    # template box is mapped with the scale and shift that window pair realises, not with the asked ones.
    from visadapt.tracking.geometry import box_to_crop, crop_image_official, crop_params
    from visadapt.tracking.sampling import load_frame

    settings = PairSettings(32, 64, (4, 4), 4.0, augment=False, crop="official")
    official, exact = _pairs(world, settings=settings)[(3, 11)], _pairs(world, settings=_no_augment())[(3, 11)]
    seq = load_sequences("got10k", world, "train")[int(official["sequence"].split("/")[1].split("_")[-1]) - 1]
    z_box = torch.tensor(seq.boxes[official["frames"][0]], dtype=torch.float64)
    z_box[2:] += z_box[:2]
    asked = crop_params(z_box, 2.0, 32)
    _, realised = crop_image_official(load_frame(seq.frames[official["frames"][0]]), asked)
    torch.testing.assert_close(official["z_box"], box_to_crop(z_box, realised).clamp(0, 32).float())
    torch.testing.assert_close(exact["z_box"], box_to_crop(z_box, asked).clamp(0, 32).float())
    assert not torch.equal(official["z_box"], exact["z_box"])


def _no_augment() -> PairSettings:
    return PairSettings(32, 64, (4, 4), 4.0, augment=False)


def test_pairs_are_deterministic_and_follow_the_quota(world):
    pairs = _pairs(world)
    a, b = pairs[(5, 3)], pairs[(5, 3)]
    for key in ("z", "x", "z_mask", "box"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(pairs[(5, 4)]["x"], a["x"])  # another augmentation seed, another draw
    assert torch.equal(pairs.sample(2, 9)["x"], pairs.sample(2, 9)["x"])
    # equal quota: even items from dataset a (6 sequences), odd from b (2); each pass visits every sequence once
    firsts = [pairs.sequence_of(i) for i in range(0, 12, 2)]
    assert {d for d, _ in firsts} == {0} and sorted(s for _, s in firsts) == list(range(6))
    seconds = [pairs.sequence_of(i) for i in range(1, 8, 2)]
    assert {d for d, _ in seconds} == {1} and sorted(s for _, s in seconds) == [0, 0, 1, 1]
    for i in range(20):
        z, x = pairs[(i, 1)]["frames"]
        assert abs(z - x) <= 100 and (z != x or len(pairs.visible[i % 2][pairs.sequence_of(i)[1]]) == 1)


def test_length_one_track_and_max_gap(world, tmp_path):
    seq = load_sequences("got10k", world, "train")[0]
    single = TrackingSequence("coco-object", seq.frames[:1], seq.boxes[:1], np.ones(1, bool), "coco")
    pairs = TrainingPairs({"coco": [single]}, SETTINGS, 8, 0)
    assert all(pairs[(i, 0)]["frames"] == (0, 0) for i in range(4))
    gap = TrainingPairs({"a": [seq]}, PairSettings(32, 64, (4, 4), 4.0, max_gap=2), 8, 0)
    for i in range(20):
        z, x = gap[(0, i)]["frames"]
        assert 0 < abs(z - x) <= 2


def test_augmentations_joint_and_independent(world):
    img = torch.rand(3, 16, 16)
    rng = np.random.default_rng(0)
    for _ in range(6):  # the 3-augment draws once for both crops
        out = three_augment([img, img], rng)
        assert torch.equal(out[0], out[1]) and not torch.equal(out[0], img)
    flipped, box = hflip(img, torch.tensor([2.0, 3.0, 6.0, 9.0]))
    assert torch.equal(flipped[..., 0], img[..., -1]) and box.tolist() == [10.0, 3.0, 14.0, 9.0]
    # the search crop is flipped in some pairs and not in others (the box is mirrored about the crop's centre)
    plain = _pairs(world, settings=PairSettings(32, 64, (4, 4), 4.0, augment=False))
    aug = _pairs(world)
    flipped = set()
    for i in range(12):
        p, q = plain[(i, 0)]["box"], aug[(i, 0)]["box"]
        assert torch.allclose(q, p, atol=1e-5) or torch.allclose(q, torch.stack((1 - p[2], p[1], 1 - p[0], p[3])),
                                                                  atol=1e-5)
        flipped.add(not torch.allclose(q, p, atol=1e-5))
    assert flipped == {True, False}


def _config(world, **kw) -> TrackConfig:
    base = dict(variant="demo", data=[f"got10k:{world}:train"], samples_per_epoch=16, batch_size=8, epochs=2,
                r=4, lora_alpha=8.0, lr=2e-3, min_lr=1e-4, warmup_epochs=0.5, warmup_lr=1e-4, checkpoint_every=2,
                seed=2)
    return TrackConfig(**{**base, **kw})


def _fixed_loss(model, world) -> float:
    pairs = TrainingPairs({"a": load_sequences("got10k", world, "val")}, PairSettings(32, 64, (4, 4), 4.0,
                                                                                      augment=False), 16, 0)
    batch = collate_pairs([pairs[(i, 0)] for i in range(16)])
    with torch.no_grad():
        return lorat_loss(model.eval()(batch["z"], batch["x"], batch["z_mask"]), batch["box"])["loss"].item()


def test_training_lowers_the_loss_and_resumes_exactly(world, tmp_path):
    cfg = _config(world, epochs=6)
    set_seed(cfg.seed)
    before = _fixed_loss(build_model(cfg)[0], world)
    train(cfg, tmp_path / "full")
    after = _fixed_loss(TrackingPipeline.from_pretrained(tmp_path / "full").model, world)
    assert after < 0.8 * before, (before, after)

    calls = {"n": 0}

    def stop(step, record):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", callbacks=[stop])
    assert (tmp_path / "cut" / "checkpoint").is_dir()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "cut")
    with pytest.raises(ValueError, match="other settings"):
        train(_config(world, epochs=6, lr=1e-3), tmp_path / "cut", resume=True)
    train(cfg, tmp_path / "cut", resume=True)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" /
                                                                                   "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bad_data_spec_and_missing_data():
    assert DataSpec.parse("got10k:/data/GOT-10k:train") == DataSpec("got10k", "/data/GOT-10k", "train")
    assert DataSpec.parse("lasot:/data/LaSOT") == DataSpec("lasot", "/data/LaSOT", None)
    with pytest.raises(ValueError, match="NAME:ROOT"):
        DataSpec.parse("/data/GOT-10k")
    with pytest.raises(ValueError, match="--data"):
        train(TrackConfig(variant="demo"), "unused-out")


def test_lockstep_tracking_equals_one_at_a_time(world):
    torch.manual_seed(0)
    model, _ = build_model(_config(world))
    pipe = TrackingPipeline(model, model_config(_config(world)))
    sequences = load_sequences("got10k", world, "val")
    videos = [s.frames[:n] for s, n in zip(sequences, (30, 12, 25))]
    boxes = [s.boxes[0] for s in sequences[:3]]
    together = pipe.tracker.track_many(videos, boxes, batch_size=3)
    for video, box, (got, scores) in zip(videos, boxes, together):
        alone = pipe([np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB")) for p in video], box)
        assert got.shape == (len(video), 4)
        np.testing.assert_allclose(got, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(scores, alone.scores, atol=1e-4)


def test_demo_tracker_beats_the_static_box(tmp_path):
    """The shipped backbone with a short LoRA + head training (the demo's settings, 150 steps) on the demo world,
    scored on held-out sequences next to the static box."""
    from visadapt.tracking.demo import demo_config

    root = tmp_path / "data"
    write_world(root, "train", n_sequences=16, n_frames=30, seed=0, kind="demo")
    write_world(root, "val", n_sequences=6, n_frames=40, seed=0, kind="demo")
    results = train(demo_config(root, epochs=3, samples_per_epoch=1600, eval_batch_size=6), tmp_path / "run")
    tracker, static = results["tracker"], results["static box"]
    assert tracker["ao"] > static["ao"] + 0.05, (tracker["ao"], static["ao"])
    assert tracker["auc"] > static["auc"] + 0.03, (tracker["auc"], static["auc"])
    assert len(list((tmp_path / "run" / "results").glob("World_Val_*.txt"))) == 6
    assert "static box" in (tmp_path / "run" / "report.md").read_text()
