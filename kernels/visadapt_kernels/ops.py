"""The public ops: ``lora_linear``, ``block_lora_linear``, ``routed_lora``, registered as torch custom ops.

Each public function validates shapes, flattens x to (N, d_in) and calls a forward op (``visadapt::lora_fwd`` or
``visadapt::routed_fwd``) whose backward is a second op (``…_bwd``); both have fake implementations, so
``torch.compile(fullgraph=True)`` traces through them as single nodes. Inside, each op runs the Triton kernels
(``triton_kernels.py``) or the eager formulas below, as :mod:`.backend` decides at run time (under "auto", after
the one-time self-check of :mod:`.selfcheck`).

What the backward keeps: x in its own dtype (Block-LoRA: only the chunk sum x̃, n times narrower; with fused
dropout x itself) and h = s · x̃ Aᵀ (N, r) in fp32 — not the (N, d_out) delta, no fp32 copy of a 16-bit x, and no
dropout mask (the kernels redraw it from the saved seed). Gradients: x, A, B
always; W and b too when they require grad (plain matmuls: W is frozen in every adapter of visadapt).

Under autocast, x, W and b are cast to autocast's dtype first (as F.linear would); the op bodies run with
autocast off, so the adapter math keeps its fp32 accumulation.

``routed_lora`` builds its routing plan (pairs sorted by adapter, per-tile tables, per-pair scales; see
:func:`.routed.routing_plan`) once per call, on the device and without reading anything back to the host, and
hands it to both ops: the forward and the backward (Triton kernels, or the eager batched SGMV below) reuse it.

All outputs are dense (contiguous) tensors, as the fakes promise. In deterministic mode
(:func:`.backend.deterministic`) no floating-point atomics run; the eager formulas have none anyway.

Dropout (p > 0 while training) runs where the kernels run: the public wrapper asks the backend (as the op body
would) and, on the Triton path, draws the call's seed (:mod:`.dropout`) and hands (p, seed, offset, groups) to
``lora_fwd``; the kernels draw one Philox mask per row group of A (``dropout_groups``: the q, k, v parts of a fused
projection draw their own) and ``lora_bwd`` redraws them from the saved seed. Elsewhere the plain-autograd
reference runs with ``torch.nn.functional.dropout``, so the masks come from torch's RNG exactly as in eager PyTorch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, selfcheck
from .dropout import MAX_GROUPS, DropoutRng, FusedDropout, check_dropout_p, fusable_groups, seed_tensor
from .lora import block_lora_linear_reference, check_block_lora, check_dropout_groups, check_lora, lora_linear_reference
from .routed import ROW_TILE, RoutingPlan, check_index_range, routing_plan, routing_shapes

_EMPTY = (0,)  # shape of the placeholder returned for a gradient nobody asked for (ops must return tensors)


def use_triton(op: str, x: torch.Tensor, lora_a: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """True if ``op`` ("lora_linear", "block_lora_linear" or "routed_lora") on these tensors (None entries
    skipped) runs the Triton kernels under the current backend. x is the op's activation (x, or dy in a backward)
    and lora_a its adapter: under "auto" x's device and dtype and lora_a's dtype key the op's self-check."""
    dtypes = tuple(t.dtype for t in (x, lora_a, *others) if t is not None)
    return _route(op, x.device, dtypes)


