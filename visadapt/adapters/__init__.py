"""Low-rank parametrisations (Block-LoRA, Comp-LoRA) as peft tuner types, export to plain LoRA, and the registry of
``--method`` names (:mod:`visadapt.adapters.methods`).

The names below load on first use, so that the command line can read the method registry without importing torch;
the methods register with peft when peft is imported (:mod:`visadapt._registry`).
"""

from visadapt.utils.lazy import lazy_exports

_LAZY = {
    "BlockLoraConfig": "block_lora", "BlockLoraModel": "block_lora",
    "CompLoraConfig": "comp_lora", "CompLoraModel": "comp_lora",
    "export_lora": "export",
    "NonFiniteWeightsError": "checks", "check_finite_file": "checks",
    "LowRankFactors": "layer", "LowRankLayer": "layer", "LowRankLinear": "layer", "LowRankMultiheadAttention": "layer",
}

__all__ = [
    "BlockLoraConfig", "BlockLoraModel", "CompLoraConfig", "CompLoraModel", "export_lora",
    "NonFiniteWeightsError", "check_finite_file",
    "LowRankFactors", "LowRankLayer", "LowRankLinear", "LowRankMultiheadAttention",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
