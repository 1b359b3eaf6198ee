"""Score a tracker on annotated sequences and write what benchmarks expect: one ``<seq>.txt`` per sequence
(``x,y,w,h`` per frame), ``results.json`` (OPE success AUC, precision, normalised precision; GOT-10k AO / SR0.5 /
SR0.75 for GOT-10k-like data) and the success / precision plots, next to a static-box baseline (the first box kept
for every frame), which any tracker should beat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from visadapt.utils import atomic_path, save_json_atomic

from .datasets import TrackingSequence
from .metrics import got10k_scores, ope_dataset, ope_sequence, plot_success_precision
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


def score(predictions: Sequence[np.ndarray], sequences: Sequence[TrackingSequence]) -> dict:
    """OPE scores (and GOT-10k ones where they apply) with the mean curves as lists."""
    per_seq = [ope_sequence(p, s.boxes, s.visible) for p, s in zip(predictions, sequences)]
    ope = ope_dataset(per_seq)
    result = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ope.items()}
    result["per_sequence_auc"] = {s.name: r["auc"] for s, r in zip(sequences, per_seq)}
    if got10k_like(sequences):
        visible = [s.meta["cover"] > 0 if "cover" in s.meta else s.visible for s in sequences]
        result.update(got10k_scores([(p, s.boxes, v) for p, s, v in zip(predictions, sequences, visible)]))
    return result


def write_predictions(predictions: Sequence[np.ndarray], sequences: Sequence[TrackingSequence], folder: Path
                      ) -> None:
    """``folder/<seq>.txt``: ``x,y,w,h`` per frame, row 1 the initial box."""
    folder.mkdir(parents=True, exist_ok=True)
    for boxes, seq in zip(predictions, sequences):
        with atomic_path(folder / f"{seq.name}.txt") as tmp:
            np.savetxt(tmp, boxes, fmt="%.2f", delimiter=",")


def headline(result: dict) -> dict:
    """The scalar scores of :func:`score`."""
    keys = ("auc", "precision", "norm_precision", "ao", "sr50", "sr75")
    return {k: result[k] for k in keys if k in result}


def evaluate_tracker(tracker: Tracker, sequences: Sequence[TrackingSequence], out: Optional[Path] = None,
                     batch_size: int = 16, name: str = "tracker", title: str = "") -> dict:
    """Track and score ``sequences``; with ``out`` also write ``results/<seq>.txt``, ``success_plot.png`` and
    ``evaluation.json``. Returns {``name``: scores, ``static box``: scores, ``sequences``, ``frames``}."""
    if not sequences:
        raise ValueError("No sequence to evaluate on.")
    predictions = track_dataset(tracker, sequences, batch_size)
    results = {name: score(predictions, sequences), STATIC: score(static_boxes(sequences), sequences),
               "sequences": len(sequences), "frames": int(sum(len(s) for s in sequences))}
    if out is not None:
        write_predictions(predictions, sequences, out / "results")
        plot_success_precision({k: curves(results[k]) for k in (name, STATIC)}, out / "success_plot.png", title)
    return results


def curves(result: dict) -> dict:
    return {**result, **{k: np.asarray(result[k]) for k in CURVES}}


def save_evaluation(results: dict, path: Path) -> None:
    save_json_atomic(results, path)
