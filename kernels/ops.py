"""The public ops: ``lora_linear``, ``block_lora_linear``, ``routed_lora``, registered as torch custom ops.

Each public function validates shapes, flattens x to (N, d_in) and calls a forward op (``visadapt::lora_fwd`` or
``visadapt::routed_fwd``) whose backward is a second op (``…_bwd``); both have fake implementations, so
``torch.compile(fullgraph=True)`` traces through them as single nodes. Inside, each op runs the Triton kernels
(``triton_kernels.py``) or the eager formulas below, as :mod:`.backend` decides at run time.

What the backward keeps: x in its own dtype (Block-LoRA: only the chunk sum x̃, n times narrower) and
h = s · x̃ Aᵀ (N, r) in fp32 — not the (N, d_out) delta, and no fp32 copy of a 16-bit x. Gradients: x, A, B
always; W and b too when they require grad (plain matmuls: W is frozen in every adapter of visadapt).

Under autocast, x, W and b are cast to autocast's dtype first (as F.linear would); the op bodies run with
autocast off, so the adapter math keeps its fp32 accumulation.

Dropout (p > 0 while training) takes the documented eager fallback: the plain-autograd reference function with
``torch.nn.functional.dropout``, so the masks come from torch's RNG exactly as in eager PyTorch (one per row group
of A with ``dropout_groups``: the q, k, v parts of a fused projection draw their own).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend
from .lora import block_lora_linear_reference, check_block_lora, check_dropout_groups, check_lora, lora_linear_reference
from .routed import check_index_range, routing_shapes, segments

_EMPTY = (0,)  # shape of the placeholder returned for a gradient nobody asked for (ops must return tensors)


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


def _pair_scale(scales: Tensor, index: Tensor, weights: Optional[Tensor]) -> Tensor:
    """(N·k,) fp32 factor of each (token, slot) pair: w · s_index (0 for unrouted pairs)."""
    flat = index.reshape(-1)
    out = scales[flat.clamp_min(0)] * (flat >= 0)
    return out if weights is None else out * weights.reshape(-1)


def _eager_routed_fwd(x, lora_a, lora_b, pair_scale, index):
    hd = _hidden_dtype(lora_a)
    tokens, pairs, counts = segments(index, lora_a.shape[0])
    h = x.new_zeros(index.numel(), lora_a.shape[1], dtype=hd)
    out = x.new_zeros(x.shape[0], lora_b.shape[1], dtype=hd)
    for adapter, tok, pair in _segment_rows(tokens, pairs, counts):
        h_l = (x[tok].to(hd) @ lora_a[adapter].to(hd).T) * pair_scale[pair, None].to(hd)
        h[pair] = h_l
        out.index_add_(0, tok, h_l @ lora_b[adapter].to(hd).T)
    return out.to(x.dtype), h


def _eager_routed_bwd(dy, x, h, lora_a, lora_b, pair_scale, index, need_x):
    hd = _hidden_dtype(lora_a)
    tokens, pairs, counts = segments(index, lora_a.shape[0])
    d_a, d_b = lora_a.new_zeros(lora_a.shape, dtype=hd), lora_b.new_zeros(lora_b.shape, dtype=hd)
    dx = x.new_zeros(x.shape, dtype=hd) if need_x else None
    for adapter, tok, pair in _segment_rows(tokens, pairs, counts):
        dy_l = dy[tok].to(hd)
        g = (dy_l @ lora_b[adapter].to(hd)) * pair_scale[pair, None].to(hd)
        d_b[adapter] = dy_l.T @ h[pair]
        d_a[adapter] = g.T @ x[tok].to(hd)
        if need_x:
            dx.index_add_(0, tok, g @ lora_a[adapter].to(hd))
    return (None if dx is None else dx.to(x.dtype)), d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


def _segment_rows(tokens, pairs, counts):
    """(adapter, token ids, pair ids) per adapter that has pairs (one host sync for the counts)."""
    start = 0
    for adapter, count in enumerate(counts.tolist()):
        if count:
            yield adapter, tokens[start:start + count], pairs[start:start + count]
        start += count


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


# ----------------------------------------------------------------------------------------------------------------
# custom ops: LoRA and Block-LoRA (n_blocks = 1 is LoRA)


@torch.library.custom_op("visadapt::lora_fwd", mutates_args=())
@_no_autocast
def _lora_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
              n_blocks: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y (N, d_out) in x's dtype, h = s · x̃ Aᵀ (N, r), x̃ (N, c) for Block-LoRA or empty); x (N, d_in) 2-D."""
    impl = _kernels().lora_forward if backend.use_triton(x, weight, bias, lora_a, lora_b) else _eager_lora_fwd
    y, h, x_lora = impl(x, weight, bias, lora_a, lora_b, n_blocks, scale)
    return y, h, saved_input(x_lora, n_blocks)


