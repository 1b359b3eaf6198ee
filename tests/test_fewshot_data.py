"""CoOp-layout datasets, the CLIP-LoRA few-shot draw and the training image dataset, on tiny fixture folders."""

import io
import json
import random
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from visadapt.fewshot.data import (
    COOP_DATASETS_URL,
    DATASETS,
    DatasetLayoutError,
    FewShot,
    ImageDataset,
    Item,
    Split,
    load_split,
    sample_few_shot,
    save_json_atomic,
)

CLASSNAMES = ["face", "beta gamma", "Annual Crop Land"]
COUNTS = {"train": 4, "val": 2, "test": 3}  # per class
# key: (CoOp folder, CLIP-LoRA folder, image folder, split file, relative path of image i of class c in a split)
ZHOU = {
    "caltech101": ("caltech-101", "Caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   "{c}/image_{i:04d}.jpg"),
    "oxford_pets": ("oxford_pets", "OxfordPets", "images", "split_zhou_OxfordPets.json", "{c}_{i}.jpg"),
    "stanford_cars": ("stanford_cars", "StanfordCars", "", "split_zhou_StanfordCars.json", "{cars}/{i:05d}.jpg"),
    "oxford_flowers": ("oxford_flowers", "Flower102", "jpg", "split_zhou_OxfordFlowers.json", "image_{i:05d}.jpg"),
    "food101": ("food-101", "Food101", "images", "split_zhou_Food101.json", "{c}/{i}.jpg"),
    "sun397": ("sun397", "SUN397", "SUN397", "split_zhou_SUN397.json", "a/{c}/sun_{i}.jpg"),
    "dtd": ("dtd", "DTD", "images", "split_zhou_DescribableTextures.json", "{c}/{c}_{i:04d}.jpg"),
    "eurosat": ("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "{c}/{c}_{i}.jpg"),
    "ucf101": ("ucf101", "UCF101", "UCF-101-midframes", "split_zhou_UCF101.json", "{c}/v_{c}_g{i:02d}.jpg"),
}
WNIDS = ["n01440764", "n01443537", "n01484850"]
VARIANTS = ["707-320", "Boeing 737-200", "F-16A/B"]


@lru_cache
def _image_bytes(suffix: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(buf, format="PNG" if suffix == ".png" else "JPEG")
    return buf.getvalue()


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(path.suffix.lower()))
    return path


def make_zhou(data: Path, key: str, folder: str | None = None) -> Path:
    """A dataset folder with 3 classes and COUNTS images per class and split, plus its split_zhou JSON."""
    coop, _, image_dir, split_file, pattern = ZHOU[key]
    dataset_dir = data / (folder or coop)
    split, i = {}, 0
    for part, n in COUNTS.items():
        split[part] = []
        for label, name in enumerate(CLASSNAMES):
            for _ in range(n):
                i += 1
                cars = "cars_test" if part == "test" else "cars_train"
                rel = pattern.format(c=name.replace(" ", "_"), i=i, cars=cars)
                write_image(dataset_dir / image_dir / rel)
                split[part].append([rel, label, name])
    (dataset_dir / split_file).write_text(json.dumps(split))
    return dataset_dir


def make_fgvc(data: Path) -> Path:
    folder = data / "fgvc_aircraft"
    folder.mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    image_id = 1000000
    for part, n in COUNTS.items():
        lines = []
        for variant in VARIANTS:
            for _ in range(n):
                image_id += 1
                write_image(folder / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {variant}")
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    return folder


def make_imagenet(data: Path, nested: bool = True, classnames: bool = True, n_train: int = 6) -> Path:
    folder = data / "imagenet"
    images = folder / "images" if nested else folder
    for k, wnid in enumerate(WNIDS):
        for i in range(n_train):
            write_image(images / "train" / wnid / f"{wnid}_{i}.JPEG")
        for i in range(2):
            write_image(images / "val" / wnid / f"ILSVRC2012_val_{k}{i:07d}.JPEG")
    if classnames:
        (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, CLASSNAMES)))
    return folder


def check_split(split: Split, counts: dict[str, int] = COUNTS, classnames: list[str] = CLASSNAMES) -> None:
    assert split.classnames == classnames
    for part, n in counts.items():
        items = getattr(split, part)
        assert Counter(it.label for it in items) == {label: n for label in range(len(classnames))}, part
        for it in items:
            assert it.path.is_absolute() and it.path.is_file()
            assert it.classname == classnames[it.label]


# --- parsing -----------------------------------------------------------------------------------------------------


def test_every_coop_dataset_has_a_spec():
    assert set(DATASETS) == {*ZHOU, "imagenet", "fgvc_aircraft", "imagefolder"}
    for key, (coop, clip_lora, image_dir, split_file, _) in ZHOU.items():
        spec = DATASETS[key]
        assert spec.aliases[0] == coop and clip_lora in spec.aliases
        assert spec.split_file == split_file and spec.image_dirs == (image_dir,)


@pytest.mark.parametrize("key", sorted(ZHOU))
@pytest.mark.parametrize("scheme", [0, 1], ids=["coop-name", "clip-lora-name"])
def test_zhou_datasets(tmp_path, key, scheme):
    dataset_dir = make_zhou(tmp_path, key, folder=ZHOU[key][scheme])
    split = load_split(key, tmp_path)
    assert split.name == key
    check_split(split)
    assert split.train[0].path == dataset_dir / ZHOU[key][2] / ZHOU[key][4].format(c="face", i=1, cars="cars_train")
    assert load_split(key, dataset_dir) == split  # --root at the dataset folder itself


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path):
    dataset_dir = make_zhou(tmp_path, "stanford_cars")
    split = load_split("stanford_cars", tmp_path)
    assert {it.path.parent for it in split.train + split.val} == {dataset_dir / "cars_train"}
    assert {it.path.parent for it in split.test} == {dataset_dir / "cars_test"}


