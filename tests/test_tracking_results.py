"""Tracking result files: our per-sequence format round-trips; GOT-10k and TrackingNet server files and zips have
the exact names and first lines the servers expect, and load with the tools the servers' users have."""

import subprocess
import sys
import zipfile

import numpy as np
import pytest

from visadapt.tracking.results import (
    read_results,
    write_got10k_sequence,
    write_results,
    write_trackingnet_sequence,
    zip_results,
)

BOXES = np.array([[10.25, 20.5, 30.0, 40.0], [11.123456, 21.0, 29.5, 39.75], [12.0, 22.0, 28.0, 38.0]])


def test_own_results_round_trip_with_times(tmp_path):
    path = write_results(tmp_path / "runs", "seq-1", BOXES, times=[0.1, 0.02, 0.03], frames=3)
    assert path == tmp_path / "runs" / "seq-1.txt"
    np.testing.assert_allclose(read_results(tmp_path / "runs", "seq-1"), BOXES, atol=1e-6)
    np.testing.assert_allclose(read_results(path), BOXES, atol=1e-6)
    assert np.loadtxt(tmp_path / "runs" / "seq-1_time.txt").tolist() == [0.1, 0.02, 0.03]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["seq-1.txt", "seq-1_time.txt"]  # no temp files


@pytest.mark.parametrize("boxes, frames, match", [
    (np.array([[1, 2, 3, np.nan]]), None, "frame 0 is not finite"),
    (np.zeros((3, 5)), None, r"shape \(3, 5\)"),
    (np.ones((2, 4)), 3, "2 boxes for 3 frames"),
])
def test_bad_boxes_are_refused_loudly(tmp_path, boxes, frames, match):
    with pytest.raises(ValueError, match=match):
        write_results(tmp_path, "s", boxes, frames=frames)
    with pytest.raises(ValueError, match=match):
        write_got10k_sequence(tmp_path, "s", [boxes], [np.zeros(len(boxes))], frames=frames)
    with pytest.raises(ValueError, match=match):
        write_trackingnet_sequence(tmp_path, "s", boxes, frames=frames)
    assert not any(tmp_path.rglob("*.txt"))


def test_read_results_refuses_other_files(tmp_path):
    (tmp_path / "x.txt").write_text("1,2,3\n")
    with pytest.raises(ValueError, match="4 numbers"):
        read_results(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="write_results"):
        read_results(tmp_path, "missing")


def test_got10k_names_first_line_times_and_zip(tmp_path):
    tracker = tmp_path / "LoRAT-B-224"
    runs = [BOXES + r for r in range(3)]
    times = [[0.5, 0.01, 0.02], [0.4, 0.01, 0.03], [0.6, 0.02, 0.01]]
    folder = write_got10k_sequence(tracker, "GOT-10k_Test_000001", runs, times, init_box=[1, 2, 3, 4],
                                   whole_pixels=False)
    write_got10k_sequence(tracker, "GOT-10k_Test_000002", runs[:1], times[:1], whole_pixels=False)
    assert folder == tracker / "GOT-10k_Test_000001"
    assert sorted(p.name for p in folder.iterdir()) == [
        "GOT-10k_Test_000001_001.txt", "GOT-10k_Test_000001_002.txt", "GOT-10k_Test_000001_003.txt",
        "GOT-10k_Test_000001_time.txt"]
    for r in (1, 2, 3):
        lines = (folder / f"GOT-10k_Test_000001_{r:03d}.txt").read_text().splitlines()
        assert lines[0] == "1.0000,2.0000,3.0000,4.0000" and len(lines) == 3  # line 1 = the initial box
        assert lines[1] == ",".join(f"{v:.4f}" for v in BOXES[1] + r - 1)
    assert (tracker / "GOT-10k_Test_000002" / "GOT-10k_Test_000002_001.txt").read_text().splitlines()[0] == (
        "10.2500,20.5000,30.0000,40.0000")
    assert np.loadtxt(folder / "GOT-10k_Test_000001_time.txt", delimiter=",").tolist() == np.array(times).T.tolist()
    archive = zip_results(tracker, expected=["GOT-10k_Test_000001", "GOT-10k_Test_000002"])
    assert archive == tmp_path / "LoRAT-B-224.zip"
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == sorted(
            [f"GOT-10k_Test_000001/GOT-10k_Test_000001_{s}.txt" for s in ("001", "002", "003", "time")]
            + [f"GOT-10k_Test_000002/GOT-10k_Test_000002_{s}.txt" for s in ("001", "time")])
    with pytest.raises(ValueError, match="1 sequences have no results.*GOT-10k_Test_000003"):
        zip_results(tracker, tmp_path / "other.zip", expected=["GOT-10k_Test_000001", "GOT-10k_Test_000003"])
    assert not (tmp_path / "other.zip").exists()


