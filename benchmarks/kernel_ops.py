"""Fused adapter kernels vs. their baselines, forward + backward of one adapted linear (d_in = d_out = d).

For each (d, r, tokens) it times, in a fresh process per configuration and with the same inputs:
  base      frozen F.linear fwd + dx                      (the floor: what the layer costs without an adapter)
  fused     visadapt.kernels.lora_linear fwd + dx, dA, dB
  fused-s   the same with the experimental shrink-in-the-GEMM fusion (kernels.backend.set_fuse_shrink)
  addmm     eager LoRA on cuBLAS: addmm(addmm(b, x, Wᵀ), x Aᵀ, Bᵀ, alpha=s), autograd (the delta add rides in
            the second GEMM's beta·C)
  peft      a real peft LoraModel over an nn.Linear (eager LoRA), same grads
  peft-c    the same model under torch.compile (inductor; CUDA, or CPU with --compile)
  block     visadapt.kernels.block_lora_linear (n_blocks = --n-blocks)
  routed    F.linear + visadapt.kernels.routed_lora with 4 adapters, the tokens split into 4 contiguous regions
and prints a markdown table: times, ratios (fused/base, fused/peft, fused/peft-c, block/fused, routed4/fused),
the fused path's TFLOP/s (its FLOPs below ÷ time) and GB/s (the byte model below ÷ time), peak memory, and the
largest difference between fused and peft outputs. Adapters fp32 (peft's default upcast), activations --dtype.

CUDA: CUDA events; before each timed run the L2 is flushed and the device synchronised, so the GPU is idle when
the start event is recorded and the CPU cannot queue the timed launches during the flush (launch overhead counts);
median of --reps. A CUDA run asserts that the fused op really launched Triton kernels, and that the routed row
reads nothing back to the host (profiler: no .item(), nonzero, bincount, ...); its index and scales are device
tensors made before timing.
CPU (or --device cpu): no Triton path, "fused" times the eager ops; the table says so. ``--quick``: tiny sizes.

``--model`` prints the cost model instead (no GPU needed): per op, the bytes each kernel moves per token and the
kernel launches of one fwd+bwd, counted by running the op on this machine (torch ops under the profiler, each
Triton launch as one; with TRITON_INTERPRET=1 VISADAPT_KERNELS=triton the Triton path is counted), including
training with dropout 0.25 in three groups; then the bytes per token each op keeps for its backward (counted).

    python benchmarks/kernel_ops.py                      # the full grid on the GPU
    python benchmarks/kernel_ops.py --quick --device cpu # smoke run
    TRITON_INTERPRET=1 VISADAPT_KERNELS=triton python benchmarks/kernel_ops.py --model
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from visadapt import kernels
from visadapt.utils.measure import device_name, run_child

N_ROUTED = 4
# The profiler's C++ side (kineto) logs each start/stop ("USDT: ... profiler_start") and, without a GPU,
# "gpuGetDeviceCount failed" to stderr, between the table's lines; a level above all of its levels silences it.
os.environ.setdefault("KINETO_LOG_LEVEL", "99")
MARKER = "KERNELS-BENCH-ROW "
TRITON_KERNELS = ("_shrink_kernel", "_linear_expand_kernel", "_routed_expand_kernel", "_reduce_kernel")


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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile'd peft (default: on CUDA only; inductor's CPU build is slow)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few reps, for a smoke run")
    p.add_argument("--model", action="store_true", help="print the bytes/launches model and exit (no timing)")
    p.add_argument("--worker", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.d, args.r, args.tokens, args.reps, args.warmup = [64, 128], [8], [512], 5, 2
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    return args


# ----------------------------------------------------------------------------------------------------------------
# timing


class _Timer:
    """Median milliseconds of fn() over reps; CUDA events with an L2 flush, or perf_counter on CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        return statistics.median(self._once(fn) for _ in range(self.reps))

    def _once(self, fn) -> float:
        if self.flush is None:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush.zero_()
        torch.cuda.synchronize()  # the GPU is idle at the start event: no launches queued during the flush
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def _peak_mib(device, fn) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _count_triton_launches(fn) -> int:
    """Triton kernel launches made by fn() (0 when the Triton module is not in use)."""
    if "visadapt.kernels.triton_kernels" not in sys.modules:  # imported on the first Triton call
        return 0
    from visadapt.kernels import triton_kernels

    launches = [0]
    saved = {name: getattr(triton_kernels, name).run for name in TRITON_KERNELS}
    for name, run in saved.items():
        getattr(triton_kernels, name).run = lambda *a, _run=run, **k: (launches.__setitem__(0, launches[0] + 1),
                                                                        _run(*a, **k))[1]
    try:
        fn()
    finally:
        for name in saved:
            del getattr(triton_kernels, name).run  # the class attribute is back
    return launches[0]