def test_coop_name_wins_and_folder_names_work_as_dataset_names(tmp_path):
    make_zhou(tmp_path, "oxford_pets", folder="OxfordPets")
    coop = make_zhou(tmp_path, "oxford_pets")
    assert load_split("OxfordPets", tmp_path).train[0].path.is_relative_to(coop)


def test_fgvc_aircraft(tmp_path):
    folder = make_fgvc(tmp_path)
    split = load_split("fgvc_aircraft", tmp_path)
    check_split(split, classnames=VARIANTS)
    assert split.train[4] == Item(folder / "images" / "1000005.jpg", 1, "Boeing 737-200")


@pytest.mark.parametrize("nested", [True, False], ids=["coop-images-train", "clip-lora-train"])
def test_imagenet(tmp_path, nested):
    folder = make_imagenet(tmp_path, nested=nested)
    split = load_split("imagenet", tmp_path)
    check_split(split, counts={"train": 6, "test": 2})
    assert split.val == []
    images = folder / "images" if nested else folder
    assert split.train[0] == Item(images / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG", 0, "face")
    assert all(it.path.parent.parent == images / "val" for it in split.test)
    assert load_split("imagenet", folder) == split


def test_imagenet_without_classnames_txt_uses_clips_names_for_1000_classes(tmp_path):
    for k in range(1000):
        write_image(tmp_path / "imagenet" / "train" / f"n{k:08d}" / "a.JPEG")
    write_image(tmp_path / "imagenet" / "val" / "n00000000" / "b.JPEG")
    split = load_split("imagenet", tmp_path)
    assert len(split.classnames) == 1000 and split.classnames[:2] == ["tench", "goldfish"]
    assert split.test == [Item(tmp_path / "imagenet" / "val" / "n00000000" / "b.JPEG", 0, "tench")]


def test_imagefolder_with_train_val_test(tmp_path):
    for part, n in COUNTS.items():
        for name in ["tabby_cat", "golden_retriever", "zebra"]:
            for i in range(n):
                write_image(tmp_path / part / name / f"{i}.png")
    split = load_split("imagefolder", tmp_path)
    assert split.name == "imagefolder"
    check_split(split, classnames=["golden retriever", "tabby cat", "zebra"])


def test_imagefolder_of_class_folders_is_split_per_class(tmp_path, keep_global_random):
    sizes = {"bird": 10, "cat_face": 2, "dog": 3}
    for name, n in sizes.items():
        for i in range(n):
            write_image(tmp_path / name / f"{i:02d}.jpeg")
    (tmp_path / "README.txt").write_text("not a class")
    split = load_split("imagefolder", tmp_path)
    assert split.classnames == ["bird", "cat face", "dog"]
    per_class = {part: Counter(it.label for it in getattr(split, part)) for part in ("train", "val", "test")}
    assert per_class == {"train": {0: 5, 1: 1, 2: 1}, "val": {0: 2, 2: 1}, "test": {0: 3, 1: 1, 2: 1}}
    paths = [it.path for it in split.train + split.val + split.test]
    assert len(set(paths)) == len(paths) == sum(sizes.values())
    random.seed(123)
    assert load_split("imagefolder", tmp_path) == split  # a fixed split, whatever the global random state


# --- few-shot sampling ----------------------------------------------------------------------------------------------


def synthetic_split(n_train: int = 20, n_val: int = 10, n_classes: int = 3) -> Split:
    """Labels interleaved, last class first, so 'order of first appearance' differs from label order."""
    def items(part, n):
        return [Item(Path(f"/d/{part}/{label}_{i}.jpg"), label, f"c{label}")
                for i in range(n) for label in reversed(range(n_classes))]

    return Split("toy", [f"c{k}" for k in range(n_classes)], items("train", n_train), items("val", n_val),
                 items("test", 2))


def clip_lora_reference(split: Split, shots: int, seed: int, val_first: bool = True):
    """CLIP-LoRA's datasets/utils.py generate_fewshot_dataset (repeat=True) on the global ``random``."""
    def generate(source, num_shots):
        tracker = defaultdict(list)
        for item in source:
            tracker[item.label].append(item)
        out = []
        for items in tracker.values():
            out += random.sample(items, num_shots) if len(items) >= num_shots else random.choices(items, k=num_shots)
        return out

    random.seed(seed)
    if val_first:
        val = generate(split.val, min(shots, 4))
        return generate(split.train, shots), val
    train = generate(split.train, shots)
    return train, generate(split.val, min(shots, 4))


def imagenet_reference(split: Split, shots: int, seed: int):
    """CLIP-LoRA's datasets/imagenet.py: per class one random.sample of shots + min(shots, 4) train images."""
    random.seed(seed)
    by_label = defaultdict(list)
    for item in split.train:
        by_label[item.label].append(item)
    train, val = [], []
    for items in by_label.values():
        samples = random.sample(items, shots + min(4, shots))
        train += samples[:shots]
        val += samples[shots:]
    return train, val


@pytest.fixture
def keep_global_random():
    state = random.getstate()
    yield
    random.setstate(state)


@pytest.mark.parametrize("shots", [1, 2, 4, 16])
def test_counts_per_class(shots):
    fs = sample_few_shot(synthetic_split(), shots, seed=1)
    assert Counter(it.label for it in fs.train) == {0: shots, 1: shots, 2: shots}
    assert Counter(it.label for it in fs.val) == {0: min(shots, 4), 1: min(shots, 4), 2: min(shots, 4)}
    assert len(set(fs.train)) == len(fs.train) and all("/train/" in str(it.path) for it in fs.train)
    assert all("/val/" in str(it.path) for it in fs.val)
    assert [it.label for it in fs.train[:shots]] == [2] * shots  # labels in order of first appearance


def test_same_seed_same_draw_other_seed_other_draw():
    split = synthetic_split()
    assert sample_few_shot(split, 4, seed=1) == sample_few_shot(split, 4, seed=1)
    assert sample_few_shot(split, 4, seed=1).train != sample_few_shot(split, 4, seed=2).train


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shots", [1, 4, 8])
def test_matches_clip_lora_code_on_the_global_random_module(keep_global_random, seed, shots):
    split = synthetic_split()
    train, val = clip_lora_reference(split, shots, seed)
    assert sample_few_shot(split, shots, seed) == FewShot(train, val)
    train, val = clip_lora_reference(split, shots, seed, val_first=False)
    assert sample_few_shot(split, shots, seed, order="coop") == FewShot(train, val)


def test_val_first_changes_the_train_images():
    split = synthetic_split(n_train=10, n_val=10, n_classes=1)
    draws = [(sample_few_shot(split, 2, s).train, sample_few_shot(split, 2, s, order="coop").train)
             for s in range(1, 6)]
    assert any(clip_lora != coop for clip_lora, coop in draws)


def test_classes_with_fewer_images_than_shots_stop_with_their_names(keep_global_random):
    split = synthetic_split(n_train=3, n_val=2)
    with pytest.raises(ValueError, match=r"--shots 8: 3 class\(es\) hold fewer training images: c0 \(3\)"):
        sample_few_shot(split, 8, seed=1)
    fs = sample_few_shot(split, 8, seed=1, short_classes="repeat")  # opt-in: with replacement
    assert Counter(it.label for it in fs.train) == {0: 8, 1: 8, 2: 8}
    assert set(fs.train) <= set(split.train) and len(set(fs.train)) < len(fs.train)  # repeats
    assert fs == FewShot(*clip_lora_reference(split, 8, 1))
    distinct = {f"c{k}": len({it.path for it in fs.train if it.label == k}) for k in range(3)}
    assert fs.to_json()["train_images"] == distinct and max(distinct.values()) <= 3  # the real counts, recorded
    every = sample_few_shot(split, 8, seed=1, short_classes="all")  # opt-in: what there is
    assert Counter(it.label for it in every.train) == {0: 3, 1: 3, 2: 3}


@pytest.mark.parametrize("shots", [1, 2, 8])
def test_split_without_val_draws_train_and_val_together_like_clip_lora_imagenet(keep_global_random, shots):
    split = synthetic_split(n_train=20, n_val=0)
    fs = sample_few_shot(split, shots, seed=3)
    assert fs == FewShot(*imagenet_reference(split, shots, 3))
    assert Counter(it.label for it in fs.val) == {0: min(shots, 4), 1: min(shots, 4), 2: min(shots, 4)}
    assert not set(fs.train) & set(fs.val)
    small = sample_few_shot(synthetic_split(n_train=3, n_val=0), 4, seed=3, short_classes="repeat")
    assert len(small.train) == 12 and len(small.val) == 12


def test_bad_shots_and_order():
    with pytest.raises(ValueError, match="shots must be >= 1"):
        sample_few_shot(synthetic_split(), 0, seed=1)
    with pytest.raises(ValueError, match="order must be"):
        sample_few_shot(synthetic_split(), 1, seed=1, order="tip-adapter")


def test_few_shot_json_round_trip(tmp_path):
    fs = sample_few_shot(load_split("fgvc_aircraft", make_fgvc(tmp_path)), 2, seed=1)
    save_json_atomic(fs.to_json(), tmp_path / "out" / "fewshot.json")
    save_json_atomic(fs.to_json(), tmp_path / "out" / "fewshot.json")  # overwrites
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["fewshot.json"]  # no temp file left behind
    data = json.loads((tmp_path / "out" / "fewshot.json").read_text())
    assert data["train"][0][1:] in ([0, "707-320"], [1, "Boeing 737-200"], [2, "F-16A/B"])
    assert FewShot.from_json(data) == fs


# --- ImageDataset ---------------------------------------------------------------------------------------------------


@pytest.fixture
def noise_image(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(path)
    return Item(path, 7, "noise")


def test_image_dataset_returns_tensor_and_label(noise_image):
    ds = ImageDataset([noise_image], transforms.ToTensor())
    x, y = ds[0]
    assert len(ds) == 1 and y == 7 and isinstance(x, torch.Tensor) and x.shape == (3, 32, 32)


def test_aug_seed_makes_random_augmentation_reproducible(noise_image):
    tf = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.1, 1.0)), transforms.ToTensor()])
    ds = ImageDataset([noise_image], tf)
    torch.manual_seed(5)
    a = ds[(0, 123)][0]
    after = torch.rand(1)
    torch.manual_seed(6)
    b = ds[(0, 123)][0]
    torch.manual_seed(5)
    assert torch.rand(1) == after  # the global RNG is left alone
    assert torch.equal(a, b) and a.shape == (3, 16, 16)
    assert not torch.equal(a, ds[(0, 124)][0])
    assert ds[0][0].shape == (3, 16, 16)  # a plain index still works


