"""LoLA-SpecViT's LoRA linears (Zidi et al., arXiv 2506.17759; official code FadiZidiDz/LoLA-SpecViT-Model), and
the same sites as a peft ``LoraConfig``.

Two layers replace ``nn.Linear`` at the LoRA sites:

- :class:`GatedLoRALinear` ("enhanced" LoRA, used in qkv, proj, fc1, fc2 of every block)::

      y = W0 x + b0 + sigmoid(G x) * (s · B A x) + R x,      s = lora_alpha / r

  with a full-rank gate ``G`` and a full-rank residual ``R`` (no biases). The gate makes the low-rank term depend on
  the input, so it cannot be merged into ``W0``; ``R`` can (:meth:`GatedLoRALinear.fold_residual`).
- :class:`LoRALinear` (plain LoRA, used in the classifier head): ``y = W0 x + b0 + s · B A x``, exactly peft's LoRA
  and exactly mergeable.

Why the gated layer is not a peft tuner: peft's LoRA layers compute ``base(x) + scale · B(A(dropout(x)))`` and merge
``scale · B A`` into the weight. The gated form adds an input-dependent sigmoid gate and a second full-rank matrix;
neither fits ``LoraLayer`` (a ``LoraVariant`` could override the forward, but peft's merge, DoRA-style bookkeeping and
saved-config loading would all have to be bypassed through private hooks). So the gated layer stays a small module
here, and the plain variant goes through peft: :func:`lola_peft_config` gives the ``LoraConfig`` that puts peft LoRA on
the same sites of a model built with ``lora_placement="none"`` (numerically the same as :class:`LoRALinear`).

Parameter names: every adapter parameter sits in a child whose name starts with ``lora_`` (``lora_A``, ``lora_B``,
``lora_gate``, ``lora_residual``), so the release's grouping rule ``'lora_' in name`` works unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

PLACEMENTS = ("none", "attn", "attn_mlp", "all")
# Module-name suffixes of the LoRA sites per placement (the ablation of §4: attention only, +MLP, +head).
_SITES = {"attn": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc1", "mlp.fc2"), "head": ("head",)}


def placement_sites(placement: str) -> tuple[str, ...]:
    """Which kinds of site carry LoRA: a subset of ('attn', 'mlp', 'head')."""
    if placement not in PLACEMENTS:
        raise ValueError(f"lora_placement must be one of {PLACEMENTS}, got {placement!r}.")
    return {"none": (), "attn": ("attn",), "attn_mlp": ("attn", "mlp"), "all": ("attn", "mlp", "head")}[placement]


class LoRALinear(nn.Module):
    """Plain LoRA around a frozen linear: ``y = base(x) + s · B A x`` (the classifier head of the release)."""

    def __init__(self, in_features: int, out_features: int, r: int = 16, lora_alpha: float = 32.0,
                 bias: bool = True) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}.")
        self.in_features, self.out_features, self.r, self.lora_alpha = in_features, out_features, r, lora_alpha
        self.base = nn.Linear(in_features, out_features, bias=bias)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        # Multiplies s; 1 unless the paper-style option cycles the adaptation strength (schedule.py).
        self.register_buffer("lora_factor", torch.ones(()))
        self.lora_enabled = True
        self.reset_lora(zero=True)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def weight(self) -> torch.Tensor:  # timm's reset_classifier and friends look for these
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def reset_lora(self, zero: bool = True) -> None:
        """Standard LoRA start: A Kaiming-uniform(a=√5), B = 0 (``zero``) so the layer equals ``base``."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if zero:
            nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * (self.scaling * self.lora_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + self.delta(x) if self.lora_enabled else out

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W0 + s · B A`` (exact; uses the current cycle factor)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.scaling * float(self.lora_factor)
                             * self.lora_B.weight @ self.lora_A.weight)
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin.to(self.base.weight.device, self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, lora_alpha={self.lora_alpha}"


class GatedLoRALinear(LoRALinear):
    """LoLA-SpecViT's "enhanced" LoRA: ``y = base(x) + sigmoid(G x) ⊙ (s · B A x) + R x`` (§4)."""

    def __init__(self, in_features: int, out_features: int, r: int = 16, lora_alpha: float = 32.0,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, r, lora_alpha, bias)
        self.lora_gate = nn.Linear(in_features, out_features, bias=False)
        self.lora_residual = nn.Linear(in_features, out_features, bias=False)
        self.reset_lora(zero=True)

    def reset_lora(self, zero: bool = True) -> None:
        """Zero start: A, G Kaiming-uniform(a=√5), B = 0 and R = 0, so the layer equals ``base``."""
        super().reset_lora(zero)
        if hasattr(self, "lora_gate"):
            nn.init.kaiming_uniform_(self.lora_gate.weight, a=math.sqrt(5))
            if zero:
                nn.init.zeros_(self.lora_residual.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.lora_gate(x)) * super().delta(x) + self.lora_residual(x)

    def fold_residual(self) -> None:
        """Move ``R`` into ``W0`` (exact): ``W0 ← W0 + R``, ``R ← 0``."""
        with torch.no_grad():
            self.base.weight.add_(self.lora_residual.weight)
            self.lora_residual.weight.zero_()

    def merged(self) -> nn.Linear:
        raise NotImplementedError("The gated LoRA term sigmoid(Gx)·(s·BAx) depends on the input and cannot be merged "
                                  "into a linear layer; only the residual can (fold_residual).")


def make_linear(in_features: int, out_features: int, lora: Optional[str], r: int, lora_alpha: float,
                bias: bool = True) -> nn.Module:
    """``nn.Linear`` (lora=None), plain ``LoRALinear`` ('plain') or ``GatedLoRALinear`` ('gated')."""
    if lora is None:
        return nn.Linear(in_features, out_features, bias=bias)
    cls = GatedLoRALinear if lora == "gated" else LoRALinear
    return cls(in_features, out_features, r=r, lora_alpha=lora_alpha, bias=bias)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every built-in LoRA branch on or off (off: each site is its frozen base linear)."""
    for layer in lora_layers(model):
        layer.lora_enabled = enabled


def lola_peft_config(placement: str = "all", r: int = 16, lora_alpha: float = 32.0, **kwargs):
    """A peft ``LoraConfig`` with plain LoRA on the sites of ``placement`` of a LoLA-SpecViT built with
    ``lora_placement="none"``; ``peft.get_peft_model(model, lola_peft_config())`` then trains LoRA A/B only."""
    from peft import LoraConfig

    kinds = placement_sites(placement)
    if not kinds:
        raise ValueError("lora_placement='none' has no LoRA sites for peft.")
    alternatives = []
    for kind in kinds:
        for site in _SITES[kind]:
            alternatives.append(r"head" if site == "head" else r"stages\.\d+\.blocks\.\d+\." + site.replace(".", r"\."))
    pattern = r"^(" + "|".join(alternatives) + r")$"
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=pattern, **kwargs)

