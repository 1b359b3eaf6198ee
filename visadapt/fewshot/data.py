"""The 11 CoOp few-shot benchmarks on disk, the CLIP-LoRA few-shot draw, and an image dataset for training.

Supported layouts, under ``root`` (CoOp's ``$DATA``; the dataset folder itself is accepted too). Each dataset
folder may carry its CoOp DATASETS.md name or the name the CLIP-LoRA code uses; the CoOp name is tried first:

- caltech101, oxford_pets, stanford_cars, oxford_flowers, food101, sun397, dtd, eurosat, ucf101: the image folder
  plus K. Zhou's ``split_zhou_<Name>.json`` (``{"train"|"val"|"test": [[relpath, label, classname], ...]}``), the
  paths relative to the image folder (StanfordCars: relative to the dataset folder).
- fgvc_aircraft: ``data/`` of fgvc-aircraft-2013b: ``variants.txt`` (label = line index),
  ``images_variant_{train,val,test}.txt`` with lines ``<image id> <variant name>`` and ``images/<id>.jpg``.
- imagenet: ImageFolder ``train/`` and ``val/`` (under ``images/`` as in CoOp, or directly as in CLIP-LoRA), class
  names from ``classnames.txt`` (lines ``<wnid> <name>``) or, when that file is absent and there are 1000 classes,
  CLIP's curated list shipped with open_clip. There is no val split; the official val images are the test split.
- imagefolder (any dataset): ``train/<class>/*``, ``test/<class>/*`` and optionally ``val/<class>/*``; or just
  ``<class>/*``, split per class (see `load_split`).

`DATASETS` holds the expected tree of each; every layout problem raises one `DatasetLayoutError` that shows it.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from visadapt.utils import DatasetLayoutError, save_json_atomic  # noqa: F401  (re-exported)
from visadapt.utils.images import open_rgb

COOP_DATASETS_URL = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
# torchvision ImageFolder's list, so that ImageNet items (and hence few-shot draws) match CLIP-LoRA's.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One labelled image."""

    path: Path
    label: int
    classname: str


@dataclass
class Split:
    """A dataset's full train/val/test splits; ``classnames[label]`` is the name used in prompts."""

    name: str
    classnames: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]


@dataclass
class FewShot:
    """The few-shot train and val subsets of one (dataset, shots, seed)."""

    train: list[Item]
    val: list[Item]

    def to_json(self) -> dict:
        """``{"train": [[path, label, classname], ...], "val": [...]}``, the form of the split_zhou files, plus the
        number of distinct training images of each class (``train_images``; below the shots when a class had
        fewer)."""
        distinct: dict[str, set] = defaultdict(set)
        for it in self.train:
            distinct[it.classname].add(str(it.path))
        return {"train": [[str(it.path), it.label, it.classname] for it in self.train],
                "val": [[str(it.path), it.label, it.classname] for it in self.val],
                "train_images": {name: len(paths) for name, paths in distinct.items()}}

    @classmethod
    def from_json(cls, d: dict) -> FewShot:
        """The inverse of `to_json`."""
        def items(rows: list) -> list[Item]:
            return [Item(Path(path), int(label), str(classname)) for path, label, classname in rows]

        return cls(items(d["train"]), items(d["val"]))


@dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset lives: folder names (CoOp's first), image folder candidates and split file."""

    name: str  # the `DATASETS` key
    title: str
    aliases: tuple[str, ...]
    image_dirs: tuple[str, ...]  # relative to the dataset folder, first existing one wins; "" = the folder itself
    split_file: str | None  # the split_zhou JSON, None where the splits come from elsewhere
    contents: str  # the dataset folder's expected entries, one per line

    @property
    def layout(self) -> str:
        """The expected tree under ``root``, for error messages."""
        if not self.aliases:  # imagefolder: root is the dataset folder
            return self.contents
        folder = f"  {self.aliases[0]}/"
        if len(self.aliases) > 1:
            folder += f"   (or {', '.join(a + '/' for a in self.aliases[1:])}, as in the CLIP-LoRA code)"
        lines = ["$DATA/   <- pass this folder as --root (or the dataset folder itself)", folder]
        return "\n".join(lines + ["    " + line for line in self.contents.splitlines()])


def _zhou(name: str, title: str, aliases: tuple[str, ...], image_dir: str, split_file: str,
          images: str) -> DatasetSpec:
    """A dataset whose splits come from a split_zhou JSON."""
    return DatasetSpec(name, title, aliases, (image_dir,), split_file,
                       f"{images}\n{split_file}   (from {COOP_DATASETS_URL})")


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec(
        "imagenet", "ImageNet", ("imagenet",), ("images", ""), None,
        "images/train/n01440764/*.JPEG ...   (1000 class folders; or train/ without images/, as in CLIP-LoRA)\n"
        "images/val/n01440764/*.JPEG ...     (the official val images re-foldered by class; the test split)\n"
        "classnames.txt                      (lines '<wnid> <class name>', from the CoOp DATASETS.md)"),
    _zhou("caltech101", "Caltech101", ("caltech-101", "Caltech101"), "101_ObjectCategories",
          "split_zhou_Caltech101.json", "101_ObjectCategories/<class>/*.jpg"),
    _zhou("oxford_pets", "OxfordPets", ("oxford_pets", "OxfordPets"), "images", "split_zhou_OxfordPets.json",
          "images/*.jpg"),
    _zhou("stanford_cars", "StanfordCars", ("stanford_cars", "StanfordCars"), "", "split_zhou_StanfordCars.json",
          "cars_train/*.jpg\ncars_test/*.jpg"),
    _zhou("oxford_flowers", "Flowers102", ("oxford_flowers", "Flower102"), "jpg", "split_zhou_OxfordFlowers.json",
          "jpg/*.jpg"),
    _zhou("food101", "Food101", ("food-101", "Food101"), "images", "split_zhou_Food101.json", "images/<class>/*.jpg"),
    DatasetSpec(
        "fgvc_aircraft", "FGVCAircraft", ("fgvc_aircraft",), ("images",), None,
        "images/<image id>.jpg\n"
        "variants.txt                        (one variant name per line; label = line index)\n"
        "images_variant_train.txt            (lines '<image id> <variant name>')\n"
        "images_variant_val.txt\n"
        "images_variant_test.txt             (the folder is data/ of fgvc-aircraft-2013b.tar.gz, renamed)"),
    _zhou("sun397", "SUN397", ("sun397", "SUN397"), "SUN397", "split_zhou_SUN397.json",
          "SUN397/<letter>/<class>/*.jpg"),
    _zhou("dtd", "DTD", ("dtd", "DTD"), "images", "split_zhou_DescribableTextures.json", "images/<class>/*.jpg"),
    _zhou("eurosat", "EuroSAT", ("eurosat",), "2750", "split_zhou_EuroSAT.json", "2750/<Class>/*.jpg"),
    _zhou("ucf101", "UCF101", ("ucf101", "UCF101"), "UCF-101-midframes", "split_zhou_UCF101.json",
          "UCF-101-midframes/<Action>/*.jpg"),
    DatasetSpec(
        "imagefolder", "an image folder", (), ("",), None,
        "<root>/   <- pass this folder as --root\n"
        "  train/<class>/*.jpg\n"
        "  val/<class>/*.jpg     (optional)\n"
        "  test/<class>/*.jpg\n"
        "or\n"
        "<root>/\n"
        "  <class>/*.jpg         (split per class: 50% train / 20% val / 30% test)"),
)}


def _spec(dataset: str) -> DatasetSpec:
    """Look a dataset up by key or by one of its folder names (``OxfordPets``, ``caltech-101``), any case."""
    wanted = dataset.lower()
    for spec in DATASETS.values():
        if wanted == spec.name or wanted in (a.lower() for a in spec.aliases):
            return spec
    raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")


def _layout_error(spec: DatasetSpec, problem: str, fix: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"{problem}\n\nExpected layout for {spec.title}:\n{spec.layout}\n\nFix: {fix}")


def _listing(folder: Path, limit: int = 8) -> str:
    """What ``folder`` holds, for 'found instead' in error messages."""
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in folder.iterdir())
    if not entries:
        return f"{folder} is empty"
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return f"{folder} holds: {', '.join(entries[:limit])}{more}"


