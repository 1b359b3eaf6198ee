"""``visadapt fewshot train --demo``: the whole few-shot flow on the embedded world, with no download.

It writes the world's tasks as image folders under ``<out>/data``, then trains the shipped demo CLIP on 16 shots of
the held-out shapes (names and shapes it never saw) with the real trainer, and measures what it forgot on the seen
shapes and colours. The protocol is CLIP-LoRA's except for the settings sized for a tiny model on a CPU, printed
with the results (``DEMO_SETTINGS``); any other option, or any of these, can be set as for a normal run.
"""

from __future__ import annotations

from pathlib import Path

from visadapt.utils.worlds.shapes import write_task

from .config import DEMO_MODEL, TrainConfig
from .report import run_summary
from .train import train

DEMO_SEED = 0  # the world's images; the few-shot draw uses TrainConfig.seed
# Sized for a 1.8 M-parameter CLIP on a CPU: 500 steps (not 500 × 16), a 10× learning rate, mild crops (the shapes
# fill a 32-pixel image), and the model's own logit scale (it was not trained to 100).
DEMO_SETTINGS = dict(shots=16, iters=500, lr=2e-3, batch_size=32, crop_scale_min=0.8, logit_scale=None, workers=0)
FORGETTING_TASKS = ("shapes", "colours")
# The held-out shapes' training folder holds 40 images a class: more shots than that cannot be drawn.
DEMO_TRAIN_IMAGES = 40


def write_demo_data(root: Path) -> tuple[Path, list[Path]]:
    """The few-shot task (held-out shapes: train/val/test) and the zero-shot tasks used to measure forgetting."""
    fewshot = write_task(root, "heldout-shapes", n_train=DEMO_TRAIN_IMAGES, n_val=8, n_test=60, seed=DEMO_SEED)
    others = [write_task(root, task, n_train=1, n_val=0, n_test=40, seed=DEMO_SEED) for task in FORGETTING_TASKS]
    return fewshot, others


def demo_config(data: Path, others: list[Path], **overrides) -> TrainConfig:
    """The demo's run: :data:`DEMO_SETTINGS` on the demo world and model, then ``overrides`` (any config field)."""
    settings = {**DEMO_SETTINGS, **overrides}
    return TrainConfig(dataset="imagefolder", root=str(data), model=DEMO_MODEL, pretrained=None,
                       eval_zeroshot_on=[str(p) for p in others], **settings)


def run_demo(out: str | Path, resume: bool = False, **overrides) -> int:
    """Write the demo world under ``out/data`` and train on it; ``overrides`` are config fields (``lr=1e-3``)."""
    out = Path(out)
    data, others = write_demo_data(out / "data")
    config = demo_config(data, others, **overrides)
    shown = {k: getattr(config, k) for k in {**DEMO_SETTINGS, **overrides}}
    print(f"Demo world written to {out / 'data'}; training {config.method_name()} on {config.shots} shots of "
          f"held-out shapes ({', '.join(f'{k}={v}' for k, v in shown.items())}).")
    results = train(config, out, resume=resume)
    print()
    print(run_summary(results))
    print(f"\nReport: {out / 'report.md'}  curve: {out / 'training_curve.png'}  adapter: {out / 'adapter'}")
    return 0
