"""Score a tracker on annotated sequences and write what benchmarks expect: one ``<seq>.txt`` per sequence
(``x,y,w,h`` per frame), ``results.json`` (OPE success AUC, precision, normalised precision; GOT-10k AO / SR0.5 /
SR0.75 for GOT-10k-like data) and the success / precision plots, next to a static-box baseline (the first box kept
for every frame), which any tracker should beat; and, for test splits, the GOT-10k and TrackingNet server files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from .datasets import TrackingSequence, image_size
from .metrics import got10k_scores, ope_dataset, ope_sequence, plot_success_precision
from .results import write_got10k_sequence, write_results, write_trackingnet_sequence, zip_results
from .tracker import Tracker

STATIC = "static box"
CURVES = ("success_curve", "precision_curve", "norm_precision_curve")


def track_dataset(tracker: Tracker, sequences: Sequence[TrackingSequence], batch_size: int = 16,
                  desc: str = "track") -> list[np.ndarray]:
    """(N, 4) xywh predictions per sequence, sequences tracked in lockstep ``batch_size`` at a time."""
    for seq in sequences:
        if not np.isfinite(seq.boxes[0]).all() or seq.boxes[0][2] <= 0 or seq.boxes[0][3] <= 0:
            raise ValueError(f"Sequence {seq.name} has no box on its first frame; trackers start from it.")
    bar = tqdm(total=sum(len(s) - 1 for s in sequences), desc=desc, unit="frame", dynamic_ncols=True, leave=False)
    try:
        out = tracker.track_many([s.frames for s in sequences], [s.boxes[0] for s in sequences], batch_size,
                                 progress=bar.update)
    finally:
        bar.close()
    return [boxes for boxes, _ in out]


def static_boxes(sequences: Sequence[TrackingSequence]) -> list[np.ndarray]:
    """The baseline: the first box repeated over every frame."""
    return [np.repeat(seq.boxes[:1], len(seq), axis=0) for seq in sequences]


def got10k_like(sequences: Sequence[TrackingSequence]) -> bool:
    """Whether the GOT-10k protocol applies (GOT-10k data, or any data with per-frame cover labels)."""
    return all(s.dataset == "got10k" or "cover" in s.meta for s in sequences)


def visibility_flags(sequence: TrackingSequence) -> np.ndarray:
    """(N,) the dataset's own visibility flags (LaSOT keeps them apart from box validity), else ``visible``."""
    return sequence.meta.get("visible_flags", sequence.visible)


def _ope(predictions: Sequence[np.ndarray], sequences: Sequence[TrackingSequence], protocol: str) -> list[dict]:
    return [ope_sequence(p, s.boxes, visibility_flags(s), s.dataset, protocol) for p, s in zip(predictions, sequences)]


def score(predictions: Sequence[np.ndarray], sequences: Sequence[TrackingSequence]) -> dict:
    """OPE scores by the official per-dataset rules (and GOT-10k ones, boxes bounded to the image, where they apply)
    with the mean curves as lists; ``strict``: the OPE scores with every invalid frame a miss."""
    per_seq = _ope(predictions, sequences, "official")
    ope = ope_dataset(per_seq)
    result = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ope.items()}
    result["per_sequence_auc"] = {s.name: r["auc"] for s, r in zip(sequences, per_seq)}
    strict = ope_dataset(_ope(predictions, sequences, "strict"))
    result["strict"] = {k: strict[k] for k in ("auc", "precision", "norm_precision")}
    if got10k_like(sequences):
        visible = [s.meta["cover"] > 0 if "cover" in s.meta else s.visible for s in sequences]
        result.update(got10k_scores([(p, s.boxes, v) for p, s, v in zip(predictions, sequences, visible)],
                                    sizes=[image_size(s) for s in sequences]))
    return result


def write_predictions(predictions: Sequence[np.ndarray], sequences: Sequence[TrackingSequence], folder: Path
                      ) -> None:
    """``folder/<seq>.txt``: ``x,y,w,h`` per frame, row 1 the initial box (:func:`results.write_results`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for boxes, seq in zip(predictions, sequences):
        write_results(folder, seq.name, boxes, frames=len(seq))


def annotated_beyond_first(sequences: Sequence[TrackingSequence]) -> bool:
    """Whether any sequence has a box after frame 0 (test splits of GOT-10k and TrackingNet have none: their
    servers score them)."""
    return any(np.isfinite(s.boxes[1:]).all(1).any() for s in sequences)


def write_server_files(predictions: Sequence[np.ndarray], sequences: Sequence[TrackingSequence], folder: Path,
                       server: str, seconds_per_frame: float, tracker: str = "visadapt_lorat") -> Path:
    """The submission of ``server`` (``got10k``: ``<folder>/<tracker>/<seq>/<seq>_001.txt`` + ``_time.txt``;
    ``trackingnet``: ``<folder>/<seq>.txt``) and its zip; returns the zip. Times are the evaluation's mean seconds per
    frame (sequences are tracked in lockstep, so a frame's own time is not separable)."""
    names = [s.name for s in sequences]
    if server == "got10k":
        root = folder / tracker
        for boxes, seq in zip(predictions, sequences):
            write_got10k_sequence(root, seq.name, [boxes], [[seconds_per_frame] * len(boxes)],
                                  init_box=seq.boxes[0], frames=len(seq))
        return zip_results(root, expected=names)
    if server == "trackingnet":
        for boxes, seq in zip(predictions, sequences):
            write_trackingnet_sequence(folder, seq.name, boxes, init_box=seq.boxes[0], frames=len(seq))
        return zip_results(folder, expected=names)
    raise ValueError(f"unknown server format {server!r}; choose got10k or trackingnet.")


def evaluate_tracker(tracker: Tracker, sequences: Sequence[TrackingSequence], out: Optional[Path] = None,
                     batch_size: int = 16, name: str = "tracker", title: str = "",
                     server: Optional[str] = None) -> dict:
    """Track and score ``sequences``; with ``out`` also write ``results/<seq>.txt`` and ``success_plot.png`` (and,
    with ``server``, the submission files and zip under ``out/server``). Sequences annotated on their first frame
    only (test splits) are tracked but not scored. Returns {``name``: scores, ``static box``: scores, ``sequences``,
    ``frames``, ``seconds_per_frame``}."""
    if not sequences:
        raise ValueError("No sequence to evaluate on.")
    started = time.perf_counter()
    predictions = track_dataset(tracker, sequences, batch_size)
    frames = int(sum(len(s) for s in sequences))
    results: dict = {"sequences": len(sequences), "frames": frames,
                     "seconds_per_frame": (time.perf_counter() - started) / max(frames - len(sequences), 1)}
    scored = annotated_beyond_first(sequences)
    if scored:
        results.update({name: score(predictions, sequences), STATIC: score(static_boxes(sequences), sequences)})
    if out is not None:
        write_predictions(predictions, sequences, out / "results")
        if scored:
            plot_success_precision({k: curves(results[k]) for k in (name, STATIC)}, out / "success_plot.png", title)
        if server:
            zipped = write_server_files(predictions, sequences, out / "server", server, results["seconds_per_frame"])
            results["server_zip"] = str(zipped.relative_to(out))
    return results


def curves(result: dict) -> dict:
    return {**result, **{k: np.asarray(result[k]) for k in CURVES}}
