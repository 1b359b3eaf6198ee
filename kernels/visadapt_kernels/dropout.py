"""Dropout inside the fused LoRA kernels: counter-based masks, and where their seed comes from.

The fused path never stores a mask. Element (g, i, k) — dropout group g (a row group of A, see
``dropout_groups``), flattened row i of x (N rows), input column k (d_in columns) — is kept when the g-th of the
four Philox4x32-10 uniforms ``tl.rand4x(seed, offset + i·d_in + k)`` is ≥ p, and kept values are scaled by
1 / (1 − p): one Philox call per element serves up to four groups (q, k, v), hence :data:`MAX_GROUPS`. The
forward's shrink, the backward's dx GEMM and its dA reduction each regenerate the masks from (seed, offset) and the
element's indices, as fused attention kernels do for attention dropout. So the mask is a pure function of
(seed, offset, shape, p): :func:`visadapt.kernels.dropout_mask` writes out the one a call used.

Where (seed, offset) come from (the caller's side):

- By default (``dropout_rng=None``) each fused call draws its seed from torch's default generator of x's device
  (one int64 ``torch.randint`` on the device, no host sync, so CUDA-graph replays draw fresh seeds) and uses
  offset 0. The masks are then a function of ``torch.manual_seed`` and of the calls made since, exactly like
  ``F.dropout``'s, and training resumes bit-exactly wherever it already did: visadapt's :class:`~visadapt.training
  .Trainer` seeds the run (``set_seed(seed)``), keeps the data loader off the global generator, and saves and
  restores the CPU and CUDA generator states in every checkpoint (``rng.cpu``, ``rng.cuda``), so the seed of every
  layer's call at every step after a resume is the one the uninterrupted run drew. Different layers, steps, micro-
  batches and extra forward passes (SAM, GLAD) get different seeds because each call draws its own; no per-layer
  offset or step counter has to be threaded through the adapters or stored.
- An explicit ``dropout_rng=(seed, offset)`` (an int or a one-element int64 tensor, and an int ≥ 0) fixes the
  masks, e.g. to replay a step or to derive them from (run seed, step, layer) in one's own loop. A caller that
  makes several fused calls with one seed must give them offsets at least N·d_in apart, or their masks overlap.

What differs from eager dropout: the fused path's masks come from Philox counters, not from torch's RNG stream, so
for one ``torch.manual_seed`` they differ from the masks ``F.dropout`` draws on the eager path (CPU tensors, the
``eager`` backend, a failed self-check) — same distribution, other samples; and drawing the seed consumes one
value of the device's generator per call where eager dropout consumes one per mask element. A run is reproducible
on one path; switching paths between the two halves of a resumed run changes the masks (never the correctness).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

#: at most this many dropout groups run fused (the four outputs of one Philox call); more take the eager path
MAX_GROUPS = 4
_SEED_HIGH = 2 ** 62  # seeds are drawn below this (Philox keys are 64-bit)

DropoutRng = tuple[Union[int, torch.Tensor], int]


class FusedDropout(NamedTuple):
    """What the fused kernels need to draw, and redraw in backward, one call's masks."""

    p: float
    seed: torch.Tensor  # (1,) int64 on x's device
    offset: int
    groups: tuple[int, ...]  # sizes of A's row groups, one mask each (summing to r)


def fusable_groups(rank: int, groups: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    """The groups as the kernels take them, or None if there are too many for the fused path."""
    groups = tuple(groups) if groups is not None else (rank,)
    return groups if len(groups) <= MAX_GROUPS else None


def seed_tensor(rng: Optional[DropoutRng], device: torch.device) -> tuple[torch.Tensor, int]:
    """(seed as a (1,) int64 tensor on ``device``, offset): drawn from torch's default generator of the device
    when ``rng`` is None, else the caller's (seed, offset)."""
    if rng is None:
        return torch.randint(_SEED_HIGH, (1,), device=device, dtype=torch.int64), 0
    seed, offset = rng
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"dropout_rng offset must be an int >= 0, got {offset!r}.")
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"A dropout_rng seed tensor must hold one int64, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)}.")
        return seed.reshape(1).to(device), offset
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"dropout_rng seed must be an int in [0, 2**63), got {seed!r}.")
    return torch.tensor([seed], dtype=torch.int64, device=device), offset


def check_dropout_p(dropout_p: float) -> None:
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be between 0 and 1, got {dropout_p}.")
