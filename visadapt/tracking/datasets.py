"""Tracking datasets where trackers keep them: one reader per on-disk layout, all returning `TrackingSequence`.

Boxes are ``x, y, w, h`` in 0-based continuous pixels (LaSOT's 1-based files are shifted on load, as the official
code does). A frame is *visible* when the dataset says the target is in view (LaSOT: neither full occlusion nor out
of view; GOT-10k: absence 0) and its box has positive size; frames without a box hold NaN.

Listing is cheap enough for the 9k-sequence sets: no image is opened, and where the layout fixes the frame names
(LaSOT ``%08d.jpg`` from 1, GOT-10k train/val ``%08d.jpg`` from 1, TrackingNet ``<i>.jpg`` from 0) the frames are a
`FrameList` that makes each path on access instead of listing the folder. Training cleans the annotations with
:func:`clean_sequence` (the only function here that reads an image size, from the first frame's header, on demand).

Every layout problem raises one `DatasetLayoutError` whose message shows the expected tree and the fix.
``READERS`` maps a dataset name to its reader; :func:`load_sequences` is the entry point.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from visadapt.utils import DatasetLayoutError
from visadapt.utils.images import image_size as read_image_size
from visadapt.utils.images import open_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
BROKEN_FRAME_FIX = "re-extract or re-download the frame (a sequence needs every frame), or drop the sequence"
PathLike = Union[str, Path]


class FrameList(Sequence):
    """Frame paths ``folder / pattern.format(start + i)`` for i < count, made on access (no folder listing).

    Behaves as a read-only list of `Path`: ``len``, indexing, iteration, ``==`` with a list; a step-1 slice is
    again a `FrameList`.
    """

    def __init__(self, folder: PathLike, pattern: str, count: int, start: int = 0) -> None:
        self.folder, self.pattern, self.count, self.start = Path(folder), pattern, int(count), int(start)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: Union[int, slice]) -> Any:
        if isinstance(index, slice):
            first, stop, step = index.indices(self.count)
            if step == 1:
                return FrameList(self.folder, self.pattern, max(stop - first, 0), self.start + first)
            return [self[i] for i in range(first, stop, step)]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(f"frame {index} of a {self.count}-frame sequence")
        return self.folder / self.pattern.format(self.start + index)

    def __iter__(self) -> Iterator[Path]:
        return (self.folder / self.pattern.format(self.start + i) for i in range(self.count))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (FrameList, list, tuple)):
            return len(self) == len(other) and all(a == Path(b) for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrameList({str(self.folder)!r}, {self.pattern!r}, count={self.count}, start={self.start})"


def read_frame(path: Union[str, Path]) -> np.ndarray:
    """An image file → (H, W, 3) uint8 RGB: the one frame reader of training, tracking and ``track run``. A broken,
    truncated or decompression-bomb frame is a :class:`DatasetLayoutError` naming the file and the fix."""
    return np.array(open_rgb(path, DatasetLayoutError, BROKEN_FRAME_FIX, upright=False))


@dataclass
class TrackingSequence:
    """One annotated video: frame files in order, (N, 4) xywh boxes (NaN where unknown), (N,) visibility.

    ``frames`` is a list of paths or a `FrameList`; ``meta`` holds what a dataset adds (``language``, ``category``,
    ``image_size`` as (W, H) when the annotations give it, ``cover`` …).
    """

    name: str
    frames: Sequence
    boxes: np.ndarray
    visible: np.ndarray
    dataset: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)


_SOT_FILES = ("      groundtruth.txt             (x,y,w,h per frame, comma separated, 1-based pixels)\n"
              "      full_occlusion.txt          (0/1 per frame, one comma-separated line)\n"
              "      out_of_view.txt             (0/1 per frame, one comma-separated line)\n"
              "      nlp.txt                     (language description; optional)")

LAYOUTS = {
    "got10k": (
        "GOT-10k/\n"
        "  train/ | val/ | test/\n"
        "    list.txt                      (one sequence folder name per line)\n"
        "    GOT-10k_Train_000001/\n"
        "      00000001.jpg 00000002.jpg …\n"
        "      groundtruth.txt             (x,y,w,h per frame, 0-based; test: first frame only)\n"
        "      absence.label               (0/1 per frame; optional)\n"
        "      cover.label                 (0-8 per frame; optional)\n"
        "split vottrain / votval: the train folder restricted by a split file you pass as split_file=\n"
        "  (pytracking's got10k_vot_train_split.txt / got10k_vot_val_split.txt: one 0-based index into\n"
        "   train/list.txt per line, or one sequence name per line)"),
    "folder": (
        "<sequence>/\n"
        "  img/ (or the frames directly): 00000001.jpg 00000002.jpg … (any of .jpg .png .bmp, sorted by name)\n"
        "  groundtruth.txt                 (x,y,w,h per frame, comma/space/tab separated; at least the first frame)"),
    "lasot": (
        "LaSOT/\n"
        "  training_set.txt testing_set.txt  (optional: sequence names of the official 1120/280 split)\n"
        "  airplane/\n"
        "    airplane-1/\n"
        "      img/00000001.jpg 00000002.jpg …  (one per groundtruth line)\n" + _SOT_FILES),
    "lasot_ext": (
        "LaSOT_Extension/                  (all 150 sequences are test)\n"
        "  atv/\n"
        "    atv-1/\n"
        "      img/00000001.jpg 00000002.jpg …  (one per groundtruth line)\n" + _SOT_FILES),
    "trackingnet": (
        "TrackingNet/\n"
        "  TRAIN_0/ … TRAIN_11/ TEST/\n"
        "    anno/<sequence>.txt           (x,y,w,h per frame, comma separated; TEST: first frame only)\n"
        "    frames/<sequence>/0.jpg 1.jpg … 10.jpg …  (0-based, numeric order)"),
    "tnl2k": (
        "TNL2K/ (the test set: one folder per sequence)\n"
        "  <sequence>/\n"
        "    imgs/00001.jpg …              (.jpg or .png, in natural name order; one per groundtruth line)\n"
        "    groundtruth.txt               (x,y,w,h per frame, comma separated)\n"
        "    language.txt                  (language description)"),
    "coco": (
        "COCO/\n"
        "  annotations/instances_train2017.json instances_val2017.json\n"
        "  images/train2017/000000000009.jpg …\n"
        "  images/val2017/…"),
}


def layout_error(kind: str, problem: str, fix: str) -> DatasetLayoutError:
    """The one error of this module: what is wrong, the expected tree of ``kind``, and how to fix it."""
    return DatasetLayoutError(f"{problem}\n\nExpected layout ({kind}):\n{LAYOUTS[kind]}\n\nFix: {fix}")


def read_boxes(path: Path, kind: str) -> np.ndarray:
    """Read ``x,y,w,h`` rows (comma, space or tab separated; ``nan`` allowed) → (N, 4) float64."""
    if not path.is_file():
        raise layout_error(kind, f"missing {path}", f"put the annotation file at {path}.")
    text = path.read_text()
    lines = text.split()  # the official files: one "x,y,w,h" token per line, no spaces
    if lines and all(line.count(",") == 3 for line in lines):
        try:  # one C-level conversion: the 9k-sequence datasets list in seconds
            return np.asarray(",".join(lines).split(","), dtype=np.float64).reshape(len(lines), 4)
        except ValueError:
            pass
    return _parse_boxes(path, text, kind)


def _parse_boxes(path: Path, text: str, kind: str) -> np.ndarray:
    """Line-by-line parse, for the error message that names the bad line."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.replace(",", " ").replace("\t", " ").split()
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise layout_error(kind, f"{path}, line {number}: {line!r} is not numbers",
                               "write x,y,w,h per line.") from None
        if len(values) != 4:
            raise layout_error(kind, f"{path}, line {number}: {len(values)} values, expected 4 (x,y,w,h)",
                               "write one x,y,w,h box per line.")
        rows.append(values)
    if not rows:
        raise layout_error(kind, f"{path} holds no box", "write at least the first frame's box.")
    return np.asarray(rows, dtype=np.float64)


