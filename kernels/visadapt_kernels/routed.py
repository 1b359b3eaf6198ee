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

import functools
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .backend import interpreting

# Rows per tile of the routing plan (the routed shrink/expand and the eager SGMV), and per dA/dB reduction tile.
# Small under the interpreter, so that tests with tens of tokens cross tile boundaries.
ROW_TILE = 32 if interpreting() else 64
REDUCE_TILE = 64 if interpreting() else 1024


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
    scales = device_scales(scales, x.device)
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


def device_scales(scales: Union[torch.Tensor, Sequence[float]], device: torch.device) -> torch.Tensor:
    """scales as an fp32 (L,) tensor on ``device``. A sequence of floats is copied to the device once per distinct
    value and then reused, so a layer called every step with the same Python floats makes no host-to-device copy."""
    if isinstance(scales, torch.Tensor):
        return scales.to(device, torch.float32).reshape(-1)
    values = tuple(float(s) for s in scales)
    if torch.compiler.is_compiling():  # traced as a constant; the cache is for eager calls
        return torch.tensor(values, dtype=torch.float32, device=device)
    return _cached_scales(values, device)


@functools.lru_cache(maxsize=256)
def _cached_scales(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _asynchronous(index: torch.Tensor) -> bool:
    """Whether the index check must not read its result back (any accelerator: that read is a host sync)."""
    return index.device.type != "cpu"


def check_index_range(index: torch.Tensor, n_adapters: int) -> None:
    """Refuse indices ≥ L or < -1 (the routing plan would skip them silently). Off the CPU the check is
    asynchronous (no host sync per layer): a bad index then fails at the next synchronisation."""
    if index.numel() == 0:
        return
    ok = (index >= -1).all() & (index < n_adapters).all()
    if _asynchronous(index):
        torch._assert_async(ok, f"routed_lora: index values must lie in [-1, {n_adapters - 1}].")
    elif not bool(ok):
        raise ValueError(f"routed_lora: index values must lie in [-1, {n_adapters - 1}].")


class RoutingPlan(NamedTuple):
    """The (token, slot) pairs sorted by adapter and cut into tiles of one adapter each, all on x's device.

    P = N·k pairs; pair p is (token p // k, slot p % k). Row i of the sorted order is pair ``pairs[i]`` of token
    ``tokens[i]``; unrouted (-1) pairs are not in any tile. Tile t covers sorted rows ``[tile_start[t],
    tile_end[t])`` of adapter ``tile_adapter[t]`` (-1: a surplus tile, skipped). The grid is sized for the worst
    case, cdiv(P, tile) + L tiles, so building the plan never reads a count back to the host.
    """

    tokens: torch.Tensor  # (P,) int32
    pairs: torch.Tensor  # (P,) int32
    pair_scale: torch.Tensor  # (P,) fp32 by pair id: w · s_index, 0 for unrouted pairs
    tile_adapter: torch.Tensor  # (cdiv(P, ROW_TILE) + L,) int32
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    reduce_adapter: torch.Tensor  # the same cut into tiles of the reduction's size (dA, dB)
    reduce_start: torch.Tensor
    reduce_end: torch.Tensor


def routing_plan(index: torch.Tensor, scales: torch.Tensor, weights: Optional[torch.Tensor], n_adapters: int,
                 one_reduce_tile_per_adapter: bool = False) -> RoutingPlan:
    """Build the plan with tensor ops only (no host sync): a stable sort, and a binary search for each adapter's
    segment instead of a bincount (whose output size depends on the data). index (N, k) int64; scales (L,) fp32;
    weights (N, k) fp32 or None. ``one_reduce_tile_per_adapter``: the deterministic mode's reduction, where one
    program per adapter sums its rows in order."""
    flat = index.reshape(-1)
    n_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    bounds = torch.searchsorted(flat[order], torch.arange(n_adapters + 1, device=flat.device, dtype=flat.dtype))
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]  # adapter l's sorted rows: [starts[l], bounds[l + 1])
    pair_scale = scales[flat.clamp(0, max(n_adapters - 1, 0))] * (flat >= 0)
    if weights is not None:
        pair_scale = pair_scale * weights.reshape(-1)
    reduce_tile = max(n_pairs, 1) if one_reduce_tile_per_adapter else REDUCE_TILE
    return RoutingPlan((order // index.shape[-1]).to(torch.int32), order.to(torch.int32), pair_scale,
                       *_tiles(starts, counts, n_pairs, ROW_TILE), *_tiles(starts, counts, n_pairs, reduce_tile))


def _tiles(starts: torch.Tensor, counts: torch.Tensor, n_pairs: int, tile: int) -> tuple[torch.Tensor, ...]:
    """(adapter, start, end) int32 per tile of at most ``tile`` sorted rows of one adapter; surplus tiles -1."""
    n_adapters = counts.shape[0]
    per = (counts + tile - 1) // tile
    last = torch.cumsum(per, 0)
    t = torch.arange(-(-n_pairs // tile) + n_adapters, device=counts.device)
    adapter = torch.searchsorted(last, t, right=True)
    valid = adapter < n_adapters
    adapter = adapter.clamp(max=n_adapters - 1)
    start = starts[adapter] + (t - (last[adapter] - per[adapter])) * tile
    end = torch.minimum(start + tile, starts[adapter] + counts[adapter])
    return torch.where(valid, adapter, -1).to(torch.int32), start.to(torch.int32), end.to(torch.int32)


def segments(index: torch.Tensor, n_adapters: int):
    """Sort the (token, slot) pairs by adapter: (token ids, pair ids, count per adapter) with -1 pairs dropped.

    For the reference only: it reads the -1 count back to the host (the ops use :func:`routing_plan`).

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

