"""Tracking metrics as LoRAT reports them (arXiv 2403.05231; official code github.com/LitingLin/LoRAT, whose
evaluation follows pytracking / OSTrack analysis and the GOT-10k toolkit).

OPE (LaSOT, LaSOT_ext, TNL2K, …), per sequence, boxes xywh:

- IoU with the pixel-inclusive convention (intersection side = min(x + w − 1) − max(x) + 1, clamped ≥ 0);
- centre = (x + (w − 1)/2, y + (h − 1)/2); CLE = ‖c_p − c_g‖; normalised CLE divides the offset by the GT size;
- a frame is invalid when its GT box has w ≤ 0 or h ≤ 0 (or no box), and, on LaSOT, LaSOT_ext and VastTrack
  only, when the dataset flags the target as not visible (the official ``ope_metrics`` reads no other set's flags,
  so GOT-10k's absence flags leave OPE alone);
- invalid frames get IoU −1 (a success failure everywhere); for normalised precision they are hits, and on UAV-style
  sets (name starting ``uav``) hits for precision too — except frames flagged invisible on LaSOT and VastTrack (not
  LaSOT_ext), which are misses for both; the denominator is every frame, frame 0 included. ``protocol="strict"``
  keeps our stricter rule instead: every invalid frame a miss, every dataset's flags read;
- success SR(τ) = share of frames with IoU > τ for τ = 0, 0.05, …, 1 (21 values), AUC = their mean;
  precision = share with CLE ≤ 20 px; normalised precision = share with normalised CLE ≤ 0.2;
- a dataset's score is the mean over sequences.

GOT-10k: IoU (continuous, toolkit ``rect_iou``) of frames 1…N−1 where the target is visible, concatenated over
all sequences; AO = mean, SR0.5 / SR0.75 = share above 0.5 / 0.75. With the image size given, both boxes are first
bounded to the image as the toolkit does (x → [0, W], then w → [0, W − x]: a box reaching left of the image is moved
in, not cut).
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


FLAGGED_DATASETS = ("lasot", "lasot_ext", "lasot_extension", "vasttrack")  # whose visibility flags OPE reads
INVISIBLE_MISS_DATASETS = ("lasot", "vasttrack")  # where flagged-invisible frames stay precision misses
PROTOCOLS = ("official", "strict")
HIT = -1.0  # an error below every threshold: the frame counts as a hit


def _dataset_key(dataset: str) -> str:
    return dataset.lower().replace("-", "_")


def _invalid_frames(g: np.ndarray, visible: Optional[np.ndarray], key: str, protocol: str) -> np.ndarray:
    """(N,) bool: frames without a usable GT box, plus the flagged-invisible ones where the protocol reads flags."""
    invalid = ~(np.isfinite(g).all(1) & (np.nan_to_num(g[:, 2]) > 0) & (np.nan_to_num(g[:, 3]) > 0))
    if visible is not None and (protocol == "strict" or key in FLAGGED_DATASETS):
        invalid |= ~visible
    return invalid


def _frame_errors(p: np.ndarray, g: np.ndarray, visible: Optional[np.ndarray], dataset: str, protocol: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) IoU, CLE and normalised CLE with the invalid frames set to a miss (−1 / ∞) or a hit (−1 for errors)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose one of {PROTOCOLS}.")
    key, official = _dataset_key(dataset), protocol == "official"
    invalid = _invalid_frames(g, visible, key, protocol)
    offset = _centres(p) - _centres(g)
    with np.errstate(divide="ignore", invalid="ignore"):
        cle, norm_cle = np.linalg.norm(offset, axis=1), np.linalg.norm(offset / g[:, 2:], axis=1)
    iou = np.where(invalid, -1.0, iou_pixel_inclusive(p, g))
    cle = np.where(invalid, HIT if official and key.startswith("uav") else np.inf, cle)
    norm_cle = np.where(invalid, HIT if official else np.inf, norm_cle)
    if official and visible is not None and key in INVISIBLE_MISS_DATASETS:
        cle, norm_cle = np.where(visible, cle, np.inf), np.where(visible, norm_cle, np.inf)
    return iou, cle, norm_cle


def ope_sequence(pred: Sequence, gt: Sequence, visible: Optional[Sequence[bool]] = None, dataset: str = "",
                 protocol: str = "official") -> dict:
    """One sequence's OPE scores: ``auc``, ``precision`` (20 px), ``norm_precision`` (0.2) and the three curves.

    ``pred``, ``gt``: (N, 4) xywh; ``visible``: (N,) the dataset's visibility flags (None: no flags); ``dataset``
    (a reader name such as ``lasot``, ``lasot_ext``, ``uav123``) picks the official per-dataset rules for invalid
    frames (module docstring); ``protocol="strict"`` counts every invalid frame as a miss instead.
    """
    p, g = _boxes(pred), _boxes(gt)
    if len(p) != len(g):
        raise ValueError(f"{len(p)} predicted boxes for {len(g)} ground-truth frames; give one box per frame.")
    flags = None if visible is None else np.asarray(visible, dtype=bool).reshape(-1)
    iou, cle, norm_cle = _frame_errors(p, g, flags, dataset, protocol)
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


def bound_to_image(boxes: Sequence, size: tuple[int, int]) -> np.ndarray:
    """(N, 4) xywh bounded to a ``size`` = (W, H) image as the GOT-10k toolkit's ``rect_iou`` does: x, y clipped to
    [0, W] / [0, H], then w, h to [0, W − x] / [0, H − y] (a box starting left of the image is moved in, not cut)."""
    b = _boxes(boxes).copy()
    for i, extent in enumerate(size):
        b[:, i] = np.clip(b[:, i], 0, extent)
        b[:, i + 2] = np.clip(b[:, i + 2], 0, extent - b[:, i])
    return b


def got10k_scores(sequences: Sequence[tuple], sizes: Optional[Sequence[Optional[tuple[int, int]]]] = None) -> dict:
    """GOT-10k AO / SR0.5 / SR0.75 over ``(pred, gt, visible)`` triples (visible: cover > 0 per frame, or None).

    Frame 0 (the initialisation) is excluded; IoUs of all remaining visible frames are pooled (frame-weighted).
    ``sizes``: each sequence's image (W, H); where given, both boxes are bounded to it first (:func:`bound_to_image`,
    the toolkit's rule), otherwise the IoU is the unbounded one.
    """
    ious = []
    for i, (pred, gt, visible) in enumerate(sequences):
        size = sizes[i] if sizes is not None else None
        if size is not None:
            pred, gt = bound_to_image(pred, size), bound_to_image(gt, size)
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
