"""The adapter methods every task offers as ``--method``, and the one reader of ``--peft-config`` files.

A method is a name, the peft config class that builds it and the fields it fixes::

    register_method("lora", "visadapt.adapters.block_lora:BlockLoraConfig", n_blocks=1, block_mode="input_split")

so a new method is its file in ``visadapt/adapters/`` and one :func:`register_method` line below. Tasks keep their
own defaults (rank, targets, dropout, …) and pass them to :func:`peft_config`; their ``--method`` choices are
:data:`METHODS`, a live view of the registry, so a method registered later (a plugin, a test) is offered too.

This module imports neither torch nor peft (the command line builds its choices from it); a method's config class
is imported when the method is first built.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

if TYPE_CHECKING:
    import peft

__all__ = ["METHODS", "peft_config", "read_peft_config", "register_method", "unregister_method"]

Targets = Union[str, Sequence[str], None]


@dataclasses.dataclass(frozen=True)
class _Method:
    """One ``--method``: its peft config class (a class, or ``"module:Class"`` imported on first use) and the fields
    it fixes, which win over the options a task passes."""

    config_class: Union[type, str]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)

    def config_type(self) -> type:
        if isinstance(self.config_class, str):
            module, _, name = self.config_class.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.config_class

    def fields(self) -> set[str]:
        """The config fields this method takes from a task's options."""
        return {f.name for f in dataclasses.fields(self.config_type())}


_REGISTRY: dict[str, _Method] = {}


class _MethodNames(Sequence):
    """The registered method names in registration order, read at every use (argparse ``choices`` included)."""

    def __getitem__(self, index):
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


METHODS: Sequence[str] = _MethodNames()


def register_method(name: str, config_class: Union[type, str], *, replace: bool = False, **fixed: Any) -> None:
    """Offer ``name`` as a ``--method`` of every task, built as ``config_class(..., **fixed)``.

    ``config_class`` is a peft config class or ``"module:Class"``; ``fixed`` are the fields the method sets whatever
    a task passes (e.g. ``n_blocks=1``). A taken name raises unless ``replace=True``.
    """
    if name in _REGISTRY and not replace:
        raise ValueError(f"Adapter method {name!r} is already registered; pass replace=True to redefine it.")
    _REGISTRY[name] = _Method(config_class, dict(fixed))


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (a test's or plugin's method)."""
    if name not in _REGISTRY:
        raise KeyError(f"Adapter method {name!r} is not registered; registered: {', '.join(METHODS)}.")
    del _REGISTRY[name]


def peft_config(method: str, r: int, lora_alpha: float, lora_dropout: float, targets: Targets,
                **options: Any) -> peft.PeftConfig:
    """The peft config of ``method`` with rank ``r``, ``lora_alpha`` and ``lora_dropout`` (peft's names) on
    ``target_modules`` ``targets``.

    ``options`` are config fields (``use_rslora``, ``attention_parts``, ``n_blocks``, ``block_mode``, ``k``,
    ``side``, ``mode``, ``init_weights``, …): a task passes the options of all its methods, and each method takes
    the fields its config class has (Block-LoRA ``n_blocks``, Comp-LoRA ``k``) and ignores the others. An option
    that no registered method takes is a TypeError (a typo, not another method's setting).
    """
    if method not in _REGISTRY:
        raise ValueError(f"Unknown adapter method {method!r}; choose one of {', '.join(METHODS)}, or pass a peft "
                         "config (--peft-config).")
    chosen = _REGISTRY[method]
    taken = chosen.fields()
    unknown = set(options) - taken - set().union(*(m.fields() for m in _REGISTRY.values()))
    if unknown:
        raise TypeError(f"peft_config() got option(s) {sorted(unknown)} that no adapter method takes "
                        f"({', '.join(METHODS)}).")
    kwargs = {k: v for k, v in options.items() if k in taken and k not in chosen.fixed}
    return chosen.config_type()(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, **kwargs,
                                **chosen.fixed)


def read_peft_config(path: Union[str, os.PathLike], *, default_targets: Targets = None,
                     targets_example: Optional[str] = None, peft_types: Sequence[str] = (),
                     peft_types_note: Optional[str] = None) -> peft.PeftConfig:
    """The peft config (any peft method: LoRA, DoRA, VeRA, …) in ``path``: a JSON file holding ``peft_type`` and
    that method's fields, or a saved adapter folder holding ``adapter_config.json``.

    A file without ``target_modules`` takes ``default_targets``, or is refused naming ``targets_example``.
    ``peft_types`` (if given) are the types the caller accepts; ``peft_types_note`` says why. Every error is a
    ValueError that starts with ``--peft-config PATH:`` and names the fix.
    """
    import peft  # registers visadapt's types with peft (visadapt._registry)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    where = f"--peft-config {path}"
    file = Path(path) / "adapter_config.json" if Path(path).is_dir() else Path(path)
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: cannot read a JSON peft config ({err}).") from err
    peft_type = data.get("peft_type") if isinstance(data, dict) else None
    if peft_types and peft_type not in peft_types:
        note = peft_types_note or f"this command takes {' or '.join(peft_types)}"
        raise ValueError(f"{where}: peft_type {peft_type!r}; {note}.")
    if peft_type is None:
        raise ValueError(f"{where}: the JSON needs a 'peft_type' (e.g. \"LORA\", \"VERA\") and that method's fields, "
                         "as written by PeftConfig.save_pretrained.")
    known = sorted(getattr(t, "value", t) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
    if peft_type not in known:
        raise ValueError(f"{where}: peft {peft.__version__} has no peft_type {peft_type!r}; it has {', '.join(known)}.")
    if not data.get("target_modules"):
        if default_targets is None:
            example = f", e.g. {targets_example}" if targets_example else " (module names, or one regex)"
            raise ValueError(f"{where}: set 'target_modules'{example}.")
        data = {**data, "target_modules": default_targets}
    return peft.PeftConfig.from_peft_type(**data)


# The methods every task offers. "lora" is Block-LoRA with one block, which is exactly LoRA (same A, B, init and
# forward) but gives q, k and v their own pairs on fused qkv and nn.MultiheadAttention layers, where stock peft
# puts one pair, and exports to plain LoRA files like the other methods.
register_method("lora", "visadapt.adapters.block_lora:BlockLoraConfig", n_blocks=1, block_mode="input_split")
register_method("block-lora", "visadapt.adapters.block_lora:BlockLoraConfig")
register_method("comp-lora", "visadapt.adapters.comp_lora:CompLoraConfig")
