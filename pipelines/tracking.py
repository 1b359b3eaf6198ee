"""``TrackingPipeline``: a LoRAT tracker (defined in :mod:`visadapt.tracking.pipeline`)."""

from visadapt.tracking.pipeline import TrackingOutput, TrackingPipeline

__all__ = ["TrackingOutput", "TrackingPipeline"]
