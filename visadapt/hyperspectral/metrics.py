"""OA, AA, Cohen's κ, per-class accuracy and F1 (spec §8), and the confusion-matrix and class-map figures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from visadapt.fewshot.report import _save_figure


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """M[i, j] = pixels of true class i predicted as j (0-based labels)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape} true labels vs {y_pred.shape} predictions.")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray) -> dict:
    """OA, AA and κ (all ×100), per-class accuracy (recall ×100; 0 for a class without test pixels) and F1."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.sum()
    if n == 0:
        raise ValueError("No test pixels: the confusion matrix is empty.")
    diag, rows, cols = np.diag(m), m.sum(axis=1), m.sum(axis=0)
    recall = np.divide(diag, rows, out=np.zeros_like(diag), where=rows > 0)
    precision = np.divide(diag, cols, out=np.zeros_like(diag), where=cols > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(diag), where=precision + recall > 0)
    oa = diag.sum() / n
    pe = (rows * cols).sum() / n ** 2
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 1.0
    return {"OA": 100 * oa, "AA": 100 * recall.mean(), "kappa": 100 * kappa,
            "per_class_accuracy": (100 * recall).tolist(), "per_class_f1": (100 * f1).tolist(),
            "support": rows.astype(int).tolist()}


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (recall per cell) with the counts written in."""
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(m)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90, fontsize=7)
    ax.set_yticks(range(k), [str(n) for n in class_names], fontsize=7)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (test pixels)")
    _save_figure(fig, Path(path))


def class_colors(num_classes: int) -> np.ndarray:
    """RGB in [0, 1] for labels 0..K: black for 0 (unlabelled), then tab20 / hsv colours."""
    import matplotlib

    base = matplotlib.colormaps["tab20"].colors if num_classes <= 20 else \
        [matplotlib.colormaps["hsv"](i / num_classes)[:3] for i in range(num_classes)]
    return np.vstack([[0.0, 0.0, 0.0], np.asarray(base[:num_classes])[:, :3]])


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return class_colors(num_classes)[np.clip(labels, 0, num_classes)]


def plot_class_map(prediction: np.ndarray, gt: np.ndarray, class_names: Sequence[str], path: Path,
                   title: str = "", labelled_only: Optional[np.ndarray] = None) -> None:
    """The predicted map of the whole scene next to the ground truth (and the prediction on labelled pixels)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    k = len(class_names)
    panels = [("prediction (whole scene)", prediction), ("ground truth", gt)]
    if labelled_only is not None:
        panels.insert(1, ("prediction (labelled pixels)", np.where(gt > 0, prediction, 0)))
    h, w = gt.shape
    fig, axes = plt.subplots(1, len(panels), figsize=(min(18, 3.2 * len(panels) * max(1.0, w / h)) + 2.5, 4))
    for ax, (name, labels) in zip(axes, panels):
        ax.imshow(colorize(labels, k), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    colors = class_colors(k)
    fig.legend(handles=[Patch(color=colors[i + 1], label=str(n)) for i, n in enumerate(class_names)],
               loc="center right", fontsize=7, frameon=False)
    fig.subplots_adjust(right=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save_figure(fig, Path(path))


def save_class_map_png(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """The class map alone, one image pixel per scene pixel (colours of :func:`class_colors`), written atomically."""
    import matplotlib.image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    matplotlib.image.imsave(tmp, (colorize(labels, num_classes) * 255).astype(np.uint8))
    os.replace(tmp, path)
