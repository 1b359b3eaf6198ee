"""Fused adapter kernels vs. their baselines, forward + backward of one adapted linear (d_in = d_out = d).

For each (d, r, tokens) it times, in the same process and with the same inputs:
  base    frozen F.linear fwd + dx                     (the floor: what the layer costs without an adapter)
  fused   visadapt.kernels.lora_linear fwd + dx, dA, dB
  peft    a real peft LoraModel over an nn.Linear (eager LoRA), same grads
  block   visadapt.kernels.block_lora_linear (n_blocks = --n-blocks)
  routed  F.linear + visadapt.kernels.routed_lora with 4 adapters, the tokens split into 4 contiguous regions
and prints a markdown table of ratios (fused/base, fused/peft, block/fused, routed4/fused) with the device,
torch and triton versions. Adapters are fp32 (peft's default upcast) and activations --dtype (bf16 default).

CUDA: timed with CUDA events, L2 flushed before each run, median of --reps; peak memory from
torch.cuda.max_memory_allocated. CPU (or --device cpu): there is no Triton path, so "fused" is the eager
implementation of the same ops, timed with perf_counter; the table says so. ``--quick`` picks tiny sizes for a
smoke run.

    python benchmarks/kernels.py                      # the full grid on the GPU
    python benchmarks/kernels.py --quick --device cpu # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

# This script is named kernels.py: keep its folder off sys.path, or an `import kernels` elsewhere (transformers
# probes for the hub package of that name while visadapt imports peft) would find this file.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from visadapt import kernels  # noqa: E402

N_ROUTED = 4


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, nargs="+", default=[768, 1024, 4096])
    p.add_argument("--r", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 16384, 65536])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--n-blocks", type=int, default=4, help="Block-LoRA chunks (must divide d)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few reps, for a smoke run")
    args = p.parse_args()
    if args.quick:
        args.d, args.r, args.tokens, args.reps, args.warmup = [64, 128], [8], [512], 5, 2
    return args


class _Timer:
    """Median milliseconds of fn() over reps; CUDA events with an L2 flush, or perf_counter on CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.flush is not None:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def _peak_mib(device, fn) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _peft_linear(weight, bias, r, scale_alpha):
    """A peft LoraModel over one nn.Linear carrying the same frozen weight."""
    from peft import LoraConfig, get_peft_model

    d_out, d_in = weight.shape
    holder = nn.Sequential()
    holder.add_module("lin", nn.Linear(d_in, d_out, device=weight.device, dtype=weight.dtype))
    with torch.no_grad():
        holder.lin.weight.copy_(weight)
        holder.lin.bias.copy_(bias)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=scale_alpha, target_modules=["lin"],
                                              init_lora_weights=False))
    lora = model.base_model.model.lin
    return model, [lora.lora_A["default"].weight, lora.lora_B["default"].weight]


def bench_one(d, r, n_tokens, args, timer, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n_tokens, d, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(n_tokens, d, generator=gen).to(device, dtype)
    weight = (torch.randn(d, d, generator=gen) / d ** 0.5).to(device, dtype)
    bias = torch.randn(d, generator=gen).to(device, dtype)
    scale = 2.0  # lora_alpha = 2r
    model, (a, b) = _peft_linear(weight, bias, r, 2 * r)
    a_s = torch.randn(r, d // args.n_blocks, generator=gen).to(device).requires_grad_(True)
    stack_a = torch.randn(N_ROUTED, r, d, generator=gen).to(device).div_(d ** 0.5).requires_grad_(True)
    stack_b = torch.randn(N_ROUTED, d, r, generator=gen).to(device).requires_grad_(True)
    index = (torch.arange(n_tokens, device=device) * N_ROUTED // n_tokens)  # 4 contiguous regions
    scales = [scale] * N_ROUTED

    def run(out, inputs):
        return lambda: torch.autograd.grad(out(), inputs, dy)

    fns = {
        "base": run(lambda: F.linear(x, weight, bias), [x]),
        "fused": run(lambda: kernels.lora_linear(x, weight, bias, a, b, scale), [x, a, b]),
        "peft": run(lambda: model(x), [x, a, b]),
        "block": run(lambda: kernels.block_lora_linear(x, weight, bias, a_s, b, args.n_blocks, scale), [x, a_s, b]),
        "routed": run(lambda: F.linear(x, weight, bias) + kernels.routed_lora(x, stack_a, stack_b, scales, index),
                      [x, stack_a, stack_b]),
    }
    with torch.no_grad():  # the fused op and peft compute the same layer: check before timing anything
        err = (kernels.lora_linear(x, weight, bias, a, b, scale).float() - model(x).float()).abs().max().item()
    ms = {name: timer(fn) for name, fn in fns.items()}
    mem = {name: _peak_mib(device, fns[name]) for name in ("fused", "peft")}
    return ms, mem, err


def main():
    args = parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    timer = _Timer(device, args.reps, args.warmup)
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (Triton path: {kernels.get_backend()} backend)"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads — EAGER path " \
                f"(no Triton on CPU): 'fused' times the eager ops, not the kernels"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"device: {where}\ntorch {torch.__version__} | triton {triton_version} | {args.dtype} activations, fp32 "
          f"adapters | fwd+bwd, median of {args.reps} ({args.warmup} warm-up) | Block-LoRA n_blocks={args.n_blocks}"
          f" | routed: {N_ROUTED} adapters on 4 contiguous token regions, base linear included\n")
    print("| d | r | tokens | base ms | fused ms | fused/base | peft ms | fused/peft | block/fused | routed4/fused "
          "| peak MiB fused | peak MiB peft | max abs diff fused vs peft |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in args.d:
        for r in args.r:
            for n_tokens in args.tokens:
                ms, mem, err = bench_one(d, r, n_tokens, args, timer, device, dtype)
                print(f"| {d} | {r} | {n_tokens} | {ms['base']:.3f} | {ms['fused']:.3f} | "
                      f"{ms['fused'] / ms['base']:.2f} | {ms['peft']:.3f} | {ms['fused'] / ms['peft']:.2f} | "
                      f"{ms['block'] / ms['fused']:.2f} | {ms['routed'] / ms['fused']:.2f} | {mem['fused']:.0f} | "
                      f"{mem['peft']:.0f} | {err:.2g} |", flush=True)


if __name__ == "__main__":
    main()