def read_flags(path: Path, n: int, kind: str) -> Optional[np.ndarray]:
    """0/1 (or integer) labels, one per frame, separated by commas or newlines; None when the file is absent."""
    if not path.is_file():
        return None
    values = path.read_text().replace(",", " ").split()
    if len(values) != n:
        raise layout_error(kind, f"{path} has {len(values)} values for {n} frames", "write one value per frame.")
    try:
        return np.asarray(values, dtype=np.float64).astype(np.int64)
    except ValueError:
        raise layout_error(kind, f"{path} holds something other than integers", "write 0/1 per frame.") from None


def _pad_boxes(boxes: np.ndarray, n: int, path: Path, kind: str) -> np.ndarray:
    """Boxes for the first frames only (test splits) become (n, 4) with NaN rows after them; more boxes than
    frames is a layout error (frames missing, or the file of another sequence)."""
    if len(boxes) > n:
        raise layout_error(kind, f"{path} has {len(boxes)} boxes for {n} frames",
                           f"give one x,y,w,h line per frame (at most {n}), or restore the missing frames.")
    if len(boxes) == n:
        return boxes
    return np.concatenate([boxes, np.full((n - len(boxes), 4), np.nan)])


def _frames(folder: Path, kind: str, natural: bool = False) -> list[Path]:
    """The image files of ``folder`` sorted by name (``natural``: ``img2`` before ``img10``)."""
    if not folder.is_dir():
        raise layout_error(kind, f"missing frame folder {folder}", "put the sequence's frames there.")
    key = (lambda p: _natural_key(p.name)) if natural else None
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=key)
    if not frames:
        raise layout_error(kind, f"no image files in {folder}", "put the frames (.jpg/.png/.bmp) there.")
    return frames


