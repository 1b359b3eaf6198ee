"""``visadapt track``: run on a video (annotated mp4 + boxes), eval and report on run folders, and a wrong dataset
layout answered with its message and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from visadapt.cli import main
from visadapt.tracking.results import whole_pixel_boxes
from visadapt.utils.worlds.video import generate_sequence, write_world

av = pytest.importorskip("av")


def _write_mp4(path, frames, fps=10):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_run_on_a_video_writes_the_annotated_video_and_boxes(tmp_path, tracking_pipeline_dir, capsys):
    seq = generate_sequence(0, 1, 8, "demo")
    _write_mp4(tmp_path / "clip.mp4", seq["frames"])
    x, y, w, h = seq["boxes"][0]
    code = main(["track", "run", str(tmp_path / "clip.mp4"), "--box", f"{x},{y},{w},{h}", "--model",
                 str(tracking_pipeline_dir), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    boxes = np.loadtxt(tmp_path / "out" / "boxes.txt", delimiter=",")
    assert boxes.shape == (8, 5)
    np.testing.assert_allclose(boxes[0, :4], seq["boxes"][0], atol=0.01)
    # the video opens in PyAV alone (no visadapt import) with every frame at the clip's size
    probe = ("import av, sys; c = av.open(sys.argv[1]); n = sum(1 for _ in c.decode(video=0)); "
             "s = c.streams.video[0]; print(n, s.width, s.height)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "out" / "tracked.mp4")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["8", "128", "96"]
    # a frame folder gives annotated frames
    (tmp_path / "frames").mkdir()
    from PIL import Image

    for i, frame in enumerate(seq["frames"][:3]):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{i:04d}.png")
    assert main(["track", "run", str(tmp_path / "frames"), "--box", f"{x},{y},{w},{h}", "--model",
                 str(tracking_pipeline_dir), "--out", str(tmp_path / "out2"), "--device", "cpu"]) == 0
    assert len(list((tmp_path / "out2" / "frames").glob("*.jpg"))) == 3
    assert main(["track", "run", str(tmp_path / "frames"), "--box", "1,2,0,4", "--model", str(tracking_pipeline_dir),
                 "--out", str(tmp_path / "out3")]) == 2
    assert "w > 0" in capsys.readouterr().err


def test_eval_then_report_two_runs(tmp_path, tracking_pipeline_dir, capsys):
    write_world(tmp_path / "data", "val", n_sequences=3, n_frames=12, seed=4, kind="demo")
    data = f"got10k:{tmp_path / 'data'}:val"
    for name, batch in (("a", "3"), ("b", "1")):
        assert main(["track", "eval", str(tracking_pipeline_dir), "--data", data, "--out", str(tmp_path / name),
                     "--batch-size", batch, "--device", "cpu"]) == 0
        assert sorted(p.name for p in (tmp_path / name / "results").iterdir())[0] == "World_Val_000001.txt"
        assert (tmp_path / name / "success_plot.png").stat().st_size > 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert {"auc", "precision", "norm_precision", "ao", "sr50", "sr75"} <= set(a["tracker"])
    assert a["tracker"]["auc"] == pytest.approx(b["tracker"]["auc"], abs=1e-3)  # lockstep or not, same tracks
    assert a["static box"]["ao"] == b["static box"]["ao"]
    capsys.readouterr()
    assert main(["track", "report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "a") in printed and "static box" in printed and "AO" in printed
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert report.count("| ") >= 4 and (tmp_path / "cmp" / "success_plot.png").stat().st_size > 0


def test_wrong_layout_and_bad_input_exit_with_code_2(tmp_path, tracking_pipeline_dir, capsys):
    (tmp_path / "GOT" / "val").mkdir(parents=True)
    code = main(["track", "eval", str(tracking_pipeline_dir), "--data", f"got10k:{tmp_path / 'GOT'}:val", "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "list.txt" in err and "Expected layout" in err
    assert main(["track", "train", "--out", str(tmp_path / "run"), "--data", "nonsense"]) == 2
    assert "NAME:ROOT" in capsys.readouterr().err
    assert main(["track", "train", "--demo", "--out", str(tmp_path / "run"), "--variant", "B-224"]) == 2
    assert "--demo brings" in capsys.readouterr().err
    assert main(["track", "eval", "--data", f"got10k:{tmp_path}:val", "--out", str(tmp_path / "o")]) == 2
    assert "run folder" in capsys.readouterr().err


def test_help_does_not_import_torch():
    code = ("import sys; from visadapt.cli import build_parser; p = build_parser(); "
            "p.parse_args(['track', 'train', '--out', 'x']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_eval_on_a_test_split_writes_the_server_submission_without_scores(tmp_path, tracking_pipeline_dir, capsys):
    """GOT-10k's test split is annotated on frame 1 only: tracked, written in the server's layout and zipped, not
    scored (there is nothing to score against)."""
    import zipfile

    write_world(tmp_path / "data", "test", n_sequences=2, n_frames=6, seed=5, kind="demo")
    for gt in (tmp_path / "data" / "test").glob("*/groundtruth.txt"):
        gt.write_text(gt.read_text().splitlines()[0] + "\n")
    out = tmp_path / "sub"
    assert main(["track", "eval", str(tracking_pipeline_dir), "--data", f"got10k:{tmp_path / 'data'}:test",
                 "--out", str(out), "--server-format", "got10k", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "tracker" not in results and not (out / "success_plot.png").exists()
    names = sorted(zipfile.ZipFile(out / results["server_zip"]).namelist())
    seq = sorted(p.name for p in (tmp_path / "data" / "test").iterdir() if p.is_dir())[0]
    assert f"{seq}/{seq}_001.txt" in names and f"{seq}/{seq}_time.txt" in names and len(names) == 4
    first = zipfile.ZipFile(out / results["server_zip"]).read(f"{seq}/{seq}_001.txt").decode().splitlines()[0]
    gt = np.loadtxt(tmp_path / "data" / "test" / seq / "groundtruth.txt", delimiter=",")
    # line 1 is the initial box, rounded out to whole pixels like every line of the official adaptor's files
    np.testing.assert_allclose([float(v) for v in first.split(",")], whole_pixel_boxes(gt[None])[0], atol=1e-4)
    assert main(["track", "report", str(out), "--out", str(tmp_path / "cmp")]) == 2
    assert "only its server" in capsys.readouterr().err
