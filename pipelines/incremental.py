"""``IncrementalClassifierPipeline``: a class-incremental classifier (defined beside its trainer in
:mod:`visadapt.incremental.pipeline`, which writes run folders through it)."""

from visadapt.incremental.pipeline import IncrementalClassifierPipeline, IncrementalOutput

__all__ = ["IncrementalClassifierPipeline", "IncrementalOutput"]
