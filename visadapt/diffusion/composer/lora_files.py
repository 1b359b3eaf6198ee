"""Loading concept LoRA files into a diffusers pipeline, with errors that say what is wrong and how to fix it.

Files are read with safetensors only (a pickled ``.ckpt``/``.bin`` can run code when loaded). The layouts people
have are accepted: peft/diffusers (``unet.….lora_A.weight``), kohya/A1111 (``lora_unet_…lora_down.weight``;
diffusers converts it) and a peft adapter of one model (``base_model.model.….lora_A.weight``, as
``visadapt.export_lora(..., format="peft")`` writes it), which is matched to the UNet or text encoder it fits. A
folder written by ``export_lora`` may be given instead of its file. Before loading, every tensor is checked to be
finite and every LoRA matrix against the module it targets, so a broken file or a LoRA trained for another base
model fails with the tensors or layers at fault instead of a NaN image or a bare size-mismatch trace.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import torch

from visadapt.adapters.checks import NonFiniteWeightsError, check_finite_file

MAX_LISTED = 5
PEFT_PREFIX = "base_model.model."  # keys of a peft adapter saved from one model
EXPORT_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
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


def lora_file(path: Union[str, os.PathLike]) -> Path:
    """``path`` itself, or the one LoRA file of a folder (as ``export_lora`` writes them)."""
    path = Path(path)
    if not path.is_dir():
        return path
    files = [path / name for name in EXPORT_FILES if (path / name).is_file()] or sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "no .safetensors file"
        raise LoraFileError(f"{path} is a folder with {found}; pass the LoRA file itself.")
    return files[0]


def read_lora_state_dict(pipe, path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The LoRA in ``path`` as a peft-format state dict (``component.module.lora_A.weight``), checked as a LoRA."""
    path = lora_file(path)
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
        check_finite_file(path)
    except NonFiniteWeightsError as err:
        raise LoraFileError(str(err)) from None
    if all(k.startswith(PEFT_PREFIX) for k in keys):
        return _peft_adapter_state_dict(pipe, path)
    return _diffusers_state_dict(pipe, path)


def _diffusers_state_dict(pipe, path: Path) -> dict[str, torch.Tensor]:
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    try:
        state_dict, _ = pipe.lora_state_dict(str(path), use_safetensors=True, local_files_only=True,
                                             unet_config=pipe.unet.config)
    except Exception as err:
        raise LoraFileError(f"{path.name}: diffusers cannot read this LoRA layout ({err}).") from None
    # The UNet and the text encoders name the old layouts' layers differently, so each has its own converter.
    unet = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    text = {k: v for k, v in state_dict.items() if not k.startswith("unet.")}
    if text:  # the converters cannot tell the layout of an empty dict (a UNet-only LoRA)
        text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
    return {**convert_unet_state_dict_to_peft(unet), **text}


def _peft_adapter_state_dict(pipe, path: Path) -> dict[str, torch.Tensor]:
    """A one-model peft adapter (``base_model.model.<module>.lora_A.weight``) keyed by the pipeline component whose
    modules it fits (``unet.<module>.lora_A.weight``), its scale lora_alpha / r folded into B so that diffusers'
    loader, which takes alpha = r, reproduces it."""
    from visadapt.utils import load_safetensors

    # Only the LoRA pairs: a concept cannot carry fully trained modules (peft's modules_to_save).
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_safetensors(path).items() if ".lora_" in k}
    scale = _peft_scale(path)
    if scale != 1.0:
        state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
    fits = {name: not fit_problems(pipe, {f"{name}.{k}": v for k, v in state.items()}) for name in COMPONENTS
            if isinstance(getattr(pipe, name, None), torch.nn.Module)}
    component = next((name for name, fit in fits.items() if fit), "unet")  # unet: its misfit is then reported
    return {f"{component}.{k}": v for k, v in state.items()}


def _peft_scale(path: Path) -> float:
    """lora_alpha / r (or / √r with rslora) of the ``adapter_config.json`` beside a peft adapter; 1 without one
    (``export_lora`` writes lora_alpha = r)."""
    config_file = path.with_name("adapter_config.json")
    if not config_file.is_file():
        return 1.0
    config = json.loads(config_file.read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraFileError(f"{path.name}: its adapter_config.json gives per-layer ranks or alphas, which a concept "
                            "LoRA cannot take; export it with visadapt.export_lora(..., format='diffusers').")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


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
    the normal forward (``load_lora_weights`` would otherwise make it the active UNet adapter). Mix-of-Show ED-LoRA
    ``.pth`` files load through :func:`visadapt.diffusion.composer.edlora.load_edlora_concept` instead.
    """
    path = lora_file(path)
    state_dict = read_lora_state_dict(pipe, path)
    problems = fit_problems(pipe, state_dict)
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise LoraFileError(f"{path.name} does not fit this base model ({type(pipe.unet).__name__} of "
                            f"{type(pipe).__name__}); {len(problems)} LoRA matrices differ:\n  {listed}{more}\n"
                            "Was it trained for another base (SD-1.x vs SD-2.x vs SDXL)?")
    with keep_active_adapters(pipe), quiet_loading():
        # diffusers does not read a one-model peft adapter: it gets the state dict converted above instead.
        source = state_dict if all(k.startswith(PEFT_PREFIX) for k in _safetensors_keys(path)) else str(path)
        pipe.load_lora_weights(source, adapter_name=adapter_name, use_safetensors=True, local_files_only=True)


@contextmanager
def quiet_loading() -> Iterator[None]:
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
