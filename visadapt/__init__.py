"""visadapt: low-rank adaptation methods for vision and diffusion models, native to peft.

Importing visadapt registers its methods with peft, so ``peft.get_peft_model(model, visadapt.BlockLoraConfig(...))``
and ``peft.PeftModel.from_pretrained(base, saved_dir)`` work like they do for LoRA.
"""

from .adapters import BlockLoraConfig, CompLoraConfig, export_lora
from .version import __version__

__all__ = ["BlockLoraConfig", "CompLoraConfig", "export_lora", "__version__"]
