"""Eager references of the LoRA and Block-LoRA linear ops: ``y = x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ``.

These plain-autograd functions are the specification that every backend of :mod:`visadapt.kernels` must match;
the public ops live in ``ops.py``.

Shapes: ``x`` (..., d_in); ``weight`` (d_out, d_in) or None; ``bias`` (d_out,) or None; ``lora_a`` (r, d_in) for
LoRA or (r, d_in / n_blocks) for Block-LoRA; ``lora_b`` (d_out, r). The result has x's leading shape, last dim
d_out, and x's dtype. ``weight=None`` returns the low-rank delta alone, for adding to a base output computed
elsewhere (a second active adapter, or a base layer that is not a plain linear).

Dropout (probability ``dropout_p``, active only when ``training``) is applied to the low-rank branch input only,
as in CLIP-LoRA; the base path always sees the clean x. ``dropout_groups`` (sizes of consecutive row groups of A,
summing to r) gives each group its own mask, drawn in group order: the q, k and v pairs stacked into one fused
projection then see independent masks, as CLIP-LoRA's separate q, k, v layers do. None: one mask for all of A.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F


def _delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, n_blocks: int,
           dropout_p: float, training: bool, dropout_groups: Optional[Sequence[int]],
           dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """s · (drop(x̃) Aᵀ) Bᵀ in the adapter's dtype (adapters are usually kept in fp32 for mixed-precision training),
    with one dropout mask per row group of A (``dropout_mask[g]`` when given). x̃ is x summed over its n_blocks
    input chunks."""
    hidden = []
    for g, a_group in enumerate(lora_a.split(list(dropout_groups or [lora_a.shape[0]]))):
        if dropout_p > 0 and training and dropout_mask is not None:
            x_lora = x * dropout_mask[g] * (1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)
        else:
            x_lora = F.dropout(x, dropout_p, training) if dropout_p > 0 else x
        if n_blocks > 1:
            x_lora = x_lora.unflatten(-1, (n_blocks, x.shape[-1] // n_blocks)).sum(-2)
        hidden.append(F.linear(x_lora.to(lora_a.dtype), a_group))
    return F.linear(torch.cat(hidden, -1), lora_b) * scale


def _base(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if weight is None else F.linear(x, weight, bias)


def _check_up(weight: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    d_out = lora_b.shape[0] if weight is None else weight.shape[0]
    if lora_b.shape != (d_out, lora_a.shape[0]):
        raise ValueError(f"LoRA B {tuple(lora_b.shape)} does not fit A {tuple(lora_a.shape)} and the weight: "
                         f"expected B (d_out, r) = ({d_out}, {lora_a.shape[0]}).")


def check_dropout_groups(lora_a: torch.Tensor, dropout_groups: Optional[Sequence[int]]) -> None:
    if dropout_groups is not None and (sum(dropout_groups) != lora_a.shape[0] or min(dropout_groups) < 1):
        raise ValueError(f"dropout_groups {list(dropout_groups)} must be positive sizes of A's row groups, summing "
                         f"to its {lora_a.shape[0]} rows.")


def _check_mask(mask: Optional[torch.Tensor], x: torch.Tensor, lora_a: torch.Tensor,
                groups: Optional[Sequence[int]]) -> None:
    want = (len(groups) if groups is not None else 1, *x.shape)
    if mask is not None and tuple(mask.shape) != want:
        raise ValueError(f"dropout_mask has shape {tuple(mask.shape)}; expected (groups, *x.shape) = {want}.")


def check_lora(x: torch.Tensor, weight: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    if lora_a.shape[-1] != x.shape[-1]:
        raise ValueError(f"LoRA A {tuple(lora_a.shape)} does not fit x (..., {x.shape[-1]}): expected "
                         f"(r, {x.shape[-1]}).")
    _check_up(weight, lora_a, lora_b)


def check_block_lora(x: torch.Tensor, weight: Optional[torch.Tensor], a_shared: torch.Tensor, lora_b: torch.Tensor,
                     n_blocks: int) -> None:
    d_in = x.shape[-1]
    if d_in % n_blocks or a_shared.shape[-1] != d_in // n_blocks:
        raise ValueError(
            f"Block-LoRA shapes do not fit: x (..., {d_in}) in {n_blocks} blocks needs A_s (r, {d_in // n_blocks}),"
            f" got {tuple(a_shared.shape)}."
        )
    _check_up(weight, a_shared, lora_b)


def _combine(base: Optional[torch.Tensor], delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return delta.to(dtype) if base is None else base + delta.to(base.dtype)


def lora_linear_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_groups: Optional[Sequence[int]] = None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eager reference of ``lora_linear``: y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ, A (r, d_in), B (d_out, r).

    ``dropout_mask`` (groups, *x.shape) bool, optional: the keep masks to apply instead of drawing them with
    ``F.dropout`` (e.g. :func:`visadapt.kernels.dropout_mask`, the masks of the fused path)."""
    check_lora(x, weight, lora_a, lora_b)
    check_dropout_groups(lora_a, dropout_groups)
    _check_mask(dropout_mask, x, lora_a, dropout_groups)
    delta = _delta(x, lora_a, lora_b, scale, 1, dropout_p, training, dropout_groups, dropout_mask)
    return _combine(_base(x, weight, bias), delta, x.dtype)


def block_lora_linear_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    a_shared: torch.Tensor,
    lora_b: torch.Tensor,
    n_blocks: int,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout_groups: Optional[Sequence[int]] = None,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eager reference of ``block_lora_linear``.

    Block-LoRA: one down-projection A_s (r, d_in / n) shared by the n input chunks of x.

    Equal to ``lora_linear`` with A = [A_s | A_s | … | A_s], but the n chunks are summed first
    (x̃ = Σ_j x[..., j·c:(j+1)·c], c = d_in / n), so the down-projection is one (N, c)·(c, r) product and only x̃
    is saved for the backward pass. ``dropout_mask`` as in :func:`lora_linear_reference` (masks of x, before the
    chunk sum).
    """
    check_block_lora(x, weight, a_shared, lora_b, n_blocks)
    check_dropout_groups(a_shared, dropout_groups)
    _check_mask(dropout_mask, x, a_shared, dropout_groups)
    delta = _delta(x, a_shared, lora_b, scale, n_blocks, dropout_p, training, dropout_groups, dropout_mask)
    return _combine(_base(x, weight, bias), delta, x.dtype)
