"""Multi-concept composition for diffusers pipelines: LoRA-Composer's concepts and attention edits, and DECOR;
concept training (``visadapt concept train``, :mod:`visadapt.diffusion.concept_train`); EasyRef's multi-reference
encoder and UNet install (:mod:`visadapt.diffusion.easyref`, pipelines ``EasyRefPipeline`` and
``EasyRefControlNetPipeline``).

The pipelines that use these live in :mod:`visadapt.pipelines` (``LoRAComposerPipeline``,
``LoRAComposerXLPipeline``, ``DecorPipeline``, ``DecorXLPipeline``). The names below load on first use, so that the
command line (``visadapt concept --help``) imports this package without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visadapt.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from .composer import ComposerConfig
    from .concepts import Concept
    from .decor import Decor, DecorProjector
    from .easyref import EasyRefEncoder, EasyRefInputError
    from .lora_files import LoraFileError

_EXPORTS = {"Concept": "concepts", "ComposerConfig": "composer", "Decor": "decor", "DecorProjector": "decor",
            "LoraFileError": "lora_files", "EasyRefEncoder": "easyref", "EasyRefInputError": "easyref"}
__all__ = ["Concept", "ComposerConfig", "Decor", "DecorProjector", "LoraFileError", "EasyRefEncoder",
           "EasyRefInputError"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
