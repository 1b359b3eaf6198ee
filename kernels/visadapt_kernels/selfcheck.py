"""One-time self-check of the Triton kernels, run by the "auto" backend before it trusts them.

The first time per process that ``auto`` would send an op to Triton on a given device and dtype, :func:`passed`
runs that op's Triton forward and backward on small tensors of that device and dtype and compares y, dx, dA and dB
with the op's plain-autograd reference (``*_reference``, in float64); for the LoRA ops also once with dropout in
two groups (the reference applying the masks the kernels' generator writes out), since training calls with dropout
take the same route as the others. A compile error, a launch failure (any
exception) or a mismatch beyond the dtype's tolerance warns once (:class:`KernelSelfCheckWarning`) and sends that
(op, device, dtypes) to the eager formulas for the rest of the process; a pass changes nothing, the check only
decides the route. Each key is checked once. ``VISADAPT_KERNELS=triton`` never comes here (forced: errors raise),
``VISADAPT_KERNELS=eager`` never runs Triton at all.

The check does not depend on the caller's state: its tensors come from a local generator (the global RNG is not
advanced), autocast is off, and the reference gradients come from ``torch.func.vjp``, which differentiates under
``no_grad``, ``inference_mode`` and inside a custom op's body (where autograd is dispatched below and
``torch.enable_grad()`` alone would record nothing). It calls the kernels and references directly, never the
custom ops, so it cannot re-enter itself; the key is marked before it runs anyway.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .backend import deterministic
from .dropout import FusedDropout
from .lora import block_lora_linear_reference, lora_linear_reference
from .routed import routed_lora_reference, routing_plan

# Allowed max |Triton − reference|, relative to the reference's largest value (at least 1), by dtype (of the
# activations or the adapters, whichever is looser): the tolerances of tests/test_kernels.py (fp32 accumulation
# everywhere; 16-bit rounding of inputs and dots).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Small. Multiples of 16, as most layers' sizes are, so that on a GPU the kernels compiled (and autotuned) for the
# check are mostly the specialisations the real layers use; none is a multiple of the tiles (rows 32/64, columns
# 32/64/128, rank 16), so the masked edges run too.
_ROWS, _D_IN, _D_OUT, _RANK, _BLOCKS, _ADAPTERS, _SCALE = 48, 48, 80, 4, 3, 3, 0.75
_SEED = 20261206  # of the dropout case's Philox masks

Key = tuple[str, torch.device, torch.dtype, torch.dtype]  # (op, device, activation dtype, adapter dtype)
_results: dict[Key, bool] = {}
_lock = threading.RLock()


class KernelSelfCheckWarning(RuntimeWarning):
    """A Triton kernel failed its one-time self-check; the op runs the eager formulas instead."""


def passed(op: str, device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """True if ``op``'s Triton path passed its self-check for activations of ``dtype`` and adapters of
    ``adapter_dtype`` on ``device``; runs the check on the first call per key and caches the answer."""
    key = (op, device, dtype, adapter_dtype)
    result = _results.get(key)
    if result is not None:
        return result
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # a CUDA graph is being captured: the check cannot read results back; eager, check later
    with _lock:
        if key not in _results:
            _results[key] = False  # while it runs: a re-entrant call takes eager, and no key is checked twice
            _results[key] = _run(key)
    return _results[key]


def reset() -> None:
    """Forget every result, so that the next use of each key checks again (for tests)."""
    with _lock:
        _results.clear()


def results() -> dict[Key, bool]:
    """A copy of the answers so far: (op, device, activation dtype, adapter dtype) → passed."""
    return dict(_results)


def _run(key: Key) -> bool:
    op, device, dtype, adapter_dtype = key
    try:
        with torch.autocast(device.type, enabled=False):
            problem = _CHECKS[op](device, dtype, adapter_dtype)
    except Exception as error:  # compile errors, launch failures, ...: anything means "do not trust Triton here"
        problem = f"{type(error).__name__}: {str(error).strip()[:500]}"
    if problem is not None:
        warnings.warn(
            f"visadapt.kernels: the Triton kernels of {op} failed their self-check on {device} with {dtype} "
            f"activations and {adapter_dtype} adapters ({problem}). {op} runs the eager PyTorch formulas there for "
            "the rest of this process. Set VISADAPT_KERNELS=eager to skip Triton and this check; "
            "VISADAPT_KERNELS=triton forces the kernels and raises their error instead.",
            KernelSelfCheckWarning, stacklevel=2)
    return problem is None


# ----------------------------------------------------------------------------------------------------------------
# the checks: each returns None when Triton matches the reference, else what differs


def _triton():
    from . import triton_kernels  # looked up at call time, so tests can patch its functions

    return triton_kernels


def _randn(gen: torch.Generator, *shape: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """Drawn on the CPU from ``gen`` (the caller's RNG, CPU or CUDA, is not touched), then moved."""
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def _tolerance(*dtypes: torch.dtype) -> float:
    """The loosest of the dtypes' tolerances: dA and dB are rounded to the adapters' dtype, y and dx to x's."""
    if torch.backends.cuda.matmul.allow_tf32:  # the kernels' fp32 dots then run as TF32 (fp16's mantissa), as torch's
        dtypes = tuple(torch.float16 if d == torch.float32 else d for d in dtypes)
    return max(TOLERANCE[d] for d in dtypes)


def _mismatch(got: tuple[Tensor, ...], want: tuple[Tensor, ...], tol: float) -> Optional[str]:
    """The first of y, dx, dA, dB (``got``) that differs from ``want`` (float64) by more than tol × max(|want|, 1),
    described; None if all match."""
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        if g.shape != w.shape:
            return f"{name} has shape {tuple(g.shape)}, the reference {tuple(w.shape)}"
        error, bound = (g.double() - w).abs().max().item(), tol * max(w.abs().max().item(), 1.0)
        if not error <= bound:  # also catches NaN
            return f"{name} differs from the reference by {error:.3g} (tolerance {bound:.3g})"
    return None


def _check_lora(n_blocks: int) -> Callable[[torch.device, torch.dtype, torch.dtype], Optional[str]]:
    """The check of lora_linear (n_blocks = 1) or block_lora_linear: with W and bias, then without (the delta
    alone, as a second adapter or a non-linear base layer asks for: another specialisation of the base GEMM)."""

    def check(device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype) -> Optional[str]:
        gen = torch.Generator().manual_seed(0)
        x = _randn(gen, _ROWS, _D_IN, device=device, dtype=dtype)
        dy = _randn(gen, _ROWS, _D_OUT, device=device, dtype=dtype)
        weight = _randn(gen, _D_OUT, _D_IN, device=device, dtype=dtype, scale=_D_IN ** -0.5)
        bias = _randn(gen, _D_OUT, device=device, dtype=dtype)
        cols = _D_IN // n_blocks
        lora_a = _randn(gen, _RANK, cols, device=device, dtype=adapter_dtype, scale=cols ** -0.5)
        lora_b = _randn(gen, _D_OUT, _RANK, device=device, dtype=adapter_dtype)
        for w, b, case in ((weight, bias, "with W and bias"), (None, None, "delta only, weight=None")):
            if problem := _compare_lora(x, dy, w, b, lora_a, lora_b, n_blocks):
                return f"{problem} ({case})"
        # training with dropout: two groups, the masks written out by the kernels' own generator
        dropout = FusedDropout(0.25, torch.tensor([_SEED], dtype=torch.int64, device=device), 3, (1, _RANK - 1))
        if problem := _compare_lora(x, dy, weight, bias, lora_a, lora_b, n_blocks, dropout):
            return f"{problem} (dropout 0.25 in two groups)"
        return None

    return check


def _compare_lora(x: Tensor, dy: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor,
                  lora_b: Tensor, n_blocks: int, dropout: Optional[FusedDropout] = None) -> Optional[str]:
    """The Triton forward and backward (x (N, d_in), dy (N, d_out)) against the reference's, in float64; with
    ``dropout``, the reference applies the masks that the kernels' generator writes out for it."""
    kernels = _triton()
    extra = () if dropout is None else (dropout,)  # positional: tests patch the launchers with (*args) spies
    y, h, x_lora = kernels.lora_forward(x, weight, bias, lora_a, lora_b, n_blocks, _SCALE, *extra)
    got = (y, *kernels.lora_backward(dy, x_lora, h, weight, lora_a, lora_b, n_blocks, _SCALE, True, *extra))
    w64, b64 = (None if t is None else t.double() for t in (weight, bias))
    p, groups, mask = 0.0, None, None
    if dropout is not None:
        p, groups = dropout.p, list(dropout.groups)
        mask = kernels.dropout_keep_mask(dropout, *x.shape)

    def reference(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        if n_blocks == 1:
            return lora_linear_reference(x, w64, b64, a, b, _SCALE, p, p > 0, groups, mask)
        return block_lora_linear_reference(x, w64, b64, a, b, n_blocks, _SCALE, p, p > 0, groups, mask)

    want, vjp = torch.func.vjp(reference, x.double(), lora_a.double(), lora_b.double())
    return _mismatch(got, (want, *vjp(dy.double())), _tolerance(x.dtype, lora_a.dtype))


def _check_routed(device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype) -> Optional[str]:
    """The check of routed_lora, three adapters: one slot per token (k = 1, tokens written directly), then two
    weighted slots (k = 2, slots summed); both with unrouted (-1) slots."""
    gen = torch.Generator().manual_seed(0)
    x = _randn(gen, _ROWS, _D_IN, device=device, dtype=dtype)
    dy = _randn(gen, _ROWS, _D_OUT, device=device, dtype=dtype)
    lora_a = _randn(gen, _ADAPTERS, _RANK, _D_IN, device=device, dtype=adapter_dtype, scale=_D_IN ** -0.5)
    lora_b = _randn(gen, _ADAPTERS, _D_OUT, _RANK, device=device, dtype=adapter_dtype)
    scales = torch.tensor([0.5, 1.0, 2.0], device=device)
    kernels = _triton()
    for k in (1, 2):
        index = torch.randint(-1, _ADAPTERS, (_ROWS, k), generator=gen).to(device)
        weights = torch.rand(_ROWS, k, generator=gen).to(device) if k > 1 else None
        plan = routing_plan(index, scales, weights, _ADAPTERS, one_reduce_tile_per_adapter=deterministic())
        delta, h = kernels.routed_forward(x, lora_a, lora_b, plan)
        got = (delta, *kernels.routed_backward(dy, x, h, lora_a, lora_b, plan, True))

        def reference(x: Tensor, a: Tensor, b: Tensor, index: Tensor = index, weights: Optional[Tensor] = weights):
            return routed_lora_reference(x, a, b, scales, index, weights)

        want, vjp = torch.func.vjp(reference, x.double(), lora_a.double(), lora_b.double())
        if problem := _mismatch(got, (want, *vjp(dy.double())), _tolerance(dtype, adapter_dtype)):
            return f"{problem} (index with k = {k})"
    return None


_CHECKS = {"lora_linear": _check_lora(1), "block_lora_linear": _check_lora(_BLOCKS), "routed_lora": _check_routed}
