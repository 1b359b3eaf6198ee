"""Bad input to the newer commands (tracking, incremental, hyperspectral, and the image files of every task's
loader): refused before any work with one line
that names the value, the valid range and the fix, never a traceback or a silent run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from images import BROKEN_KINDS, broken_image

from visadapt.cli import main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("visadapt: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- tracking --------------------------------------------------------------------------------------------------

def _frame_folder(folder, n, size=64):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:08d}.png")
    return folder


@pytest.mark.parametrize("box", ["500,500,20,20", "-30,-30,20,20", "10,70,5,5"])
def test_track_run_refuses_a_first_box_outside_the_frame(tmp_path, tracking_pipeline_dir, capsys, box):
    frames = _frame_folder(tmp_path / "frames", 3)
    code = main(["track", "run", str(frames), f"--box={box}", "--model", str(tracking_pipeline_dir), "--out",
                 str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    line = _one_line_error(capsys)
    assert "64x64" in line and "outside" in line
    assert not (tmp_path / "out" / "boxes.txt").exists()


def test_track_eval_refuses_a_first_groundtruth_box_outside_the_frame(tmp_path, tracking_pipeline_dir, capsys):
    seq = _frame_folder(tmp_path / "seq", 4)
    np.savetxt(seq / "groundtruth.txt", [[500, 500, 20, 20]] + [[10, 10, 20, 20]] * 3, fmt="%d", delimiter=",")
    code = main(["track", "eval", str(tracking_pipeline_dir), "--data", f"folder:{seq}", "--out", str(tmp_path / "out"),
                 "--device", "cpu"])
    assert code == 2
    assert "outside the 64x64 first frame" in _one_line_error(capsys)


def test_groundtruth_with_more_rows_than_frames_is_refused(tmp_path, tracking_pipeline_dir, capsys):
    from visadapt.tracking.datasets import read_folder
    from visadapt.utils import DatasetLayoutError

    seq = _frame_folder(tmp_path / "seq", 12)
    np.savetxt(seq / "groundtruth.txt", [[10, 10, 20, 20]] * 20, fmt="%d", delimiter=",")
    with pytest.raises(DatasetLayoutError, match="20 boxes for 12 frames"):
        read_folder(seq)
    code = main(["track", "eval", str(tracking_pipeline_dir), "--data", f"folder:{seq}", "--out", str(tmp_path / "out"),
                 "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(seq / "groundtruth.txt") in err and "20 boxes for 12 frames" in err
    assert not (tmp_path / "out").exists()


def test_track_train_refuses_sequences_whose_boxes_all_lie_outside_the_frame(tmp_path, capsys):
    for name in ("a", "b"):
        seq = _frame_folder(tmp_path / "data" / name, 4)
        np.savetxt(seq / "groundtruth.txt", [[300, 300, 20, 20]] * 4, fmt="%d", delimiter=",")
    code = main(["track", "train", "--variant", "demo", "--data", f"folder:{tmp_path / 'data' / 'a'}", "--data",
                 f"folder:{tmp_path / 'data' / 'b'}", "--epochs", "1", "--samples-per-epoch", "2", "--out",
                 str(tmp_path / "run")])
    assert code == 2
    line = _one_line_error(capsys)
    assert "no annotated box overlaps its frame" in line and "64x64" in line and "(300.0, 300.0, 20.0, 20.0)" in line
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


# --- incremental -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """4 classes of 3 tiny images each in the imagefolder layout (train rows 0..11, class c at rows 3c..3c+2)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(4):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _incremental(root, out, *extra):
    return main(["incremental", "train", "--dataset", "imagefolder", "--root", str(root), "--base-classes", "2",
                 "--way", "1", "--sessions", "3", "--shots", "1", "--backbone", "visadapt-demo-clip",
                 "--epochs-base", "0", "--epochs-incremental", "0", "--out", str(out), *extra])


@pytest.mark.parametrize("row", ["99999", "-1", "12"])
def test_incremental_refuses_an_index_list_row_out_of_range_before_training(tmp_path, image_folder, capsys, row):
    index_list = tmp_path / "list.txt"
    index_list.write_text(f"2 6\n3 {row}\n")
    assert _incremental(image_folder, tmp_path / "run", "--index-list", str(index_list)) == 2
    line = _one_line_error(capsys)
    assert f"{index_list}:2: sample index {row} is outside 0..11" in line
    assert not list((tmp_path / "run").iterdir())  # nothing half-written: the fixed list reruns into the same --out


