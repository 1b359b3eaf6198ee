"""``visadapt incremental train --demo``: a class-incremental stream of shapes on the tiny demo CLIP's vision
tower, CoACT next to two baselines in one command, no download.

The shapes world (:mod:`visadapt.utils.worlds.shapes`) draws 15 shapes: the demo CLIP was pretrained on the first ten
(``SEEN_SHAPES``), never on the last five (``HELDOUT_SHAPES``). Session 0 holds five seen shapes with every
training image; each later session adds two shapes (the last ones held-out) with ``shots`` images each. The three
runs share data, seed and schedule: ``coact``, ``finetune`` (naive per-session LoRA fine-tuning: CE only, adapter
and classifier tuned in every session at the base lr) and ``prototypes`` (frozen backbone, prototype rows).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from visadapt.utils import save_json_atomic, write_text_atomic
from visadapt.utils.worlds.shapes import HELDOUT_SHAPES, SEEN_SHAPES, shape_samples

from .config import DEMO_BACKBONE, IncrementalConfig
from .data import IncrementalData, pil_source
from .metrics import plot_sessions

DEMO_SHAPES = SEEN_SHAPES + HELDOUT_SHAPES
DEMO_SEED = 0  # the world's images
DEMO_TRAIN, DEMO_TEST = 30, 20  # images per class
# Sized for a 0.2 M-parameter ViT on 2 CPU cores; the schedule of every recipe. The tower's projected features are
# unbounded (no tanh pooler), so the demo uses the cosine classifier the spec suggests for them.
DEMO_SETTINGS = dict(backbone=DEMO_BACKBONE, setting="fscil", base_classes=5, way=2, sessions=6, shots=5,
                     epochs_base=8, epochs_incremental=3, batch_size=25, lr=0.02, inc_lr_factor=0.1,
                     crop_scale_min=0.5, adapt_blocks=4, eval_batch_size=100, classifier="cosine")
RECIPES = ("coact", "finetune", "prototypes")


def demo_data(seed: int = DEMO_SEED, n_train: int = DEMO_TRAIN, n_test: int = DEMO_TEST) -> IncrementalData:
    """The 15 shapes, ``n_train`` / ``n_test`` rendered images each (colour, texture, size random)."""
    splits = {}
    for index, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        images, labels = zip(*shape_samples(DEMO_SHAPES, n, (seed, index)))
        splits[split] = pil_source(images, labels, split)
    return IncrementalData("demo", splits["train"], splits["test"], list(DEMO_SHAPES))


def demo_config(recipe: str = "coact", **overrides) -> IncrementalConfig:
    return IncrementalConfig(**{**DEMO_SETTINGS, "recipe": recipe, **overrides})


def run_demo(out: str | Path, resume: bool = False, recipes: tuple[str, ...] = RECIPES,
             overrides: Optional[dict] = None) -> dict:
    """Train every recipe on the demo stream into ``out/<recipe>`` and compare them in ``out``."""
    from .train import run_report, train

    out, data = Path(out), demo_data()
    results = {}
    for recipe in recipes:
        config = demo_config(recipe, **(overrides or {}))
        run = out / recipe
        if (run / "results.json").exists():
            results[recipe] = json.loads((run / "results.json").read_text())
            continue
        shown = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config.with_recipe()).items()
                          if k in DEMO_SETTINGS or k in ("supcon_weight", "consistency_weight"))
        print(f"--- {recipe}: {shown}")
        results[recipe] = train(config, run, resume=resume and (run / "run_config.json").exists(), data=data)
    summary = {name: {k: r[k] for k in ("average_accuracy", "last_accuracy", "performance_drop", "base_forgetting",
                                        "harmonic_mean", "wall_time_s")} | {"all": [s["all"] for s in r["sessions"]],
                                                                             "base": [s["base"] for s in r["sessions"]]}
               for name, r in results.items()}
    save_json_atomic(summary, out / "comparison.json")
    plot_sessions({n: r["sessions"] for n, r in results.items()}, out / "sessions.png", title="demo shapes stream")
    write_text_atomic(run_report(list(results.values()), list(results)), out / "report.md")
    return summary
