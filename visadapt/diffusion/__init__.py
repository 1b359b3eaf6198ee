"""Multi-concept composition for diffusers pipelines: LoRA-Composer's concepts and attention edits, and DECOR.

The pipelines that use these live in :mod:`visadapt.pipelines` (``LoRAComposerPipeline``,
``LoRAComposerXLPipeline``, ``DecorPipeline``, ``DecorXLPipeline``).
"""

from .composer import ComposerConfig
from .concepts import Concept
from .decor import Decor, DecorProjector
from .lora_files import LoraFileError

__all__ = ["Concept", "ComposerConfig", "Decor", "DecorProjector", "LoraFileError"]
