"""``TrackingPipeline``: a LoRAT tracker, re-exported.

The pipeline lives in its task, ``visadapt/tracking/pipeline.py`` (:mod:`visadapt.tracking.pipeline`), beside the
tracker it runs and the trainer that writes run folders through it. :mod:`visadapt.pipelines` is the public face:
users import it from there.
"""

from visadapt.tracking.pipeline import TrackingOutput, TrackingPipeline

__all__ = ["TrackingOutput", "TrackingPipeline"]
