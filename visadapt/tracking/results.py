"""Tracking results on disk: our own per-sequence files and the formats the GOT-10k and TrackingNet servers take.

* ours: ``<folder>/<sequence>.txt``, one ``x,y,w,h`` row per frame (0-based pixels), optional
  ``<sequence>_time.txt`` (seconds per frame); :func:`write_results` / :func:`read_results`.
* GOT-10k test server (the got10k toolkit's layout): ``<tracker>/<sequence>/<sequence>_001.txt`` … ``_003.txt``
  (one file per run; line 1 is the initial box), and ``<sequence>_time.txt`` with one column of seconds per run;
  :func:`write_got10k_sequence`, then :func:`zip_results` on the tracker folder. Boxes are rounded out to whole
  pixels by default, as the official LoRAT adaptor writes them (:func:`whole_pixel_boxes`).
* TrackingNet test server (pytracking's layout): ``<sequence>.txt`` per sequence, zipped flat;
  :func:`write_trackingnet_sequence`, then :func:`zip_results`.

Every file is written atomically; wrong lengths, NaN/inf boxes and bad run numbers raise ``ValueError``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from visadapt.utils.io import atomic_path, write_text_atomic

PathLike = Union[str, Path]
GOT10K_MAX_RUNS = 3


def _checked_boxes(boxes: np.ndarray, what: str, frames: Optional[int] = None) -> np.ndarray:
    """(N, 4) finite float64, or a ValueError that says what is wrong."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"{what}: boxes of shape {boxes.shape}; give (N, 4) x,y,w,h rows, one per frame.")
    if frames is not None and len(boxes) != frames:
        raise ValueError(f"{what}: {len(boxes)} boxes for {frames} frames; give one box per frame.")
    bad = np.flatnonzero(~np.isfinite(boxes).all(1))
    if bad.size:
        raise ValueError(f"{what}: the box of frame {bad[0]} is not finite ({boxes[bad[0]].tolist()}); "
                         "the servers reject NaN — write the last good box for frames the tracker lost.")
    return boxes


def _checked_times(times: Sequence[float], frames: int, what: str) -> np.ndarray:
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    if len(times) != frames:
        raise ValueError(f"{what}: {len(times)} times for {frames} frames; give one time (s) per frame.")
    if not np.isfinite(times).all() or (times < 0).any():
        raise ValueError(f"{what}: times must be finite and non-negative seconds.")
    return times


def _rows(array: np.ndarray, fmt: str) -> str:
    with io.StringIO() as text:
        np.savetxt(text, array, fmt=fmt, delimiter=",")
        return text.getvalue()


def _with_init(boxes: np.ndarray, init_box: Optional[Sequence[float]], what: str) -> np.ndarray:
    if init_box is None:
        return boxes
    boxes = boxes.copy()
    boxes[0] = _checked_boxes(np.asarray(init_box, dtype=np.float64).reshape(1, 4), f"{what} (init box)")[0]
    return boxes


def write_results(folder: PathLike, name: str, boxes: np.ndarray, times: Optional[Sequence[float]] = None,
                  frames: Optional[int] = None) -> Path:
    """Write (N, 4) xywh ``boxes`` to ``<folder>/<name>.txt`` (and ``times`` to ``<name>_time.txt``); return it.

    ``frames`` (the sequence length), when given, is checked against N.
    """
    boxes = _checked_boxes(boxes, name, frames)
    path = Path(folder) / f"{name}.txt"
    write_text_atomic(_rows(boxes, "%.6f"), path)
    if times is not None:
        write_text_atomic(_rows(_checked_times(times, len(boxes), name), "%.8f"), Path(folder) / f"{name}_time.txt")
    return path


def read_results(path: PathLike, name: Optional[str] = None) -> np.ndarray:
    """Read a result file (``path``, or ``<path>/<name>.txt``): (N, 4) xywh float64. Comma, tab or space separated."""
    path = Path(path) / f"{name}.txt" if name is not None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no result file {path}; write it with write_results (or check the tracker name).")
    rows = [line.replace(",", " ").replace("\t", " ").split() for line in path.read_text().splitlines()]
    rows = [row for row in rows if row]
    if not rows or any(len(row) != 4 for row in rows):
        raise ValueError(f"{path} is not a result file: every line must hold 4 numbers x,y,w,h.")
    return np.asarray(rows, dtype=np.float64)