def _dataset_dir(spec: DatasetSpec, root: Path) -> Path:
    """The dataset folder: ``root`` itself if it is one, else the child of ``root`` named like the dataset."""
    markers = {"imagenet": ["classnames.txt", "train", "images/train"], "fgvc_aircraft": ["variants.txt"]}.get(
        spec.name, [spec.split_file])
    # Checked before the children, because SUN397 holds an image folder named like the dataset.
    if root.name.lower() in (a.lower() for a in spec.aliases) or any((root / m).exists() for m in markers):
        return root
    if root.is_dir():
        for alias in spec.aliases:
            if (root / alias).is_dir():
                return root / alias
        by_name = {c.name.lower(): c for c in root.iterdir() if c.is_dir()}
        for alias in spec.aliases:
            if alias.lower() in by_name:
                return by_name[alias.lower()]
    raise _layout_error(
        spec, f"No {spec.title} folder ({' or '.join(a + '/' for a in spec.aliases)}) in --root {root}.\n"
              f"Found instead: {_listing(root)}.",
        f"pass --root the folder that contains `{spec.aliases[0]}/`, or `{spec.aliases[0]}/` itself.")


def _require(spec: DatasetSpec, folder: Path, names: Sequence[str], fix: str) -> None:
    """Raise unless every entry of ``names`` exists in ``folder``."""
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise _layout_error(spec, f"{folder} lacks {', '.join(missing)}.\nFound instead: {_listing(folder)}.", fix)


def _check_classes(spec: DatasetSpec, source: str | Path, classnames: list[str], splits: dict[str, list[Item]]) -> None:
    """Every class needs a train image, or the few-shot draw would silently skip it."""
    untrained = sorted(set(range(len(classnames))) - {it.label for it in splits["train"]})
    if untrained:
        raise _layout_error(spec, f"{source}: no train images for class(es) {[classnames[i] for i in untrained[:5]]}.",
                            "give every class at least one train image.")


def _check_files_exist(spec: DatasetSpec, source: str | Path, image_dir: Path, splits: dict[str, list[Item]]) -> None:
    items = [it for part in splits.values() for it in part]
    missing = [str(it.path) for it in items if not os.path.isfile(it.path)]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise _layout_error(spec, f"{len(missing)} of {len(items)} images listed in {source} are missing, e.g.:\n"
                                  f"  {shown}",
                            f"extract the complete image archive so that the listed paths resolve under {image_dir}.")


def _read_zhou(spec: DatasetSpec, folder: Path) -> tuple[list[str], dict[str, list[Item]]]:
    """Read a split_zhou JSON, paths resolved against the image folder."""
    source = folder / spec.split_file
    fetch = f"download {spec.split_file} (linked in {COOP_DATASETS_URL}) into {folder}."
    _require(spec, folder, [spec.split_file], fetch)
    image_dir = folder / spec.image_dirs[0]
    if spec.image_dirs[0]:  # StanfordCars paths start at the dataset folder
        _require(spec, folder, [spec.image_dirs[0] + "/"], f"extract the images into {image_dir}.")
    try:
        raw = json.loads(source.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _layout_error(spec, f"{source} is not valid JSON ({e}).", f"re-{fetch}") from e
    absent = [s for s in _SPLITS if not isinstance(raw, dict) or not isinstance(raw.get(s), list)]
    if absent:
        raise _layout_error(spec, f"{source} has no list under key(s) {absent}; a split file holds "
                                  '{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}.',
                            f"re-{fetch}")
    splits: dict[str, list[Item]] = {}
    names: dict[int, str] = {}
    for part in _SPLITS:
        splits[part] = []
        for entry in raw[part]:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and isinstance(entry[2], str)):
                raise _layout_error(spec, f"{source}: {part} entry {entry!r} is not [relpath, label, classname].",
                                    f"re-{fetch}")
            relpath, label, classname = entry
            if names.setdefault(label, classname) != classname:
                raise _layout_error(spec, f"{source}: label {label} is named both {names[label]!r} and "
                                          f"{classname!r}.", f"re-{fetch}")
            splits[part].append(Item(image_dir / relpath, label, classname))
    if sorted(names) != list(range(len(names))):
        raise _layout_error(spec, f"{source}: labels must be 0..C-1 without gaps, found {sorted(names)[:10]}...",
                            f"re-{fetch}")
    classnames = [names[i] for i in range(len(names))]
    _check_classes(spec, source, classnames, splits)
    _check_files_exist(spec, source, image_dir, splits)
    return classnames, splits


