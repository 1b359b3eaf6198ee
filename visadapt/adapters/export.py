"""Export a Block-LoRA or Comp-LoRA adapter as a plain LoRA file that needs no visadapt to load.

Both methods' updates are exactly low rank, ΔW = s · B_eff A_eff (Block-LoRA's tiled A_s, Comp-LoRA's projected
B), so the export is exact: each adapted module gets lora_A = A_eff and lora_B = s · B_eff with lora_alpha = r
(scale 1), s being the adapter's own scale (alpha/r, or alpha/√r with rslora), never a live ``set_adapters``
weight. Split q/k/v parts become one stacked pair on the fused matrix, exactly as LoRA sees it.

Three layouts, each loaded by the stock tool that expects it:

* ``"peft"``: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
  (``base_model.model.<module>.lora_A.weight``), for ``peft.PeftModel.from_pretrained(base, folder)``.
* ``"diffusers"``: ``pytorch_lora_weights.safetensors`` with ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``
  keys, one file for a whole pipeline, written by diffusers' own ``save_lora_weights``; for
  ``pipe.load_lora_weights(folder)`` and ``set_adapters``.
* ``"kohya"``: ``<folder name>.safetensors`` with ``lora_unet_…`` / ``lora_te_…`` keys, ``lora_down`` /
  ``lora_up`` / ``alpha`` (diffusers' ``convert_state_dict_to_kohya``), for A1111, ComfyUI and diffusers.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import peft
import torch
import torch.nn as nn
import torch.nn.functional as F
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from visadapt.utils import staged_dir

from .layer import LowRankLayer, LowRankMultiheadAttention
from .model import regex_for_modules

Format = Literal["peft", "diffusers", "kohya"]
FORMATS = ("peft", "diffusers", "kohya")
PEFT_PREFIX = "base_model.model."
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers gives (and looks for first)
PIPELINE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
OUT_PROJ = "base_layer.out_proj"  # where peft's LoRA puts nn.MultiheadAttention's second pair

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def export_lora(model: Any, out_dir: Union[str, os.PathLike], adapter_name: str = "default",
                format: Optional[Format] = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to the folder ``out_dir`` as a plain LoRA; return ``out_dir``.

    Args:
        model: a ``PeftModel``, a model with adapters injected through peft (e.g. a diffusers UNet after
            ``add_adapter``), or a diffusers pipeline whose UNet and/or text encoders carry the adapter.
        format: ``"peft"`` (folder for ``PeftModel.from_pretrained``), ``"diffusers"`` (one
            ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights``) or ``"kohya"`` (one
            ``<out_dir name>.safetensors`` for A1111 / ComfyUI / diffusers). Default: ``"diffusers"`` for a
            diffusers UNet or pipeline, ``"peft"`` otherwise.

    Weights are fp32; modules with smaller rank than the largest are zero-padded to one common rank r (exact, and
    every loader then applies scale alpha / r = 1). An export of a UNet or pipeline, in any format, also loads as a
    LoRA-Composer concept (``visadapt.diffusion.Concept(lora=out_dir, ...)``).
    """
    format = format or ("diffusers" if _is_diffusers(model) else "peft")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if format == "peft":
        return _export_peft(model, out_dir, adapter_name)
    layers = {name: _lora_state(_pairs_of(module, adapter_name, f"The {name}"))
              for name, module in _diffusers_components(model, adapter_name).items()}
    with staged_dir(out_dir) as stage:
        if format == "diffusers":
            _save_diffusers(stage, layers)
        else:
            save_file(_to_kohya(layers), str(stage / _kohya_file_name(out_dir)), metadata={"format": "pt"})
    return Path(out_dir)


def _kohya_file_name(out_dir: Union[str, os.PathLike]) -> str:
    """A1111 and ComfyUI show a LoRA by its file name, so the kohya file is named after its folder."""
    return f"{Path(out_dir).resolve().name}.safetensors"


# --- collecting the pairs ----------------------------------------------------------------------------------------

def _collect_pairs(base: nn.Module, adapter_name: str) -> Pairs:
    """Module path (plain-LoRA layout) -> (A (r, d_in), s·B (d_out, r)) of every visadapt layer with the adapter."""
    pairs = {}
    for name, module in base.named_modules():
        if isinstance(module, LowRankLayer) and adapter_name in module.adapter_factors:
            for sub, pair in module.export_pairs(adapter_name).items():
                pairs[f"{name}.{sub}" if sub else name] = pair
    return pairs


def _pairs_of(model: nn.Module, adapter_name: str, what: str = "The model") -> Pairs:
    """The adapter's pairs, or an error that says why there are none."""
    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"{what} has no adapter named {adapter_name!r}; it has {sorted(configs)}.")
    pairs = _collect_pairs(_base(model), adapter_name)
    if not pairs:
        raise ValueError(f"Adapter {adapter_name!r} is a {configs[adapter_name].peft_type} adapter, not a visadapt "
                         "low-rank one; export_lora converts Block-LoRA and Comp-LoRA adapters.")
    return pairs