# aten ops that read a device value back to the host, directly or to size their output: a sync on CUDA
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
             "aten::masked_select", "aten::bincount", "aten::_unique2", "aten::unique_consecutive"}


def _host_reads(fn) -> list[str]:
    """Names of the sync ops fn() runs (none may run in a timed region that claims to have no sync)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events() if event.name in _SYNC_OPS]


# ----------------------------------------------------------------------------------------------------------------
# the contenders


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


def _addmm_lora(x, weight, bias, a, b, scale):
    """Eager LoRA on cuBLAS GEMMs: the delta is added by the second GEMM (beta · C) instead of a separate add."""
    h = x @ a.to(x.dtype).T
    return torch.addmm(torch.addmm(bias, x, weight.T), h, b.to(x.dtype).T, alpha=scale)


def _fused_shrink(fn):
    """fn with the experimental shrink-in-the-GEMM fusion switched on (see kernels.backend.set_fuse_shrink)."""
    def run():
        kernels.backend.set_fuse_shrink(True)
        try:
            return fn()
        finally:
            kernels.backend.set_fuse_shrink(False)
    return run


def bench_one(d, r, n_tokens, args, device, dtype) -> dict:
    timer = _Timer(device, args.reps, args.warmup)
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
    scales = torch.full((N_ROUTED,), scale, device=device)

    def run(out, inputs):
        return lambda: torch.autograd.grad(out(), inputs, dy)

    fns = {
        "base": run(lambda: F.linear(x, weight, bias), [x]),
        "fused": run(lambda: kernels.lora_linear(x, weight, bias, a, b, scale), [x, a, b]),
        "addmm": run(lambda: _addmm_lora(x, weight, bias, a, b, scale), [x, a, b]),
        "peft": run(lambda: model(x), [x, a, b]),
        "block": run(lambda: kernels.block_lora_linear(x, weight, bias, a_s, b, args.n_blocks, scale), [x, a_s, b]),
        "routed": run(lambda: F.linear(x, weight, bias) + kernels.routed_lora(x, stack_a, stack_b, scales, index),
                      [x, stack_a, stack_b]),
    }
    if hasattr(kernels.backend, "set_fuse_shrink"):
        fns["fused-s"] = _fused_shrink(fns["fused"])
    if args.compile:
        compiled = torch.compile(model)
        fns["peft-c"] = run(lambda: compiled(x), [x, a, b])
    with torch.no_grad():  # the fused op and peft compute the same layer: check before timing anything
        err = (kernels.lora_linear(x, weight, bias, a, b, scale).float() - model(x).float()).abs().max().item()
    launches = _count_triton_launches(fns["fused"])
    if device.type == "cuda" and kernels.get_backend() != "eager":
        assert launches > 0, ("the fused op ran no Triton kernel on CUDA: the timings would be the eager path's "
                              "(did a KernelSelfCheckWarning above send it to eager? VISADAPT_KERNELS=triton "
                              "raises the kernel's own error)")
    if device.type == "cuda":  # on CPU the index check reads its result directly, which is no sync there
        reads = _host_reads(fns["routed"])
        assert not reads, f"the routed row reads device values back to the host (a sync per call): {reads}"
    ms = {name: timer(fn) for name, fn in fns.items()}
    mem = {name: _peak_mib(device, fns[name]) for name in ("fused", "peft")}
    return dict(d=d, r=r, tokens=n_tokens, ms=ms, mem=mem, err=err, triton_launches=launches)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and the byte model


def flops(d_in: int, d_out: int, r: int, n_tokens: int) -> int:
    """fwd + dx of the frozen base (4·N·d_in·d_out) + LoRA's shrink, expand, g, dx add, dA, dB (6·N·r·(d_in+d_out))."""
    return 4 * n_tokens * d_in * d_out + 6 * n_tokens * r * (d_in + d_out)


