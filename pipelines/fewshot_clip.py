"""``FewShotCLIPPipeline``: a trained few-shot CLIP classifier, re-exported.

The pipeline lives in its task, ``visadapt/fewshot/pipeline.py`` (:mod:`visadapt.fewshot.pipeline`), beside the
trainer that writes run folders through it. :mod:`visadapt.pipelines` is the public face: users import it from there.
"""

from visadapt.fewshot.pipeline import FewShotCLIPPipeline, FewShotOutput

__all__ = ["FewShotCLIPPipeline", "FewShotOutput"]
