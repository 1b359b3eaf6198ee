"""visadapt: low-rank adaptation methods for vision and diffusion models, native to peft, timm and diffusers.

Importing visadapt registers its methods with peft, so ``peft.get_peft_model(model, visadapt.BlockLoraConfig(...))``
and ``peft.PeftModel.from_pretrained(base, saved_dir)`` work like they do for LoRA, and its timm models
(``timm.create_model("lola_specvit_base")``). The import itself is light: the registration runs when peft or timm
is imported (at once if they already are; see :mod:`visadapt._registry`), and the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _registry
from .version import __version__

_registry.install()

_LAZY = {"BlockLoraConfig": "visadapt.adapters", "CompLoraConfig": "visadapt.adapters",
         "export_lora": "visadapt.adapters"}

__all__ = ["BlockLoraConfig", "CompLoraConfig", "export_lora", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'visadapt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
