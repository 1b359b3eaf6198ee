"""Register visadapt's methods with peft and its models with timm as soon as either library is imported.

``import visadapt`` stays light (the command line answers ``--help`` at once), yet the promise holds: after
``import visadapt``, peft builds and loads Block-LoRA / Comp-LoRA adapters and ``timm.create_model`` knows the
``lola_specvit_*`` models, whichever of visadapt, peft and timm is imported first. A library already imported is
registered at once; one not yet imported is registered right after its module has run (a post-import hook).

A registration imports visadapt modules (``visadapt.adapters.block_lora``, …). When the library's first import comes
from inside one of their siblings (``visadapt.adapters.layer`` imports peft), that module is only half run and the
registration cannot import it yet: it then waits until no module of those packages is running.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Callable

# library -> the visadapt modules whose import registers with it
REGISTRATIONS: dict[str, tuple[str, ...]] = {
    "peft": ("visadapt.adapters.block_lora", "visadapt.adapters.comp_lora"),
    "timm": ("visadapt.hyperspectral.model",),
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of a module so that registrations run after it.

    ``pending``: library → its registration, queued when the library has run (not when it is only looked up:
    ``importlib.util.find_spec("timm")``, as peft does, loads nothing); ``watched``: the packages whose modules a
    registration imports, tracked while they run; ``waiting``: registrations queued until none does.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Callable[[], None]] = {}
        self.watched: tuple[str, ...] = ()
        self.running: set[str] = set()
        self.waiting: list[Callable[[], None]] = []

    def find_spec(self, fullname, path, target=None):
        library = fullname in self.pending
        tracked = fullname.startswith(self.watched) and bool(self.pending or self.waiting)
        if not (library or tracked):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run_module = spec.loader.exec_module

                def exec_module(module, run_module=run_module):
                    if tracked:
                        self.running.add(fullname)
                    try:
                        run_module(module)
                    finally:
                        self.running.discard(fullname)
                    if library and fullname in self.pending:
                        self.waiting.append(self.pending.pop(fullname))
                    while self.waiting and not self.running:
                        self.waiting.pop(0)()

                spec.loader.exec_module = exec_module
                return spec
        return None


_HOOK = _AfterImport()


def _register(modules: tuple[str, ...]) -> Callable[[], None]:
    def register() -> None:
        for name in modules:
            importlib.import_module(name)

    return register


def install() -> None:
    """Register now with the libraries already imported, and after import with the others."""
    for library, modules in REGISTRATIONS.items():
        if library in sys.modules:
            _register(modules)()
        else:
            _HOOK.pending[library] = _register(modules)
    _HOOK.watched = tuple(sorted({m.rpartition(".")[0] + "." for ms in REGISTRATIONS.values() for m in ms}))
    if _HOOK.pending and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
