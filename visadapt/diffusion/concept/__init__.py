"""Concept LoRA training (``visadapt concept train``): :mod:`.config` (the options), :mod:`.train` (the trainer),
:mod:`.cli` (the command), :mod:`.demo` (two held-out shapes taught to the embedded world model, which the composer
app and the composition benchmark compose). Importing this package imports no torch (the command line's
``--help``)."""
