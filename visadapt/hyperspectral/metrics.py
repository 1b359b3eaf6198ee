"""OA, AA, Cohen's κ, per-class accuracy and F1 (spec §8), and the confusion-matrix and class-map figures."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from visadapt.utils import atomic_path


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
    """Row-normalised confusion matrix (recall per cell, with a colour bar) with the counts written in."""
    from visadapt.utils.figures import plt, save_figure

    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(m)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class (recall)")
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
    save_figure(fig, Path(path))


def class_colors(num_classes: int) -> np.ndarray:
    """RGB in [0, 1] for labels 0..K: black for 0 (unlabelled), then tab20 / hsv colours."""
    import matplotlib

    base = matplotlib.colormaps["tab20"].colors if num_classes <= 20 else \
        [matplotlib.colormaps["hsv"](i / num_classes)[:3] for i in range(num_classes)]
    return np.vstack([[0.0, 0.0, 0.0], np.asarray(base[:num_classes])[:, :3]])


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return class_colors(num_classes)[np.clip(labels, 0, num_classes)]


def plot_class_map(prediction: np.ndarray, gt: Optional[np.ndarray], class_names: Sequence[str], path: Path,
                   title: str = "", labelled_only: bool = False) -> None:
    """The predicted map of the whole scene next to the ground truth (and, with ``labelled_only``, the prediction
    on the labelled pixels); ``gt=None`` draws the prediction alone. The legend names every class and black as
    unlabelled."""
    from matplotlib.patches import Patch

    from visadapt.utils.figures import plt, save_figure

    k = len(class_names)
    panels = [("prediction (whole scene)", prediction)]
    if gt is not None:
        if labelled_only:
            panels.append(("prediction (labelled pixels)", np.where(gt > 0, prediction, 0)))
        panels.append(("ground truth", gt))
    h, w = prediction.shape
    panel_width = 3.2 * max(0.5, min(2.0, w / h))
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels) + 2.2, 3.6), squeeze=False)
    for ax, (name, labels) in zip(axes[0], panels):
        ax.imshow(colorize(labels, k), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    colors = class_colors(k)
    handles = [Patch(color=colors[i + 1], label=str(n)) for i, n in enumerate(class_names)]
    handles.append(Patch(facecolor=colors[0], edgecolor="grey", label="unlabelled / not predicted"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False,
               title="class", title_fontsize=8)
    fig.suptitle(title or "class map", fontsize=10)
    fig.tight_layout()
    save_figure(fig, Path(path))


def save_class_map_png(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """The class map alone, one image pixel per scene pixel (colours of :func:`class_colors`), written atomically."""
    import matplotlib.image

    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, (colorize(labels, num_classes) * 255).astype(np.uint8))