def _route(op: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> bool:
    """:func:`use_triton` on the tensors' device and dtypes (x's first, then the adapter's, then the others')."""
    chosen = backend.get_backend()
    if chosen == "eager" or not backend.triton_available() or any(d not in backend.TRITON_DTYPES for d in dtypes):
        return False
    if chosen == "triton":
        if device.type != "cuda" and not backend.interpreting():
            raise RuntimeError("Kernel backend 'triton' on CPU tensors needs Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before importing visadapt.kernels.")
        return True
    if device.type != "cuda" and not backend.AUTO_INTERPRET:
        return False
    return selfcheck.passed(op, device, dtypes[0], dtypes[1])


# The dropout route is decided in the public wrappers, where torch.compile traces: it must run there, not be traced
# (the first call's self-check launches kernels and reads results back). It is a constant of the process for a
# device and dtypes unless set_backend is called, which a compiled graph then does not see for its dropout calls.
_compiled_route = torch.compiler.assume_constant_result(_route)


def _hidden_dtype(lora_a: Tensor) -> torch.dtype:
    """dtype of h and of the adapter math: at least fp32 (fp64 adapters stay fp64)."""
    return torch.promote_types(lora_a.dtype, torch.float32)


def _no_autocast(fn):
    """Run an op body with autocast off: autocast would otherwise reach the eager formulas inside the op and
    change the dtypes its fake implementation promises. The public wrappers apply autocast's dtype to x first."""
    @functools.wraps(fn)  # keeps the signature, from which custom_op infers the schema
    def run(*args):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args)
    return run