def _named_frames(folder: Path, pattern: str, count: int, start: int, kind: str) -> FrameList:
    """Frames whose names the layout fixes; only the first one is checked on disk (one stat per sequence)."""
    frames = FrameList(folder, pattern, count, start)
    if not frames[0].is_file():
        raise layout_error(kind, f"missing {frames[0]} (the first frame)", f"put the frames in {folder}.")
    return frames


def _visible(boxes: np.ndarray, flags_hidden: Optional[np.ndarray] = None) -> np.ndarray:
    visible = np.isfinite(boxes).all(1) & (np.nan_to_num(boxes[:, 2]) > 0) & (np.nan_to_num(boxes[:, 3]) > 0)
    return visible if flags_hidden is None else visible & ~flags_hidden.astype(bool)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_folder(root: PathLike, split: Optional[str] = None) -> list[TrackingSequence]:
    """A plain sequence folder: frames (in ``img/`` or beside the file) and ``groundtruth.txt``."""
    root = Path(root)
    if not root.is_dir():
        raise layout_error("folder", f"{root} is not a folder", "pass the sequence folder.")
    frame_dir = root / "img" if (root / "img").is_dir() else root
    frames = _frames(frame_dir, "folder")
    boxes = _pad_boxes(read_boxes(root / "groundtruth.txt", "folder"), len(frames), root / "groundtruth.txt", "folder")
    return [TrackingSequence(root.name, frames, boxes, _visible(boxes), "folder")]


# --- GOT-10k ---------------------------------------------------------------------------------------------------

GOT10K_SPLITS = ("train", "val", "test", "vottrain", "votval")


def _got10k_subset(names: list[str], split_file: PathLike) -> list[str]:
    """Restrict ``names`` (train/list.txt order) by a split file of 0-based indices or of sequence names."""
    path = Path(split_file)
    if not path.is_file():
        raise layout_error("got10k", f"split file {path} does not exist",
                           "pass the path of the split file (e.g. pytracking's got10k_vot_train_split.txt).")
    entries = path.read_text().split()
    if all(e.isdigit() for e in entries):
        bad = [e for e in entries if int(e) >= len(names)]
        if bad:
            raise layout_error("got10k", f"{path} holds index {bad[0]}, but list.txt names {len(names)} sequences",
                               "use the split file that belongs to the full GOT-10k train set.")
        return [names[int(e)] for e in entries]
    unknown = sorted(set(entries) - set(names))
    if unknown:
        raise layout_error("got10k", f"{path} names {unknown[0]}, which list.txt does not list",
                           "use a split file of this train set's sequence names or 0-based indices.")
    return entries