def _base(model: Any) -> Any:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _pad_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and zero columns of B add nothing to B A: padding keeps the export exact."""
    extra = rank - lora_a.shape[0]
    return F.pad(lora_a, (0, 0, 0, extra)).contiguous(), F.pad(lora_b, (0, extra)).contiguous()


def _lora_state(pairs: Pairs) -> dict[str, torch.Tensor]:
    """peft-layout LoRA tensors ``<module>.lora_A.weight`` (r, d_in) / ``lora_B.weight`` (d_out, r), one rank r."""
    rank = max(a.shape[0] for a, _ in pairs.values())
    state = {}
    for key, (lora_a, lora_b) in pairs.items():
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = _pad_rank(lora_a, lora_b, rank)
    return state


def _rank(state: dict[str, torch.Tensor]) -> int:
    return next(t.shape[0] for k, t in state.items() if k.endswith("lora_A.weight"))


# --- peft folder -------------------------------------------------------------------------------------------------

def _export_peft(model: Any, out_dir: Union[str, os.PathLike], adapter_name: str) -> Path:
    if _is_pipeline(model):
        raise ValueError("format='peft' exports one model; export a pipeline with format='diffusers' (one "
                         "pytorch_lora_weights.safetensors for all its components) or format='kohya'.")
    base = _base(model)
    pairs = _pairs_of(model, adapter_name)
    config = model.peft_config[adapter_name]
    _warn_if_peft_doubles_out_proj(base, adapter_name)
    modules, params, pairs = _peft_targets(base, adapter_name, pairs)
    state = {PEFT_PREFIX + k: v for k, v in _lora_state(pairs).items()}
    state.update(_modules_to_save_state(model, config, adapter_name))
    rank = _rank(state)
    lora_config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=regex_for_modules(modules) if modules else [],
        target_parameters=params or None, modules_to_save=config.modules_to_save,
        base_model_name_or_path=config.base_model_name_or_path, task_type=config.task_type, inference_mode=True,
    )
    with staged_dir(out_dir) as stage:
        save_file(state, str(stage / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora_config.save_pretrained(str(stage))
    return Path(out_dir)


def _peft_targets(base: nn.Module, adapter_name: str, pairs: Pairs) -> tuple[list[str], list[str], Pairs]:
    """(target_modules, target_parameters, pairs) such that stock peft builds exactly the pairs the file holds.

    peft's LoRA on an ``nn.MultiheadAttention`` always adds a second pair on ``out_proj``; an attention adapted
    only on q, k, v (the CLIP-LoRA placement) would load with one missing pair per layer. Such layers are named
    by their ``in_proj_weight`` in ``target_parameters`` instead: peft then adds the one pair, under the same key.
    """
    pairs = dict(pairs)
    attention = {n: m.get_base_layer() for n, m in base.named_modules()
                 if isinstance(m, LowRankMultiheadAttention) and adapter_name in m.adapter_factors}
    qkv_only = {n for n in attention if f"{n}.{OUT_PROJ}" not in pairs}
    for name in attention.keys() - qkv_only - pairs.keys():  # o only: peft adds the in_proj pair anyway
        pairs[name] = _zero_pair(attention[name].in_proj_weight)
    params = sorted(f"{n}.in_proj_weight" for n in qkv_only)
    modules = {k.removesuffix(f".{OUT_PROJ}") for k in pairs} - qkv_only
    # peft matches target_parameters by suffix: other attention layers whose names end alike get a zero pair.
    for name, module in base.named_modules():
        key = f"{name}.in_proj_weight"
        if (isinstance(module, nn.MultiheadAttention) and ".base_layer" not in key and name not in pairs
                and any(key.endswith("." + p) for p in params)):
            pairs[name] = _zero_pair(module.in_proj_weight)
    return sorted(modules), params, pairs


def _zero_pair(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-1 pair of zeros for ``weight`` (d_out, d_in): a LoRA layer that changes nothing."""
    zeros = dict(dtype=torch.float32, device=weight.device)
    return torch.zeros(1, weight.shape[1], **zeros), torch.zeros(weight.shape[0], 1, **zeros)


def _modules_to_save_state(model, config, adapter_name: str) -> dict[str, torch.Tensor]:
    """Fully trained modules (``modules_to_save``) carry over unchanged: peft stores them the same for LoRA."""
    if not config.modules_to_save:
        return {}
    marker = f".{config.peft_type.lower()}_factors."
    full = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v.detach().float().contiguous()
            for k, v in full.items() if marker not in k}


