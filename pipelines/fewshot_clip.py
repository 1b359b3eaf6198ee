"""``FewShotCLIPPipeline``: a trained few-shot CLIP classifier (defined beside its trainer in
:mod:`visadapt.fewshot.pipeline`, which writes run folders through it)."""

from visadapt.fewshot.pipeline import FewShotCLIPPipeline, FewShotOutput

__all__ = ["FewShotCLIPPipeline", "FewShotOutput"]
