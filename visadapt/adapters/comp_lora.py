"""Comp-LoRA (arXiv 2501.15040): LoRA kept in the complement of the frozen weight's principal subspace.

Reading of the abstract used here (the paper's code is not released; inferred): with W = U Σ Vᵀ computed once from
the frozen weight, the update is ΔW = (I − U_k U_kᵀ) B A, enforced on every forward as B_eff = B − U_k (U_kᵀ B).
Then U_kᵀ (W + ΔW) = U_kᵀ W exactly: the top-k output directions of W never move, whatever the optimiser does
(projecting gradients instead would not survive Adam). ``side="in"`` projects A against the top-k right singular
vectors, ``"both"`` does both. ``mode="init_only"`` is the MiLoRA-style alternative: start from the minor singular
components and train freely.

U_k (and V_k) are saved with the adapter, so a reload reproduces the outputs exactly on any device; on load the
saved subspace wins over the one computed from the new base (a fractional k may resolve differently there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
import torch.nn as nn

from .layer import LowRankFactors
from .model import LowRankConfig, LowRankModel, register_method


@dataclass
class CompLoraConfig(LowRankConfig):
    """Configuration of a Comp-LoRA adapter; use it with ``peft.get_peft_model`` like a ``LoraConfig``."""

    k: Union[int, float] = field(
        default=0.5, metadata={"help": "Principal directions to protect: an int count, or a float in (0, 1) for "
                                       "the smallest k holding that fraction of Σσ² (the paper's k is unknown)."})
    side: Literal["out", "in", "both"] = field(
        default="out", metadata={"help": "out: ΔW's column space avoids the top-k left singular vectors; in: its "
                                         "row space avoids the top-k right ones; both."})
    mode: Literal["project", "init_only"] = field(
        default="project", metadata={"help": "project: constrain every forward (default); init_only: start from "
                                             "the minor singular components, then train freely (MiLoRA-style)."})

    peft_type_name = "COMP_LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.side not in ("out", "in", "both"):
            raise ValueError(f"side must be 'out', 'in' or 'both', got {self.side!r}.")
        if self.mode not in ("project", "init_only"):
            raise ValueError(f"mode must be 'project' or 'init_only', got {self.mode!r}.")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)):
            raise ValueError(f"k must be an int or a float in (0, 1), got {self.k!r}.")
        if isinstance(self.k, float) and not 0.0 < self.k < 1.0:
            raise ValueError(f"A float k is an energy fraction and must lie in (0, 1), got {self.k}; pass an int "
                             "for a fixed number of directions.")
        if isinstance(self.k, int) and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def resolve_k(k: Union[int, float], singular_values: torch.Tensor) -> int:
    """The number of protected directions for this matrix; raises if that leaves no room for an update."""
    size = singular_values.numel()
    if isinstance(k, float):
        energy = singular_values.double().square().cumsum(0)
        k = int(torch.searchsorted(energy, k * energy[-1]).item()) + 1
    if k >= size:
        raise ValueError(f"k={k} is larger than this matrix allows: it has {size} singular directions and "
                         f"protecting all of them leaves no room for an update; use k < {size} (or a smaller "
                         "energy fraction).")
    return k


class CompLoraFactors(LowRankFactors):
    """lora_A (r, d_in), lora_B (d_out, r); buffers u_k (d_out, k) / v_k (d_in, k), or a0, b0 for init_only."""

    def __init__(self, weight: torch.Tensor, config: CompLoraConfig) -> None:
        super().__init__()
        d_out, d_in = weight.shape
        if weight.device.type == "meta":
            raise ValueError("Comp-LoRA needs the frozen weights to compute its projector; load the base model "
                             "with real weights (low_cpu_mem_usage is not supported).")
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        self.init_only = config.mode == "init_only"
        if self.init_only:
            self._init_from_minor_components(u, s, vh, config)
            return
        k = resolve_k(config.k, s)
        if config.side in ("out", "both"):
            self.register_buffer("u_k", u[:, :k].contiguous())
        if config.side in ("in", "both"):
            self.register_buffer("v_k", vh[:k].T.contiguous())
        self.lora_A = nn.Parameter(torch.empty(config.r, d_in, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, config.r, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not config.init_weights:
            nn.init.uniform_(self.lora_B, -1 / math.sqrt(config.r), 1 / math.sqrt(config.r))

    def _init_from_minor_components(self, u, s, vh, config: CompLoraConfig) -> None:
        """A, B from the r smallest singular triplets, with the starting product kept aside so ΔW starts at 0."""
        if config.r > s.numel():
            raise ValueError(f"mode='init_only' needs r <= {s.numel()} (the matrix rank), got r={config.r}.")
        root = (s[-config.r:] / config.scaling).sqrt()
        b0, a0 = u[:, -config.r:] * root, root[:, None] * vh[-config.r:]
        self.lora_A, self.lora_B = nn.Parameter(a0.clone()), nn.Parameter(b0.clone())
        self.register_buffer("a0", a0)
        self.register_buffer("b0", b0)
        if not config.init_weights:
            with torch.no_grad():
                self.lora_B.add_(torch.randn_like(b0) * b0.std())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A fractional k is resolved against the base the factors are built on, which may differ from the base
        # the adapter was trained on; the saved subspace is part of the adapter, so it wins, whatever its size.
        for name in ("u_k", "v_k"):
            saved = state_dict.get(prefix + name)
            if saved is not None and hasattr(self, name) and getattr(self, name).shape != saved.shape:
                setattr(self, name, getattr(self, name).new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lora_a, lora_b = self.lora_A, self.lora_B
        if self.init_only:  # ΔW = B A − B0 A0, an exact rank-2r pair
            return torch.cat([lora_a, self.a0.to(lora_a.dtype)]), torch.cat([lora_b, -self.b0.to(lora_b.dtype)], 1)
        if hasattr(self, "u_k"):
            u_k = self.u_k.to(lora_b.dtype)
            lora_b = lora_b - u_k @ (u_k.T @ lora_b)
        if hasattr(self, "v_k"):
            v_k = self.v_k.to(lora_a.dtype)
            lora_a = lora_a - (lora_a @ v_k) @ v_k.T
        return lora_a, lora_b


class CompLoraModel(LowRankModel):
    prefix = "comp_lora_"
    factors_cls = CompLoraFactors


register_method(CompLoraConfig, CompLoraModel)