def _read_fgvc(spec: DatasetSpec, folder: Path) -> tuple[list[str], dict[str, list[Item]]]:
    """Read fgvc-aircraft-2013b's variant lists (the class name is all of the line after the image id)."""
    lists = [f"images_variant_{part}.txt" for part in _SPLITS]
    image_dir = folder / spec.image_dirs[0]
    _require(spec, folder, [spec.image_dirs[0] + "/", "variants.txt", *lists],
             "use the data/ folder of fgvc-aircraft-2013b.tar.gz, renamed to fgvc_aircraft/.")
    classnames = [line.strip() for line in (folder / "variants.txt").read_text().splitlines() if line.strip()]
    label_of = {name: i for i, name in enumerate(classnames)}
    splits: dict[str, list[Item]] = {}
    for part, list_file in zip(_SPLITS, lists):
        splits[part] = []
        for line in (folder / list_file).read_text().splitlines():
            image_id, _, variant = line.strip().partition(" ")
            if not image_id:
                continue
            if variant not in label_of:
                raise _layout_error(spec, f"{folder / list_file}: variant {variant!r} of image {image_id} is not in "
                                          "variants.txt.", "use the unmodified fgvc-aircraft-2013b files.")
            splits[part].append(Item(image_dir / f"{image_id}.jpg", label_of[variant], variant))
    _check_classes(spec, folder / lists[0], classnames, splits)
    _check_files_exist(spec, folder / "images_variant_*.txt", image_dir, splits)
    return classnames, splits


