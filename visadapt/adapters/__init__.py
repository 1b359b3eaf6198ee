"""Low-rank parametrisations (Block-LoRA, Comp-LoRA) as peft tuner types, and export to plain LoRA."""

from .block_lora import BlockLoraConfig, BlockLoraModel
from .checks import NonFiniteWeightsError, check_finite_file
from .comp_lora import CompLoraConfig, CompLoraModel
from .export import export_lora
from .layer import LowRankFactors, LowRankLayer, LowRankLinear, LowRankMultiheadAttention

__all__ = [
    "BlockLoraConfig", "BlockLoraModel", "CompLoraConfig", "CompLoraModel", "export_lora",
    "NonFiniteWeightsError", "check_finite_file",
    "LowRankFactors", "LowRankLayer", "LowRankLinear", "LowRankMultiheadAttention",
]
