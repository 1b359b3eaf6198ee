"""``visadapt incremental train --demo``: a class-incremental stream of the pattern world on the tiny demo CLIP's
vision tower, CoACT next to two baselines over three seeds in one command, no download.

CoACT's regime is a backbone pretrained elsewhere that must adapt to a new domain in the base session and keep what
it learnt. The demo CLIP was pretrained on the shapes world, whose captions name shapes, colours, sizes and three
fine textures; the pattern world (:func:`visadapt.utils.worlds.shapes.pattern_samples`) tells its 15 classes apart
by coarse textures that no caption named: class i is a large ``PATTERN_SHAPES[i % 3]`` with texture
``PATTERN_KINDS[i % 5]`` at twice the shapes world's period, colour random. The frozen tower separates the three
shapes but barely the five texture kinds (nearest class mean 90-91 % and 36-39 %, chance 33 % and 20 %; ``python
benchmarks/incremental.py --probe``), so prototypes of frozen features confuse the five classes of a shape.
Session 0 holds the first five classes (every shape and every kind, in different pairs) with every training image;
each later session adds two classes, new pairs of the same shapes and kinds, with ``shots`` images each.

The three recipes share data, schedule and seed: ``coact``, ``finetune`` (naive per-session LoRA fine-tuning: CE
only, adapter and classifier tuned in every session at the base lr) and ``prototypes`` (frozen backbone, prototype
rows). Each seed draws its own images, few-shot samples and training noise; the comparison reports mean ± sample std
over the seeds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from visadapt.utils import save_json_atomic, write_text_atomic
from visadapt.utils.worlds.shapes import PATTERN_CLASSES, pattern_name, pattern_samples

from .config import DEMO_BACKBONE, IncrementalConfig
from .data import IncrementalData, pil_source
from .metrics import plot_sessions

DEMO_CLASSES = PATTERN_CLASSES
DEMO_SEEDS = (1, 2, 3)  # each seed: the world's images, the few-shot samples and the training noise
DEMO_TRAIN, DEMO_TEST = 30, 20  # images per class
# Sized for a 0.2 M-parameter ViT on 2 CPU cores; the schedule of every recipe (the one the shapes-world demo had:
# the world changed, not the budget). The tower's projected features are unbounded (no tanh pooler), so the demo
# uses the cosine classifier the spec suggests for them.
DEMO_SETTINGS = dict(backbone=DEMO_BACKBONE, setting="fscil", base_classes=5, way=2, sessions=6, shots=5,
                     epochs_base=8, epochs_incremental=3, batch_size=25, lr=0.02, inc_lr_factor=0.1,
                     crop_scale_min=0.5, adapt_blocks=4, eval_batch_size=100, classifier="cosine")
RECIPES = ("coact", "finetune", "prototypes")
# what comparison.json keeps of each run, as mean and std over the seeds
METRICS = ("average_accuracy", "last_accuracy", "performance_drop", "base_forgetting")


def demo_data(seed: int = DEMO_SEEDS[0], n_train: int = DEMO_TRAIN, n_test: int = DEMO_TEST) -> IncrementalData:
    """The 15 pattern classes, ``n_train`` / ``n_test`` rendered images each, drawn from the streams of ``seed``."""
    splits = {}
    for index, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = zip(*pattern_samples(DEMO_CLASSES, n, (seed, index)))
        splits[split] = pil_source(images, labels, split)
    return IncrementalData("demo", splits["train"], splits["test"], [pattern_name(*c) for c in DEMO_CLASSES])


def demo_config(recipe: str = "coact", **overrides) -> IncrementalConfig:
    """The demo's config of ``recipe``; the few-shot samples are drawn with the run's seed unless overridden."""
    seed = overrides.get("seed", DEMO_SEEDS[0])
    return IncrementalConfig(**{**DEMO_SETTINGS, "recipe": recipe, "split_seed": seed, **overrides})


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize_seeds(runs: dict[int, dict]) -> dict:
    """One recipe's runs ({seed: results.json}) as mean and sample std over the seeds, per metric and per session,
    with each seed's own values under ``per_seed``."""
    seeds = sorted(runs)
    out: dict = {"seeds": seeds}
    for key in METRICS:
        values = [runs[s][key] for s in seeds]
        out[key], out[f"{key}_std"] = float(np.mean(values)), _std(values)
    for key in ("all", "base"):
        per_session = np.array([[session[key] for session in runs[s]["sessions"]] for s in seeds])
        out[key] = per_session.mean(0).tolist()
        out[f"{key}_std"] = [_std(column) for column in per_session.T]
    out["wall_time_s"] = float(sum(runs[s]["wall_time_s"] for s in seeds))
    out["per_seed"] = {str(s): {**{k: runs[s][k] for k in METRICS}, "all": [x["all"] for x in runs[s]["sessions"]],
                                "base": [x["base"] for x in runs[s]["sessions"]],
                                "wall_time_s": runs[s]["wall_time_s"]} for s in seeds}
    return out


