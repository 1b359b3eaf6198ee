"""Figures written as PNG files: the matplotlib backend is chosen here, once, for files only (no display needed).

Import ``plt`` from this module instead of ``matplotlib.pyplot``; nothing else in visadapt switches the backend.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path  # noqa: E402

__all__ = ["plt", "save_figure", "plot_training_curve"]


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_training_curve(history: Sequence[dict], path: str | Path, title: str = "",
                        loss_name: str = "loss") -> None:
    """Loss per step (raw and, from 100 steps, smoothed) with the learning rate on a second axis; one legend names
    every line."""
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 50)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if window == 1:  # a short run: the mean of one step is the raw curve
        lines = ax.plot(steps, losses, color="tab:blue", lw=1.2, label="loss")
    else:
        smooth = [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        lines = ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
        lines += ax.plot(steps, smooth, color="tab:blue", lw=1.6, label=f"loss (mean of {window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel(loss_name)
    lr_ax = ax.twinx()
    lines += lr_ax.plot(steps, [h["lr"] for h in history], color="tab:orange", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    ax.set_title(f"training curve {title}".strip())
    save_figure(fig, path)