def test_read_index_list_names_the_line_of_a_bad_row(tmp_path):
    from visadapt.incremental.sessions import read_index_list

    path = tmp_path / "list.txt"
    path.write_text("0 1\n\n1 -1\n")
    assert read_index_list(path) == {0: [1], 1: [-1]}  # without the split size: parsed as written
    with pytest.raises(ValueError, match=r"list.txt:3: sample index -1 is outside 0\.\.4"):
        read_index_list(path, 5)
    path.write_text("-2 1\n")
    with pytest.raises(ValueError, match=r"list.txt:1: class id -2 is negative"):
        read_index_list(path, 5)


@pytest.mark.parametrize("flag", ["--sessions", "--way", "--base-classes", "--shots"])
def test_incremental_refuses_zero_sessions_way_base_classes_and_shots(tmp_path, image_folder, capsys, flag):
    with pytest.raises(SystemExit) as stop:  # the declared range, checked as the command line is parsed
        _incremental(image_folder, tmp_path / "run", flag, "0")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"argument {flag}: must be an integer >= 1" in err and "got 0" in err
    assert not (tmp_path / "run").exists()


# --- hyperspectral ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hsi_scene(tmp_path_factory):
    from visadapt.utils.worlds.spectra import synthetic_scene, write_scene_mat

    scene = synthetic_scene(height=24, width=24, bands=20, classes=3, seed=1)
    data, gt = write_scene_mat(scene, tmp_path_factory.mktemp("scene"), "small")
    return scene, data, gt


def _hsi_train(data, gt, out, *extra):
    return main(["hsi", "train", "--data", str(data), "--data-key", "small", "--gt", str(gt), "--gt-key", "small_gt",
                 "--out", str(out), "--model", "lola_specvit_tiny", "--pca", "4", "--patch", "5", "--epochs", "1",
                 *extra])


def test_hsi_train_refuses_an_unknown_model_with_the_valid_names(hsi_scene, tmp_path, capsys):
    _, data, gt = hsi_scene
    assert _hsi_train(data, gt, tmp_path / "run", "--model", "lola_specvit_nope") == 2
    line = _one_line_error(capsys)
    assert "lola_specvit_nope" in line and "lola_specvit_base, lola_specvit_small, lola_specvit_tiny" in line


def test_hsi_train_refuses_a_per_class_count_a_class_cannot_give(hsi_scene, tmp_path, capsys):
    scene, data, gt = hsi_scene
    assert _hsi_train(data, gt, tmp_path / "run", "--train", "1000") == 2
    line = _one_line_error(capsys)
    sizes = np.bincount(scene.gt.ravel())[1:]
    smallest = int(sizes.argmin())
    assert "--train 1000: 3 class(es)" in line and f"class {smallest + 1} ({sizes[smallest]})" in line
    assert f"below {sizes[smallest]}" in line
    assert not (tmp_path / "run" / "results.json").exists()


def test_stratified_split_names_the_short_classes():
    from visadapt.hyperspectral.data import stratified_split

    gt = np.zeros((10, 10), dtype=np.int64)
    gt[:2] = 1  # 20 pixels
    gt[2:3] = 2  # 10 pixels
    with pytest.raises(ValueError, match=r"1 class\(es\).*grass \(10\)\. Lower --train below 10"):
        stratified_split(gt, 10, class_names=["tree", "grass"])
    assert len(stratified_split(gt, 9).train) == 18  # 9 per class, one test pixel left in class 2


# --- image files of the task loaders ---------------------------------------------------------------------------

def _fewshot_load(path):
    from torchvision import transforms

    from visadapt.fewshot.data import ImageDataset, Item

    return ImageDataset([Item(path, 0, "x")], transforms.ToTensor())[0]


def _incremental_load(path):
    from visadapt.incremental.data import files_source

    return files_source([path], [0], path.parent).load(0)


def _tracking_load(path):
    from visadapt.tracking.datasets import read_frame

    return read_frame(path)


