"""The dataset readers on tiny fake datasets written in the exact official layouts."""

from __future__ import annotations

import itertools
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from visadapt.incremental.data import load_dataset
from visadapt.utils import DatasetLayoutError, UntrustedFileError


def _write_cifar(root, n_classes=100, per_class=2):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        labels = [c for c in range(n_classes) for _ in range(per_class)]
        data = rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:  # the official files are Python-2 pickles with bytes keys
            pickle.dump({b"filenames": [b"x.png"] * len(labels), b"fine_labels": labels, b"coarse_labels": labels,
                         b"data": data}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(n_classes)]}, f)
    return data


def test_cifar100_python_files(tmp_path):
    last = _write_cifar(tmp_path)
    data = load_dataset("cifar100", str(tmp_path))
    assert len(data.class_names) == 100 and data.class_names[3] == "class3"
    assert len(data.train) == 200 and list(data.train.labels[:3]) == [0, 0, 1]
    image = np.asarray(data.test.load(5))
    assert image.shape == (32, 32, 3)
    assert np.array_equal(image, last[5].reshape(3, 32, 32).transpose(1, 2, 0))  # CHW rows → HWC pixels


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_cifar_reader_refuses_code_in_a_pickle(tmp_path):
    _write_cifar(tmp_path, n_classes=2, per_class=1)
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": _Payload()}, f)
    with pytest.raises(UntrustedFileError, match="meta: refusing to unpickle code"):
        load_dataset("cifar100", str(tmp_path))


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def test_cub200_files_keep_images_txt_order(tmp_path):
    cub = tmp_path / "CUB_200_2011"
    rows = [(1, "001.Black_footed_Albatross/a.jpg", 1, 1), (2, "002.Laysan_Albatross/b.jpg", 2, 0),
            (3, "001.Black_footed_Albatross/c.jpg", 1, 0), (4, "002.Laysan_Albatross/d.jpg", 2, 1)]
    for i, rel, _, _ in rows:
        _image(cub / "images" / rel, i * 10)
    (cub / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (cub / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (cub / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (cub / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    data = load_dataset("cub200", str(tmp_path))
    assert data.class_names == ["Black_footed_Albatross", "Laysan_Albatross"]
    assert data.train.names == ["images/001.Black_footed_Albatross/a.jpg", "images/002.Laysan_Albatross/d.jpg"]
    assert list(data.train.labels) == [0, 1] and list(data.test.labels) == [1, 0]
    assert np.asarray(data.train.load(1))[0, 0, 0] == 40


def test_mini_imagenet_labels_are_sorted_wnids(tmp_path):
    mini = tmp_path / "miniimagenet"
    (mini / "split").mkdir(parents=True)
    (mini / "split" / "train.csv").write_text("filename,label\nn02.jpg,n02\nn01.jpg,n01\n")
    (mini / "split" / "test.csv").write_text("filename,label\nt1.jpg,n01\n")
    for name in ("n02.jpg", "n01.jpg", "t1.jpg"):
        _image(mini / "images" / name, 5)
    data = load_dataset("mini_imagenet", str(tmp_path))
    assert data.class_names == ["n01", "n02"] and list(data.train.labels) == [1, 0] and list(data.test.labels) == [0]


def test_image_folders_and_layout_errors(tmp_path):
    for split in ("train", "test"):
        for c in ("b", "a"):
            _image(tmp_path / "dtd" / split / c / "0.png", 1)
    data = load_dataset("dtd", str(tmp_path / "dtd"))
    assert data.class_names == ["a", "b"] and len(data.test) == 2
    with pytest.raises(DatasetLayoutError, match="cifar-100-python"):
        load_dataset("cifar100", str(tmp_path))
    with pytest.raises(DatasetLayoutError, match="images.txt"):
        load_dataset("cub200", str(tmp_path))
    with pytest.raises(DatasetLayoutError, match="split/train.csv"):
        load_dataset("mini_imagenet", str(tmp_path))
    with pytest.raises(ValueError, match="needs --root"):
        load_dataset("cifar100", None)


def test_coop_split_files(tmp_path):
    import json

    dtd = tmp_path / "dtd"
    entries = {"train": [["banded/a.jpg", 0, "banded"], ["woven/b.jpg", 1, "woven"]],
               "val": [], "test": [["woven/c.jpg", 1, "woven"]]}
    for split in entries.values():
        for rel, _, _ in split:
            _image(dtd / "images" / rel, 9)
    (dtd / "split_zhou_DescribableTextures.json").write_text(json.dumps(entries))
    data = load_dataset("dtd", str(tmp_path))  # found in a child folder of --root
    assert data.class_names == ["banded", "woven"] and list(data.train.labels) == [0, 1]
    assert data.test.names == ["images/woven/c.jpg"] and np.asarray(data.test.load(0)).shape == (8, 8, 3)


def _write_cifar_for_standard_list(root, pools):
    """A CIFAR-100 layout with the real train split's 50,000 rows (blank images): the rows the official list names
    for classes 60-64 carry their class, two free rows each base class, every other row class 99."""
    labels = np.full(50000, 99)
    listed = {row for rows in pools.values() for row in rows}
    free = iter(sorted(set(range(50000)) - listed))
    for c in range(60):
        labels[[next(free), next(free)]] = c
    for c in range(60, 65):
        labels[pools[c]] = c
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, split_labels in (("train", labels), ("test", np.arange(100))):
        with open(folder / split, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * len(split_labels), b"fine_labels": split_labels.tolist(),
                         b"coarse_labels": split_labels.tolist(),
                         b"data": np.zeros((len(split_labels), 3072), np.uint8)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}, f)


def test_official_recipe_on_cifar100_trains_on_the_standard_samples(tmp_path):
    # the official code reads its shipped index list, the first --shots lines of a class (CEC's 5-shot samples
    # first), whenever it runs CIFAR-100; no flag picks them
    from visadapt.cli import main
    from visadapt.incremental.sessions import read_index_list, standard_index_list

    standard = standard_index_list("cifar100")
    assert standard is not None and standard.parent.name == "index_lists"
    pools = read_index_list(standard)
    assert len(pools) == 100 and {len(p) for p in pools.values()} == {32}
    _write_cifar_for_standard_list(tmp_path / "data", pools)
    small = ["--backbone", "visadapt-demo-clip", "--sessions", "2", "--epochs-base", "0", "--adapt-blocks", "2",
             "--ft-start-layer", "500", "--seed", "1"]
    run = tmp_path / "official"
    assert main(["incremental", "train", "--official-recipe", "--dataset", "cifar100", "--root",
                 str(tmp_path / "data"), "--out", str(run), *small]) == 0
    assert read_index_list(run / "index_list.txt") == pools
    config = json.loads((run / "run_config.json").read_text())
    assert config["index_list"] is None and config["shots"] == 5
    session = json.loads((run / "session_1" / "results.json").read_text())
    assert session["train_images"] == 25 and session["new_classes"] == [60, 61, 62, 63, 64]
    # a user's own draw stays an option
    drawn = tmp_path / "drawn"
    assert main(["incremental", "train", "--official-recipe", "--index-list", "draw", "--dataset", "cifar100",
                 "--root", str(tmp_path / "data"), "--out", str(drawn), *small]) == 0
    assert read_index_list(drawn / "index_list.txt")[60] != pools[60]


# ------------------------------------------------------------------------------------------- the demo's world
def test_pattern_world_pairs_every_shape_with_every_kind_once_and_is_seeded():
    from visadapt.utils.worlds.shapes import PATTERN_CLASSES, PATTERN_KINDS, PATTERN_SHAPES, pattern_samples

    assert sorted(PATTERN_CLASSES) == sorted(itertools.product(PATTERN_SHAPES, PATTERN_KINDS))
    # the demo's base session (the first five classes) holds every shape and every texture kind
    assert {c[0] for c in PATTERN_CLASSES[:5]} == set(PATTERN_SHAPES)
    assert {c[1] for c in PATTERN_CLASSES[:5]} == set(PATTERN_KINDS)
    first = [np.asarray(im) for im, _ in pattern_samples(PATTERN_CLASSES[:2], 3, (1, 0))]
    again = [np.asarray(im) for im, _ in pattern_samples(PATTERN_CLASSES[:2], 2, (1, 0))]
    other = [np.asarray(im) for im, _ in pattern_samples(PATTERN_CLASSES[:2], 3, (2, 0))]
    assert len(first) == 6 and first[0].shape == (32, 32, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first[:2] + first[3:5], again))  # n does not shift a class
    assert not any(np.array_equal(a, b) for a, b in zip(first, other))
    with pytest.raises(ValueError, match="kind one of"):
        next(pattern_samples([("circle", "wavy")], 1))


def test_pattern_world_leaves_the_shapes_world_as_it_was():
    # the new period parameter and kinds must not move a draw of the shapes world (other tasks' demos use it)
    from visadapt.utils.worlds import shapes

    scene = shapes.Scene("circle", "red", "striped", "large")
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(shapes.render_array(scene, a), shapes.render_array(scene, b, period=4.0))
    assert a.random() == b.random()  # the same number of draws
    assert set(shapes.PATTERN_KINDS) - set(shapes.TEXTURES) == {"barred", "ringed"}  # never in sample_scene


def test_the_demo_tower_tells_the_shapes_apart_but_barely_the_texture_kinds():
    """The premise of the demo's world: frozen features separate what the demo CLIP was pretrained on (shapes) and
    hardly the cue the classes add (texture kinds), so there is something for the base session to teach. Measured
    (seeds 1-3, nearest class mean of 30 images on 20 a class): shapes 91.0 / 91.3 / 90.0 % (chance 33 %), kinds
    38.7 / 38.7 / 36.3 % (chance 20 %)."""
    import torch
    import torch.nn.functional as F

    from visadapt.incremental.data import eval_transform
    from visadapt.incremental.demo import DEMO_CLASSES, demo_data
    from visadapt.incremental.model import load_open_clip
    from visadapt.incremental.train import embed_all
    from visadapt.utils.worlds.models import DEMO_CLIP_DIR
    from visadapt.utils.worlds.shapes import PATTERN_KINDS, PATTERN_SHAPES

    tower = load_open_clip(f"local-dir:{DEMO_CLIP_DIR}", None)
    transform = eval_transform(tower.image_size, tower.mean, tower.std)
    data = demo_data(1)
    x_train, y_train = embed_all(tower.trunk, data.train, transform, 100)
    x_test, y_test = embed_all(tower.trunk, data.test, transform, 100)

    def ncm(values, factor):
        to = torch.tensor([values.index(c[factor]) for c in DEMO_CLASSES])
        rows = torch.stack([x_train[to[y_train] == v].mean(0) for v in range(len(values))])
        guess = (F.normalize(x_test, dim=1) @ F.normalize(rows, dim=1).T).argmax(1)
        return (guess == to[y_test]).float().mean().item()

    assert ncm(PATTERN_SHAPES, 0) > 0.8
    assert ncm(PATTERN_KINDS, 1) < 0.5
