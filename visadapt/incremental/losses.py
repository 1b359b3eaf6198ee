"""CoACT's losses: supervised contrastive loss over several encoders' views, the teacher's EMA, the logit
consistency."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def supcon(views: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
           base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), every view an anchor.

    ``views``: (B, V, D) L2-normalised embeddings (view v of item b may come from any encoder); ``labels``: (B,).
    For anchor a among the B·V vectors, with positives P(a) = the other vectors of a's label:
    ℓ_a = −1/|P(a)| Σ_{p∈P(a)} log softmax_{n≠a}(z_a·z_n / τ)[p], |P(a)| clamped to 1; the loss is
    (τ / τ_base) · mean_a ℓ_a. Views computed without grad are fixed anchors, positives and negatives.
    """
    b, v, _ = views.shape
    z = views.transpose(0, 1).reshape(b * v, -1)  # view-major: row v·B + i is view v of item i
    y = labels.repeat(v)
    sim = z @ z.T / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(b * v, dtype=torch.bool, device=z.device)
    positive = (y[:, None] == y[None, :]) & not_self
    log_prob = sim - torch.log((sim.exp() * not_self).sum(1, keepdim=True))
    mean_pos = (log_prob * positive).sum(1) / positive.sum(1).clamp(min=1)
    return -(temperature / base_temperature) * mean_pos.mean()


@torch.no_grad()
def ema_update(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """ξ ← m·ξ + (1 − m)·θ for each (teacher, student) pair of tensors, in place."""
    if teacher:
        torch._foreach_mul_(list(teacher), momentum)
        torch._foreach_add_(list(teacher), [s.detach() for s in student], alpha=1.0 - momentum)


def consistency(logits: torch.Tensor, base_logits: torch.Tensor, base_classes: int | None = None) -> torch.Tensor:
    """MSE between the current and the frozen base-session model's logits (B, C); ``base_classes`` restricts it to
    the first that many columns."""
    if base_classes is not None:
        logits, base_logits = logits[:, :base_classes], base_logits[:, :base_classes]
    return F.mse_loss(logits, base_logits.detach())


def normalized(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1)
