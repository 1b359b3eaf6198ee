"""``HyperspectralPipeline``: a trained LoLA-SpecViT, re-exported.

The pipeline lives in its task, ``visadapt/hyperspectral/pipeline.py`` (:mod:`visadapt.hyperspectral.pipeline`),
beside the trainer that writes run folders through it. :mod:`visadapt.pipelines` is the public face: users import it
from there.
"""

from visadapt.hyperspectral.pipeline import HyperspectralOutput, HyperspectralPipeline

__all__ = ["HyperspectralOutput", "HyperspectralPipeline"]
