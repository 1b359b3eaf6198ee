"""LoLA-SpecViT throughput: training and inference samples/s and trainable parameters, per size and LoRA placement.

    python benchmarks/hsi.py                                   # tiny and base, every placement, CPU/GPU as available
    python benchmarks/hsi.py --models lola_specvit_tiny --batch 32 --steps 5 --device cpu

A training step is the trainer's: forward, label-smoothed cross-entropy, backward, grad-norm clip, AdamW on the
trainable parameters (official freezing), on random 15×15×15 patches (the release's input). Inference is a forward in
eval mode under ``torch.no_grad``. Each (model, placement) is timed after ``--warmup`` untimed steps; on CUDA the
timing synchronises and fp16 autocast is used when ``--precision fp16`` (the release's AMP).
"""

from __future__ import annotations

import argparse
import platform
import time

import timm
import torch
import torch.nn.functional as F

import visadapt.hyperspectral  # noqa: F401  (registers the models)
from visadapt.hyperspectral.model import count_parameters, set_trainable
from visadapt.hyperspectral.schedule import lola_param_groups
from visadapt.utils.modules import trainable_parameters

PLACEMENTS = ("none", "attn", "attn_mlp", "all")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, placement: str, batch: int, steps: int, warmup: int, device: torch.device, precision: str,
            num_classes: int = 16, size: int = 15) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes, in_chans=size, img_size=size,
                              lora_placement=placement).to(device)
    set_trainable(model, "official" if placement != "none" else "full")
    opt = torch.optim.AdamW(lola_param_groups(model, 2e-5))
    x = torch.randn(batch, size, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    model.train()
    for _ in range(warmup):
        train_step()
    _sync(device)
    tick = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train_s = (time.perf_counter() - tick) / steps
    model.eval()
    with torch.no_grad():
        for _ in range(warmup):
            with autocast:
                model(x)
        _sync(device)
        tick = time.perf_counter()
        for _ in range(steps):
            with autocast:
                model(x)
        _sync(device)
    infer_s = (time.perf_counter() - tick) / steps
    return {"model": name, "placement": placement, "total": count_parameters(model),
            "trainable": trainable_parameters(model), "train_sps": batch / train_s, "infer_sps": batch / infer_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lola_specvit_tiny,lola_specvit_base")
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"
    print(f"device: {where} | torch {torch.__version__} | batch {args.batch} | input 15×15×15 | precision "
          f"{args.precision} | warmup {args.warmup}, timed steps {args.steps}")
    print("placement 'none' = no LoRA, every parameter trained (the spectral-only baseline); others: official freezing")
    header = (f"{'model':<20}{'placement':<11}{'total':>14}{'trainable':>14}{'train samples/s':>18}"
              f"{'infer samples/s':>18}")
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        for placement in args.placements.split(","):
            r = measure(name, placement, args.batch, args.steps, args.warmup, device, args.precision)
            print(f"{r['model']:<20}{r['placement']:<11}{r['total']:>14,}{r['trainable']:>14,}"
                  f"{r['train_sps']:>18.1f}{r['infer_sps']:>18.1f}", flush=True)


if __name__ == "__main__":
    main()
