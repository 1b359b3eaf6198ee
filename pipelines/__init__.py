"""User-facing pipelines (``from_pretrained`` / ``save_pretrained`` / ``__call__``), installed as
``visadapt.pipelines``."""

from .fewshot_clip import FewShotCLIPPipeline, FewShotOutput

__all__ = ["FewShotCLIPPipeline", "FewShotOutput"]