@pytest.mark.parametrize("content", [b"not an image", "truncated"])
def test_corrupt_image_error_names_the_file(tmp_path, content):
    path = tmp_path / "broken" / "img 1.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
        content = buf.getvalue()[:200]
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(OSError, match=r"(?s)broken/img 1\.jpg.*re-download it, or remove it"):
        ImageDataset([Item(path, 0, "x")], transforms.ToTensor())[0]


# --- layout errors ------------------------------------------------------------------------------------------------


def layout_error(dataset: str, root: Path) -> str:
    with pytest.raises(DatasetLayoutError) as info:
        load_split(dataset, root)
    message = str(info.value)
    assert "Expected layout for" in message and "Fix: " in message
    return message


def test_empty_root(tmp_path):
    message = layout_error("oxford_pets", tmp_path)
    assert "is empty" in message and "--root" in message
    assert "oxford_pets/" in message and "OxfordPets/" in message and "split_zhou_OxfordPets.json" in message


def test_missing_root_and_other_datasets_only(tmp_path):
    assert "does not exist" in layout_error("caltech101", tmp_path / "nope")
    make_zhou(tmp_path, "dtd")
    message = layout_error("caltech101", tmp_path)
    assert "Found instead: " in message and "dtd/" in message and "caltech-101/" in message
    assert "101_ObjectCategories" in message


