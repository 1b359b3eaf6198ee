"""Reports of few-shot runs: one run's training curve and summary, and accuracy-vs-shots over many runs."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def _save_figure(fig, path: Path) -> None:
    """Write a PNG atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent, prefix=f".{path.stem}-")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_training_curve(history: Sequence[dict], path: Path, title: str = "") -> None:
    """Loss per step (raw and smoothed) with the learning rate on a second axis."""
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 50)
    smooth = [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="loss")
    ax.plot(steps, smooth, color="tab:blue", lw=1.6, label=f"loss (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [h["lr"] for h in history], color="tab:orange", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"training curve {title}".strip())
    _save_figure(fig, Path(path))


def run_summary(results: dict) -> str:
    """Markdown lines describing one run."""
    lines = [
        f"## {results['method']} on {results['dataset']}, {results['shots']} shots, seed {results['seed']}",
        "",
        f"Model `{results['model']}` (pretrained: `{results['pretrained']}`), {results['trainable_params']:,} "
        f"trainable parameters, {results['iterations']} iterations, {results['wall_time_s']:.0f} s wall time on "
        f"{results['device']}.",
        "",
        "| | top-1 (%) |",
        "|---|---|",
        f"| zero-shot | {results['zeroshot_top1']:.2f} |",
        f"| few-shot ({results['method']}) | {results['top1']:.2f} |",
    ]
    if results.get("zeroshot_on"):
        lines += ["", "Zero-shot accuracy on other datasets, before and after adaptation (forgetting):", "",
                  "| dataset | before | after | change |", "|---|---|---|---|"]
        for name, r in results["zeroshot_on"].items():
            lines.append(f"| {name} | {r['before']:.2f} | {r['after']:.2f} | {r['change']:+.2f} |")
    return "\n".join(lines)


def write_run_report(results: dict, path: Path) -> None:
    text = "# Few-shot run\n\n" + run_summary(results) + "\n\n![training curve](training_curve.png)\n"
    _write_text(text, Path(path))


def find_results(paths: Iterable[str | Path]) -> list[dict]:
    """Every ``results.json`` at or below the given run folders."""
    found = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
        for file in files:
            found.append({**json.loads(file.read_text()), "_run": str(file.parent)})
    if not found:
        raise FileNotFoundError(f"No results.json under {', '.join(map(str, paths))}; pass run folders written "
                                "by `visadapt fewshot train`.")
    return found


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: Sequence[dict]) -> dict:
    """{dataset: {method: {shots: [top1 per seed]}}} plus zero-shot per dataset."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    zeroshot: dict = defaultdict(list)
    for r in runs:
        table[r["dataset"]][r["method"]][r["shots"]].append(r["top1"])
        zeroshot[r["dataset"]].append(r["zeroshot_top1"])
    return {"table": table, "zeroshot": {d: statistics.fmean(v) for d, v in zeroshot.items()}}


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Accuracy-vs-shots plot (one panel per dataset, mean ± std over seeds) and a method × shots table."""
    runs = find_results(run_dirs)
    agg = aggregate(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = sorted(agg["table"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method, by_shots in sorted(agg["table"][dataset].items()):
            shots = sorted(by_shots)
            stats = [_mean_std(by_shots[k]) for k in shots]
            ax.errorbar(shots, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        label=method)
        ax.axhline(agg["zeroshot"][dataset], color="grey", ls="--", lw=1, label="zero-shot")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(dataset)
        ax.legend(fontsize=8)
    _save_figure(fig, out / "accuracy_vs_shots.png")
    _write_text(_markdown(agg, len(runs)), out / "report.md")
    return out


def _markdown(agg: dict, n_runs: int) -> str:
    shots = sorted({k for d in agg["table"].values() for m in d.values() for k in m})
    methods = sorted({m for d in agg["table"].values() for m in d})
    head = "| dataset | method | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    rule = "|---|---|" + "---|" * len(shots)
    lines = ["# Few-shot report", "", f"{n_runs} runs; top-1 (%) as mean ± std over seeds.", "",
             "![accuracy vs shots](accuracy_vs_shots.png)", "", head, rule]
    for dataset in sorted(agg["table"]):
        lines.append(f"| {dataset} | zero-shot | " + " | ".join(f"{agg['zeroshot'][dataset]:.2f}" for _ in shots)
                     + " |")
        for method in methods:
            by_shots = agg["table"][dataset].get(method, {})
            cells = []
            for k in shots:
                if by_shots.get(k):
                    mean, std = _mean_std(by_shots[k])
                    cells.append(f"{mean:.2f} ± {std:.2f} ({len(by_shots[k])})")
                else:
                    cells.append("–")
            lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + " |")
    if len(agg["table"]) > 1:
        lines += ["", "Mean over datasets (runs present for every dataset only):", "", "| method | "
                  + " | ".join(f"{k}-shot" for k in shots) + " |", "|---|" + "---|" * len(shots)]
        for method in methods:
            cells = []
            for k in shots:
                per = [agg["table"][d][method][k] for d in agg["table"] if agg["table"][d].get(method, {}).get(k)]
                cells.append(f"{statistics.fmean(statistics.fmean(v) for v in per):.2f}"
                             if len(per) == len(agg["table"]) else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
