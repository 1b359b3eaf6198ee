"""Tracking datasets where trackers keep them: one reader per on-disk layout, all returning `TrackingSequence`.

Boxes are ``x, y, w, h`` in 0-based continuous pixels (LaSOT's 1-based files are shifted on load, as the official
code does). A frame is *visible* when the dataset says the target is in view (LaSOT: neither full occlusion nor out
of view; GOT-10k: absence 0) and its box has positive size; frames without a box hold NaN.

Every layout problem raises one `DatasetLayoutError` whose message shows the expected tree and the fix.
``READERS`` maps a dataset name to its reader; :func:`load_sequences` is the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from visadapt.utils import DatasetLayoutError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class TrackingSequence:
    """One annotated video: frame files in order, (N, 4) xywh boxes (NaN where unknown), (N,) visibility."""

    name: str
    frames: list[Path]
    boxes: np.ndarray
    visible: np.ndarray
    dataset: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)


LAYOUTS = {
    "got10k": (
        "GOT-10k/\n"
        "  train/ | val/ | test/\n"
        "    list.txt                      (one sequence folder name per line)\n"
        "    GOT-10k_Train_000001/\n"
        "      00000001.jpg 00000002.jpg …\n"
        "      groundtruth.txt             (x,y,w,h per frame, 0-based; test: first frame only)\n"
        "      absence.label               (0/1 per frame; optional)\n"
        "      cover.label                 (0-8 per frame; optional)"),
    "folder": (
        "<sequence>/\n"
        "  img/ (or the frames directly): 00000001.jpg 00000002.jpg … (any of .jpg .png .bmp, sorted by name)\n"
        "  groundtruth.txt                 (x,y,w,h per frame, comma/space/tab separated; at least the first frame)"),
}


def layout_error(kind: str, problem: str, fix: str) -> DatasetLayoutError:
    """The one error of this module: what is wrong, the expected tree of ``kind``, and how to fix it."""
    return DatasetLayoutError(f"{problem}\n\nExpected layout ({kind}):\n{LAYOUTS[kind]}\n\nFix: {fix}")


def read_boxes(path: Path, kind: str) -> np.ndarray:
    """Read ``x,y,w,h`` rows (comma, space or tab separated; ``nan`` allowed) → (N, 4) float64."""
    if not path.is_file():
        raise layout_error(kind, f"missing {path}", f"put the annotation file at {path}.")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
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
    return np.asarray([int(float(v)) for v in values])


def _pad_boxes(boxes: np.ndarray, n: int) -> np.ndarray:
    """Boxes for the first frames only (test splits) become (n, 4) with NaN rows after them."""
    if len(boxes) >= n:
        return boxes[:n]
    return np.concatenate([boxes, np.full((n - len(boxes), 4), np.nan)])


def _frames(folder: Path, kind: str) -> list[Path]:
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise layout_error(kind, f"no image files in {folder}", "put the frames (.jpg/.png/.bmp) there.")
    return frames


def _visible(boxes: np.ndarray, flags_hidden: Optional[np.ndarray] = None) -> np.ndarray:
    visible = np.isfinite(boxes).all(1) & (np.nan_to_num(boxes[:, 2]) > 0) & (np.nan_to_num(boxes[:, 3]) > 0)
    return visible if flags_hidden is None else visible & ~flags_hidden.astype(bool)


def read_folder(root: Union[str, Path], split: Optional[str] = None) -> list[TrackingSequence]:
    """A plain sequence folder: frames (in ``img/`` or beside the file) and ``groundtruth.txt``."""
    root = Path(root)
    if not root.is_dir():
        raise layout_error("folder", f"{root} is not a folder", "pass the sequence folder.")
    frame_dir = root / "img" if (root / "img").is_dir() else root
    frames = _frames(frame_dir, "folder")
    boxes = _pad_boxes(read_boxes(root / "groundtruth.txt", "folder"), len(frames))
    return [TrackingSequence(root.name, frames, boxes, _visible(boxes), "folder")]


def read_got10k(root: Union[str, Path], split: str = "train") -> list[TrackingSequence]:
    """GOT-10k ``train`` / ``val`` / ``test`` (``root`` is the folder holding the split folders)."""
    root = Path(root)
    split_dir = root / split
    listing = split_dir / "list.txt"
    if not listing.is_file():
        raise layout_error("got10k", f"missing {listing}", f"pass the GOT-10k root (the folder that holds {split}/).")
    sequences = []
    for name in listing.read_text().split():
        folder = split_dir / name
        if not folder.is_dir():
            raise layout_error("got10k", f"{listing} names {name}, which is not in {split_dir}",
                               "restore the sequence folder or remove it from list.txt.")
        frames = _frames(folder, "got10k")
        boxes = _pad_boxes(read_boxes(folder / "groundtruth.txt", "got10k"), len(frames))
        absence = read_flags(folder / "absence.label", len(frames), "got10k")
        cover = read_flags(folder / "cover.label", len(frames), "got10k")
        meta = {"cover": cover} if cover is not None else {}
        sequences.append(TrackingSequence(name, frames, boxes, _visible(boxes, absence), "got10k", meta))
    return sequences


READERS: dict[str, Callable[..., list[TrackingSequence]]] = {"got10k": read_got10k, "folder": read_folder}


def load_sequences(name: str, root: Union[str, Path], split: Optional[str] = None) -> list[TrackingSequence]:
    """Read dataset ``name`` (a key of ``READERS``) from ``root``; ``split`` as the dataset names it."""
    if name not in READERS:
        raise ValueError(f"unknown tracking dataset {name!r}; choose one of {sorted(READERS)}")
    reader = READERS[name]
    return reader(root) if split is None else reader(root, split)