def _class_folders(folder: Path) -> list[Path]:
    """Sub-folders in ImageFolder's order (sorted names), hidden ones skipped."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, in torchvision ImageFolder's order."""
    found = []
    for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
        found += [Path(dirpath) / f for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _read_class_folders(spec: DatasetSpec, folder: Path, label_of: dict[str, int],
                        classnames: list[str]) -> list[Item]:
    """Items of ``folder/<class>/*``, labelled by ``label_of`` (the train folder's classes)."""
    items = []
    for class_dir in _class_folders(folder):
        if class_dir.name not in label_of:
            raise _layout_error(spec, f"{class_dir} is not a class of the train split.",
                                "use the same class folders in every split.")
        label = label_of[class_dir.name]
        items += [Item(p, label, classnames[label]) for p in _images_in(class_dir)]
    if not items:
        raise _layout_error(spec, f"No images in class folders under {folder}.\nFound instead: {_listing(folder)}.",
                            "put the images in one sub-folder per class.")
    return items


def _read_imagenet(spec: DatasetSpec, folder: Path) -> tuple[list[str], dict[str, list[Item]]]:
    """ImageFolder train/ and val/ (the test split), labels = sorted wnids as in torchvision's ImageFolder."""
    images = next((folder / d for d in spec.image_dirs if (folder / d / "train").is_dir()), folder)
    _require(spec, images, ["train/", "val/"], f"put ImageFolder-style train/ and val/ under {folder / 'images'}.")
    wnids = [d.name for d in _class_folders(images / "train")]
    names_file = folder / "classnames.txt"
    if names_file.is_file():
        names = {}
        for line in names_file.read_text().splitlines():
            wnid, _, name = line.strip().partition(" ")
            if wnid:
                names[wnid] = name
        unnamed = [w for w in wnids if w not in names]
        if unnamed:
            raise _layout_error(spec, f"{names_file} has no name for class folder(s) {unnamed[:5]}.",
                                f"download classnames.txt from {COOP_DATASETS_URL}.")
        classnames = [names[w] for w in wnids]
    elif len(wnids) == 1000:
        # The CLIP-LoRA code hard-codes CLIP's curated names; open_clip ships the same list, in sorted-wnid order.
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        classnames = list(IMAGENET_CLASSNAMES)
    else:
        raise _layout_error(spec, f"{folder} has no classnames.txt (needed unless train/ holds the 1000 ImageNet "
                                  f"classes; it holds {len(wnids)}).\nFound instead: {_listing(folder)}.",
                            f"download classnames.txt from {COOP_DATASETS_URL} into {folder}.")
    label_of = {w: i for i, w in enumerate(wnids)}
    splits = {"train": _read_class_folders(spec, images / "train", label_of, classnames), "val": [],
              "test": _read_class_folders(spec, images / "val", label_of, classnames)}
    _check_classes(spec, images / "train", classnames, splits)
    return classnames, splits


def _split_per_class(files: list[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """50% train / 20% val / 30% test (rounded, at least 1 test) of one class's images, after shuffling the sorted
    names with ``random.Random(0)``: the same every run, whatever the few-shot seed or the other classes."""
    files = sorted(files)
    random.Random(0).shuffle(files)
    n_test = max(1, round(0.3 * len(files)))
    n_val = round(0.2 * len(files))
    test, val, train = files[:n_test], files[n_test:n_test + n_val], files[n_test + n_val:]
    return sorted(train), sorted(val), sorted(test)


def _read_imagefolder(spec: DatasetSpec, folder: Path) -> tuple[list[str], dict[str, list[Item]]]:
    """train/ + test/ (+ val/) class folders, or bare class folders split by `_split_per_class`."""
    if not folder.is_dir():
        raise _layout_error(spec, f"--root {folder}: {_listing(folder)}.", "pass --root an existing image folder.")
    if (folder / "train").is_dir():
        _require(spec, folder, ["test/"], f"add test/<class>/ folders next to {folder / 'train'}.")
        class_dirs = _class_folders(folder / "train")
        classnames = [d.name.replace("_", " ") for d in class_dirs]
        label_of = {d.name: i for i, d in enumerate(class_dirs)}
        splits = {part: _read_class_folders(spec, folder / part, label_of, classnames) if (folder / part).is_dir()
                  else [] for part in _SPLITS}
        _check_classes(spec, folder / "train", classnames, splits)
        return classnames, splits
    if (folder / "test").is_dir() or (folder / "val").is_dir():
        _require(spec, folder, ["train/"], f"add train/<class>/ folders to {folder}.")
    class_files = {d: _images_in(d) for d in _class_folders(folder)}
    class_files = {d: files for d, files in class_files.items() if files}
    if not class_files:
        raise _layout_error(spec, f"No class folders with images in --root {folder}.\n"
                                  f"Found instead: {_listing(folder)}.", "pass --root the folder of class folders.")
    too_small = [d.name for d, files in class_files.items() if len(files) < 2]
    if too_small:
        raise _layout_error(spec, f"Class folder(s) {too_small[:5]} in {folder} hold fewer than 2 images, too few to "
                                  "split into train and test.", "add images, or remove those class folders.")
    classnames = [d.name.replace("_", " ") for d in class_files]
    splits: dict[str, list[Item]] = {part: [] for part in _SPLITS}
    for label, files in enumerate(class_files.values()):
        for part, paths in zip(_SPLITS, _split_per_class(files)):
            splits[part] += [Item(p, label, classnames[label]) for p in paths]
    return classnames, splits


def load_split(dataset: str, root: str | os.PathLike) -> Split:
    """Read the train/val/test splits of ``dataset`` under ``root``, CoOp's ``$DATA`` or the dataset folder itself.

    ``dataset`` is a `DATASETS` key or a dataset folder name (``OxfordPets``). Every listed image must exist. Raises
    `DatasetLayoutError` (showing the expected layout) when the files do not match it, `ValueError` for an unknown
    ``dataset``. ``imagefolder`` without train/ and test/ folders splits each class folder 50% train / 20% val / 30%
    test (rounded, at least 1 test image) after a fixed ``random.Random(0)`` shuffle of its sorted file names.
    """
    spec = _spec(dataset)
    root = Path(root).expanduser().absolute()
    if spec.name == "imagefolder":
        classnames, splits = _read_imagefolder(spec, root)
    else:
        folder = _dataset_dir(spec, root)
        read = {"imagenet": _read_imagenet, "fgvc_aircraft": _read_fgvc}.get(spec.name, _read_zhou)
        classnames, splits = read(spec, folder)
    return Split(spec.name, classnames, splits["train"], splits["val"], splits["test"])


SHORT_CLASSES = ("error", "repeat", "all")


def _check_counts(items: list[Item], k: int, classnames: Sequence[str]) -> None:
    """Refuse ``k`` shots when a class holds fewer training images, naming the classes and their counts."""
    counts = defaultdict(int)
    for item in items:
        counts[item.label] += 1
    short = sorted((n, label) for label, n in counts.items() if n < k)
    if short:
        named = ", ".join(f"{classnames[label] if label < len(classnames) else label} ({n})" for n, label in short[:5])
        raise ValueError(f"--shots {k}: {len(short)} class(es) hold fewer training images: {named}. Lower --shots, "
                         "or pass --short-classes repeat (draw with replacement) or all (take what there is); the "
                         "real counts are recorded in fewshot_split.json.")


def _draw(items: list[Item], k: int, rng: random.Random, repeat: bool = True) -> list[list[Item]]:
    """Dassl's ``generate_fewshot_dataset``: ``k`` per label, labels in order of first appearance; a label with
    fewer than ``k`` items is drawn with replacement (``repeat``) or taken whole. One list per label."""
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    return [rng.sample(group, k) if len(group) >= k else rng.choices(group, k=k) if repeat else list(group)
            for group in by_label.values()]


def sample_few_shot(split: Split, shots: int, seed: int, order: Literal["clip-lora", "coop"] = "clip-lora",
                    short_classes: str = "error") -> FewShot:
    """Draw ``shots`` train images and ``min(shots, 4)`` val images per class, as the CLIP-LoRA code does.

    ``random.Random(seed)`` gives the same stream as the code's ``random.seed(seed)``. ``order="clip-lora"`` draws the
    val subset before the train subset (CLIP-LoRA), ``"coop"`` after it (CoOp/Dassl), so the train images differ.
    A split without val images (ImageNet, an imagefolder without val/) draws ``shots + min(shots, 4)`` train images
    per class at once (with replacement where a class has fewer), the first ``shots`` for train and the rest for
    val. A class with fewer training images than ``shots`` is an error naming it, unless ``short_classes`` is
    ``"repeat"`` (drawn with replacement) or ``"all"`` (every image it has); val subsets repeat images as needed.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1 images per class, got {shots}")
    if order not in ("clip-lora", "coop"):
        raise ValueError(f"order must be 'clip-lora' or 'coop', got {order!r}")
    if short_classes not in SHORT_CLASSES:
        raise ValueError(f"short_classes must be one of {SHORT_CLASSES}, got {short_classes!r}")
    if short_classes == "error":
        _check_counts(split.train, shots, split.classnames)
    rng = random.Random(seed)
    n_val = min(shots, 4)
    repeat = short_classes != "all"
    if not split.val:
        groups = _draw(split.train, shots + n_val, rng, repeat)
        return FewShot([it for g in groups for it in g[:shots]], [it for g in groups for it in g[shots:]])
    if order == "clip-lora":
        val = _draw(split.val, n_val, rng)
        train = _draw(split.train, shots, rng, repeat)
    else:
        train = _draw(split.train, shots, rng, repeat)
        val = _draw(split.val, n_val, rng)
    return FewShot([it for g in train for it in g], [it for g in val for it in g])


def _load_image(path: Path) -> Image.Image:
    """The image as RGB, its stored pixels as the CLIP-LoRA code reads them (no EXIF rotation); a broken, truncated
    or decompression-bomb file gets one line that names it, so one bad file in 100k is easy to find."""
    return open_rgb(path, OSError, "the file is corrupt or unreadable: re-download it, or remove it together with its "
                    "entry in the split file", upright=False)


class ImageDataset(Dataset):
    """``items`` as ``(transform(RGB image), label)`` pairs.

    An index may also be an ``(index, aug_seed)`` pair: the transform then runs on a torch RNG seeded with
    ``aug_seed`` (forked, so the global state is untouched), which makes random augmentation reproducible whatever
    the worker process or a resume point. Only torch's RNG is seeded, which torchvision transforms use.
    """

    def __init__(self, items: Sequence[Item], transform: Callable[[Image.Image], Any]):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, int]:
        aug_seed = None
        if isinstance(index, tuple):
            index, aug_seed = index
        item = self.items[index]
        image = _load_image(item.path)
        if aug_seed is None:
            return self.transform(image), item.label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            return self.transform(image), item.label
