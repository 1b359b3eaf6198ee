"""``HyperspectralPipeline``: a trained LoLA-SpecViT (defined beside its trainer in
:mod:`visadapt.hyperspectral.pipeline`, which writes run folders through it)."""

from visadapt.hyperspectral.pipeline import HyperspectralOutput, HyperspectralPipeline

__all__ = ["HyperspectralOutput", "HyperspectralPipeline"]
