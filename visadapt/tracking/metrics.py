"""Tracking metrics as LoRAT reports them (arXiv 2403.05231; official code github.com/LitingLin/LoRAT, whose
evaluation follows pytracking / OSTrack analysis and the GOT-10k toolkit).

OPE (LaSOT, LaSOT_ext, TNL2K, …), per sequence, boxes xywh:

- IoU with the pixel-inclusive convention (intersection side = min(x + w − 1) − max(x) + 1, clamped ≥ 0);
- centre = (x + (w − 1)/2, y + (h − 1)/2); CLE = ‖c_p − c_g‖; normalised CLE divides the offset by the GT size;
- invalid frames (GT w ≤ 0 or h ≤ 0, or not visible when flags are given) get IoU −1 and CLE ∞: failures, and
  the denominator is every frame, frame 0 included;
- success SR(τ) = share of frames with IoU > τ for τ = 0, 0.05, …, 1 (21 values), AUC = their mean;
  precision = share with CLE ≤ 20 px; normalised precision = share with normalised CLE ≤ 0.2;
- a dataset's score is the mean over sequences.

GOT-10k: IoU (continuous, toolkit ``rect_iou``) of frames 1…N−1 where the target is visible, concatenated over
all sequences; AO = mean, SR0.5 / SR0.75 = share above 0.5 / 0.75.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from visadapt.utils.figures import plt, save_figure

SUCCESS_THRESHOLDS = np.linspace(0, 1, 21)
PRECISION_THRESHOLDS = np.arange(51, dtype=np.float64)  # 0 … 50 px
NORM_PRECISION_THRESHOLDS = np.linspace(0, 0.5, 51)


def _boxes(boxes: Sequence) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return arr


def iou_pixel_inclusive(pred: Sequence, gt: Sequence) -> np.ndarray:
    """(N, 4) xywh × (N, 4) xywh → (N,) IoU with inclusive pixel ends (pytracking)."""
    p, g = _boxes(pred), _boxes(gt)
    left, top = np.maximum(p[:, 0], g[:, 0]), np.maximum(p[:, 1], g[:, 1])
    right = np.minimum(p[:, 0] + p[:, 2] - 1, g[:, 0] + g[:, 2] - 1)
    bottom = np.minimum(p[:, 1] + p[:, 3] - 1, g[:, 1] + g[:, 3] - 1)
    inter = np.clip(right - left + 1, 0, None) * np.clip(bottom - top + 1, 0, None)
    union = p[:, 2] * p[:, 3] + g[:, 2] * g[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def iou_continuous(pred: Sequence, gt: Sequence) -> np.ndarray:
    """(N, 4) xywh × (N, 4) xywh → (N,) IoU with x2 = x + w (GOT-10k toolkit ``rect_iou``)."""
    p, g = _boxes(pred), _boxes(gt)
    w = np.clip(np.minimum(p[:, 0] + p[:, 2], g[:, 0] + g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    h = np.clip(np.minimum(p[:, 1] + p[:, 3], g[:, 1] + g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = w * h
    union = p[:, 2] * p[:, 3] + g[:, 2] * g[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _centres(b: np.ndarray) -> np.ndarray:
    return b[:, :2] + (b[:, 2:] - 1) / 2


def ope_sequence(pred: Sequence, gt: Sequence, visible: Optional[Sequence[bool]] = None) -> dict:
    """One sequence's OPE scores: ``auc``, ``precision`` (20 px), ``norm_precision`` (0.2) and the three curves."""
    p, g = _boxes(pred), _boxes(gt)
    if len(p) != len(g):
        raise ValueError(f"{len(p)} predicted boxes for {len(g)} ground-truth frames; give one box per frame.")
    valid = (g[:, 2] > 0) & (g[:, 3] > 0)
    if visible is not None:
        valid &= np.asarray(visible, dtype=bool)
    iou = np.where(valid, iou_pixel_inclusive(p, g), -1.0)
    offset = _centres(p) - _centres(g)
    cle = np.where(valid, np.linalg.norm(offset, axis=1), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_cle = np.where(valid, np.linalg.norm(offset / np.where(valid[:, None], g[:, 2:], 1), axis=1), np.inf)
    success = (iou[None, :] > SUCCESS_THRESHOLDS[:, None]).mean(axis=1)
    precision = (cle[None, :] <= PRECISION_THRESHOLDS[:, None]).mean(axis=1)
    norm_precision = (norm_cle[None, :] <= NORM_PRECISION_THRESHOLDS[:, None]).mean(axis=1)
    return {"auc": float(success.mean()), "precision": float((cle <= 20).mean()),
            "norm_precision": float((norm_cle <= 0.2).mean()), "success_curve": success,
            "precision_curve": precision, "norm_precision_curve": norm_precision}


def ope_dataset(sequences: Sequence[dict]) -> dict:
    """Mean over sequences of :func:`ope_sequence` results (scores and curves)."""
    if not sequences:
        raise ValueError("No sequence results to average.")
    keys = sequences[0].keys()
    return {k: (np.mean([s[k] for s in sequences], axis=0) if isinstance(sequences[0][k], np.ndarray)
                else float(np.mean([s[k] for s in sequences]))) for k in keys}


def got10k_scores(sequences: Sequence[tuple]) -> dict:
    """GOT-10k AO / SR0.5 / SR0.75 over ``(pred, gt, visible)`` triples (visible: cover > 0 per frame, or None).

    Frame 0 (the initialisation) is excluded; IoUs of all remaining visible frames are pooled (frame-weighted).
    """
    ious = []
    for pred, gt, visible in sequences:
        iou = iou_continuous(pred, gt)[1:]
        if visible is not None:
            iou = iou[np.asarray(visible, dtype=bool)[1:]]
        ious.append(iou)
    pooled = np.concatenate(ious) if ious else np.zeros(0)
    if pooled.size == 0:
        raise ValueError("No visible frame after the first in any sequence; GOT-10k scores are undefined.")
    return {"ao": float(pooled.mean()), "sr50": float((pooled > 0.5).mean()), "sr75": float((pooled > 0.75).mean()),
            "frames": int(pooled.size)}


def plot_success_precision(runs: dict[str, dict], path: str | Path, title: str = "") -> None:
    """Success and precision plots (one curve per run, AUC / P@20 in the legend) as one PNG.

    ``runs``: run name → :func:`ope_dataset` (or :func:`ope_sequence`) result.
    """
    fig, (ax_s, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    order = sorted(runs, key=lambda name: -runs[name]["auc"])
    for name in order:
        r = runs[name]
        ax_s.plot(SUCCESS_THRESHOLDS, r["success_curve"], label=f"{name} [AUC {100 * r['auc']:.1f}]")
        ax_p.plot(PRECISION_THRESHOLDS, r["precision_curve"], label=f"{name} [P@20 {100 * r['precision']:.1f}]")
    ax_s.set(xlabel="overlap threshold", ylabel="success rate", xlim=(0, 1), ylim=(0, 1.02),
             title=f"Success plot {title}".strip())
    ax_p.set(xlabel="location error threshold (px)", ylabel="precision", xlim=(0, 50), ylim=(0, 1.02),
             title=f"Precision plot {title}".strip())
    for ax in (ax_s, ax_p):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left" if ax is ax_s else "lower right", fontsize=8)
    save_figure(fig, path)
