"""LoRAT speed and memory, measured side by side: tracking frames/s and LoRA vs full fine-tuning training steps.

    python benchmarks/tracking.py                                  # B-224 geometry on a ViT-S/14 backbone, CPU
    python benchmarks/tracking.py --backbone variant --device cuda --dtype bf16   # the paper's B-224
    python benchmarks/tracking.py --variant L-224 --backbone variant --device cuda --dtype bf16

Random weights (no download); ``--backbone S`` keeps the variant's crop sizes (template + search tokens) on a
ViT-S/14 (384 wide, 12 blocks, 6 heads) so that the CPU run stays within minutes; ``--backbone variant`` uses the
variant's own DINOv2 backbone.

Inference (batch 1, eval, no grad, models cast to ``--dtype``), one child process, the models taking turns
forward by forward so that shared cores slow every model alike; median (and fastest) time per forward of:
  * plain ViT: timm's patch embedding, blocks and final norm on the same template + search tokens (no head);
  * merged tracker: the LoRAT network after ``merge`` (adapters folded in: the deployed model), head included;
  * unmerged tracker: the same network with the LoRA layers still separate;
  * Tracker.track: the merged network in the tracking loop on a 640×480 frame (search crop, normalisation, network,
    window and decode; the crops take the model's dtype).
Goal: merged / plain ≤ 1.05 (LoRA costs nothing at inference once merged).

Training: one step = forward, LoRAT loss, backward, AdamW step on random crops and boxes, at ``--batch``; LoRA
(frozen backbone, official sites, r=64) and full fine-tuning (every weight trainable) each in a fresh child process.
Memory on CUDA is the allocator's peak during the timed steps; on CPU it is the process's peak resident size
(kernel high-water mark, reset after the model is built), shown both in total and above the resident size before
the first step (activations, gradients, optimiser state) — the total includes the libraries and weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from visadapt.utils.measure import MiB, PeakMemory, current_rss, device_name, run_child

MARKER = "@@tracking@@"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMALL = {"embed_dim": 384, "depth": 12, "num_heads": 6}  # ViT-S/14 dimensions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(spec, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 3, spec.template_px, spec.template_px, generator=g)
    x = torch.randn(batch, 3, spec.search_px, spec.search_px, generator=g)
    z_mask = torch.randint(0, 2, (batch, *spec.z_grid), generator=g)
    centre = torch.rand(batch, 2, generator=g) * 0.4 + 0.3
    size = torch.rand(batch, 2, generator=g) * 0.3 + 0.1
    boxes = torch.cat((centre - size / 2, centre + size / 2), 1)
    return z.to(device, dtype), x.to(device, dtype), z_mask.to(device), boxes.to(device)


def _vit_kwargs(args: argparse.Namespace) -> dict:
    return dict(SMALL) if args.backbone == "S" else {}


def plain_vit_forward(vit: torch.nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """timm's ViT compute on the tracker's tokens: patch embedding of both crops, the blocks, the final norm."""
    tokens = [vit.patch_embed.proj(img).flatten(2).transpose(1, 2) for img in (z, x)]
    return vit.norm(vit.blocks(torch.cat(tokens, 1)))


def inference_worker(args: argparse.Namespace) -> dict:
    import numpy as np

    from visadapt.tracking.model import build_lorat, build_vit, get_variant, merge
    from visadapt.tracking.tracker import Tracker

    device, dtype, spec = torch.device(args.device), DTYPES[args.dtype], get_variant(args.variant)
    torch.manual_seed(0)
    plain = build_vit(spec.timm_name, **_vit_kwargs(args)).to(device, dtype).eval()
    unmerged = build_lorat(args.variant, **_vit_kwargs(args)).to(device, dtype).eval()
    merged = merge(copy.deepcopy(unmerged)).eval()
    z, x, z_mask, _ = _inputs(spec, 1, device, dtype)
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    tracker = Tracker.for_variant(merged, spec, device=device)
    tracker.init(frame, (280.0, 200.0, 80.0, 60.0))
    runs = {"plain": lambda: plain_vit_forward(plain, z, x), "merged": lambda: merged(z, x, z_mask),
            "unmerged": lambda: unmerged(z, x, z_mask), "track": lambda: tracker.track(frame)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for run in runs.values():
                run()
        for _ in range(args.iters):
            for name, run in runs.items():
                _sync(device)
                start = time.perf_counter()
                run()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()}


def training_worker(recipe: str, args: argparse.Namespace) -> dict:
    from visadapt.tracking.losses import lorat_loss
    from visadapt.tracking.model import build_lorat, get_variant, param_groups, parameter_counts

    device, dtype, spec = torch.device(args.device), DTYPES[args.dtype], get_variant(args.variant)
    torch.manual_seed(0)
    model = build_lorat(args.variant, lora=recipe == "lora", **_vit_kwargs(args)).to(device).train()
    if recipe == "full":
        model.requires_grad_(True)
    optimizer = torch.optim.AdamW(param_groups(model), lr=1e-4)
    z, x, z_mask, boxes = _inputs(spec, args.batch, device, torch.float32)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    before = current_rss()
    memory = PeakMemory(device)
    times = []
    for step in range(1 + args.train_steps):  # step 0 creates the optimiser state: untimed
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = lorat_loss(model(z, x, z_mask), boxes)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
    peak = memory.peak()
    counts = parameter_counts(model)
    return {"recipe": recipe, "step_s": statistics.median(times), "peak_mib": peak / MiB,
            "above_start_mib": (peak - (memory.baseline if device.type == "cuda" else before)) / MiB,
            "peak_reset": memory.reset, "trainable": counts["trainable"], "total": counts["total"],
            "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B-224", help="B-224, B-378, L-224, L-378, g-224, g-378")
    parser.add_argument("--backbone", choices=("S", "variant"), default="S",
                        help="S: ViT-S/14 dimensions at the variant's crop sizes; variant: the variant's backbone")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--iters", type=int, default=15, help="timed forwards per model (models take turns)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="training batch size")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (after one untimed)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "meta":
        sys.exit("--device meta builds no real tensors and cannot run; use cpu or cuda.")
    if args.worker:
        kind = args.worker[0]
        row = inference_worker(args) if kind == "inference" else training_worker(kind, args)
        print(MARKER + json.dumps(row))
        return
    report(args, run_child(__file__, MARKER, "inference"),
           {r: run_child(__file__, MARKER, r) for r in ("lora", "full")})


def report(args: argparse.Namespace, fps: dict, train: dict) -> None:
    backbone = "ViT-S/14 (384 wide, 12 blocks)" if args.backbone == "S" else "the variant's DINOv2"
    cuda = args.device.startswith("cuda")
    print(f"command: python benchmarks/tracking.py {' '.join(sys.argv[1:])}")
    print(f"device: {device_name(args.device)}; dtype {args.dtype}; {args.variant} crops on {backbone}, random "
          "weights")
    print(f"inference, batch 1, {args.iters} forwards per model, models taking turns:")
    print("model              median ms  frames/s  ratio to plain  fastest ms  ratio to plain")
    plain = fps["plain"]
    labels = {"plain": "plain ViT", "merged": "merged tracker", "unmerged": "unmerged tracker",
              "track": "Tracker.track"}
    for name, label in labels.items():
        t = fps[name]
        print(f"{label:17s}  {t['median'] * 1e3:9.1f}  "
              f"{1 / t['median']:8.2f}  {t['median'] / plain['median']:14.3f}  {t['min'] * 1e3:10.1f}  "
              f"{t['min'] / plain['min']:14.3f}")
    merged, unmerged = fps["merged"]["median"], fps["unmerged"]["median"]
    print(f"merged / plain (medians) = {merged / plain['median']:.3f} (goal ≤ 1.05); "
          f"unmerged / merged = {unmerged / merged:.3f}")
    memory = "CUDA allocator peak" if cuda else "peak RSS (process high-water mark)"
    print(f"training step, batch {args.batch}, median of {args.train_steps} steps; memory: {memory}")
    print("recipe  trainable M  total M  s/step  peak MiB  above start MiB")
    for recipe in ("lora", "full"):
        r = train[recipe]
        print(f"{recipe:6s}  {r['trainable'] / 1e6:11.2f}  {r['total'] / 1e6:7.2f}  {r['step_s']:6.2f}  "
              f"{r['peak_mib']:8.1f}  {r['above_start_mib']:15.1f}")
    lora, full = train["lora"], train["full"]
    above = lora["above_start_mib"] / full["above_start_mib"]
    print(f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}, peak memory "
          f"{lora['peak_mib'] / full['peak_mib']:.2f}, above start {above:.2f}")
    if not cuda and not (lora["peak_reset"] and full["peak_reset"]):
        print("note: the kernel refused to reset the peak-RSS mark; peaks include model building.")
    if args.json:
        Path(args.json).write_text(json.dumps({"inference_s": fps, "training": train}, indent=1))


if __name__ == "__main__":
    main()
