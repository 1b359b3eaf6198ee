"""Per-session accuracies and the derived metrics of a class-incremental run, and their figures.

Per session s (percent, on the test images of the classes seen so far): ``base`` (classes of session 0),
``novel`` (all classes added since, pooled; None in session 0), ``all`` (every seen class, sample accuracy) and
``groups`` (accuracy on the classes introduced in each session j <= s). Over the run: average accuracy
Ā = mean_s all(s), performance drop PD = all(0) − all(S−1), base forgetting = base(0) − base(S−1), and the
harmonic mean HM(s) = 2·base·novel / (base + novel) for s >= 1 (conventional definitions; the paper's could not be
checked).

``all_per_batch`` is the official code's figure for ``all``: the mean of the accuracies of the test batches (100
images each, test-set order), so a short last batch counts as much as a full one. It equals ``all`` when every
batch is full (CIFAR-100, miniImageNet) and drifts from it on uneven test sets (CUB-200); ``all`` stays per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .sessions import SessionPlan

OFFICIAL_TEST_BATCH = 100  # the official code's --test_batch_size


def _pct(hits: np.ndarray) -> Optional[float]:
    return float(100.0 * hits.mean()) if len(hits) else None


def per_batch_accuracy(hits: np.ndarray, batch_size: int = OFFICIAL_TEST_BATCH) -> Optional[float]:
    """Percent: the mean over consecutive batches of ``batch_size`` of each batch's accuracy (the official 'all')."""
    if not len(hits):
        return None
    return float(100.0 * np.mean([hits[i:i + batch_size].mean() for i in range(0, len(hits), batch_size)]))


def session_accuracy(predictions: Sequence[int], labels: Sequence[int], plan: SessionPlan, session: int) -> dict:
    """base / novel / all / per-group accuracy (percent) of one session's test predictions."""
    pred, y = np.asarray(predictions), np.asarray(labels)
    if len(y) and y.max() >= plan.seen(session):
        raise ValueError(f"Session {session} sees classes < {plan.seen(session)}; a test label is {y.max()}.")
    hits = pred == y
    groups = np.array([plan.group_of(int(c)) for c in y], dtype=np.int64)
    return {"session": session, "classes_seen": plan.seen(session), "base": _pct(hits[y < plan.base]),
            "novel": _pct(hits[y >= plan.base]) if session else None, "all": _pct(hits),
            "all_per_batch": per_batch_accuracy(hits),
            "groups": [_pct(hits[groups == j]) for j in range(session + 1)], "num_test": int(len(y))}


def harmonic_mean(base: Optional[float], novel: Optional[float]) -> Optional[float]:
    if base is None or novel is None:
        return None
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def summarize(sessions: Sequence[dict]) -> dict:
    """Average accuracy, performance drop, base forgetting and per-session harmonic means of a run's sessions."""
    if not sessions:
        raise ValueError("No session to summarise.")
    first, last = sessions[0], sessions[-1]
    official = {}
    if all(s.get("all_per_batch") is not None for s in sessions):  # runs written before it lack the figure
        official = {"average_accuracy_per_batch": float(np.mean([s["all_per_batch"] for s in sessions])),
                    "last_accuracy_per_batch": last["all_per_batch"]}
    return {"average_accuracy": float(np.mean([s["all"] for s in sessions])),
            "performance_drop": first["all"] - last["all"],
            "base_forgetting": first["base"] - last["base"],
            "harmonic_mean": [harmonic_mean(s["base"], s["novel"]) for s in sessions],
            "last_accuracy": last["all"], **official}


def plot_sessions(runs: dict[str, Sequence[dict]], path: str | Path, title: str = "") -> None:
    """Accuracy on all seen classes (solid) and on base classes (dashed) per session, one colour per run."""
    from visadapt.utils.figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (name, sessions) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        x = [s["session"] for s in sessions]
        ax.plot(x, [s["all"] for s in sessions], "-o", color=colour, label=f"{name}: all")
        ax.plot(x, [s["base"] for s in sessions], "--", color=colour, alpha=0.7, label=f"{name}: base")
    ax.set_xlabel("session")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "accuracy per session")
    save_figure(fig, path)


def plot_group_heatmap(sessions: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Accuracy of each session's classes (columns: the session that introduced them) after each session (rows)."""
    from visadapt.utils.figures import plt, save_figure

    n = len(sessions)
    grid = np.full((n, n), np.nan)
    for s in sessions:
        for j, acc in enumerate(s["groups"]):
            grid[s["session"], j] = np.nan if acc is None else acc
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for (r, c), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=7, color="w" if value < 60 else "k")
    ax.set_xlabel("classes introduced in session")
    ax.set_ylabel("after session")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_title(title or "accuracy per session group")
    save_figure(fig, path)
