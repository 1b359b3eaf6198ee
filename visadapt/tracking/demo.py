"""``visadapt track train --demo``: LoRAT adapted to a procedural video world on the shipped tiny ViT, no download.

The demo backbone (the demo ViT of :mod:`visadapt.utils.worlds.models`) was pretrained as a whole tracker on the
``pretrain`` kind of the video world (:mod:`visadapt.utils.worlds.video`). The demo writes the ``demo`` kind (other
shapes and textures, distractors of the target's shape, occlusion, scale change, out-of-view frames) as a GOT-10k-layout
dataset under ``<out>/data`` (``train`` and the held-out ``val`` sequences), trains LoRA and a fresh head on
``train``, tracks ``val`` and scores it next to the static-box baseline (the first box kept for every frame).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from visadapt.utils.worlds.video import write_world

from .config import TrackConfig

DEMO_SEED = 0  # the world's sequences
DEMO_WORLD = {"train": (32, 40), "val": (12, 60)}  # split: (sequences, frames)
# Sized for the 0.2 M-parameter demo ViT on 2 CPU cores. Its crops are as in its pretraining: shifted less than
# LoRAT's (jitter 1, not 3) and clean (a blur of up to 2 px wipes out the textures of a 32 px template).
DEMO_SETTINGS = dict(variant="demo", r=8, lora_alpha=16.0, epochs=6, samples_per_epoch=2048, batch_size=32,
                     lr=1e-3, min_lr=1e-5, warmup_epochs=0.5, warmup_lr=1e-5, eval_batch_size=12, seed=1,
                     translation_jitter=1.0, augment=False)


def demo_data(root: Path) -> Path:
    """Write (or reuse) the demo world under ``root``; returns ``root``."""
    for split, (n, frames) in DEMO_WORLD.items():
        write_world(root, split, n, frames, DEMO_SEED, "demo")
    return root


def demo_config(root: Path, **overrides) -> TrackConfig:
    return TrackConfig(**{**DEMO_SETTINGS, "data": [f"got10k:{root}:train"], "eval_data": f"got10k:{root}:val",
                          **overrides})


def run_demo(out: str | Path, resume: bool = False, overrides: Optional[dict] = None) -> dict:
    """Write the world into ``out/data``, train and evaluate into ``out``; returns ``results.json``'s content."""
    from .train import train

    out = Path(out)
    root = demo_data(out / "data")
    return train(demo_config(root, **(overrides or {})), out, resume=resume)
