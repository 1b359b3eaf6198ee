"""Datasets of the incremental settings, read from their standard files, and the two-view training set.

- **CIFAR-100**: ``cifar-100-python/{train,test,meta}`` of the official archive. These files are Python pickles.
  They are read with a restricted unpickler that builds only dicts, lists, strings, bytes, numbers and numpy arrays
  (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``) and refuses any other global, so a
  tampered file cannot run code; arrays over ``MAX_ARRAY_BYTES`` (1 GiB) are refused before numpy allocates them.
  Any refusal (code, truncated file, huge array) is an ``UntrustedFileError`` naming the file; only files with
  these standard names are opened.
- **CUB-200-2011**: ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt`` and
  ``images/``; the training split keeps ``images.txt`` order (index-list rows count in it); label = class id − 1.
- **miniImageNet** (CEC's release): ``split/train.csv`` and ``split/test.csv`` (``filename,label``) and ``images/``;
  labels = position of the wnid in the sorted wnids of ``train.csv`` (as CoACT).
- **CoOp layouts** (FSCIT datasets that CoOp ships, found by their ``split_zhou_*.json`` in ``root`` or in a child
  of it): the JSON's train and test lists, labels as in the JSON, images under the dataset's image folder.
- **image folders** (any other FSCIT dataset, and ``imagefolder``): ``root/{train,test}/<class>/*``, classes in
  sorted folder order.
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from visadapt.utils import DatasetLayoutError, UntrustedFileError
from visadapt.utils.images import open_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
BROKEN_IMAGE_FIX = "re-download the dataset's file, or remove it and its line in the dataset's lists"


@dataclass
class ImageSource:
    """``n`` labelled images, loaded on demand: ``load(i)`` → RGB PIL image; ``names[i]`` identifies image i."""

    load: Callable[[int], Image.Image]
    labels: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: Sequence[int]) -> "ImageSource":
        rows = [int(r) for r in rows]
        return ImageSource(lambda i: self.load(rows[i]), self.labels[rows], [self.names[r] for r in rows])


@dataclass
class IncrementalData:
    """The training and test images of one dataset, labels ``0 .. C-1`` in the protocol's class order."""

    name: str
    train: ImageSource
    test: ImageSource
    class_names: list[str]


def files_source(paths: Sequence[Path], labels: Sequence[int], root: Path) -> ImageSource:
    """Image files, read when loaded (stored pixels, no EXIF rotation, as the reference codes read them); a broken,
    truncated or decompression-bomb file is a :class:`DatasetLayoutError` naming it and the fix."""
    paths = list(paths)
    return ImageSource(lambda i: open_rgb(paths[i], DatasetLayoutError, BROKEN_IMAGE_FIX, upright=False),
                       np.asarray(labels, dtype=np.int64), [str(p.relative_to(root)) for p in paths])


def array_source(images: np.ndarray, labels: Sequence[int], prefix: str) -> ImageSource:
    """(N, H, W, 3) uint8 images."""
    return ImageSource(lambda i: Image.fromarray(images[i]), np.asarray(labels, dtype=np.int64),
                       [f"{prefix}/{i}" for i in range(len(images))])


def pil_source(images: Sequence[Image.Image], labels: Sequence[int], prefix: str = "image") -> ImageSource:
    images = list(images)
    return ImageSource(lambda i: images[i].convert("RGB"), np.asarray(labels, dtype=np.int64),
                       [f"{prefix}/{i}" for i in range(len(images))])


# ----------------------------------------------------------------------------------------------------- CIFAR-100
MAX_ARRAY_BYTES = 1 << 30  # one array of a CIFAR-100 file; the largest real one (train images) is 154 MB


class _ArrayTooLarge(pickle.UnpicklingError):
    pass


class _BoundedArray(np.ndarray):
    """What the unpickler builds arrays as: the shape and dtype are checked before numpy allocates anything."""

    def __setstate__(self, state):
        shape, dtype = state[1], state[2]
        count = 1
        for n in shape:
            count *= int(n)
        if count * getattr(dtype, "itemsize", 1) > MAX_ARRAY_BYTES:
            raise _ArrayTooLarge(f"an array of shape {tuple(shape)} and dtype {dtype} (over {MAX_ARRAY_BYTES >> 20} "
                                 "MiB; CIFAR-100 arrays are smaller)")
        if getattr(dtype, "hasobject", False):
            raise pickle.UnpicklingError("refusing to unpickle an object array (not part of a CIFAR-100 file)")
        super().__setstate__(state)


def _reconstruct(subtype, shape, dtype):
    return np.ndarray.__new__(_BoundedArray, (0,), dtype="u1")


def _scalar(dtype, data=None):
    if getattr(dtype, "hasobject", False) or getattr(dtype, "itemsize", 0) > MAX_ARRAY_BYTES:
        raise pickle.UnpicklingError(f"refusing to unpickle a numpy scalar of dtype {dtype}.")
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


