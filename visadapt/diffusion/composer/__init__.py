"""LoRA-Composer and DECOR: several concept LoRAs composed in one diffusers image, each in its box.

:mod:`.concepts` (:class:`~.concepts.Concept`, boxes, token positions), :mod:`.lora_files` (concept LoRA files
checked and loaded), :mod:`.edlora` (Mix-of-Show ED-LoRA ``.pth`` concepts), :mod:`.attention` (the attention
processor that routes each concept to its box), :mod:`.refinement` (:class:`~.refinement.ComposerConfig`, the
latent-optimisation losses and re-initialisation) and :mod:`.decor` (DECOR's prompt projection). The pipelines are
:mod:`visadapt.pipelines` ``LoRAComposerPipeline`` / ``LoRAComposerXLPipeline`` / ``DecorPipeline``.
"""