@_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, n_blocks, scale):
    return (x.new_empty(x.shape[0], lora_b.shape[0]),
            x.new_empty(x.shape[0], lora_a.shape[0], dtype=_hidden_dtype(lora_a)),
            x.new_empty(x.shape[0], lora_a.shape[1]) if n_blocks > 1 else x.new_empty(_EMPTY))


@torch.library.custom_op("visadapt::lora_bwd", mutates_args=())
@_no_autocast
def _lora_bwd(dy: Tensor, x_lora: Tensor, h: Tensor, weight: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
              n_blocks: int, scale: float, need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (N, d_in) or an empty placeholder, dA, dB); x_lora is x (LoRA) or x̃ (Block-LoRA)."""
    if backend.use_triton(dy, x_lora, weight, lora_a, lora_b):
        dx, d_a, d_b = _kernels().lora_backward(dy, x_lora, h, weight, lora_a, lora_b, n_blocks, scale, need_x)
    else:
        dx, d_a, d_b = _eager_lora_bwd(dy, x_lora, h, weight, lora_a, lora_b, n_blocks, scale, need_x)
    return _or_empty(dx, x_lora), d_a, d_b


@_lora_bwd.register_fake
def _(dy, x_lora, h, weight, lora_a, lora_b, n_blocks, scale, need_x):
    dx = x_lora.new_empty(dy.shape[0], x_lora.shape[1] * n_blocks) if need_x else x_lora.new_empty(_EMPTY)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _lora_setup(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, n_blocks, scale = inputs
    # W's own gradient (rare: W is frozen in visadapt's adapters) needs the full x even for Block-LoRA
    keep_x = n_blocks == 1 or ctx.needs_input_grad[1]
    ctx.save_for_backward(x if n_blocks == 1 else output[2], weight, lora_a, lora_b, output[1],
                          x if keep_x else None)
    ctx.n_blocks, ctx.scale = n_blocks, scale


def _lora_backward(ctx, dy, _dh, _dx_lora):
    x_lora, weight, lora_a, lora_b, h, x = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_a, d_b = torch.ops.visadapt.lora_bwd(dy, x_lora, h, weight, lora_a, lora_b, ctx.n_blocks, ctx.scale,
                                               need[0])
    d_w = (dy.T @ x).to(weight.dtype) if need[1] else None
    d_bias = dy.sum(0).to(dy.dtype) if need[2] else None
    return (dx if need[0] else None), d_w, d_bias, (d_a if need[3] else None), (d_b if need[4] else None), None, None


torch.library.register_autograd("visadapt::lora_fwd", _lora_backward, setup_context=_lora_setup)


# ----------------------------------------------------------------------------------------------------------------
# custom ops: routed multi-LoRA


@torch.library.custom_op("visadapt::routed_fwd", mutates_args=())
@_no_autocast
def _routed_fwd(x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor, index: Tensor,
                weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(Δy (N, d_out) in x's dtype, h (N·k, r) per (token, slot) pair); index (N, k) int64."""
    check_index_range(index, lora_a.shape[0])  # here, not in the wrapper: data-dependent, so not traced
    pair_scale = _pair_scale(scales, index, weights)
    if backend.use_triton(x, lora_a, lora_b):
        kern = _kernels()
        return kern.routed_forward(x, lora_a, lora_b, kern.routing_tables(index, pair_scale, lora_a.shape[0]))
    return _eager_routed_fwd(x, lora_a, lora_b, pair_scale, index)


@_routed_fwd.register_fake
def _(x, lora_a, lora_b, scales, index, weights):
    return (x.new_empty(x.shape[0], lora_b.shape[1]),
            x.new_empty(index.numel(), lora_a.shape[1], dtype=_hidden_dtype(lora_a)))


