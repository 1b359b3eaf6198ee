"""Reports of few-shot runs: one run's training curve and summary, and accuracy-vs-shots over many runs."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from visadapt.utils import write_text_atomic

# What a few-shot run's results.json holds that other tasks' runs do not.
_FEWSHOT_KEYS = ("method", "shots", "top1", "zeroshot_top1", "dataset")


def run_summary(results: dict) -> str:
    """Markdown lines describing one run."""
    lines = [
        f"## {results['method']} on {dataset_label(results)}, {results['shots']} shots, seed {results['seed']}",
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


def find_results(paths: Iterable[str | Path]) -> tuple[list[dict], list[str]]:
    """The few-shot runs at or below the given folders (their ``results.json``), and the other runs found there
    (e.g. hyperspectral ones), which a few-shot report leaves out."""
    found, skipped = [], []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
        for file in files:
            results = json.loads(file.read_text())
            if all(key in results for key in _FEWSHOT_KEYS):
                found.append({**results, "_run": str(file.parent)})
            else:
                skipped.append(str(file.parent))
    if not found:
        others = f" (found only other runs: {', '.join(skipped)})" if skipped else ""
        raise FileNotFoundError(f"No few-shot results.json under {', '.join(map(str, paths))}{others}; pass run "
                                "folders written by `visadapt fewshot train`.")
    return found, skipped


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def dataset_label(results: dict) -> str:
    """The dataset a run names; an image folder by its folder name (every one is dataset 'imagefolder')."""
    if results["dataset"] == "imagefolder" and results.get("root"):
        return f"{Path(results['root']).name} (image folder)"
    return results["dataset"]


def aggregate(runs: Sequence[dict]) -> dict:
    """``table``: {dataset: {method: {shots: [top1 per distinct seed]}}}, runs of the same seed (a rerun, a copied
    folder) averaged into one value, so that they neither count as seeds nor shrink the std; ``runs``: the number
    of runs behind each list, same keys; ``zeroshot``: mean zero-shot top-1 per dataset."""
    by_seed: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    zeroshot: dict = defaultdict(list)
    for r in runs:
        seed = r.get("seed", r.get("_run"))  # a results.json without a seed counts as its own
        by_seed[dataset_label(r)][r["method"]][r["shots"]][seed].append(r["top1"])
        zeroshot[dataset_label(r)].append(r["zeroshot_top1"])
    table = {d: {m: {k: [statistics.fmean(v) for v in seeds.values()] for k, seeds in by_shots.items()}
                 for m, by_shots in methods.items()} for d, methods in by_seed.items()}
    counts = {d: {m: {k: sum(map(len, seeds.values())) for k, seeds in by_shots.items()}
                  for m, by_shots in methods.items()} for d, methods in by_seed.items()}
    return {"table": table, "runs": counts, "zeroshot": {d: statistics.fmean(v) for d, v in zeroshot.items()}}


def _seeds_and_runs(seeds: int, runs: int) -> str:
    """"3 seeds", or "1 seed, 2 runs" where some runs repeat a seed."""
    text = f"{seeds} seed{'s' if seeds != 1 else ''}"
    return text if runs == seeds else f"{text}, {runs} runs"


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, list[str]]:
    """Accuracy-vs-shots plot (one panel per dataset, mean ± std over seeds) and a method × shots table.

    Returns the output folder and the run folders that were skipped because they are not few-shot runs."""
    from matplotlib.ticker import ScalarFormatter

    from visadapt.utils.figures import plt, save_figure

    runs, skipped = find_results(run_dirs)
    agg = aggregate(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = sorted(agg["table"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method, by_shots in sorted(agg["table"][dataset].items()):
            shots = sorted(by_shots)
            stats = [_mean_std(by_shots[k]) for k in shots]
            seeds = max(len(by_shots[k]) for k in shots)
            runs_here = max(agg["runs"][dataset][method][k] for k in shots)
            ax.errorbar(shots, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", ls="-", capsize=3,
                        label=f"{method} ({_seeds_and_runs(seeds, runs_here)})")
        ax.axhline(agg["zeroshot"][dataset], color="grey", ls="--", lw=1, label="zero-shot")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({k for m in agg["table"][dataset].values() for k in m}))
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test top-1 (%), mean ± std over seeds")
        ax.set_title(f"{dataset}: few-shot top-1 vs shots")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "accuracy_vs_shots.png")
    write_text_atomic(_markdown(agg, len(runs), skipped), out / "report.md")
    return out, skipped


def _markdown(agg: dict, n_runs: int, skipped: Sequence[str] = ()) -> str:
    shots = sorted({k for d in agg["table"].values() for m in d.values() for k in m})
    methods = sorted({m for d in agg["table"].values() for m in d})
    head = "| dataset | method | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    rule = "|---|---|" + "---|" * len(shots)
    lines = ["# Few-shot report", "", f"{n_runs} runs; top-1 (%) as mean ± std over seeds (runs of the same seed "
             "averaged first; no std from one seed), then the seeds (and runs) behind it.", "",
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
                    spread = f" ± {std:.2f}" if len(by_shots[k]) > 1 else ""
                    count = _seeds_and_runs(len(by_shots[k]), agg["runs"][dataset][method][k])
                    cells.append(f"{mean:.2f}{spread} ({count})")
                else:
                    cells.append("–")
            lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", f"Not few-shot runs, left out: {', '.join(f'`{s}`' for s in skipped)}."]
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