def kernel_bytes(op: str, d_in: int, d_out: int, r: int, act: int, n_blocks: int = 4, k: int = 1,
                 fused_shrink: bool = False):
    """[(kernel, bytes moved per token)] of one fwd+bwd on the Triton path: activations ``act`` bytes each, h and g
    fp32; weights are not per-token and left out. Read off triton_kernels.py (predicted, not measured)."""
    h = 4 * r
    if op == "base":
        return [("F.linear fwd", act * (d_in + d_out)), ("dx = dy W", act * (d_out + d_in))]
    if op == "ideal":  # every activation read once per GEMM, h and g never leave the chip
        return [("fwd GEMM", act * (d_in + d_out)), ("dx GEMM", act * (d_out + d_in)),
                ("dA, dB in the dx GEMM", act * d_in)]
    if op == "routed":
        return _routed_bytes(d_in, d_out, r, act, k)
    if op in ("lora-dropout", "block-dropout"):  # masks redrawn in registers; Block-LoRA reads x, not x̃
        return [("shrink h = s drop(x) Ãᵀ", act * d_in + h), ("base GEMM + expand", act * (d_in + d_out) + h),
                ("shrink g = s dy B", act * d_out + h), ("dx GEMM + Σ_g keep_g ⊙ g_g Ã_g", act * (d_out + d_in) + h),
                ("reduce dB = dyᵀ h", act * d_out + h), ("reduce dA = Σ_g (keep_g ⊙ x)ᵀ g_g", act * d_in + h)]
    c = d_in if op == "lora" else d_in // n_blocks
    rows = [("chunk sum x̃", act * d_in + act * c)] if op == "block" else []
    if fused_shrink:  # h and g come out of the GEMMs' main loops: only their fp32 writes remain
        return rows + [("base GEMM + shrink + expand", act * (d_in + d_out) + h),
                       ("dx GEMM + shrink + g Ã", act * (d_out + d_in) + h),
                       ("reduce dB = dyᵀ h", act * d_out + h), ("reduce dA = gᵀ x̃", act * c + h)]
    return rows + [("shrink h = s x̃ Aᵀ", act * c + h), ("base GEMM + expand", act * (d_in + d_out) + h),
                   ("shrink g = s dy B", act * d_out + h), ("dx GEMM + g Ã", act * (d_out + d_in) + h),
                   ("reduce dB = dyᵀ h", act * d_out + h), ("reduce dA = gᵀ x̃", act * c + h)]


def _routed_bytes(d_in: int, d_out: int, r: int, act: int, k: int):
    """Per token with k slots (pairs): the plan reads the index and writes ≈ 4 int32/fp32 values per pair; a
    shrink reads a row and writes h per pair; an expand writes the token's row (k > 1: fp32 atomic
    read-modify-writes per pair, then one fp32 → act cast)."""
    def expand(n):
        return r * 4 + act * n if k == 1 else k * (r * 4 + 8 * n) + (4 + act) * n

    return [("plan", k * (8 + 16)), ("shrink h", k * (act * d_in + 4 * r)), ("expand Δy", expand(d_out)),
            ("shrink g", k * (act * d_out + 4 * r)), ("expand dx", expand(d_in)),
            ("reduce dB", k * (act * d_out + 4 * r)), ("reduce dA", k * (act * d_in + 4 * r))]


# kernels that only describe memory layout: no device work, no launch
_NO_LAUNCH = {"aten::empty", "aten::empty_strided", "aten::view", "aten::reshape", "aten::_reshape_alias",
              "aten::as_strided", "aten::transpose", "aten::t", "aten::permute", "aten::unsqueeze", "aten::squeeze",
              "aten::expand", "aten::slice", "aten::select", "aten::alias", "aten::detach", "aten::unflatten",
              "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::lift_fresh", "aten::resolve_conj",
              "aten::resolve_neg", "aten::_unsafe_view", "aten::unbind", "aten::flatten", "aten::empty_like",
              "aten::new_empty", "aten::result_type", "aten::contiguous", "aten::to", "aten::_to_copy",
              "aten::zeros", "aten::zeros_like", "aten::new_zeros", "aten::ones_like", "aten::numpy_T",
              "aten::_has_compatible_shallow_copy_type", "aten::matrix_H", "aten::chunk", "aten::lift_fresh_copy"}


def count_launches(fn) -> int:
    """Device kernel launches of fn(): leaf aten ops that do work (a copy, a fill, a GEMM, ...) plus one per Triton
    launch (whose interpreted internals are not counted). On CPU this counts what CUDA would launch."""
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()  # warm-up: first-call work (imports the Triton module, fills caches) is not a per-call launch
    saved = {}
    if "visadapt.kernels.triton_kernels" in sys.modules:
        from visadapt.kernels import triton_kernels

        for name in TRITON_KERNELS:
            kernel = getattr(triton_kernels, name)
            saved[name] = kernel.run

            def run(*a, _run=kernel.run, **k):
                with record_function("triton launch"):
                    return _run(*a, **k)
            kernel.run = run
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        for name in saved:
            del getattr(triton_kernels, name).run
    return sum(1 for event in prof.events() if _is_launch(event))


