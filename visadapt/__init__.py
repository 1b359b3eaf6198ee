"""visadapt: low-rank adaptation methods for vision and diffusion models, native to peft, timm and diffusers.

Importing visadapt registers its methods with peft, so ``peft.get_peft_model(model, visadapt.BlockLoraConfig(...))``
and ``peft.PeftModel.from_pretrained(base, saved_dir)`` work like they do for LoRA, and its timm models
(``timm.create_model("lola_specvit_base")``). The import itself is light: the registration runs when peft or timm
is imported (at once if they already are; see :mod:`visadapt._registry`), and the names below load on first use.
"""

from __future__ import annotations

from . import _registry
from .utils.lazy import lazy_exports
from .version import __version__

_registry.install()

_LAZY = {"BlockLoraConfig": "visadapt.adapters", "CompLoraConfig": "visadapt.adapters",
         "export_lora": "visadapt.adapters"}

__all__ = ["BlockLoraConfig", "CompLoraConfig", "export_lora", "__version__"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