class _CifarUnpickler(pickle.Unpickler):
    """Builds the CIFAR-100 dicts (lists, bytes, numbers, numpy arrays up to ``MAX_ARRAY_BYTES``) and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "scalar"): _scalar, ("numpy._core.multiarray", "scalar"): _scalar}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle code ({module}.{name}: not part of a CIFAR-100 "
                                         "file)")
        return self.ALLOWED[(module, name)]


def _plain(value):
    """The unpickled value with every bounded array turned back into a plain ndarray."""
    if isinstance(value, np.ndarray):
        return np.asarray(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _cifar_file(path: Path) -> dict:
    """One CIFAR-100 pickle, read with :class:`_CifarUnpickler`; a file that asks for anything else, is truncated
    or asks for a huge array is refused as :class:`~visadapt.utils.UntrustedFileError` (nothing in it is run)."""
    fix = "Replace it with the file from the official cifar-100-python.tar.gz"
    try:
        with open(path, "rb") as f:
            raw = _plain(_CifarUnpickler(f, encoding="bytes").load())
    except _ArrayTooLarge as err:
        raise UntrustedFileError(path, f"array too large: {err}", fix) from err
    except pickle.UnpicklingError as err:
        reason = str(err).rstrip(".")
        if "truncated" in reason or "ran out of input" in reason.lower():
            reason = "truncated file"
        elif not reason.startswith("refusing"):
            reason = f"not a CIFAR-100 pickle ({reason})"
        raise UntrustedFileError(path, reason, fix) from err
    except EOFError as err:
        raise UntrustedFileError(path, "truncated file (the pickle ends early)", fix) from err
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
        raise UntrustedFileError(path, f"not a CIFAR-100 pickle ({type(err).__name__}: {err})", fix) from err
    if not isinstance(raw, dict):
        raise UntrustedFileError(path, f"not a CIFAR-100 pickle (it holds a {type(raw).__name__}, not a dict)", fix)
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar_folder(root: Path) -> Path:
    for folder in (root, root / "cifar-100-python"):
        if all((folder / n).is_file() for n in ("train", "test", "meta")):
            return folder
    raise DatasetLayoutError(f"{root}: no CIFAR-100 python files. Expected root/cifar-100-python/{{train,test,meta}} "
                             "(the official cifar-100-python.tar.gz, extracted).")


def load_cifar100(root: Path) -> IncrementalData:
    folder = _cifar_folder(root)
    meta = _cifar_file(folder / "meta")
    names = [n.decode() if isinstance(n, bytes) else n for n in meta["fine_label_names"]]
    splits = {}
    for split in ("train", "test"):
        d = _cifar_file(folder / split)
        images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = array_source(np.ascontiguousarray(images), d["fine_labels"], split)
    return IncrementalData("cifar100", splits["train"], splits["test"], names)


# ----------------------------------------------------------------------------------------------------- CUB-200
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def _cub_folder(root: Path) -> Path:
    for folder in (root, root / "CUB_200_2011", root / "CUB_200_2011" / "CUB_200_2011"):
        if all((folder / n).is_file() for n in CUB_FILES):
            return folder
    raise DatasetLayoutError(f"{root}: not CUB-200-2011. Expected root/CUB_200_2011/{{{', '.join(CUB_FILES)}, "
                             "images/<class>/<file>.jpg}} (CEC's or Caltech's archive).")


def _pairs(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split(maxsplit=1)) for line in path.read_text().splitlines() if line.strip()]  # type: ignore


def load_cub200(root: Path) -> IncrementalData:
    folder = _cub_folder(root)
    paths = dict(_pairs(folder / "images.txt"))
    labels = {k: int(v) - 1 for k, v in _pairs(folder / "image_class_labels.txt")}
    is_train = {k: v.strip() == "1" for k, v in _pairs(folder / "train_test_split.txt")}
    names = [name.split(".", 1)[-1] for _, name in sorted(_pairs(folder / "classes.txt"), key=lambda p: int(p[0]))]
    split = {True: ([], []), False: ([], [])}
    for image_id, rel in paths.items():
        files, labs = split[is_train[image_id]]
        files.append(folder / "images" / rel.strip())
        labs.append(labels[image_id])
    return IncrementalData("cub200", files_source(*split[True], folder), files_source(*split[False], folder), names)


# ------------------------------------------------------------------------------------------------- miniImageNet
def _mini_folder(root: Path) -> Path:
    for folder in (root, root / "miniimagenet", root / "mini_imagenet"):
        if (folder / "split" / "train.csv").is_file() and (folder / "split" / "test.csv").is_file():
            return folder
    raise DatasetLayoutError(f"{root}: not CEC's miniImageNet. Expected root/miniimagenet/{{split/train.csv, "
                             "split/test.csv, images/<file>.jpg}} (rows `filename,label`).")


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    return [(r[0], r[1]) for r in rows[1:]]  # header: filename,label


def load_mini_imagenet(root: Path) -> IncrementalData:
    folder = _mini_folder(root)
    train, test = _csv_rows(folder / "split" / "train.csv"), _csv_rows(folder / "split" / "test.csv")
    wnids = sorted({w for _, w in train})
    index = {w: i for i, w in enumerate(wnids)}

    def source(rows: list[tuple[str, str]]) -> ImageSource:
        unknown = sorted({w for _, w in rows} - set(index))
        if unknown:
            raise DatasetLayoutError(f"{folder}/split/test.csv names wnids absent from train.csv: {unknown[:3]}.")
        return files_source([folder / "images" / f for f, _ in rows], [index[w] for _, w in rows], folder)

    return IncrementalData("mini_imagenet", source(train), source(test), wnids)


# ------------------------------------------------------------------------------------------------ image folders
def load_imagefolder(root: Path, name: str = "imagefolder") -> IncrementalData:
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DatasetLayoutError(f"{root}: expected root/train/<class>/<image> and root/test/<class>/<image>.")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())

    def source(split: str) -> ImageSource:
        files, labels = [], []
        for label, c in enumerate(classes):
            found = sorted(p for p in (root / split / c).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
        return files_source(files, labels, root)

    return IncrementalData(name, source("train"), source("test"), classes)


# FSCIT dataset → (CoOp's split file, image folder relative to the dataset folder)
COOP_SPLITS = {
    "caltech101": ("split_zhou_Caltech101.json", "101_ObjectCategories"),
    "dtd": ("split_zhou_DescribableTextures.json", "images"),
    "eurosat": ("split_zhou_EuroSAT.json", "2750"),
    "food101": ("split_zhou_Food101.json", "images"),
    "oxford_flowers": ("split_zhou_OxfordFlowers.json", "jpg"),
    "oxford_pets": ("split_zhou_OxfordPets.json", "images"),
    "stanford_cars": ("split_zhou_StanfordCars.json", ""),
    "sun397": ("split_zhou_SUN397.json", "SUN397"),
}


def _coop_split_file(name: str, root: Path) -> Optional[Path]:
    if name not in COOP_SPLITS:
        return None
    split = COOP_SPLITS[name][0]
    found = [root / split, *(c / split for c in sorted(root.iterdir()) if c.is_dir())]
    return next((f for f in found if f.is_file()), None)


def load_coop(name: str, split_file: Path) -> IncrementalData:
    """A CoOp dataset from its ``split_zhou`` JSON: ``{"train": [[image path, label, class name], ...], "test":
    ...}``; image paths are relative to the dataset's image folder beside the JSON."""
    import json

    folder = split_file.parent
    images = folder / COOP_SPLITS[name][1]
    splits = json.loads(split_file.read_text())
    names: dict[int, str] = {}
    sources = {}
    for split in ("train", "test"):
        entries = splits.get(split)
        if not entries:
            raise DatasetLayoutError(f"{split_file}: no {split!r} list (CoOp's split_zhou files hold train, val, "
                                     "test).")
        for _, label, classname in entries:
            names[int(label)] = classname
        sources[split] = files_source([images / e[0] for e in entries], [int(e[1]) for e in entries], folder)
    if sorted(names) != list(range(len(names))):
        raise DatasetLayoutError(f"{split_file}: labels are not 0..{len(names) - 1}.")
    return IncrementalData(name, sources["train"], sources["test"], [names[i] for i in range(len(names))])


