"""Concept LoRA training (``visadapt concept train``): :mod:`.config` (the options), :mod:`.train` (the trainer),
:mod:`.cli` (the command). Importing this package imports no torch (the command line's ``--help``)."""
