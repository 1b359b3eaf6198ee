"""Hyperspectral classification with LoLA-SpecViT (Zidi et al., 2025), as timm models with LoRA.

``import visadapt`` registers the ``lola_specvit_*`` models with timm (when timm is imported). The names below load
on first use, so the command line does not import torch to answer ``--help``.
"""

from __future__ import annotations

from visadapt.utils.lazy import lazy_exports

_HOMES = {"GatedLoRALinear": ".lora", "LoRALinear": ".lora", "lola_peft_config": ".lora",
          "set_lora_enabled": ".lora", "LoLASpecViT": ".model", "set_trainable": ".model"}

__all__ = list(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