def load_dataset(name: str, root: Optional[str]) -> IncrementalData:
    """The dataset ``name`` from ``root`` (see the module docstring for the layouts)."""
    if not root:
        raise ValueError(f"--dataset {name} needs --root, the folder holding its files.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--root {path}: no such folder.")
    loaders = {"cifar100": load_cifar100, "cub200": load_cub200, "mini_imagenet": load_mini_imagenet}
    if name in loaders:
        return loaders[name](path)
    coop = _coop_split_file(name, path)
    return load_coop(name, coop) if coop else load_imagefolder(path, name)


# ------------------------------------------------------------------------------------------------- transforms
def train_transform(size: int, mean: Sequence[float], std: Sequence[float], scale_min: float = 0.08) -> Callable:
    """CoACT's training view: crop, flip, colour jitter (p 0.8), grayscale (p 0.2), normalise."""
    return T.Compose([T.RandomResizedCrop(size, scale=(scale_min, 1.0)), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                      T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Resize the short side, centre crop, normalise (test images and prototypes)."""
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


class TwoViews(Dataset):
    """Item ``(index, aug_seed)`` → (view 1, view 2, label), both views drawn on a torch RNG seeded with
    ``aug_seed`` (forked: the global RNG, which drives dropout, is untouched), so a resumed run sees the same views."""

    def __init__(self, source: ImageSource, transform: Callable) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, aug_seed = item
        image = self.source.load(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            return self.transform(image), self.transform(image), int(self.source.labels[index])


class EvalImages(Dataset):
    """Item i → (eval view, label)."""

    def __init__(self, source: ImageSource, transform: Callable) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.source.load(index)), int(self.source.labels[index])


def collate_views(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x1, x2, y = zip(*batch)
    return torch.stack(x1), torch.stack(x2), torch.tensor(y)
