"""Pretrain the tiny demo ViT of ``visadapt track train --demo`` as a whole tracker on the procedural world.

    python pretrain/demo_vit.py --out visadapt/utils/worlds/demo_vit [--steps N --seed S]

A DINOv2-layout timm ViT (patch 8, 64 wide, 4 deep; :data:`~visadapt.utils.worlds.models.DEMO_ARCH`) inside a
:class:`~visadapt.tracking.model.LoRAT` is trained from random weights, every parameter (backbone, position table,
token types, head), with the LoRAT loss on (template, search) pairs of the video world's ``pretrain`` kind (shapes and
textures the demo never shows), with a milder search-crop shift than LoRAT's (translation jitter 1 instead of 3:
a from-scratch ViT learns to find the object near the centre within the half hour, not yet to search the whole
crop), on clean crops (no flips, colour jitter or 3-augment unless ``--augment``), and with a head initialised for
its width. Only the backbone is written (timm names, ``model.safetensors`` + ``config.json``
with the settings and the held-out AO it reached), so the demo starts from features, not from a tracker head.
A one-off: half an hour on 2 shared CPU cores (``--minutes``); tests and CI never run it.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from visadapt.tracking.datasets import load_sequences
from visadapt.tracking.losses import lorat_loss
from visadapt.tracking.metrics import got10k_scores
from visadapt.tracking.model import LoRAT, build_vit
from visadapt.tracking.sampling import PairSettings, TrainingPairs, collate_pairs
from visadapt.tracking.tracker import Tracker
from visadapt.utils import staged_dir
from visadapt.utils.worlds.models import DEMO_ARCH, DEMO_VIT_DIR
from visadapt.utils.worlds.video import write_world


def pair_settings(arch: dict = DEMO_ARCH, augment: bool = True, translation_jitter: float = 3.0) -> PairSettings:
    return PairSettings(arch["template_size"], arch["search_size"], tuple(arch["z_grid"]),
                        arch["search_area_factor"], arch["template_area_factor"],
                        translation_jitter=translation_jitter, augment=augment)


@torch.no_grad()
def quick_ao(model: LoRAT, sequences, arch: dict = DEMO_ARCH) -> float:
    """GOT-10k AO of ``model`` on ``sequences``, tracked one at a time."""
    tracker = Tracker(model, arch["template_size"], arch["search_size"], arch["search_area_factor"],
                      arch["template_area_factor"], arch["window_influence"])
    tracks = tracker.track_many([s.frames for s in sequences], [s.boxes[0] for s in sequences])
    triples = [(boxes, s.boxes, s.visible) for (boxes, _), s in zip(tracks, sequences)]
    return got10k_scores(triples)["ao"]


def pretrain(out: Path, steps: int, seed: int, batch_size: int, lr: float, workers: int, n_sequences: int,
             data_dir: Path, minutes: float = 30.0, translation_jitter: float = 1.0, augment: bool = False) -> dict:
    """Train for ``steps`` steps or ``minutes`` of training, whichever ends first (the cosine schedule follows
    the larger of the two fractions done), then write the backbone to ``out``."""
    torch.manual_seed(seed)
    write_world(data_dir, "train", n_sequences, 50, seed, "pretrain")
    write_world(data_dir, "val", 8, 60, seed, "pretrain")
    train = load_sequences("got10k", data_dir, "train")
    val = load_sequences("got10k", data_dir, "val")
    vit = build_vit(DEMO_ARCH["timm_name"], **DEMO_ARCH["vit_kwargs"])
    model = LoRAT(vit, tuple(DEMO_ARCH["z_grid"]), tuple(DEMO_ARCH["x_grid"]))
    model.pos_embed.requires_grad_(True)  # from scratch: the position table learns too
    for layer in model.head.modules():  # LoRAT's std-0.02 head init is sized for 768+ wide features, not 64
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    pairs = TrainingPairs({"world": train}, pair_settings(augment=augment, translation_jitter=translation_jitter),
                          steps * batch_size, seed)
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_pairs)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 20)
    model.train()
    start, losses = time.perf_counter(), []
    for step, batch in enumerate(tqdm(loader, total=steps, desc="pretrain demo ViT", dynamic_ncols=True), 1):
        done = max(step / steps, (time.perf_counter() - start) / (60 * minutes))
        if done > 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done)))
        loss = lorat_loss(model(batch["z"], batch["x"], batch["z_mask"]), batch["box"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            tqdm.write(f"step {step}: loss {np.mean(losses[-100:]):.4f} lr {opt.param_groups[0]['lr']:.2e}")
    model.eval()
    ao = quick_ao(model, val)
    train_time = time.perf_counter() - start
    print(f"held-out AO of the pretraining tracker: {ao:.3f} ({time.perf_counter() - start:.0f} s)")
    prefix = vit.num_prefix_tokens
    with torch.no_grad():
        vit.pos_embed[:, prefix:] = model.pos_embed  # the learned table back into timm's layout
    config = {**DEMO_ARCH, "pretraining": {"world_kind": "pretrain", "steps": len(losses), "batch_size": batch_size,
                                           "lr": lr, "seed": seed,
                                           "translation_jitter": translation_jitter, "augment": augment,
                                           "train_sequences": n_sequences,
                                           "final_loss": float(np.mean(losses[-200:])), "val_ao": ao,
                                           "wall_time_s": train_time}}
    with staged_dir(out) as stage:
        save_file({k: v.detach().contiguous() for k, v in vit.state_dict().items()}, stage / "model.safetensors")
        (stage / "config.json").write_text(json.dumps(config, indent=1))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(prog="python pretrain/demo_vit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEMO_VIT_DIR))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=30.0, help="training time limit")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--augment", action="store_true", help="LoRAT's flips, colour jitter and 3-augment (off: "
                        "clean crops, which a from-scratch ViT learns from faster)")
    parser.add_argument("--translation-jitter", type=float, default=1.0,
                        help="search-crop shift (LoRAT trains with 3; a milder shift learns faster from scratch)")
    parser.add_argument("--sequences", type=int, default=300, help="training sequences of the world")
    parser.add_argument("--data", default=None, help="where to write the world (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = pretrain(Path(args.out), args.steps, args.seed, args.batch_size, args.lr, args.workers,
                          args.sequences, Path(args.data or tmp), args.minutes,
                          args.translation_jitter, args.augment)
    print(json.dumps(config["pretraining"], indent=1))


if __name__ == "__main__":
    main()
