"""The diffusion task, one sub-package per family: :mod:`.composer` (LoRA-Composer's concepts and attention edits,
DECOR), :mod:`.concept` (concept training, ``visadapt concept train``), :mod:`.easyref` (EasyRef's multi-reference
encoder, UNet install and checkpoints; ``visadapt easyref``); :mod:`.tiny` (offline random pipelines) and
:mod:`.train_common` (what the trainers share) serve them all.

The pipelines that use these live in :mod:`visadapt.pipelines` (``LoRAComposerPipeline``,
``LoRAComposerXLPipeline``, ``DecorPipeline``, ``DecorXLPipeline``, ``EasyRefPipeline``,
``EasyRefControlNetPipeline``). The names below load on first use, so that the command line (``visadapt concept
--help``) imports this package without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visadapt.utils.lazy import lazy_exports

if TYPE_CHECKING:
    from .composer.concepts import Concept
    from .composer.decor import Decor, DecorProjector
    from .composer.lora_files import LoraFileError
    from .composer.refinement import ComposerConfig
    from .concept.config import ConceptTrainConfig
    from .concept.train import train_concept
    from .easyref.encoder import EasyRefEncoder, EasyRefInputError
    from .easyref.tiny_mllm import tiny_qwen2vl

_EXPORTS = {"Concept": "composer.concepts", "ComposerConfig": "composer.refinement", "Decor": "composer.decor",
            "DecorProjector": "composer.decor", "LoraFileError": "composer.lora_files",
            "EasyRefEncoder": "easyref.encoder", "EasyRefInputError": "easyref.encoder",
            "ConceptTrainConfig": "concept.config", "train_concept": "concept.train",
            "tiny_qwen2vl": "easyref.tiny_mllm"}
__all__ = ["Concept", "ComposerConfig", "Decor", "DecorProjector", "LoraFileError", "EasyRefEncoder",
           "EasyRefInputError", "ConceptTrainConfig", "train_concept", "tiny_qwen2vl"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