def _warn_if_peft_doubles_out_proj(base: nn.Module, adapter_name: str) -> None:
    """peft <= 0.21 adds the LoRA delta of nn.MultiheadAttention.out_proj twice, in forward and in merge
    (huggingface/peft#3774). The exported file is correct LoRA; say that those peft versions will misread it."""
    if Version(peft.__version__) >= Version("0.22.0.dev0"):
        return
    has_o = any(isinstance(m, LowRankMultiheadAttention) and adapter_name in m.adapter_factors
                and "o" in m.adapter_factors[adapter_name] for m in base.modules())
    if has_o:
        warnings.warn(
            f"peft {peft.__version__} applies a LoRA on nn.MultiheadAttention's out_proj twice "
            "(huggingface/peft#3774), so it will not reproduce this adapter's 'o' part when loading the export. "
            "The file itself is exact; load it with a fixed peft, or train with attention_parts=['q', 'k', 'v'] "
            "(the CLIP-LoRA placement).",
            stacklevel=3,
        )


# --- diffusers and kohya files -----------------------------------------------------------------------------------

def _is_pipeline(model: Any) -> bool:
    return not isinstance(model, nn.Module) and hasattr(model, "components")


def _is_diffusers(model: Any) -> bool:
    if "diffusers" not in sys.modules:  # nothing can be a diffusers object before diffusers is imported
        return False
    from diffusers import DiffusionPipeline, ModelMixin

    return isinstance(_base(model), (DiffusionPipeline, ModelMixin))


def _diffusers_components(model: Any, adapter_name: str) -> dict[str, nn.Module]:
    """Component name (``unet``, ``text_encoder``, ``text_encoder_2``) -> the module that carries the adapter."""
    if not _is_pipeline(model):
        base = _base(model)
        if type(base).__name__ != "UNet2DConditionModel":
            raise ValueError(f"format='diffusers'/'kohya' writes Stable Diffusion LoRA files: pass the UNet or the "
                             f"pipeline, not a {type(base).__name__} (export it with format='peft').")
        return {"unet": model}
    found = {name: getattr(model, name, None) for name in PIPELINE_COMPONENTS}
    found = {name: m for name, m in found.items()
             if isinstance(m, nn.Module) and adapter_name in getattr(m, "peft_config", {})}
    if not found:
        have = {name: sorted(getattr(getattr(model, name, None), "peft_config", {})) for name in PIPELINE_COMPONENTS}
        raise ValueError(f"No component of the pipeline has an adapter named {adapter_name!r} (adapters: {have}).")
    return found


def _save_diffusers(stage: Path, layers: dict[str, dict[str, torch.Tensor]]) -> None:
    """diffusers' own writer: ``pytorch_lora_weights.safetensors`` with the LoraConfig of each component in its
    header (``lora_adapter_metadata``), so ``load_lora_weights`` rebuilds exactly these targets, rank and alpha."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    writer = StableDiffusionXLLoraLoaderMixin if "text_encoder_2" in layers else StableDiffusionLoraLoaderMixin
    kwargs: dict[str, Any] = {}
    for name, state in layers.items():
        rank = _rank(state)
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        kwargs[f"{name}_lora_layers"] = state
        kwargs[f"{name}_lora_adapter_metadata"] = {"r": rank, "lora_alpha": rank, "target_modules": targets}
    writer.save_lora_weights(str(stage), weight_name=DIFFUSERS_WEIGHT_NAME, **kwargs)


def _to_kohya(layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """kohya / A1111 keys through diffusers' ``convert_state_dict_to_kohya`` (``lora_unet_…``, ``lora_te1_…``,
    ``lora_down`` / ``lora_up``, ``alpha`` = rank), fixed up to kohya's own naming of the text encoders: the
    transformers-4 tree (``text_model.…``) and ``lora_te_`` when there is one text encoder (SD-1.x/2.x)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state = {}
    for name, tensors in layers.items():
        for key, tensor in (tensors if name == "unet" else _with_out_proj(tensors)).items():
            if name != "unet" and not key.startswith("text_model."):
                key = "text_model." + key  # transformers 5 flattened CLIPTextModel; kohya names the old tree
            state[f"{name}.{key}"] = tensor
    kohya = convert_state_dict_to_kohya(state)
    if "text_encoder_2" not in layers:
        kohya = {k.replace("lora_te1_", "lora_te_", 1) if k.startswith("lora_te1_") else k: v for k, v in kohya.items()}
    return {k: v.float() if k.endswith(".alpha") else v for k, v in kohya.items()}


def _with_out_proj(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' kohya loader recognises a text-encoder LoRA by its out_proj pairs and fails with "Could not
    automatically infer state dict type" without one: attention layers without an out_proj pair get a zero pair,
    which changes nothing."""
    if any(".out_proj.lora_" in k for k in tensors):
        return tensors
    out = dict(tensors)
    for key, lora_a in tensors.items():
        match = re.fullmatch(r"(.*\.self_attn)\.[qkv]_proj\.lora_A\.weight", key)
        if match and f"{match[1]}.out_proj.lora_A.weight" not in out:
            out[f"{match[1]}.out_proj.lora_A.weight"] = torch.zeros_like(lora_a)
            out[f"{match[1]}.out_proj.lora_B.weight"] = lora_a.new_zeros(lora_a.shape[1], lora_a.shape[0])
    return out