def whole_pixel_boxes(boxes: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """(N, 4) xywh → (N, 4) xywh of whole pixels covering each box: x1, y1 floored, x2, y2 = ⌊x + w + 1 − eps⌋ (the
    official adaptor's rounding: an end within ``eps`` past a whole pixel does not claim the next one)."""
    b = np.asarray(boxes, dtype=np.float64)
    start = np.floor(b[:, :2])
    end = np.floor(b[:, :2] + b[:, 2:] + 1 - eps)
    return np.concatenate([start, end - start], axis=1)


def write_got10k_sequence(tracker_dir: PathLike, name: str, runs: Sequence[np.ndarray],
                          times: Sequence[Sequence[float]], init_box: Optional[Sequence[float]] = None,
                          frames: Optional[int] = None, whole_pixels: bool = True) -> Path:
    """Write one GOT-10k test sequence for the server: ``<tracker_dir>/<name>/<name>_00r.txt`` for run r = 1…len(runs)
    and ``<name>_time.txt`` (N rows, one column per run), as the got10k toolkit writes them.

    ``runs``: 1 to 3 arrays of (N, 4) xywh boxes (the protocol runs a tracker 3 times; all are submitted).
    ``init_box``, when given, is written as line 1 of every run (the toolkit does the same); otherwise line 1 must
    already be the initial box. ``whole_pixels`` (default, the official adaptor's files) rounds every box out to
    whole pixels (:func:`whole_pixel_boxes`); False writes the boxes as they are. Returns the sequence folder.
    """
    if not 1 <= len(runs) <= GOT10K_MAX_RUNS:
        raise ValueError(f"{name}: {len(runs)} runs; GOT-10k takes 1 to {GOT10K_MAX_RUNS}.")
    if len(times) != len(runs):
        raise ValueError(f"{name}: {len(times)} time lists for {len(runs)} runs; give one per run.")
    checked = [_with_init(_checked_boxes(b, f"{name} run {r}", frames), init_box, name) for r, b in enumerate(runs, 1)]
    if len({len(b) for b in checked}) != 1:
        raise ValueError(f"{name}: the runs have different lengths {[len(b) for b in checked]}.")
    if whole_pixels:
        checked = [whole_pixel_boxes(b) for b in checked]
    n = len(checked[0])
    time_table = np.stack([_checked_times(t, n, f"{name} run {r}") for r, t in enumerate(times, 1)], 1)
    folder = Path(tracker_dir) / name
    for r, boxes in enumerate(checked, 1):
        write_text_atomic(_rows(boxes, "%.4f"), folder / f"{name}_{r:03d}.txt")
    write_text_atomic(_rows(time_table, "%.8f"), folder / f"{name}_time.txt")
    return folder


def write_trackingnet_sequence(folder: PathLike, name: str, boxes: np.ndarray,
                               init_box: Optional[Sequence[float]] = None, frames: Optional[int] = None) -> Path:
    """Write one TrackingNet test sequence, ``<folder>/<name>.txt`` (``x,y,w,h`` per frame, 2 decimals as
    pytracking's packer writes them); ``init_box`` replaces line 1 when given. Returns the file."""
    boxes = _with_init(_checked_boxes(boxes, name, frames), init_box, name)
    path = Path(folder) / f"{name}.txt"
    write_text_atomic(_rows(boxes, "%.2f"), path)
    return path


def zip_results(folder: PathLike, zip_path: Optional[PathLike] = None,
                expected: Optional[Iterable[str]] = None) -> Path:
    """Zip everything under ``folder`` with paths relative to it (the archive the servers take); return its path.

    For GOT-10k pass the tracker folder (entries ``<seq>/<seq>_001.txt``, as the got10k toolkit packs them); for
    TrackingNet the folder of ``<seq>.txt`` files. ``expected`` (sequence names), when given, must all be present —
    a server rejects an incomplete submission. The default archive is ``<folder>.zip``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no result folder {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if expected is not None:
        present = {p.relative_to(folder).parts[0].removesuffix(".txt") for p in files}
        missing = sorted(set(expected) - present)
        if missing:
            raise ValueError(f"{len(missing)} sequences have no results in {folder} (first: {missing[0]}); "
                             "run the tracker on them before zipping.")
    zip_path = Path(zip_path) if zip_path is not None else folder.parent / f"{folder.name}.zip"
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, path.relative_to(folder).as_posix())
    return zip_path