@torch.library.custom_op("visadapt::routed_bwd", mutates_args=())
@_no_autocast
def _routed_bwd(dy: Tensor, x: Tensor, h: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                index: Tensor, weights: Optional[Tensor], need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    pair_scale = _pair_scale(scales, index, weights)
    if backend.use_triton(dy, x, lora_a, lora_b):
        kern = _kernels()
        routing = kern.routing_tables(index, pair_scale, lora_a.shape[0])
        dx, d_a, d_b = kern.routed_backward(dy, x, h, lora_a, lora_b, routing, need_x)
    else:
        dx, d_a, d_b = _eager_routed_bwd(dy, x, h, lora_a, lora_b, pair_scale, index, need_x)
    return _or_empty(dx, x), d_a, d_b


@_routed_bwd.register_fake
def _(dy, x, h, lora_a, lora_b, scales, index, weights, need_x):
    return (x.new_empty(x.shape) if need_x else x.new_empty(_EMPTY)), lora_a.new_empty(lora_a.shape), \
        lora_b.new_empty(lora_b.shape)


def _routed_setup(ctx, inputs, output):
    x, lora_a, lora_b, scales, index, weights = inputs
    ctx.save_for_backward(x, lora_a, lora_b, scales, index, weights, output[1])


def _routed_backward(ctx, dy, _dh):
    x, lora_a, lora_b, scales, index, weights, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_a, d_b = torch.ops.visadapt.routed_bwd(dy, x, h, lora_a, lora_b, scales, index, weights, need[0])
    return (dx if need[0] else None), (d_a if need[1] else None), (d_b if need[2] else None), None, None, None


torch.library.register_autograd("visadapt::routed_fwd", _routed_backward, setup_context=_routed_setup)


# ----------------------------------------------------------------------------------------------------------------
# public functions


def lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = False,
                dropout_groups: Optional[Sequence[int]] = None) -> Tensor:
    """y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ.

    x (..., d_in); weight (d_out, d_in) or None (then the delta alone is returned); bias (d_out,) or None;
    lora_a (r, d_in); lora_b (d_out, r); result (..., d_out) in x's dtype. Adapter math accumulates in fp32.
    Dropout applies to the low-rank branch only; p > 0 while training runs the eager reference. dropout_groups:
    sizes of consecutive row groups of A (summing to r) that each draw their own mask, e.g. the q, k, v pairs
    stacked into one fused projection; None draws one mask for all of A.
    """
    check_lora(x, weight, lora_a, lora_b)
    check_dropout_groups(lora_a, dropout_groups)
    if dropout_p > 0 and training:
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, dropout_groups)
    return _call_lora(x, weight, bias, lora_a, lora_b, 1, scale)


def block_lora_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], a_shared: Tensor,
                      lora_b: Tensor, n_blocks: int, scale: float, dropout_p: float = 0.0,
                      training: bool = False, dropout_groups: Optional[Sequence[int]] = None) -> Tensor:
    """Block-LoRA: y = x Wᵀ + b + s · (x̃ A_sᵀ) Bᵀ with x̃ = Σ_j x[..., j·c:(j+1)·c], c = d_in / n_blocks.

    a_shared (r, c) is shared by the n input chunks, i.e. a LoRA with A = [A_s | … | A_s] that is never
    materialised (the kernels read A_s at column k mod c). Other shapes and dropout as in :func:`lora_linear`.
    """
    check_block_lora(x, weight, a_shared, lora_b, n_blocks)
    check_dropout_groups(a_shared, dropout_groups)
    if dropout_p > 0 and training:
        return block_lora_linear_reference(x, weight, bias, a_shared, lora_b, n_blocks, scale, dropout_p, training,
                                           dropout_groups)
    return _call_lora(x, weight, bias, a_shared, lora_b, n_blocks, scale)


def _call_lora(x, weight, bias, lora_a, lora_b, n_blocks, scale):
    x, weight, bias = _autocast(x, weight, bias)
    y, _, _ = torch.ops.visadapt.lora_fwd(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, n_blocks,
                                       float(scale))
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
    delta, _ = torch.ops.visadapt.routed_fwd(x.reshape(-1, x.shape[-1]), lora_a, lora_b, scales, index, weights)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])
