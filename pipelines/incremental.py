"""``IncrementalClassifierPipeline``: a class-incremental classifier, re-exported.

The pipeline lives in its task, ``visadapt/incremental/pipeline.py`` (:mod:`visadapt.incremental.pipeline`), beside
the trainer that writes run folders through it. :mod:`visadapt.pipelines` is the public face: users import it from
there.
"""

from visadapt.incremental.pipeline import IncrementalClassifierPipeline, IncrementalOutput

__all__ = ["IncrementalClassifierPipeline", "IncrementalOutput"]