def read_got10k(root: PathLike, split: str = "train", split_file: Optional[PathLike] = None
                ) -> list[TrackingSequence]:
    """GOT-10k ``train`` / ``val`` / ``test`` (``root`` holds the split folders).

    ``vottrain`` / ``votval`` (7086 / 1249 of the 9335 train sequences, as the full LoRAT protocol and pytracking
    use) are ``train`` restricted by ``split_file``, which we do not ship: pass pytracking's
    ``got10k_vot_train_split.txt`` (0-based indices into ``train/list.txt``) or any file of sequence names.
    ``split_file`` restricts the other splits the same way.
    """
    root = Path(root)
    if split not in GOT10K_SPLITS:
        raise ValueError(f"unknown GOT-10k split {split!r}; choose one of {GOT10K_SPLITS}")
    if split.startswith("vot") and split_file is None:
        raise layout_error("got10k", f"split {split!r} needs its split file",
                           f"pass split_file=<path to got10k_vot_{split[3:]}_split.txt> (from pytracking's "
                           "ltr/data_specs), or use split='train'.")
    folder = "train" if split.startswith("vot") else split
    split_dir = root / folder
    listing = split_dir / "list.txt"
    if not listing.is_file():
        raise layout_error("got10k", f"missing {listing}", f"pass the GOT-10k root (the folder that holds {folder}/).")
    names = listing.read_text().split()
    if split_file is not None:
        names = _got10k_subset(names, split_file)
    return [_got10k_sequence(split_dir, name, folder == "test") for name in names]


def _got10k_sequence(split_dir: Path, name: str, test: bool) -> TrackingSequence:
    folder = split_dir / name
    if not folder.is_dir():
        raise layout_error("got10k", f"{split_dir / 'list.txt'} names {name}, which is not in {split_dir}",
                           "restore the sequence folder or remove it from list.txt.")
    boxes = read_boxes(folder / "groundtruth.txt", "got10k")
    # train/val annotate every frame, so the names follow from the count; test annotates frame 1 only
    frames = _frames(folder, "got10k") if test else _named_frames(folder, "{:08d}.jpg", len(boxes), 1, "got10k")
    boxes = _pad_boxes(boxes, len(frames), folder / "groundtruth.txt", "got10k")
    absence = read_flags(folder / "absence.label", len(frames), "got10k")
    cover = read_flags(folder / "cover.label", len(frames), "got10k")
    meta = {"cover": cover} if cover is not None else {}
    return TrackingSequence(name, frames, boxes, _visible(boxes, absence), "got10k", meta)


# --- LaSOT and LaSOT_ext ---------------------------------------------------------------------------------------

def _lasot_sequence(folder: Path, kind: str) -> TrackingSequence:
    """One LaSOT-format sequence: 1-based integer boxes shifted to 0-based, occlusion/out-of-view flags."""
    boxes = read_boxes(folder / "groundtruth.txt", kind)
    boxes[:, :2] -= 1  # 1-based pixel indices → 0-based continuous coordinates, as the official loader does
    hidden = np.zeros(len(boxes), dtype=bool)
    for flag_file in ("full_occlusion.txt", "out_of_view.txt"):
        flags = read_flags(folder / flag_file, len(boxes), kind)
        if flags is None:
            raise layout_error(kind, f"missing {folder / flag_file}", "restore the file from the dataset archive.")
        hidden |= flags.astype(bool)
    # the flags apart from box validity: official OPE treats a flagged-visible frame without a box differently
    meta: dict = {"category": folder.parent.name, "visible_flags": ~hidden}
    language = folder / "nlp.txt"
    if language.is_file():
        meta["language"] = language.read_text(encoding="utf-8").strip()
    frames = _named_frames(folder / "img", "{:08d}.jpg", len(boxes), 1, kind)
    return TrackingSequence(folder.name, frames, boxes, _visible(boxes, hidden), kind, meta)


def _lasot_folders(root: Path, kind: str) -> list[Path]:
    """Sequence folders ``<category>/<category>-<k>`` in natural order (``airplane-2`` before ``airplane-10``)."""
    if not root.is_dir():
        raise layout_error(kind, f"{root} is not a folder", "pass the dataset root (the folder of categories).")
    folders = []
    for category in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
        folders += sorted((p for p in category.iterdir() if (p / "groundtruth.txt").is_file()),
                          key=lambda p: _natural_key(p.name))
    if not folders:
        raise layout_error(kind, f"no <category>/<sequence>/groundtruth.txt under {root}",
                           "pass the dataset root (the folder that holds the category folders).")
    return folders


