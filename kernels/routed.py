"""Region-routed multi-LoRA: shapes, validation, routing metadata and the eager reference of ``routed_lora``.

Each token takes the delta of its own adapter(s) from a stack (Punica/SGMV style).

``routed_lora(x, lora_a, lora_b, scales, index, weights=None)`` returns the low-rank delta ONLY; the caller adds it
to the base output it computed itself (the composition pipeline's ``to_out`` inside boxes, or a batch that mixes
adapters per sample).

Shapes (L adapters of rank r; ``...`` is any leading shape of x, N tokens in all):
- ``x`` (..., d_in)
- ``lora_a`` (L, r, d_in), ``lora_b`` (L, d_out, r), ``scales`` (L,) tensor or sequence of floats
- ``index`` integer, -1 = no adapter: (...) for one adapter per token, or (..., k) for up to k adapters per token
  (overlapping regions); (..., 1) is the same as (...)
- ``weights`` optional, float, same shape as ``index``: per-(token, slot) mixing weight (1 when None)
- result (..., d_out) in x's dtype: Δy_i = Σ_j w_ij · s_{index_ij} · (x_i A_{index_ij}ᵀ) B_{index_ij}ᵀ

Gradients flow to x, lora_a and lora_b; ``scales``, ``index`` and ``weights`` are treated as constants.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def routing_shapes(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales, index: torch.Tensor,
                   weights: Optional[torch.Tensor]):
    """Validate the arguments; return (scales (L,) fp32 tensor, index (N, k) int64, weights (N, k) fp32 or None)."""
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"routed_lora takes stacked adapters: lora_a (L, r, d_in) and lora_b (L, d_out, r), got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}.")
    n_adapters, rank, d_in = lora_a.shape
    if d_in != x.shape[-1]:
        raise ValueError(f"routed_lora: lora_a {tuple(lora_a.shape)} does not fit x (..., {x.shape[-1]}): expected "
                         f"(L, r, {x.shape[-1]}).")
    if lora_b.shape[0] != n_adapters or lora_b.shape[2] != rank:
        raise ValueError(f"routed_lora: lora_b {tuple(lora_b.shape)} does not fit lora_a {tuple(lora_a.shape)}: "
                         f"expected (L, d_out, r) = ({n_adapters}, d_out, {rank}).")
    scales = torch.as_tensor(scales, dtype=torch.float32, device=x.device).reshape(-1)
    if scales.shape[0] != n_adapters:
        raise ValueError(f"routed_lora: {scales.shape[0]} scales for {n_adapters} adapters.")
    lead = x.shape[:-1]
    if index.is_floating_point() or index.is_complex():
        raise ValueError(f"routed_lora: index must be an integer tensor, got {index.dtype}.")
    if tuple(index.shape) == tuple(lead):  # one adapter per token
        index = index.unsqueeze(-1)
    if tuple(index.shape[:-1]) != tuple(lead) or index.dim() != len(lead) + 1:
        raise ValueError(f"routed_lora: index {tuple(index.shape)} does not fit x {tuple(x.shape)}: expected "
                         f"{tuple(lead)} or {(*lead, 'k')}.")
    if weights is not None:
        weights = weights.reshape(index.shape) if weights.numel() == index.numel() else None
        if weights is None:
            raise ValueError(f"routed_lora: weights must have the shape of index {tuple(index.shape)}.")
        weights = weights.to(torch.float32).reshape(-1, index.shape[-1])
    return scales, index.reshape(-1, index.shape[-1]).long(), weights


def check_index_range(index: torch.Tensor, n_adapters: int) -> None:
    """Out-of-range indices (≥ L or < -1) would read another adapter's memory: refuse them. On CUDA the check
    is asynchronous (no host sync per layer); a bad index then fails at the next synchronisation."""
    if index.numel() == 0:
        return
    ok = (index >= -1).all() & (index < n_adapters).all()
    if index.is_cuda:
        torch._assert_async(ok)
    elif not bool(ok):
        raise ValueError(f"routed_lora: index values must lie in [-1, {n_adapters - 1}].")


def segments(index: torch.Tensor, n_adapters: int):
    """Sort the (token, slot) pairs by adapter: (token ids, pair ids, count per adapter) with -1 pairs dropped.

    Pairs of adapter l are ``token[start_l : start_l + count_l]`` with start_l = Σ_{j<l} count_j; pair p is
    (token p // k, slot p % k).
    """
    check_index_range(index, n_adapters)
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=n_adapters + 1)
    order = order[int(counts[0]):]  # drop the -1 pairs, which sort first
    return order // index.shape[-1], order, counts[1:]


def routed_lora_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scales: Union[torch.Tensor, Sequence[float]], index: torch.Tensor,
                          weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eager reference of ``routed_lora`` (plain autograd, the specification): one gather, two small matmuls and
    one scatter-add per adapter present in ``index``."""
    scales, index, weights = routing_shapes(x, lora_a, lora_b, scales, index, weights)
    flat_x = x.reshape(-1, x.shape[-1])
    tokens, pairs, counts = segments(index, lora_a.shape[0])
    pair_scale = scales[index.reshape(-1).clamp_min(0)]
    if weights is not None:
        pair_scale = pair_scale * weights.reshape(-1)
    out = flat_x.new_zeros(flat_x.shape[0], lora_b.shape[1], dtype=lora_b.dtype)
    start = 0
    for adapter, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        tok, pair = tokens[start:start + count], pairs[start:start + count]
        start += count
        hidden = (flat_x[tok].to(lora_a.dtype) @ lora_a[adapter].T) * pair_scale[pair, None].to(lora_a.dtype)
        out = out.index_add(0, tok, hidden @ lora_b[adapter].T)
    return out.to(x.dtype).reshape(*x.shape[:-1], lora_b.shape[1])