def _autocast(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """Cast x (and the frozen W, b) to autocast's dtype when autocast is on, as F.linear would; adapters keep
    theirs (their math accumulates in fp32 anyway)."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def _kernels():
    from . import triton_kernels  # imported on first use: importing it needs triton (and a driver or interpreter)

    return triton_kernels


# ----------------------------------------------------------------------------------------------------------------
# eager formulas (the same math as the kernels; in-place adds where the reference would allocate)


def _chunk_sum(x: Tensor, n_blocks: int) -> Tensor:
    return x if n_blocks == 1 else x.unflatten(-1, (n_blocks, -1)).sum(-2)


def saved_input(x_lora: Tensor, n_blocks: int) -> Tensor:
    """Block-LoRA's x̃ (N, c), kept for dA_s instead of x; LoRA keeps x itself, which an op may not return."""
    return x_lora if n_blocks > 1 else x_lora.new_empty(_EMPTY)


def _eager_lora_fwd(x, weight, bias, lora_a, lora_b, n_blocks, scale):
    hd = _hidden_dtype(lora_a)
    x_lora = _chunk_sum(x, n_blocks)
    h = F.linear(x_lora.to(hd), lora_a.to(hd)) * scale
    delta = F.linear(h, lora_b.to(hd))
    y = delta.to(x.dtype) if weight is None else F.linear(x, weight, bias).add_(delta.to(x.dtype))
    return y, h, x_lora


def _eager_lora_bwd(dy, x_lora, h, weight, lora_a, lora_b, n_blocks, scale, need_x):
    hd = _hidden_dtype(lora_a)
    g = (dy.to(hd) @ lora_b.to(hd)) * scale  # (N, r) = s · dy B
    d_b = dy.to(hd).T @ h
    d_a = g.T @ x_lora.to(hd)
    dx = None
    if need_x:
        low_rank = (g @ lora_a.to(hd)).to(x_lora.dtype)  # (N, c); Block-LoRA: the same for each of the n chunks
        d_in = x_lora.shape[1] * n_blocks
        dx = x_lora.new_zeros(dy.shape[0], d_in) if weight is None else dy @ weight.to(dy.dtype)
        dx.unflatten(-1, (n_blocks, -1)).add_(low_rank.unsqueeze(-2))
    return dx, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


class _TileRows(NamedTuple):
    """The plan's tiles as padded (T, ROW_TILE) row blocks for the eager SGMV."""

    adapter: Tensor  # (T,) int64, surplus tiles clamped to adapter 0 (their rows are all invalid)
    tokens: Tensor  # (T, ROW_TILE) token of each row
    pairs: Tensor  # (T, ROW_TILE) pair of each row (padding: some valid pair, masked out by `valid`)
    target: Tensor  # (T, ROW_TILE) pair, or the scratch row P for padding
    valid: Tensor  # (T, ROW_TILE) bool
    factor: Tensor  # (T, ROW_TILE) fp32: w · s of the pair, 0 on padding


def _tile_rows(plan: RoutingPlan) -> _TileRows:
    """Gather the plan's tile tables into padded row blocks (needs P ≥ 1 pairs)."""
    n_pairs = plan.pairs.shape[0]
    rows = plan.tile_start.long()[:, None] + torch.arange(ROW_TILE, device=plan.pairs.device)
    valid = (rows < plan.tile_end.long()[:, None]) & (plan.tile_adapter[:, None] >= 0)
    rows = rows.clamp(0, max(n_pairs - 1, 0))
    tok, pair = plan.tokens.long()[rows], plan.pairs.long()[rows]
    return _TileRows(plan.tile_adapter.long().clamp_min(0), tok, pair, torch.where(valid, pair, n_pairs), valid,
                     plan.pair_scale[pair] * valid)


def _gather(t: Tensor, rows: _TileRows, dtype: torch.dtype) -> Tensor:
    """t[token of each row] as (T, ROW_TILE, d) in dtype, zero on padding rows (even where t is not finite)."""
    return torch.where(rows.valid[..., None], t[rows.tokens].to(dtype), 0)


def _per_adapter(per_tile: Tensor, plan: RoutingPlan, n_adapters: int) -> Tensor:
    """Σ over each adapter's tiles of per_tile (T, ...) → (L, ...), as a one-hot matmul: a fixed summation order
    (no atomics, so deterministic) and no data-dependent shapes."""
    one_hot = plan.tile_adapter.long()[None, :] == torch.arange(n_adapters, device=per_tile.device)[:, None]
    return (one_hot.to(per_tile.dtype) @ per_tile.flatten(1)).unflatten(1, per_tile.shape[1:])


def _eager_routed_fwd(x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: RoutingPlan) -> tuple[Tensor, Tensor]:
    """SGMV in plain torch: (Δy (N, d_out) in x's dtype, h (P, r) fp32 per pair), one batched matmul per
    projection over the plan's tiles; no host sync, no atomics."""
    hd = _hidden_dtype(lora_a)
    n_pairs = plan.pairs.shape[0]
    if n_pairs == 0:  # no tokens: nothing to gather
        return x.new_zeros(0, lora_b.shape[1]), x.new_zeros(0, lora_a.shape[1], dtype=hd)
    rows = _tile_rows(plan)
    h_t = torch.bmm(_gather(x, rows, hd), lora_a.to(hd)[rows.adapter].transpose(1, 2)) * rows.factor[..., None]
    h = _scatter_rows(h_t, rows.target, n_pairs)
    delta = _scatter_rows(torch.bmm(h_t, lora_b.to(hd)[rows.adapter].transpose(1, 2)), rows.target, n_pairs)
    return _slot_sum(delta, x.shape[0]).to(x.dtype), h


def _eager_routed_bwd(dy: Tensor, x: Tensor, h: Tensor, lora_a: Tensor, lora_b: Tensor, plan: RoutingPlan,
                      need_x: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """(dx (N, d_in) or None, dA (L, r, d_in), dB (L, d_out, r)) with g[pair] = w · s · dy[tok] B[l]."""
    hd = _hidden_dtype(lora_a)
    n_adapters, n_pairs = lora_a.shape[0], plan.pairs.shape[0]
    if n_pairs == 0:  # no tokens: zero gradients
        return x.new_zeros(x.shape) if need_x else None, torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    rows = _tile_rows(plan)
    dy_t = _gather(dy, rows, hd)
    g_t = torch.bmm(dy_t, lora_b.to(hd)[rows.adapter]) * rows.factor[..., None]
    d_b = _per_adapter(dy_t.transpose(1, 2) @ h[rows.pairs], plan, n_adapters)
    d_a = _per_adapter(g_t.transpose(1, 2) @ _gather(x, rows, hd), plan, n_adapters)
    dx = None
    if need_x:
        dx = _slot_sum(_scatter_rows(torch.bmm(g_t, lora_a.to(hd)[rows.adapter]), rows.target, n_pairs),
                       x.shape[0]).to(x.dtype)
    return dx, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


def _scatter_rows(per_row: Tensor, target: Tensor, n_pairs: int) -> Tensor:
    """(P, d) with row p = per_row's row of pair p (zero for unrouted pairs): each pair sits in one tile row, and
    the padding rows, all zero, go to a scratch row P that is dropped."""
    out = per_row.new_zeros(n_pairs + 1, per_row.shape[-1])
    out[target.reshape(-1)] = per_row.reshape(-1, per_row.shape[-1])
    return out[:n_pairs]


def _slot_sum(per_pair: Tensor, n_tokens: int) -> Tensor:
    """(N, d): each token's k slots (pairs p = token · k + slot) summed in slot order."""
    return per_pair.view(n_tokens, -1, per_pair.shape[-1]).sum(1)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


# ----------------------------------------------------------------------------------------------------------------
# custom ops: LoRA and Block-LoRA (n_blocks = 1 is LoRA)


def _lora_op(n_blocks: int) -> str:
    """The public op that a lora_fwd / lora_bwd call serves: the backend self-checks each one separately."""
    return "lora_linear" if n_blocks == 1 else "block_lora_linear"


def _dropout(dropout_p: float, seed: Optional[Tensor], offset: int, groups: Optional[list[int]],
             rank: int) -> Optional[FusedDropout]:
    """The fused dropout of an op call (None without a seed: no dropout)."""
    return None if seed is None else FusedDropout(dropout_p, seed, offset, tuple(groups or (rank,)))


@torch.library.custom_op("visadapt::lora_fwd", mutates_args=())
@_no_autocast
def _lora_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
              n_blocks: int, scale: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None, offset: int = 0,
              groups: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y (N, d_out) in x's dtype, h = s · x̃ Aᵀ (N, r), x̃ (N, c) for Block-LoRA or empty); x (N, d_in) 2-D.

    With a ``seed`` (fused dropout, see :mod:`.dropout`; the wrapper passes one only where the Triton kernels run)
    the kernels drop the low-rank input with the Philox masks of (seed, offset), one per row group of A, and the
    backward keeps x (not x̃): it regenerates the masks instead of storing them."""
    dropout = _dropout(dropout_p, seed, offset, groups, lora_a.shape[0])
    if dropout is not None:  # only Triton can redraw the masks; the wrapper checked that it runs here
        y, h, _ = _kernels().lora_forward(x, weight, bias, lora_a, lora_b, n_blocks, scale, dropout)
        return y, h, x.new_empty(_EMPTY)
    on_triton = use_triton(_lora_op(n_blocks), x, lora_a, lora_b, weight, bias)
    impl = _kernels().lora_forward if on_triton else _eager_lora_fwd
    y, h, x_lora = impl(x, weight, bias, lora_a, lora_b, n_blocks, scale)
    return y, h, saved_input(x_lora, n_blocks)


@_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, n_blocks, scale, dropout_p=0.0, seed=None, offset=0, groups=None):
    return (x.new_empty(x.shape[0], lora_b.shape[0]),
            x.new_empty(x.shape[0], lora_a.shape[0], dtype=_hidden_dtype(lora_a)),
            x.new_empty(x.shape[0], lora_a.shape[1]) if n_blocks > 1 and seed is None else x.new_empty(_EMPTY))


@torch.library.custom_op("visadapt::lora_bwd", mutates_args=())
@_no_autocast
def _lora_bwd(dy: Tensor, x_lora: Tensor, h: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
              n_blocks: int, scale: float, need_x: bool, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
              offset: int = 0, groups: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (N, d_in) or an empty placeholder, dA, dB); x_lora is x (LoRA, or any op with fused dropout) or x̃
    (Block-LoRA without dropout)."""
    dropout = _dropout(dropout_p, seed, offset, groups, lora_a.shape[0])
    if dropout is not None or use_triton(_lora_op(n_blocks), dy, lora_a, lora_b, x_lora, weight):
        dx, d_a, d_b = _kernels().lora_backward(dy, x_lora, h, weight, lora_a, lora_b, n_blocks, scale, need_x,
                                                dropout)
    else:
        dx, d_a, d_b = _eager_lora_bwd(dy, x_lora, h, weight, lora_a, lora_b, n_blocks, scale, need_x)
    return _or_empty(dx, x_lora), d_a, d_b


@_lora_bwd.register_fake
def _(dy, x_lora, h, weight, lora_a, lora_b, n_blocks, scale, need_x, dropout_p=0.0, seed=None, offset=0,
      groups=None):
    d_in = x_lora.shape[1] * (n_blocks if seed is None else 1)
    dx = x_lora.new_empty(dy.shape[0], d_in) if need_x else x_lora.new_empty(_EMPTY)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _lora_setup(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, n_blocks, scale, dropout_p, seed, offset, groups = inputs
    # W's own gradient (rare: W is frozen in visadapt's adapters) needs the full x even for Block-LoRA; fused
    # dropout keeps x too (its masks are drawn on x's indices), never a mask
    keep_x = n_blocks == 1 or seed is not None
    ctx.save_for_backward(x if keep_x else output[2], weight, lora_a, lora_b, output[1],
                          x if keep_x or ctx.needs_input_grad[1] else None, seed)
    ctx.n_blocks, ctx.scale, ctx.dropout = n_blocks, scale, (dropout_p, offset, groups)


def _lora_backward(ctx, dy, _dh, _dx_lora):
    x_lora, weight, lora_a, lora_b, h, x, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dropout_p, offset, groups = ctx.dropout
    dx, d_a, d_b = torch.ops.visadapt.lora_bwd(dy, x_lora, h, weight, lora_a, lora_b, ctx.n_blocks, ctx.scale,
                                               need[0], dropout_p, seed, offset, groups)
    d_w = (dy.T @ x).to(weight.dtype) if need[1] else None
    d_bias = dy.sum(0).to(dy.dtype) if need[2] else None
    return ((dx if need[0] else None), d_w, d_bias, (d_a if need[3] else None), (d_b if need[4] else None),
            None, None, None, None, None, None)


torch.library.register_autograd("visadapt::lora_fwd", _lora_backward, setup_context=_lora_setup)


# ----------------------------------------------------------------------------------------------------------------
# custom ops: routed multi-LoRA


@torch.library.custom_op("visadapt::routed_fwd", mutates_args=())
@_no_autocast
def _routed_fwd(x: Tensor, lora_a: Tensor, lora_b: Tensor, index: Tensor,
                plan: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(Δy (N, d_out) in x's dtype, h (N·k, r) per (token, slot) pair); index (N, k) int64 (only checked here: the
    plan, a :class:`RoutingPlan` as a list, carries the routing)."""
    check_index_range(index, lora_a.shape[0])  # here, not in the wrapper: data-dependent, so not traced
    plan = RoutingPlan(*plan)
    if use_triton("routed_lora", x, lora_a, lora_b):
        return _kernels().routed_forward(x, lora_a, lora_b, plan)
    return _eager_routed_fwd(x, lora_a, lora_b, plan)


@_routed_fwd.register_fake
def _(x, lora_a, lora_b, index, plan):
    return (x.new_empty(x.shape[0], lora_b.shape[1]),
            x.new_empty(index.numel(), lora_a.shape[1], dtype=_hidden_dtype(lora_a)))


@torch.library.custom_op("visadapt::routed_bwd", mutates_args=())
@_no_autocast
def _routed_bwd(dy: Tensor, x: Tensor, h: Tensor, lora_a: Tensor, lora_b: Tensor, plan: list[Tensor],
                need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (N, d_in) or an empty placeholder, dA (L, r, d_in), dB (L, d_out, r)), reusing the forward's plan."""
    plan = RoutingPlan(*plan)
    if use_triton("routed_lora", dy, lora_a, lora_b, x):
        dx, d_a, d_b = _kernels().routed_backward(dy, x, h, lora_a, lora_b, plan, need_x)
    else:
        dx, d_a, d_b = _eager_routed_bwd(dy, x, h, lora_a, lora_b, plan, need_x)
    return _or_empty(dx, x), d_a, d_b


@_routed_bwd.register_fake
def _(dy, x, h, lora_a, lora_b, plan, need_x):
    return (x.new_empty(x.shape) if need_x else x.new_empty(_EMPTY)), lora_a.new_empty(lora_a.shape), \
        lora_b.new_empty(lora_b.shape)


def _routed_setup(ctx, inputs, output):
    x, lora_a, lora_b, _, plan = inputs
    ctx.save_for_backward(x, lora_a, lora_b, output[1], *plan)


def _routed_backward(ctx, dy, _dh):
    x, lora_a, lora_b, h, *plan = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_a, d_b = torch.ops.visadapt.routed_bwd(dy, x, h, lora_a, lora_b, plan, need[0])
    no_grad_plan = [None] * len(plan)  # autograd wants the inputs' structure back: one entry per plan tensor
    return (dx if need[0] else None), (d_a if need[1] else None), (d_b if need[2] else None), None, no_grad_plan


torch.library.register_autograd("visadapt::routed_fwd", _routed_backward, setup_context=_routed_setup)


# ----------------------------------------------------------------------------------------------------------------
# public functions


def lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = False,
                dropout_groups: Optional[Sequence[int]] = None, dropout_rng: Optional[DropoutRng] = None) -> Tensor:
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ.

    x (..., d_in); weight (d_out, d_in) or None (then the delta alone is returned); bias (d_out,) or None;
    lora_a (r, d_in); lora_b (d_out, r); result (..., d_out) in x's dtype. Adapter math accumulates in fp32.

    Dropout (p > 0 while training) applies to the low-rank branch only. dropout_groups: sizes of consecutive row
    groups of A (summing to r) that each draw their own mask, e.g. the q, k, v pairs stacked into one fused
    projection; None draws one mask for all of A. Where the Triton kernels run (as for p = 0, and up to
    :data:`~.dropout.MAX_GROUPS` groups) dropout runs inside them: Philox masks drawn from (seed, offset) in the
    forward and redrawn in the backward, never stored (:mod:`.dropout`); ``dropout_rng`` = (seed, offset) fixes
    them, None draws the seed from torch's generator of x's device. Elsewhere (CPU, the eager backend) the eager
    reference runs with ``F.dropout``'s masks from torch's RNG, and ``dropout_rng`` is not used. The two paths draw
    different masks for one ``torch.manual_seed``.
    """
    check_lora(x, weight, lora_a, lora_b)
    check_dropout_groups(lora_a, dropout_groups)
    check_dropout_p(dropout_p)
    if dropout_p > 0 and training:
        fused = _fused_dropout("lora_linear", x, weight, bias, lora_a, lora_b, dropout_p, dropout_groups, dropout_rng)
        if fused is None:
            return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, dropout_groups)
        return _call_lora(x, weight, bias, lora_a, lora_b, 1, scale, fused)
    return _call_lora(x, weight, bias, lora_a, lora_b, 1, scale)


def block_lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], a_shared: Tensor,
                      lora_b: Tensor, n_blocks: int, scale: float, dropout_p: float = 0.0,
                      training: bool = False, dropout_groups: Optional[Sequence[int]] = None,
                      dropout_rng: Optional[DropoutRng] = None) -> Tensor:
    """Block-LoRA: y = x Wᵀ + b + s · (x̃ A_sᵀ) Bᵀ with x̃ = Σ_j x[..., j·c:(j+1)·c], c = d_in / n_blocks.

    a_shared (r, c) is shared by the n input chunks, i.e. a LoRA with A = [A_s | … | A_s] that is never
    materialised (the kernels read A_s at column k mod c). Other shapes and dropout as in :func:`lora_linear`
    (the mask acts on x, before the chunk sum; the fused path then keeps x, not x̃, for the backward).
    """
    check_block_lora(x, weight, a_shared, lora_b, n_blocks)
    check_dropout_groups(a_shared, dropout_groups)
    check_dropout_p(dropout_p)
    if dropout_p > 0 and training:
        fused = _fused_dropout("block_lora_linear", x, weight, bias, a_shared, lora_b, dropout_p, dropout_groups,
                               dropout_rng)
        if fused is None:
            return block_lora_linear_reference(x, weight, bias, a_shared, lora_b, n_blocks, scale, dropout_p,
                                               training, dropout_groups)
        return _call_lora(x, weight, bias, a_shared, lora_b, n_blocks, scale, fused)
    return _call_lora(x, weight, bias, a_shared, lora_b, n_blocks, scale)


def _fused_dropout(op: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor,
                   lora_b: Tensor, dropout_p: float, groups: Optional[Sequence[int]],
                   rng: Optional[DropoutRng]) -> Optional[FusedDropout]:
    """The fused dropout of this call where the Triton kernels run it (drawing the seed then), else None."""
    groups = fusable_groups(lora_a.shape[0], groups)
    x, weight, bias = _autocast(x, weight, bias)  # the route is decided on the dtypes the op will see
    dtypes = tuple(t.dtype for t in (x, lora_a, lora_b, weight, bias) if t is not None)  # use_triton's order
    if groups is None or not _compiled_route(op, x.device, dtypes):
        return None
    seed, offset = seed_tensor(rng, x.device)
    return FusedDropout(float(dropout_p), seed, offset, groups)


def _call_lora(x, weight, bias, lora_a, lora_b, n_blocks, scale, dropout: Optional[FusedDropout] = None):
    x, weight, bias = _autocast(x, weight, bias)
    drop = () if dropout is None else (dropout.p, dropout.seed, dropout.offset, list(dropout.groups))
    y, _, _ = torch.ops.visadapt.lora_fwd(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, n_blocks,
                                       float(scale), *drop)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def routed_lora(x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Union[Tensor, Sequence[float]], index: Tensor,
                weights: Optional[Tensor] = None) -> Tensor:
    """Low-rank delta of L stacked adapters, routed per token (Punica/SGMV): Δy (..., d_out) in x's dtype.

    Δy_i = Σ_j w_ij · s_{index_ij} · (x_i A_{index_ij}ᵀ) B_{index_ij}ᵀ; the base output is NOT included.
    x (..., d_in); lora_a (L, r, d_in); lora_b (L, d_out, r); scales (L,); index integer (...) or (..., k), -1 =
    no adapter (a token whose slots are all -1 gets 0); weights None or float with index's shape.
    Gradients reach x, lora_a, lora_b; scales, index and weights are constants.
    """
    scales, index, weights = routing_shapes(x, lora_a, lora_b, scales, index, weights)
    (x,) = _autocast(x)
    # one plan per call, on the device, shared by the forward and backward ops
    plan = routing_plan(index, scales, weights, lora_a.shape[0], one_reduce_tile_per_adapter=backend.deterministic())
    delta, _ = torch.ops.visadapt.routed_fwd(x.reshape(-1, x.shape[-1]), lora_a, lora_b, index, list(plan))
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def dropout_mask(shape: Sequence[int], dropout_p: float, dropout_rng: DropoutRng, n_groups: int = 1,
                 device: Union[str, torch.device] = "cuda") -> Tensor:
    """The keep masks (n_groups, *shape) bool that the fused kernels draw for an x of ``shape`` (..., d_in) with
    dropout ``dropout_p`` and ``dropout_rng`` = (seed, offset): written out by a small Triton kernel that calls the
    kernels' own mask function, for checking the fused path against the eager reference (``dropout_mask=`` of
    :func:`.lora_linear_reference`). Needs the Triton kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    check_dropout_p(dropout_p)
    device = torch.device(device)
    if not backend.triton_available() or (device.type != "cuda" and not backend.interpreting()):
        raise RuntimeError("dropout_mask runs a Triton kernel: it needs triton and a CUDA device (or, for CPU "
                           "tensors, TRITON_INTERPRET=1 set before importing visadapt.kernels).")
    if n_groups < 1 or n_groups > MAX_GROUPS:
        raise ValueError(f"n_groups must be between 1 and {MAX_GROUPS}, got {n_groups}.")
    seed, offset = seed_tensor(dropout_rng, device)
    rows = math.prod(shape[:-1])
    dropout = FusedDropout(float(dropout_p), seed, offset, (1,) * n_groups)
    return _kernels().dropout_keep_mask(dropout, rows, shape[-1]).reshape(n_groups, *shape)
