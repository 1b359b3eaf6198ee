"""Few-shot class-incremental learning with CoACT (Roy et al., arXiv 2405.16625): ``visadapt incremental``."""