def read_lasot(root: PathLike, split: Optional[str] = None) -> list[TrackingSequence]:
    """LaSOT: ``split`` ``train`` / ``test`` takes the names in ``training_set.txt`` / ``testing_set.txt`` at the
    root; ``None`` or ``all`` (or a missing list file, with a warning) takes every sequence found."""
    root = Path(root)
    if split not in (None, "all", "train", "test"):
        raise ValueError(f"unknown LaSOT split {split!r}; choose train, test or all")
    listing = root / {"train": "training_set.txt", "test": "testing_set.txt"}.get(split or "", "")
    if split in ("train", "test") and listing.is_file():
        folders = []
        for name in listing.read_text().split():
            folder = root / name.rsplit("-", 1)[0] / name
            if not (folder / "groundtruth.txt").is_file():
                raise layout_error("lasot", f"{listing} names {name}, but {folder / 'groundtruth.txt'} is missing",
                                   "restore the sequence (or pass split=None to read what is there).")
            folders.append(folder)
    else:
        if split in ("train", "test"):
            warnings.warn(f"{listing} is missing: reading every LaSOT sequence under {root} as {split!r}; put the "
                          "official list there to read only that split.", stacklevel=2)
        folders = _lasot_folders(root, "lasot")
    return [_lasot_sequence(folder, "lasot") for folder in folders]


def read_lasot_ext(root: PathLike, split: Optional[str] = None) -> list[TrackingSequence]:
    """LaSOT_Extension (150 test sequences, LaSOT's per-sequence files).

    Its boxes are shifted to 0-based like LaSOT's (same annotation convention); the official loader leaves them
    unshifted, which moves every box by one pixel against the image.
    """
    if split not in (None, "all", "test"):
        raise ValueError(f"LaSOT_ext has only a test split, not {split!r}")
    return [_lasot_sequence(folder, "lasot_ext") for folder in _lasot_folders(Path(root), "lasot_ext")]


# --- TrackingNet -----------------------------------------------------------------------------------------------

def _trackingnet_chunks(root: Path, split: str) -> list[Path]:
    if split == "train":
        chunks = [root / f"TRAIN_{i}" for i in range(12) if (root / f"TRAIN_{i}").is_dir()]
    elif split == "test":
        chunks = [root / "TEST"] if (root / "TEST").is_dir() else []
    elif re.fullmatch(r"TRAIN_\d+", split):
        chunks = [root / split] if (root / split).is_dir() else []
    else:
        raise ValueError(f"unknown TrackingNet split {split!r}; choose train, test or a chunk such as TRAIN_0")
    if not chunks:
        raise layout_error("trackingnet", f"no {split!r} chunk folder under {root}",
                           "pass the TrackingNet root (the folder holding TRAIN_0 … TRAIN_11 and TEST).")
    return chunks


def _numeric_frames(folder: Path) -> list[Path]:
    """Frames named ``<i>.jpg``, in numeric order (``10.jpg`` after ``9.jpg``)."""
    if not folder.is_dir():
        raise layout_error("trackingnet", f"missing frame folder {folder}", "extract the sequence's frames there.")
    frames = [Path(e.path) for e in os.scandir(folder) if e.name.endswith(".jpg") and e.name[:-4].isdigit()]
    if not frames:
        raise layout_error("trackingnet", f"no <i>.jpg frames in {folder}", "extract the sequence's frames there.")
    return sorted(frames, key=lambda p: int(p.stem))


