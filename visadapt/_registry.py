"""Register visadapt's methods with peft and its models with timm as soon as either library is imported.

``import visadapt`` stays light (the command line answers ``--help`` at once), yet the promise holds: after
``import visadapt``, peft builds and loads Block-LoRA / Comp-LoRA adapters and ``timm.create_model`` knows the
``lola_specvit_*`` models, whichever of visadapt, peft and timm is imported first. A library already imported is
registered at once; one not yet imported is registered right after its module has run (a post-import hook).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Callable

# library -> the visadapt modules whose import registers with it
REGISTRATIONS: dict[str, tuple[str, ...]] = {
    "peft": ("visadapt.adapters",),
    "timm": ("visadapt.hyperspectral.model",),
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of a watched module so that a callback runs after it."""

    def __init__(self) -> None:
        self.pending: dict[str, Callable[[], None]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        callback = self.pending.pop(fullname)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run_module = spec.loader.exec_module

                def exec_module(module, run_module=run_module):
                    run_module(module)
                    callback()

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
    if _HOOK.pending and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
