"""User-facing pipelines (``from_pretrained`` / ``save_pretrained`` / ``__call__``), installed as
``visadapt.pipelines``.

This package is the public face: users import every pipeline from here. The diffusion pipelines (LoRA-Composer,
DECOR, EasyRef) are defined here; each task pipeline lives in its task, ``visadapt/<task>/pipeline.py``, beside the
trainer that writes run folders through it, and the module of its name here (``fewshot_clip``, ``hyperspectral``,
``incremental``, ``tracking``) only re-exports it.

Each pipeline is imported on first use, so ``from visadapt.pipelines import FewShotCLIPPipeline`` does not pay for
importing diffusers, and the diffusion pipelines do not pay for open_clip.
"""

from __future__ import annotations

from visadapt.utils.lazy import lazy_exports

_HOMES = {
    "FewShotCLIPPipeline": "fewshot_clip",
    "FewShotOutput": "fewshot_clip",
    "LoRAComposerPipeline": "lora_composer",
    "LoRAComposerXLPipeline": "lora_composer",
    "LoRAComposerMixin": "lora_composer",
    "DecorPipeline": "decor",
    "DecorXLPipeline": "decor",
    "DecorMixin": "decor",
    "EasyRefPipeline": "easyref",
    "EasyRefControlNetPipeline": "easyref",
    "EasyRefMixin": "easyref",
    "HyperspectralPipeline": "hyperspectral",
    "HyperspectralOutput": "hyperspectral",
    "IncrementalClassifierPipeline": "incremental",
    "IncrementalOutput": "incremental",
    "TrackingPipeline": "tracking",
    "TrackingOutput": "tracking",
}

__all__ = list(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