def read_trackingnet(root: PathLike, split: str = "train") -> list[TrackingSequence]:
    """TrackingNet ``train`` (every TRAIN_k chunk present), one chunk (``TRAIN_3``) or ``test``.

    Train frames follow from the annotation count (``0.jpg`` …); TEST annotates the first frame only, so its frames
    are listed (numeric order) and the other rows are NaN.
    """
    root = Path(root)
    sequences = []
    for chunk in _trackingnet_chunks(root, split):
        anno_dir = chunk / "anno"
        if not anno_dir.is_dir():
            raise layout_error("trackingnet", f"missing {anno_dir}", f"extract the {chunk.name} annotations there.")
        for anno in sorted(p for p in anno_dir.iterdir() if p.suffix == ".txt"):
            folder = chunk / "frames" / anno.stem
            boxes = read_boxes(anno, "trackingnet")
            if chunk.name == "TEST":
                frames = _numeric_frames(folder)
                boxes = _pad_boxes(boxes[:1], len(frames), anno, "trackingnet")
            else:
                frames = _named_frames(folder, "{}.jpg", len(boxes), 0, "trackingnet")
            sequences.append(TrackingSequence(anno.stem, frames, boxes, _visible(boxes), "trackingnet",
                                              {"chunk": chunk.name}))
    return sequences


# --- TNL2K -----------------------------------------------------------------------------------------------------

def read_tnl2k(root: PathLike, split: Optional[str] = None) -> list[TrackingSequence]:
    """TNL2K (the folder of test sequences; ``split`` is ignored): ``imgs/``, ``groundtruth.txt``, ``language.txt``."""
    root = Path(root)
    if not root.is_dir():
        raise layout_error("tnl2k", f"{root} is not a folder", "pass the folder that holds the sequence folders.")
    folders = sorted(p for p in root.iterdir() if (p / "groundtruth.txt").is_file())
    if not folders:
        raise layout_error("tnl2k", f"no <sequence>/groundtruth.txt under {root}",
                           "pass the folder that holds the sequence folders.")
    sequences = []
    for folder in folders:
        frames = _frames(folder / "imgs", "tnl2k", natural=True)  # = name order for zero-padded names
        boxes = read_boxes(folder / "groundtruth.txt", "tnl2k")
        if len(boxes) != len(frames):
            raise layout_error("tnl2k", f"{folder}: {len(boxes)} boxes for {len(frames)} frames in imgs/",
                               "give one groundtruth line per frame.")
        language = folder / "language.txt"
        meta = {"language": language.read_text(encoding="utf-8").strip()} if language.is_file() else {}
        sequences.append(TrackingSequence(folder.name, frames, boxes, _visible(boxes), "tnl2k", meta))
    return sequences


# --- COCO ------------------------------------------------------------------------------------------------------

def read_coco(root: PathLike, split: str = "train", year: int = 2017) -> list[TrackingSequence]:
    """COCO detection as length-1 tracks: one sequence per annotated object (``<image id>_<annotation id>``).

    Crowd regions are skipped, as the official loader does; boxes with no area are skipped here (the official
    pipeline drops them later, in its box-validity cleaning). ``meta`` holds ``image_size`` (W, H), ``category``
    and ``image_id`` from the JSON, so cleaning needs no image read.
    """
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"unknown COCO split {split!r}; choose train or val")
    annotation_file = root / "annotations" / f"instances_{split}{year}.json"
    image_dir = root / "images" / f"{split}{year}"
    if not annotation_file.is_file():
        raise layout_error("coco", f"missing {annotation_file}", "pass the COCO root (the folder of annotations/).")
    if not image_dir.is_dir():
        raise layout_error("coco", f"missing {image_dir}", f"extract {split}{year}.zip into images/.")
    try:
        data = json.loads(annotation_file.read_text())
        images = {im["id"]: im for im in data["images"]}
        categories = {c["id"]: c["name"] for c in data.get("categories", [])}
        return list(_coco_tracks(data["annotations"], images, categories, image_dir))
    except (ValueError, KeyError, TypeError) as error:
        raise layout_error("coco", f"{annotation_file} is not a COCO instances file ({error!r})",
                           "use the official instances_*.json.") from None


def _coco_tracks(annotations: Iterable[dict], images: dict, categories: dict, image_dir: Path
                 ) -> Iterator[TrackingSequence]:
    paths: dict[int, Path] = {}
    for ann in annotations:
        image = images.get(ann["image_id"])
        x, y, w, h = (float(v) for v in ann["bbox"])
        if image is None or ann.get("iscrowd", 0) or not (w > 0 and h > 0):
            continue
        path = paths.setdefault(image["id"], image_dir / image["file_name"])  # one Path per image, shared
        meta = {"image_size": (int(image["width"]), int(image["height"])), "image_id": image["id"],
                "category": categories.get(ann["category_id"], str(ann["category_id"]))}
        yield TrackingSequence(f"{image['id']}_{ann['id']}", [path], np.array([[x, y, w, h]]),
                               np.ones(1, dtype=bool), "coco", meta)


