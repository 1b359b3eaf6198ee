"""Loading concept LoRA files into a diffusers pipeline, with errors that say what is wrong and how to fix it.

Files are read with safetensors only (a pickled ``.ckpt``/``.bin`` can run code when loaded). Both layouts people
have are accepted: peft/diffusers (``unet.….lora_A.weight``) and kohya/A1111 (``lora_unet_…lora_down.weight``);
diffusers converts the latter. Before loading, every LoRA matrix is checked against the module it targets, so a
LoRA trained for another base model fails with the layers that differ instead of a bare size-mismatch trace.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import torch

MAX_LISTED = 5
_LORA_KEY = re.compile(r"lora_(A|B|down|up)\b|\.lora\.(down|up)\.|_lora\.(down|up)\.")


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or does not fit the pipeline."""


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        raise LoraFileError(f"{path} is not a readable safetensors file ({err}). Re-download or re-export it; "
                            "LoRA files must be .safetensors.") from None


def read_lora_state_dict(pipe, path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The LoRA in ``path`` as a peft-format state dict (``component.module.lora_A.weight``), checked as a LoRA."""
    from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                 convert_unet_state_dict_to_peft)

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}.")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path.name}: only .safetensors LoRA files are loaded (pickled .ckpt/.pt/.bin files "
                            "can run code when opened). Convert it with safetensors first.")
    keys = _safetensors_keys(path)
    if not any(_LORA_KEY.search(k) for k in keys):
        shown = ", ".join(keys[:3]) or "no tensors"
        raise LoraFileError(f"{path.name} holds no LoRA weights (found {shown}); expected peft keys "
                            "'….lora_A.weight' or kohya keys '….lora_down.weight'.")
    try:
        state_dict, _ = pipe.lora_state_dict(str(path), use_safetensors=True, local_files_only=True,
                                             unet_config=pipe.unet.config)
    except Exception as err:
        raise LoraFileError(f"{path.name}: diffusers cannot read this LoRA layout ({err}).") from None
    # The UNet and the text encoders name the old layouts' layers differently, so each has its own converter.
    unet = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    text = {k: v for k, v in state_dict.items() if not k.startswith("unet.")}
    text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
    return {**convert_unet_state_dict_to_peft(unet), **text}


def _module(root: torch.nn.Module, path: str):
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            module = root.get_submodule(candidate)
        except AttributeError:
            continue
        return getattr(module, "base_layer", module)
    return None


def _features(module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return -1, -1


def fit_problems(pipe, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """One line per LoRA matrix whose target module is missing or has other sizes (empty when the LoRA fits)."""
    problems: list[str] = []
    for key, tensor in state_dict.items():
        match = re.match(r"([^.]+)\.(.+)\.lora_(A|B)\.weight$", key)
        if not match:
            continue
        component, module_path, side = match.groups()
        root = getattr(pipe, component, None)
        module = _module(root, module_path) if isinstance(root, torch.nn.Module) else None
        if module is None:
            problems.append(f"{component}.{module_path}: no such layer in this model")
            continue
        d_in, d_out = _features(module)
        got = tensor.shape[1] if side == "A" else tensor.shape[0]
        want = d_in if side == "A" else d_out
        if got != want:
            what = "input" if side == "A" else "output"
            problems.append(f"{component}.{module_path}: LoRA {what} size {got}, layer has {want}")
    return problems


def load_concept_lora(pipe, path: Union[str, os.PathLike], adapter_name: str) -> None:
    """Load the LoRA in ``path`` into ``pipe`` as ``adapter_name`` after checking it fits, without activating it.

    The pipeline's active adapters are left as they were: a concept LoRA acts only inside its region, never through
    the normal forward (``load_lora_weights`` would otherwise make it the active UNet adapter).
    """
    path = Path(path)
    state_dict = read_lora_state_dict(pipe, path)
    problems = fit_problems(pipe, state_dict)
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise LoraFileError(f"{path.name} does not fit this base model ({type(pipe.unet).__name__} of "
                            f"{type(pipe).__name__}); {len(problems)} LoRA matrices differ:\n  {listed}{more}\n"
                            "Was it trained for another base (SD-1.x vs SD-2.x vs SDXL)?")
    with keep_active_adapters(pipe), _quiet_loading():
        pipe.load_lora_weights(str(path), adapter_name=adapter_name, use_safetensors=True, local_files_only=True)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide two known-harmless messages of a text-encoder LoRA load: transformers' "LOAD REPORT" table listing every
    base weight as missing, and peft's warning that the model already has adapters (it has: the other concepts)."""
    names = ("transformers.integrations.peft", "transformers.utils.loading_report")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *TEXT_ENCODERS)


@contextmanager
def keep_active_adapters(pipe) -> Iterator[dict[str, list[str]]]:
    """Yield each component's active adapters; restore them (or the disabled state) on exit."""
    saved = {name: active_adapters(getattr(pipe, name, None)) for name in COMPONENTS}
    try:
        yield saved
    finally:
        for name, active in saved.items():
            set_active_adapters(getattr(pipe, name, None), active)


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if model is not None else []


def active_adapters(model) -> list[str]:
    """The adapters a model's LoRA layers run (empty when it has none or they are disabled)."""
    layers = _lora_layers(model)
    if not layers or layers[0].disable_adapters:
        return []
    return list(layers[0].active_adapters)


def set_active_adapters(model, names: list[str]) -> None:
    """Run exactly ``names`` (keeping their current scales); an empty list disables every adapter."""
    # Per layer rather than diffusers' set_adapters, which would reset every adapter's weight to 1.0.
    for layer in _lora_layers(model):
        layer.enable_adapters(bool(names))
        if names:
            layer.set_adapter(names, inference_mode=True)
