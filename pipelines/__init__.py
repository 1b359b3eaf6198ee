"""User-facing pipelines (``from_pretrained`` / ``save_pretrained`` / ``__call__``), installed as
``visadapt.pipelines``."""

from .decor import DecorMixin, DecorPipeline, DecorXLPipeline
from .fewshot_clip import FewShotCLIPPipeline, FewShotOutput
from .lora_composer import LoRAComposerMixin, LoRAComposerPipeline, LoRAComposerXLPipeline

__all__ = ["FewShotCLIPPipeline", "FewShotOutput", "LoRAComposerPipeline", "LoRAComposerXLPipeline",
           "LoRAComposerMixin", "DecorPipeline", "DecorXLPipeline", "DecorMixin"]
