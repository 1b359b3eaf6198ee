"""Hyperspectral classification with LoLA-SpecViT (specs/lola_specvit.md).

Importing this package registers the ``lola_specvit_*`` models with timm.
"""

from .lora import GatedLoRALinear, LoRALinear, lola_peft_config, set_lora_enabled
from .model import LoLASpecViT, set_trainable

__all__ = ["GatedLoRALinear", "LoRALinear", "LoLASpecViT", "lola_peft_config", "set_lora_enabled", "set_trainable"]