def seed_words(seeds: Sequence[int]) -> str:
    """"seed 2" or "seeds 1, 2, 3"."""
    return f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"


def _pm(mean: float, std: float, n: int) -> str:
    """"mean ± std", or the value alone for one seed (no spread to show)."""
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def comparison_report(summary: dict) -> str:
    """Markdown: the recipes' mean ± std over the seeds, each seed's scores, and the per-session means."""
    seeds = next(iter(summary.values()))["seeds"]
    n = len(seeds)
    spread = "mean ± sample std over the seeds" if n > 1 else "one seed"
    lines = ["# Class-incremental demo: the pattern world", "",
             f"{seed_words(seeds).capitalize()}: {spread} (accuracy in %, forgetting and drop in points).", "",
             "| recipe | session 0 | last | average | base forgetting | performance drop | time (s, all seeds) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {_pm(r['all'][0], r['all_std'][0], n)} | "
                     f"{_pm(r['last_accuracy'], r['last_accuracy_std'], n)} | "
                     f"{_pm(r['average_accuracy'], r['average_accuracy_std'], n)} | "
                     f"{_pm(r['base_forgetting'], r['base_forgetting_std'], n)} | "
                     f"{_pm(r['performance_drop'], r['performance_drop_std'], n)} | {r['wall_time_s']:.0f} |")
    lines += ["", "## Each seed (average / last accuracy, base forgetting)", "",
              "| recipe | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name, r in summary.items():
        cells = [f"{p['average_accuracy']:.1f} / {p['last_accuracy']:.1f}, {p['base_forgetting']:.0f}"
                 for p in (r["per_seed"][str(s)] for s in seeds)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sessions = len(next(iter(summary.values()))["all"])
    lines += ["", f"## Per session{', mean over the seeds' * (n > 1)} (all / base, %)", "",
              "| recipe | " + " | ".join(str(s) for s in range(sessions)) + " |", "|---|" + "---|" * sessions]
    for name, r in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(r["all"], r["base"])) + " |")
    lines += ["", "Each run's own report: `<recipe>/seed_<s>/report.md`.", "", "![sessions](sessions.png)"]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path, resume: bool = False, recipes: tuple[str, ...] = RECIPES,
             overrides: Optional[dict] = None, seeds: Optional[Sequence[int]] = None) -> dict:
    """Train every recipe on the demo stream of every seed into ``out/<recipe>/seed_<s>`` and compare them in
    ``out`` (``comparison.json``, ``report.md``, ``sessions.png``). ``seeds`` default to :data:`DEMO_SEEDS`, or to
    the one ``seed`` of ``overrides``."""
    from .train import train

    out, overrides = Path(out), dict(overrides or {})
    if seeds is None:
        seeds = (overrides.pop("seed"),) if "seed" in overrides else DEMO_SEEDS
    overrides.pop("seed", None)
    results: dict[str, dict[int, dict]] = {recipe: {} for recipe in recipes}
    for seed in seeds:
        data = demo_data(seed)
        for recipe in recipes:
            config = demo_config(recipe, seed=seed, **overrides)
            run = out / recipe / f"seed_{seed}"
            if (run / "results.json").exists():
                results[recipe][seed] = json.loads((run / "results.json").read_text())
                continue
            shown = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config.with_recipe()).items()
                              if k in DEMO_SETTINGS or k in ("seed", "supcon_weight", "consistency_weight"))
            print(f"--- {recipe}, seed {seed}: {shown}")
            results[recipe][seed] = train(config, run, resume=resume and (run / "run_config.json").exists(),
                                          data=data)
    summary = {recipe: summarize_seeds(runs) for recipe, runs in results.items()}
    save_json_atomic(summary, out / "comparison.json")
    mean_sessions = {name: [{"session": i, "all": a, "base": b} for i, (a, b) in enumerate(zip(r["all"], r["base"]))]
                     for name, r in summary.items()}
    plot_sessions(mean_sessions, out / "sessions.png",
                  title=f"demo pattern stream, {'mean of ' * (len(seeds) > 1)}{seed_words(seeds)}")
    write_text_atomic(comparison_report(summary), out / "report.md")
    return summary
