"""EasyRef (arXiv 2412.09618): SDXL conditioned on several reference images through a multimodal LLM.

:mod:`.encoder` (:class:`~.encoder.EasyRefEncoder` and its reference inputs), :mod:`.unet` (the decoupled
cross-attention and LoRA installed in a UNet), :mod:`.files` (checkpoint layouts, reading and writing);
training (``visadapt easyref train``): :mod:`.config`, :mod:`.data`, :mod:`.train`; evaluation
(``visadapt easyref eval``): :mod:`.eval`; the command line: :mod:`.cli`; an offline tiny Qwen2-VL:
:mod:`.tiny_mllm`. The pipelines are :mod:`visadapt.pipelines` ``EasyRefPipeline`` / ``EasyRefControlNetPipeline``.
Importing this package imports no torch (the command line's ``--help``).
"""
