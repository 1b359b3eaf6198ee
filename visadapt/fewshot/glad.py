"""GLAD's regularised gradient (arXiv 2507.13089), as reconstructed from the paper (its code is not released: the
rule is inferred, and each reading is a switch).

The paper steers the plain gradient g towards the SAM gradient g' (taken at θ + ρ·g/‖g‖) and steps along a point
between them. Two readings are offered:

- ``rule="interp"`` (default): g_f = (1 − α)·g + α·g', the first-order form of a gradient-norm penalty
  (α = 0: plain training, α = 1: SAM).
- ``rule="project"``: g_f = g' when ⟨g, g'⟩ ≥ 0, else g − (⟨g, g'⟩/‖g'‖²)·g' (a ProGrad-style conflict rule).

Each step costs two forward/backward passes on the same batch. Dropout draws fresh masks in the second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch


@dataclass(frozen=True)
class GladConfig:
    rho: float = 0.05  # SAM radius; the paper's value is unknown, 0.05 is SAM's default
    alpha: float = 0.8  # weight of the SAM gradient (interp rule)
    rule: Literal["interp", "project"] = "interp"

    def __post_init__(self) -> None:
        if self.rho <= 0:
            raise ValueError(f"GLAD rho must be > 0, got {self.rho}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"GLAD alpha must lie in [0, 1], got {self.alpha}.")
        if self.rule not in ("interp", "project"):
            raise ValueError(f"GLAD rule must be 'interp' or 'project', got {self.rule!r}.")


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(xs, ys))


def glad_backward(params: Sequence[torch.nn.Parameter], loss_and_backward: Callable[[], torch.Tensor],
                  config: GladConfig) -> torch.Tensor:
    """Leave GLAD's regularised gradient in ``p.grad`` for every parameter; return the first pass's loss.

    ``loss_and_backward`` runs forward and backward on the current batch (accumulating into ``.grad``, which must
    be zero on entry). Gradients may carry a loss scale (fp16): ε only uses g's direction and both passes share
    the scale, so the result carries the same scale. A non-finite g skips the SAM pass, leaving the step to the
    grad scaler.
    """
    params = [p for p in params if p.requires_grad]
    loss = loss_and_backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    norm = _dot(grads, grads).sqrt()
    if not torch.isfinite(norm) or norm == 0:
        return loss
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(g, alpha=config.rho / (norm.item() + 1e-12))
            p.grad = None
    loss_and_backward()
    with torch.no_grad():
        sam = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, weights in zip(params, saved):
            p.copy_(weights)  # restore exactly rather than subtract ε: no rounding drift
        combined = _combine(grads, sam, config)
        for p, g in zip(params, combined):
            p.grad = g
    return loss


def _combine(g: list[torch.Tensor], g_sam: list[torch.Tensor], config: GladConfig) -> list[torch.Tensor]:
    if config.rule == "interp":
        return [(1 - config.alpha) * a + config.alpha * b for a, b in zip(g, g_sam)]
    inner = _dot(g, g_sam)
    if inner >= 0:
        return [b.clone() for b in g_sam]
    coef = (inner / _dot(g_sam, g_sam).clamp_min(1e-30)).to(g[0].dtype)
    return [a - coef * b for a, b in zip(g, g_sam)]