def test_got10k_files_round_boxes_out_to_whole_pixels_by_default(tmp_path):
    # The official adaptor's files: left/top floored, right/bottom (x + w, y + h) raised to the next whole pixel,
    # unless within 1e-4 of one; integer boxes stay as they are.
    boxes = np.array([[10.25, 20.5, 30.0, 40.0], [11.123456, 21.0, 29.5, 39.75], [3, 4, 5.00005, 6], [-2.5, 0, 1, 1]])
    folder = write_got10k_sequence(tmp_path, "s", [boxes], [np.zeros(4)])
    written = np.loadtxt(folder / "s_001.txt", delimiter=",")
    np.testing.assert_array_equal(written, [[10, 20, 31, 41], [11, 21, 30, 40], [3, 4, 5, 6], [-3, 0, 2, 1]])


def test_got10k_refuses_bad_runs(tmp_path):
    with pytest.raises(ValueError, match="4 runs; GOT-10k takes 1 to 3"):
        write_got10k_sequence(tmp_path, "s", [BOXES] * 4, [np.zeros(3)] * 4)
    with pytest.raises(ValueError, match="different lengths"):
        write_got10k_sequence(tmp_path, "s", [BOXES, BOXES[:2]], [np.zeros(3), np.zeros(2)])
    with pytest.raises(ValueError, match="2 times for 3 frames"):
        write_got10k_sequence(tmp_path, "s", [BOXES], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="non-negative"):
        write_got10k_sequence(tmp_path, "s", [BOXES], [[0.1, np.nan, 0.2]])


def test_trackingnet_files_and_flat_zip_load_without_visadapt(tmp_path):
    folder = tmp_path / "trackingnet"
    write_trackingnet_sequence(folder, "abc_0", BOXES, init_box=(5, 6, 7, 8))
    write_trackingnet_sequence(folder, "xyz_3", BOXES[:2])
    assert (folder / "abc_0.txt").read_text().splitlines() == ["5.00,6.00,7.00,8.00", "11.12,21.00,29.50,39.75",
                                                                "12.00,22.00,28.00,38.00"]
    archive = zip_results(folder, tmp_path / "submission.zip", expected=["abc_0", "xyz_3"])
    got10k = write_got10k_sequence(tmp_path / "T", "GOT-10k_Test_000001", [BOXES], [[0.1, 0.1, 0.1]]).parent
    got_zip = zip_results(got10k)
    # what the servers and the got10k toolkit do with the files: zipfile + numpy, never visadapt
    code = f"""
import io, sys, zipfile
import numpy as np
with zipfile.ZipFile({str(archive)!r}) as z:
    assert sorted(z.namelist()) == ["abc_0.txt", "xyz_3.txt"], z.namelist()
    boxes = np.loadtxt(io.BytesIO(z.read("abc_0.txt")), delimiter=",")
    assert boxes.shape == (3, 4) and boxes[0].tolist() == [5, 6, 7, 8]
with zipfile.ZipFile({str(got_zip)!r}) as z:
    boxes = np.loadtxt(io.BytesIO(z.read("GOT-10k_Test_000001/GOT-10k_Test_000001_001.txt")), delimiter=",")
    times = np.loadtxt(io.BytesIO(z.read("GOT-10k_Test_000001/GOT-10k_Test_000001_time.txt")), delimiter=",")
    assert boxes.shape == (3, 4) and times.shape == (3,)
assert "visadapt" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
