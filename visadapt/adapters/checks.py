"""Checks on adapter and LoRA files before they reach a model.

A single NaN or inf weight in a LoRA turns every output it touches into NaN (a black or 100 % NaN image), far
from the file that caused it. Checking the file's tensors up front names the broken tensor instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

import torch

MAX_LISTED = 5


class NonFiniteWeightsError(ValueError):
    """An adapter or LoRA file holds NaN or inf weights."""


def check_finite_file(path: Union[str, os.PathLike]) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the tensors of a ``.safetensors`` file that hold NaN or inf.

    Tensors are read one at a time (safetensors only, nothing is unpickled), so memory stays at one tensor.
    """
    from visadapt.utils import open_safetensors

    path = Path(path)
    with open_safetensors(path) as handle:
        bad = [key for key in handle.keys() if not _finite(handle.get_tensor(key))]
    if bad:
        raise NonFiniteWeightsError(f"{path.name} holds NaN or inf weights in {len(bad)} tensor(s): "
                                    f"{_listed(bad)}. The file is corrupt or its training diverged; re-export it from "
                                    "a good checkpoint (or retrain with a lower learning rate).")


def check_finite_dir(folder: Union[str, os.PathLike]) -> None:
    """:func:`check_finite_file` on every ``.safetensors`` file in ``folder`` and its subfolders (a peft adapter
    folder keeps further adapters in subfolders)."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        check_finite_file(path)


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more