def _tracking_size(path):
    from visadapt.tracking.datasets import TrackingSequence, image_size

    return image_size(TrackingSequence("s", [path], np.zeros((1, 4)), np.ones(1, dtype=bool)))


@pytest.mark.parametrize("kind", BROKEN_KINDS)
@pytest.mark.parametrize("load, fix", [(_fewshot_load, "re-download it, or remove it together with its entry"),
                                       (_incremental_load, "re-download the dataset's file, or remove it"),
                                       (_tracking_load, "re-extract or re-download the frame"),
                                       (_tracking_size, "re-extract or re-download the frame")])
def test_task_image_loaders_refuse_a_broken_file_in_one_line(tmp_path, kind, load, fix):
    """A corrupt file, a truncated one and a decompression bomb (20000x20000 claimed in a 60-byte PNG) stop with
    one line naming the file and the fix, a ValueError/OSError the CLI prints without a traceback."""
    if load is _tracking_size and kind == "truncated":
        pytest.skip("the size comes from the header, which a truncated file still has")
    path = broken_image(tmp_path / "data" / "img 1.png", kind)
    with pytest.raises((ValueError, OSError)) as err:
        load(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    if kind == "huge":  # the fix is the limit's: downscale, or raise it
        assert "20000x20000" in text and "downscale it" in text and "VISADAPT_MAX_IMAGE_PIXELS=<pixels>" in text
    else:
        assert fix in text


def test_the_task_loaders_take_the_pixel_limit_from_the_environment(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (48, 48), (9, 8, 7)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refused over 2000 pixels
    with pytest.raises(ValueError, match="48x48"):
        _tracking_load(path)
    monkeypatch.setenv("VISADAPT_MAX_IMAGE_PIXELS", "5000")
    assert _tracking_load(path).shape == (48, 48, 3)
    assert _incremental_load(path).size == (48, 48)


@pytest.mark.parametrize("kind", ["truncated", "huge"])
def test_track_run_prints_one_line_for_a_broken_frame(tmp_path, tracking_pipeline_dir, capsys, kind):
    frames = _frame_folder(tmp_path / "frames", 3)
    broken_image(frames / "00000001.png", kind)
    code = main(["track", "run", str(frames), "--box=10,10,20,20", "--model", str(tracking_pipeline_dir), "--out",
                 str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    line = _one_line_error(capsys)
    assert str(frames / "00000001.png") in line
    assert ("downscale it" if kind == "huge" else "re-extract or re-download the frame") in line


def test_incremental_train_prints_one_line_for_a_huge_image(tmp_path, image_folder, capsys):
    root = shutil.copytree(image_folder, tmp_path / "images")
    huge = broken_image(root / "test" / "c1" / "2.png", "huge")
    assert _incremental(root, tmp_path / "run") == 2
    line = _one_line_error(capsys)
    assert str(huge) in line and "20000x20000" in line and "VISADAPT_MAX_IMAGE_PIXELS" in line


@pytest.mark.parametrize("load_with", ["fewshot", "tracking"])
def test_a_broken_image_met_in_a_dataloader_worker_is_still_one_line(tmp_path, load_with):
    """torch re-raises a worker's error with the worker's traceback in its message (--workers N); the CLI prints
    the error's own line."""
    from torch.utils.data import DataLoader

    from visadapt.cli import user_message

    path = broken_image(tmp_path / "img 1.png", "truncated")
    if load_with == "fewshot":
        from torchvision import transforms

        from visadapt.fewshot.data import ImageDataset, Item

        dataset = ImageDataset([Item(path, 0, "x")], transforms.ToTensor())
    else:
        dataset = [path]
    loader = (DataLoader(dataset, num_workers=1) if load_with == "fewshot" else  # frames: read_frame per item
              DataLoader(dataset, num_workers=1, batch_size=None, collate_fn=_tracking_load))
    with pytest.raises((ValueError, OSError)) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # what torch hands back
    assert user_message(err.value) == f"{path}: cannot read the image (image file is truncated); " + (
        "the file is corrupt or unreadable: re-download it, or remove it together with its entry in the split file."
        if load_with == "fewshot" else
        "re-extract or re-download the frame (a sequence needs every frame), or drop the sequence.")