def _does_work(event) -> bool:
    return event.name == "triton launch" or (event.name.startswith("aten::") and event.name not in _NO_LAUNCH)


def _is_launch(event) -> bool:
    """The outermost op that does device work counts once (aten::linear: its addmm); ops inside it, and the
    interpreter's own tensor traffic inside a Triton launch, do not."""
    if not _does_work(event):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if _does_work(parent):
            return False
        parent = parent.cpu_parent
    return True


def print_model(args):
    """Per op: bytes per token (model, Triton path) and launches of one fwd+bwd (counted here)."""
    act = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    d, r = 1024, 16
    # launches do not depend on the sizes or the dtype: count them on small fp32 tensors (fast when interpreted)
    dc, n = 64, 128
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dc, generator=gen).requires_grad_(True)
    dy = torch.randn(n, dc, generator=gen)
    w, bias = torch.randn(dc, dc, generator=gen) / dc ** 0.5, torch.randn(dc, generator=gen)
    a, b = (torch.randn(*shape, generator=gen).requires_grad_(True) for shape in ((r, dc), (dc, r)))
    a_s = torch.randn(r, dc // args.n_blocks, generator=gen).requires_grad_(True)
    la = torch.randn(N_ROUTED, r, dc, generator=gen).requires_grad_(True)
    lb = torch.randn(N_ROUTED, dc, r, generator=gen).requires_grad_(True)
    index = torch.arange(n) * N_ROUTED // n
    index2 = torch.stack([index, (index + 1) % N_ROUTED], -1)
    scales = torch.full((N_ROUTED,), 2.0)
    calls = {
        "base": (lambda: F.linear(x, w, bias), [x]),
        "lora": (lambda: kernels.lora_linear(x, w, bias, a, b, 2.0), [x, a, b]),
        "block": (lambda: kernels.block_lora_linear(x, w, bias, a_s, b, args.n_blocks, 2.0), [x, a_s, b]),
        "routed": (lambda: kernels.routed_lora(x, la, lb, scales, index), [x, la, lb]),
        "routed k=2": (lambda: kernels.routed_lora(x, la, lb, scales, index2), [x, la, lb]),
    }
    if hasattr(kernels.backend, "set_fuse_shrink"):
        calls["lora, fused shrink"] = calls["lora"]
        calls["block, fused shrink"] = calls["block"]
    # training with dropout 0.25 in three groups (q, k, v of a fused projection, as CLIP-LoRA's protocol)
    groups = [r - 2 * (r // 3), r // 3, r // 3]
    calls["lora-dropout"] = (lambda: kernels.lora_linear(x, w, bias, a, b, 2.0, 0.25, True, groups), [x, a, b])
    calls["block-dropout"] = (lambda: kernels.block_lora_linear(x, w, bias, a_s, b, args.n_blocks, 2.0, 0.25, True,
                                                                groups), [x, a_s, b])
    path = "Triton (interpreted)" if os.environ.get("TRITON_INTERPRET") == "1" and kernels.get_backend() == "triton" \
        else "eager"
    exact = getattr(kernels, "deterministic", bool)()  # (absent before the deterministic mode existed)
    print(f"model: d_in = d_out = {d}, r = {r}, {args.dtype} activations, fp32 h/g; launches counted on the {path} "
          f"path (backend {kernels.get_backend()}, deterministic {exact}), fwd + bwd\n")
    print("| op | launches fwd+bwd (counted) | bytes/token (predicted) | × base | kernels (bytes/token) |")
    print("|---|---|---|---|---|")
    base_bytes = sum(v for _, v in kernel_bytes("base", d, d, r, act))
    for name, (fwd, inputs) in calls.items():
        step = functools.partial(lambda f, i: torch.autograd.grad(f(), i, dy), fwd, inputs)
        launches = count_launches(_fused_shrink(step) if name.endswith("fused shrink") else step)
        key = name.split(",")[0].split(" ")[0]
        parts = kernel_bytes(key, d, d, r, act, args.n_blocks, k=2 if name.endswith("k=2") else 1,
                             fused_shrink=name.endswith("fused shrink"))
        total = sum(v for _, v in parts)
        detail = "; ".join(f"{k} {v}" for k, v in parts)
        print(f"| {name} | {launches} | {total} | {total / base_bytes:.2f} | {detail} |")
    ideal = sum(v for _, v in kernel_bytes("ideal", d, d, r, act))
    print(f"| limit (one read per GEMM) | 2 | {ideal} | {ideal / base_bytes:.2f} | "
          f"{'; '.join(f'{k} {v}' for k, v in kernel_bytes('ideal', d, d, r, act))} |")
    print_saved(args, d, r, groups)


def print_saved(args, d: int, r: int, groups: list[int]) -> None:
    """Bytes per token that the forward keeps for the backward (counted: the per-token tensors that autograd saves,
    at d = 1024, r = 16, in --dtype, on this machine's path), with and without dropout."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    n = 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(dtype).requires_grad_(True)
    w, bias = (torch.randn(d, d, generator=gen) / d ** 0.5).to(dtype), torch.randn(d, generator=gen).to(dtype)
    a = torch.randn(r, d, generator=gen).requires_grad_(True)
    a_s = torch.randn(r, d // args.n_blocks, generator=gen).requires_grad_(True)
    b = torch.randn(d, r, generator=gen).requires_grad_(True)
    calls = {"lora": lambda p: kernels.lora_linear(x, w, bias, a, b, 2.0, p, True, groups),
             "block": lambda p: kernels.block_lora_linear(x, w, bias, a_s, b, args.n_blocks, 2.0, p, True, groups)}
    print(f"\nsaved for backward, bytes/token (counted: per-token tensors autograd keeps, d = {d}, r = {r}, "
          f"{args.dtype} x, fp32 adapters, dropout in 3 groups; backend {kernels.get_backend()})\n")
    print("| op | p = 0 | p = 0.25, training |")
    print("|---|---|---|")
    for name, fn in calls.items():
        cells = []
        for p in (0.0, 0.25):
            seen = {}

            def pack(t, seen=seen):
                if t.dim() and t.shape[0] == n:  # per-token tensors only (weights are not)
                    seen[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn(p)
            cells.append(str(sum(seen.values()) // n))
        print(f"| {name} | {' | '.join(cells)} |")


# ----------------------------------------------------------------------------------------------------------------
# main


def _row(res: dict, args) -> str:
    ms, mem = res["ms"], res["mem"]
    seconds = ms["fused"] / 1e3
    act = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    moved = res["tokens"] * sum(v for _, v in kernel_bytes("lora", res["d"], res["d"], res["r"], act))
    tflops = flops(res["d"], res["d"], res["r"], res["tokens"]) / seconds / 1e12
    compiled, fused_s = ms.get("peft-c", float("nan")), ms.get("fused-s", float("nan"))
    cells = [res["d"], res["r"], res["tokens"], f"{ms['base']:.3f}", f"{ms['fused']:.3f}",
             f"{ms['fused'] / ms['base']:.2f}", f"{fused_s:.3f}", f"{fused_s / ms['base']:.2f}", f"{ms['addmm']:.3f}",
             f"{ms['peft']:.3f}", f"{compiled:.3f}", f"{ms['fused'] / ms['peft']:.2f}", f"{ms['fused'] / compiled:.2f}",
             f"{ms['block'] / ms['fused']:.2f}", f"{ms['routed'] / ms['fused']:.2f}", f"{tflops:.1f}",
             f"{moved / seconds / 1e9:.0f}", f"{mem['fused']:.0f}", f"{mem['peft']:.0f}", f"{res['err']:.2g}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main():
    args = parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.model:
        print_model(args)
        return
    if args.worker:
        print(MARKER + json.dumps(bench_one(*args.worker, args, device, dtype)), flush=True)
        return
    if device.type == "cuda":
        where = f"{device_name(args.device)} (Triton path: {kernels.get_backend()} backend)"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads — EAGER path " \
                f"(no Triton on CPU): 'fused' times the eager ops, not the kernels"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"device: {where}\ntorch {torch.__version__} | triton {triton_version} | {args.dtype} activations, fp32 "
          f"adapters | fwd+bwd, median of {args.reps} ({args.warmup} warm-up), one process per row | Block-LoRA "
          f"n_blocks={args.n_blocks} | routed: {N_ROUTED} adapters on 4 contiguous token regions, base linear "
          f"included | TFLOP/s and GB/s of the fused op (FLOPs and byte model of this script)\n")
    print("| d | r | tokens | base ms | fused ms | fused/base | fused-s ms | fused-s/base | addmm ms | peft ms "
          "| peft-c ms | fused/peft | fused/peft-c | block/fused | routed4/fused | fused TFLOP/s | fused GB/s "
          "| peak MiB fused | peak MiB peft | max abs diff fused vs peft |")
    print("|" + "---|" * 20)
    for d in args.d:
        for r in args.r:
            for n_tokens in args.tokens:
                print(_row(run_child(__file__, MARKER, str(d), str(r), str(n_tokens)), args), flush=True)


if __name__ == "__main__":
    main()
