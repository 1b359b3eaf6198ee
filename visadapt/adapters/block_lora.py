"""Block-LoRA ("One Head Eight Arms", arXiv 2501.16720): LoRA whose down-projection blocks are all shared.

Reading of the abstract used here (the paper's code is not released; inferred): split A = [A_1 | … | A_n] by input
columns and share them, A_j = A_s (r × d_in/n). Then ΔW = B [A_s | … | A_s], and the forward sums the n input
chunks before one small product: x̃ = Σ_j x_j, Δy = s · (x̃ A_sᵀ) Bᵀ. Trainable parameters per matrix:
r · (d_in / n + d_out). ``block_mode="rank_split"`` is the alternative reading (split by rank, ΔW = (Σ_i B_i) A_s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from .layer import LowRankFactors
from .model import LowRankConfig, LowRankModel, register_method


@dataclass
class BlockLoraConfig(LowRankConfig):
    """Configuration of a Block-LoRA adapter; use it with ``peft.get_peft_model`` like a ``LoraConfig``."""

    n_blocks: int = field(default=8, metadata={"help": "Number of input chunks sharing one down-projection."})
    block_mode: Literal["input_split", "rank_split"] = field(
        default="input_split", metadata={"help": "input_split: share A_s over input chunks (default); rank_split: "
                                                 "share it over rank groups, ΔW = (Σ_i B_i) A_s."})
    init_fan_in: Literal["block", "full"] = field(
        default="block", metadata={"help": "A_s ~ U(±1/sqrt(fan_in)) with fan_in = d_in/n ('block') or d_in "
                                           "('full', the init scale of a plain LoRA A)."})

    peft_type_name = "BLOCK_LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {self.n_blocks}.")
        if self.block_mode not in ("input_split", "rank_split"):
            raise ValueError(f"block_mode must be 'input_split' or 'rank_split', got {self.block_mode!r}.")
        if self.init_fan_in not in ("block", "full"):
            raise ValueError(f"init_fan_in must be 'block' or 'full', got {self.init_fan_in!r}.")
        if self.block_mode == "rank_split" and self.r % self.n_blocks:
            raise ValueError(f"block_mode='rank_split' needs r divisible by n_blocks; r={self.r}, "
                             f"n_blocks={self.n_blocks}.")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class BlockLoraFactors(LowRankFactors):
    """lora_A: A_s, (r, d_in/n) for input_split or (r/n, d_in) for rank_split; lora_B: (d_out, r)."""

    def __init__(self, weight: torch.Tensor, config: BlockLoraConfig) -> None:
        super().__init__()
        d_out, d_in = weight.shape
        r, n = config.r, config.n_blocks
        self.rank_split = config.block_mode == "rank_split"
        if self.rank_split:
            a_shape = (r // n, d_in)
        else:
            if d_in % n:
                raise ValueError(f"n_blocks={n} does not divide the input width {d_in}; values that would: "
                                 f"{', '.join(map(str, _divisors(d_in)))}.")
            self.n_blocks = n
            a_shape = (r, d_in // n)
        self.groups = n
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=weight.device))
        fan_in = a_shape[1] if config.init_fan_in == "block" else d_in
        nn.init.uniform_(self.lora_A, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        if not config.init_weights:
            nn.init.uniform_(self.lora_B, -1 / math.sqrt(r), 1 / math.sqrt(r))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rank_split:  # B = [B_1 … B_n] column groups, all multiplying the shared A_s
            return self.lora_A, self.lora_B.unflatten(1, (self.groups, -1)).sum(1)
        return self.lora_A, self.lora_B


class BlockLoraModel(LowRankModel):
    prefix = "block_lora_"
    factors_cls = BlockLoraFactors


register_method(BlockLoraConfig, BlockLoraModel)
