"""User-facing pipelines (``from_pretrained`` / ``save_pretrained`` / ``__call__``), installed as
``visadapt.pipelines``."""
