"""Tracking dataset readers on miniature copies of each official layout (tiny real JPEGs, written per test)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visadapt.tracking.datasets import (
    LAYOUTS,
    READERS,
    FrameList,
    TrackingSequence,
    clean_sequence,
    clean_sequences,
    load_sequences,
    read_coco,
    read_got10k,
    read_lasot,
    read_lasot_ext,
    read_tnl2k,
    read_trackingnet,
)
from visadapt.utils import DatasetLayoutError

W, H = 40, 30


def _image(path: Path, size=(W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)


def _lasot_sequence(folder: Path, boxes, occlusion, out_of_view, language="a red thing") -> None:
    for i in range(len(boxes)):
        _image(folder / "img" / f"{i + 1:08d}.jpg")
    (folder / "groundtruth.txt").write_text("".join(",".join(map(str, b)) + "\n" for b in boxes))
    (folder / "full_occlusion.txt").write_text(",".join(map(str, occlusion)))
    (folder / "out_of_view.txt").write_text(",".join(map(str, out_of_view)))
    if language is not None:
        (folder / "nlp.txt").write_text(language + "\n")


@pytest.fixture
def lasot(tmp_path):
    root = tmp_path / "LaSOT"
    box = [5, 6, 10, 8]
    _lasot_sequence(root / "airplane" / "airplane-1", [[1, 1, 4, 3], box, box], [0, 1, 0], [0, 0, 1])
    _lasot_sequence(root / "airplane" / "airplane-10", [box, box], [0, 0], [0, 0], language=None)
    _lasot_sequence(root / "airplane" / "airplane-2", [box, [0, 0, 0, 0]], [0, 0], [0, 0])
    (root / "training_set.txt").write_text("airplane-1\nairplane-10\n")
    (root / "testing_set.txt").write_text("airplane-2\n")
    return root


def test_lasot_shift_flags_split_and_language(lasot):
    train = read_lasot(lasot, "train")
    assert [s.name for s in train] == ["airplane-1", "airplane-10"]
    seq = train[0]
    assert seq.boxes[0].tolist() == [0, 0, 4, 3]  # 1-based (1, 1) is pixel (0, 0)
    assert seq.boxes[1].tolist() == [4, 5, 10, 8]
    assert seq.visible.tolist() == [True, False, False]  # full occlusion in frame 2, out of view in frame 3
    assert seq.meta.pop("visible_flags").tolist() == [True, False, False]  # the flags alone, for OPE
    assert seq.meta == {"category": "airplane", "language": "a red thing"}
    assert seq.dataset == "lasot" and len(seq) == 3
    assert seq.frames[0] == lasot / "airplane" / "airplane-1" / "img" / "00000001.jpg"
    assert all(p.is_file() for p in seq.frames)
    assert "language" not in train[1].meta
    test = read_lasot(lasot, "test")
    assert [s.name for s in test] == ["airplane-2"] and test[0].visible.tolist() == [True, False]  # empty box
    # all sequences in natural order: airplane-2 before airplane-10
    assert [s.name for s in load_sequences("lasot", lasot)] == ["airplane-1", "airplane-2", "airplane-10"]


def test_lasot_without_list_reads_all_with_a_warning(lasot):
    (lasot / "training_set.txt").unlink()
    with pytest.warns(UserWarning, match="training_set.txt is missing"):
        assert len(read_lasot(lasot, "train")) == 3


def test_lasot_ext_reads_every_sequence_shifted(tmp_path):
    root = tmp_path / "LaSOT_Extension"
    _lasot_sequence(root / "atv" / "atv-1", [[3, 3, 5, 5]], [0], [0])
    _lasot_sequence(root / "wingsuit" / "wingsuit-1", [[3, 3, 5, 5], [4, 4, 5, 5]], [0, 0], [1, 0])
    sequences = load_sequences("lasot_ext", root, "test")
    assert [s.name for s in sequences] == ["atv-1", "wingsuit-1"]
    assert sequences[1].boxes[1].tolist() == [3, 3, 5, 5] and sequences[1].visible.tolist() == [False, True]
    assert sequences[1].dataset == "lasot_ext"


def _got10k(root: Path, split: str, names, frames=3, test=False) -> None:
    (root / split).mkdir(parents=True)
    (root / split / "list.txt").write_text("\n".join(names) + "\n")
    for name in names:
        folder = root / split / name
        for i in range(frames):
            _image(folder / f"{i + 1:08d}.jpg")
        rows = 1 if test else frames
        (folder / "groundtruth.txt").write_text("".join(f"{1 + i},2.5,10,8\n" for i in range(rows)))
        if not test:
            (folder / "absence.label").write_text("0\n1\n" + "0\n" * (frames - 2))
            (folder / "cover.label").write_text("8\n0\n" + "5\n" * (frames - 2))


def test_got10k_train_test_and_vottrain_split_file(tmp_path):
    names = [f"GOT-10k_Train_{i:06d}" for i in (1, 2, 3)]
    _got10k(tmp_path, "train", names)
    _got10k(tmp_path, "test", ["GOT-10k_Test_000001"], frames=4, test=True)
    train = read_got10k(tmp_path, "train")
    assert [s.name for s in train] == names
    assert train[0].boxes[1].tolist() == [2, 2.5, 10, 8] and train[0].visible.tolist() == [True, False, True]
    assert train[0].meta["cover"].tolist() == [8, 0, 5]
    assert list(train[0].frames) == sorted((tmp_path / "train" / names[0]).glob("*.jpg"))
    test = read_got10k(tmp_path, "test")[0]
    assert len(test) == 4 and test.boxes[0].tolist() == [1, 2.5, 10, 8] and np.isnan(test.boxes[1:]).all()
    assert test.visible.tolist() == [True, False, False, False]
    # pytracking's split files hold 0-based indices into train/list.txt; names work too
    (tmp_path / "vot_train.txt").write_text("2\n0\n")
    vot = load_sequences("got10k", tmp_path, "vottrain", split_file=tmp_path / "vot_train.txt")
    assert [s.name for s in vot] == [names[2], names[0]]
    (tmp_path / "vot_val.txt").write_text(names[1] + "\n")
    assert [s.name for s in read_got10k(tmp_path, "votval", tmp_path / "vot_val.txt")] == [names[1]]
    with pytest.raises(DatasetLayoutError, match="needs its split file"):
        read_got10k(tmp_path, "vottrain")
    (tmp_path / "bad.txt").write_text("7\n")
    with pytest.raises(DatasetLayoutError, match="index 7"):
        read_got10k(tmp_path, "vottrain", split_file=tmp_path / "bad.txt")


def test_scores_read_flags_where_the_official_evaluation_does(lasot, tmp_path):
    from visadapt.tracking.evaluate import score

    # LaSOT airplane-2, frame 1: no box but flagged visible — official OPE counts it a normalised-precision hit
    seq = read_lasot(lasot, "test")[0]
    pred = seq.boxes.copy()
    pred[1] = [20, 20, 10, 8]
    r = score([pred], [seq])
    assert r["norm_precision"] == 1.0 and r["precision"] == 0.5 and r["strict"]["norm_precision"] == 0.5
    # GOT-10k: the absence flag of frame 1 leaves OPE alone; AO bounds the boxes to the 40×30 image (frame 2's
    # prediction starts 7 px left of it and moves in: IoU 7·8 / (80 + 80 − 56)); cover 0 drops frame 1 from AO
    _got10k(tmp_path, "train", ["GOT-10k_Train_000001"])
    seq = read_got10k(tmp_path, "train")[0]
    pred = seq.boxes.copy()
    pred[2, 0] = -7
    r = score([pred], [seq])
    exact = 20 / 21  # IoU 1 passes every threshold but τ = 1 (strict >); frame 2 misses (pixel-inclusive IoU 0)
    assert r["auc"] == pytest.approx(2 * exact / 3) and r["strict"]["auc"] == pytest.approx(exact / 3)
    assert r["ao"] == pytest.approx(56 / 104)


def _trackingnet(root: Path, chunk: str, name: str, frames: int, test: bool = False) -> None:
    for i in range(frames):
        _image(root / chunk / "frames" / name / f"{i}.jpg")
    rows = 1 if test else frames
    anno = root / chunk / "anno" / f"{name}.txt"
    anno.parent.mkdir(parents=True, exist_ok=True)
    anno.write_text("".join(f"{i},{i},6,5\n" for i in range(rows)))


def test_trackingnet_chunks_numeric_frames_and_first_frame_test(tmp_path):
    _trackingnet(tmp_path, "TRAIN_0", "abc_0", 12)
    _trackingnet(tmp_path, "TRAIN_1", "xyz_1", 2)
    _trackingnet(tmp_path, "TEST", "tst_0", 12, test=True)
    train = read_trackingnet(tmp_path, "train")
    assert [(s.name, s.meta["chunk"]) for s in train] == [("abc_0", "TRAIN_0"), ("xyz_1", "TRAIN_1")]
    assert [p.name for p in train[0].frames][8:] == ["8.jpg", "9.jpg", "10.jpg", "11.jpg"]
    assert train[0].boxes[10].tolist() == [10, 10, 6, 5] and train[0].visible.all()
    assert [s.name for s in read_trackingnet(tmp_path, "TRAIN_1")] == ["xyz_1"]
    test = load_sequences("trackingnet", tmp_path, "test")[0]
    assert [p.name for p in test.frames] == [f"{i}.jpg" for i in range(12)]  # 10.jpg after 9.jpg, not after 1.jpg
    assert test.boxes[0].tolist() == [0, 0, 6, 5] and np.isnan(test.boxes[1:]).all()
    assert test.visible.tolist() == [True] + [False] * 11


def test_tnl2k_frames_boxes_language(tmp_path):
    for name, n in (("Seq_A", 3), ("Seq_B", 2)):
        for i in range(n):
            _image(tmp_path / name / "imgs" / f"{i + 1:05d}.png")
        (tmp_path / name / "groundtruth.txt").write_text("".join(f"{i},1,4,4\n" for i in range(n)))
        (tmp_path / name / "language.txt").write_text(f"the {name}\n")
    for i in range(11):  # unpadded names: img10 comes after img9
        _image(tmp_path / "Seq_C" / "imgs" / f"img{i}.jpg")
    (tmp_path / "Seq_C" / "groundtruth.txt").write_text("1,1,4,4\n" * 11)
    sequences = read_tnl2k(tmp_path)
    assert [s.name for s in sequences] == ["Seq_A", "Seq_B", "Seq_C"]
    assert [p.name for p in sequences[2].frames][-3:] == ["img8.jpg", "img9.jpg", "img10.jpg"]
    assert sequences[0].meta["language"] == "the Seq_A" and sequences[0].boxes[2].tolist() == [2, 1, 4, 4]
    assert [p.name for p in sequences[0].frames] == ["00001.png", "00002.png", "00003.png"]
    (tmp_path / "Seq_B" / "groundtruth.txt").write_text("0,1,4,4\n")
    with pytest.raises(DatasetLayoutError, match="1 boxes for 2 frames"):
        read_tnl2k(tmp_path)


def _coco(root: Path) -> None:
    _image(root / "images" / "train2017" / "000000000001.jpg", (W, H))
    _image(root / "images" / "train2017" / "000000000002.jpg", (20, 10))
    data = {"images": [{"id": 1, "file_name": "000000000001.jpg", "width": W, "height": H},
                       {"id": 2, "file_name": "000000000002.jpg", "width": 20, "height": 10}],
            "categories": [{"id": 3, "name": "car"}, {"id": 5, "name": "dog"}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1.5, 2, 10, 5], "iscrowd": 0},
                {"id": 11, "image_id": 1, "category_id": 5, "bbox": [0, 0, 30, 20], "iscrowd": 1},  # crowd
                {"id": 12, "image_id": 2, "category_id": 5, "bbox": [3, 3, 0, 4], "iscrowd": 0},  # no area
                {"id": 13, "image_id": 2, "category_id": 5, "bbox": [15, 2, 10, 4], "iscrowd": 0}]}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))


def test_coco_objects_are_length_one_tracks(tmp_path):
    _coco(tmp_path)
    tracks = read_coco(tmp_path, "train")
    assert [t.name for t in tracks] == ["1_10", "2_13"]
    first = tracks[0]
    assert len(first) == 1 and first.frames[0] == tmp_path / "images" / "train2017" / "000000000001.jpg"
    assert first.boxes.tolist() == [[1.5, 2, 10, 5]] and first.visible.tolist() == [True]
    assert first.meta == {"image_size": (W, H), "image_id": 1, "category": "car"} and first.dataset == "coco"
    cleaned = clean_sequences(tracks)  # 2_13 sticks out of its 20×10 image: clipped to x2 = 20
    assert [t.boxes.tolist() for t in cleaned] == [[[1.5, 2, 10, 5]], [[15, 2, 5, 4]]]


def test_cleaning_clips_drops_and_trims(tmp_path):
    frames = [tmp_path / f"{i}.jpg" for i in range(6)]
    for f in frames:
        _image(f)
    boxes = np.array([[np.nan] * 4,  # unannotated head
                      [-5, 2, 10, 4],  # left edge outside: clipped to x1 = 0
                      [10, 10, 5, 5],  # invisible (occluded): dropped
                      [35, 25, 10, 10],  # clipped to the 40×30 image
                      [50, 5, 5, 5],  # entirely outside: empty after clipping, dropped
                      [1, 1, 0, 3]])  # no width: dropped → trimmed tail
    visible = np.array([False, True, False, True, True, False])
    seq = TrackingSequence("s", frames, boxes, visible, "test")
    cleaned = clean_sequence(seq)  # image size from the first frame's header (40×30)
    assert cleaned.frames == frames[1:4] and cleaned.meta["first_frame"] == 1
    assert cleaned.boxes[0].tolist() == [0, 2, 5, 4] and cleaned.boxes[2].tolist() == [35, 25, 5, 5]
    assert np.isnan(cleaned.boxes[1]).all() and cleaned.visible.tolist() == [True, False, True]
    assert clean_sequence(seq, size=(30, 20)).frames == frames[1:2]  # a given size: frame 3 now lies outside
    assert clean_sequence(TrackingSequence("e", frames[:1], boxes[4:5], visible[4:5])) is None
    assert seq.boxes[1].tolist() == [-5, 2, 10, 4]  # the input is not modified


def test_cleaning_keeps_frame_lists_lazy(lasot):
    seq = read_lasot(lasot, "test")[0]
    cleaned = clean_sequence(seq)  # frame 2 has an empty box: trimmed
    assert isinstance(seq.frames, FrameList) and isinstance(cleaned.frames, FrameList)
    assert list(cleaned.frames) == [lasot / "airplane" / "airplane-2" / "img" / "00000001.jpg"]


def test_frame_list_behaves_like_a_list(tmp_path):
    frames = FrameList(tmp_path, "{:08d}.jpg", 4, start=1)
    expected = [tmp_path / f"{i:08d}.jpg" for i in range(1, 5)]
    assert frames == expected and list(frames) == expected and frames[-1] == expected[-1]
    assert frames[1:3] == expected[1:3] and frames[::2] == expected[::2] and len(frames[2:]) == 2
    with pytest.raises(IndexError):
        frames[4]


def _broken_trees(tmp_path: Path):
    """(reader name, root, split, a line of the expected tree) for a tree with one file missing."""
    lasot = tmp_path / "lasot"
    _lasot_sequence(lasot / "cat" / "cat-1", [[1, 1, 2, 2]], [0], [0])
    (lasot / "cat" / "cat-1" / "out_of_view.txt").unlink()
    ext = tmp_path / "ext"
    _lasot_sequence(ext / "atv" / "atv-1", [[1, 1, 2, 2], [1, 1, 2, 2]], [0], [0, 0])  # one flag for 2 frames
    got = tmp_path / "got"
    _got10k(got, "train", ["GOT-10k_Train_000001"])
    (got / "train" / "GOT-10k_Train_000001" / "00000001.jpg").unlink()
    tn = tmp_path / "tn"
    (tn / "TRAIN_0" / "frames").mkdir(parents=True)
    tnl = tmp_path / "tnl"
    _image(tnl / "Seq" / "img" / "00001.jpg")  # img/ instead of imgs/
    (tnl / "Seq" / "groundtruth.txt").write_text("0,0,2,2\n")
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_val2017.json").write_text("{}")
    (coco / "images" / "val2017").mkdir(parents=True)
    folder = tmp_path / "folder"
    _image(folder / "img" / "00000001.jpg")
    return [("lasot", lasot, None, "full_occlusion.txt"), ("lasot_ext", ext, None, "LaSOT_Extension/"),
            ("got10k", got, "train", "list.txt"), ("trackingnet", tn, "train", "anno/<sequence>.txt"),
            ("tnl2k", tnl, None, "language.txt"), ("coco", coco, "val", "instances_train2017.json"),
            ("folder", folder, None, "groundtruth.txt")]


def test_each_reader_shows_its_layout_on_a_broken_tree(tmp_path):
    cases = _broken_trees(tmp_path)
    assert {name for name, *_ in cases} == set(READERS) == set(LAYOUTS)
    for name, root, split, tree_line in cases:
        with pytest.raises(DatasetLayoutError) as error:
            load_sequences(name, root, split)
        message = str(error.value)
        assert f"Expected layout ({name}):" in message and tree_line in message and "Fix:" in message, message


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown tracking dataset"):
        load_sequences("otb", ".")
    with pytest.raises(ValueError, match="unknown LaSOT split"):
        read_lasot(".", "val")
    with pytest.raises(ValueError, match="only a test split"):
        read_lasot_ext(".", "train")
    with pytest.raises(ValueError, match="TrackingNet split"):
        read_trackingnet(".", "val")
