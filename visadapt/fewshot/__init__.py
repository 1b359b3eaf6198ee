"""Few-shot CLIP classification with low-rank adapters: CoOp-layout data, the CLIP-LoRA protocol, GLAD, reports."""