# --- training-time annotation cleaning -------------------------------------------------------------------------

def image_size(sequence: TrackingSequence) -> tuple[int, int]:
    """(W, H) of the sequence's frames: ``meta['image_size']`` if the annotations gave it, else the first frame's
    header (PIL reads no pixels for this). Every frame of a sequence is assumed to share the size."""
    if "image_size" in sequence.meta:
        return tuple(sequence.meta["image_size"])
    return read_image_size(sequence.frames[0], DatasetLayoutError, BROKEN_FRAME_FIX)


def clean_sequence(sequence: TrackingSequence, size: Optional[tuple[int, int]] = None
                   ) -> Optional[TrackingSequence]:
    """The training data cleaning of the official LoRAT pipeline, for one sequence.

    Boxes become continuous ``x1, y1, x2 = x + w, y2 = y + h``, are clipped to the image ``size`` (W, H; read
    lazily by :func:`image_size` when not given), and a box that is then empty (x1 ≥ x2 or y1 ≥ y2) or belongs to
    an invisible frame is dropped (NaN, not visible). Frames without a box at the head and the tail are cut off;
    ``meta['first_frame']`` is the index of the kept first frame in the original sequence. Returns a new sequence
    with xywh boxes, or None when no box is left (or the image has no area).
    """
    width, height = size if size is not None else image_size(sequence)
    if width <= 0 or height <= 0:
        return None
    x1, y1 = sequence.boxes[:, 0], sequence.boxes[:, 1]
    x2, y2 = x1 + sequence.boxes[:, 2], y1 + sequence.boxes[:, 3]
    xyxy = np.stack([np.clip(x1, 0, width), np.clip(y1, 0, height), np.clip(x2, 0, width), np.clip(y2, 0, height)], 1)
    with np.errstate(invalid="ignore"):
        keep = sequence.visible.astype(bool) & np.isfinite(xyxy).all(1) & (xyxy[:, 0] < xyxy[:, 2]) & (
            xyxy[:, 1] < xyxy[:, 3])
    if not keep.any():
        return None
    first, last = int(np.argmax(keep)), len(keep) - int(np.argmax(keep[::-1]))
    boxes = np.where(keep[:, None], np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1), np.nan)
    # the raw flags are folded into ``visible`` here (and would no longer match the trimmed frames)
    meta = {k: v for k, v in sequence.meta.items() if k != "visible_flags"}
    meta["first_frame"] = sequence.meta.get("first_frame", 0) + first
    return replace(sequence, frames=sequence.frames[first:last], boxes=boxes[first:last],
                   visible=keep[first:last], meta=meta)


def clean_sequences(sequences: Iterable[TrackingSequence]) -> list[TrackingSequence]:
    """:func:`clean_sequence` over a dataset, leaving out the sequences with nothing left."""
    return [cleaned for cleaned in map(clean_sequence, sequences) if cleaned is not None]


READERS: dict[str, Callable[..., list[TrackingSequence]]] = {
    "got10k": read_got10k, "folder": read_folder, "lasot": read_lasot, "lasot_ext": read_lasot_ext,
    "trackingnet": read_trackingnet, "tnl2k": read_tnl2k, "coco": read_coco}


def load_sequences(name: str, root: PathLike, split: Optional[str] = None, **options: Any
                   ) -> list[TrackingSequence]:
    """Read dataset ``name`` (a key of ``READERS``) from ``root``; ``split`` as the dataset names it.

    ``options`` go to the reader (GOT-10k: ``split_file=`` for ``vottrain``/``votval``; COCO: ``year=``).
    """
    if name not in READERS:
        raise ValueError(f"unknown tracking dataset {name!r}; choose one of {sorted(READERS)}")
    reader = READERS[name]
    return reader(root, **options) if split is None else reader(root, split, **options)