@pytest.mark.parametrize("point_at", ["data", "dataset"])
def test_images_without_split_file(tmp_path, point_at):
    write_image(tmp_path / "oxford_pets" / "images" / "a_1.jpg")
    message = layout_error("oxford_pets", tmp_path if point_at == "data" else tmp_path / "oxford_pets")
    assert "lacks split_zhou_OxfordPets.json" in message and COOP_DATASETS_URL in message
    assert "images/" in message  # what was found instead


def test_sun397_folder_itself_is_not_mistaken_for_its_image_folder(tmp_path):
    write_image(tmp_path / "sun397" / "SUN397" / "a" / "abbey" / "1.jpg")
    assert "lacks split_zhou_SUN397.json" in layout_error("sun397", tmp_path / "sun397")


def test_split_file_problems(tmp_path):
    dataset_dir = make_zhou(tmp_path, "eurosat")
    split_file = dataset_dir / "split_zhou_EuroSAT.json"
    good = json.loads(split_file.read_text())

    split_file.write_text('{"train": [')
    assert "split_zhou_EuroSAT.json is not valid JSON" in layout_error("eurosat", tmp_path)

    split_file.write_text(json.dumps({"train": good["train"], "val": good["val"]}))
    message = layout_error("eurosat", tmp_path)
    assert "has no list under key(s) ['test']" in message and str(split_file) in message

    split_file.write_text(json.dumps({**good, "val": good["val"] + [["x.jpg", 0, "other name"]]}))
    assert "label 0 is named both 'face' and 'other name'" in layout_error("eurosat", tmp_path)

    split_file.write_text(json.dumps({**good, "test": good["test"] + [["x.jpg", 5, "five"]]}))
    assert "labels must be 0..C-1" in layout_error("eurosat", tmp_path)

    split_file.write_text(json.dumps({**good, "test": good["test"] + [["x.jpg", "0"]]}))
    assert "is not [relpath, label, classname]" in layout_error("eurosat", tmp_path)


def test_missing_images_are_listed(tmp_path):
    dataset_dir = make_zhou(tmp_path, "food101")
    missing = sorted((dataset_dir / "images" / "face").iterdir())[:2]
    for path in missing:
        path.unlink()
    message = layout_error("food101", tmp_path)
    assert f"2 of {3 * sum(COUNTS.values())} images listed in" in message
    assert all(str(p) in message for p in missing)
    assert "food-101/" in message


def test_missing_image_folder(tmp_path):
    make_zhou(tmp_path, "ucf101", folder="UCF101")
    for path in sorted((tmp_path / "UCF101").rglob("*"), reverse=True):
        if path.name != "split_zhou_UCF101.json":
            path.unlink() if path.is_file() else path.rmdir()
    assert "lacks UCF-101-midframes/" in layout_error("ucf101", tmp_path)


def test_fgvc_problems(tmp_path):
    folder = make_fgvc(tmp_path)
    with (folder / "images_variant_val.txt").open("a") as f:
        f.write("1000001 Boeing 747\n")
    assert "variant 'Boeing 747' of image 1000001 is not in variants.txt" in layout_error("fgvc_aircraft", tmp_path)
    (folder / "variants.txt").unlink()
    message = layout_error("fgvc_aircraft", tmp_path)
    assert "lacks variants.txt" in message and "images_variant_train.txt" in message


def test_imagenet_problems(tmp_path):
    make_imagenet(tmp_path, classnames=False)
    message = layout_error("imagenet", tmp_path)
    assert "no classnames.txt" in message and "holds 3" in message
    val = make_imagenet(tmp_path / "b") / "images" / "val"
    write_image(val / "n99999999" / "x.JPEG")
    assert "n99999999 is not a class of the train split" in layout_error("imagenet", tmp_path / "b")
    for path in sorted(val.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    val.rmdir()
    assert "lacks val/" in layout_error("imagenet", tmp_path / "b")


def test_imagefolder_problems(tmp_path):
    assert "train/<class>/*.jpg" in layout_error("imagefolder", tmp_path)
    write_image(tmp_path / "test" / "cat" / "1.png")
    assert "lacks train/" in layout_error("imagefolder", tmp_path)
    write_image(tmp_path / "b" / "cat" / "1.png")
    assert "fewer than 2 images" in layout_error("imagefolder", tmp_path / "b")


def test_unknown_dataset_lists_the_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'pets'; valid names: imagenet, caltech101") as info:
        load_split("pets", tmp_path)
    assert not isinstance(info.value, DatasetLayoutError)
