"""Export a Block-LoRA or Comp-LoRA adapter as a plain peft LoRA that needs no visadapt to load.

Both methods' updates are exactly low rank, ΔW = s · B_eff A_eff (Block-LoRA's tiled A_s, Comp-LoRA's projected
B), so the export is exact: each adapted module gets lora_A = A_eff and lora_B = s · B_eff with lora_alpha = r
(scale 1). Split q/k/v parts become one stacked pair on the fused matrix, exactly as LoRA sees it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import peft
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from visadapt.utils import staged_dir

from .layer import LowRankLayer, LowRankMultiheadAttention
from .model import regex_for_modules

PEFT_PREFIX = "base_model.model."


def _collect_pairs(base: nn.Module, adapter_name: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list]:
    pairs, targets = {}, []
    for name, module in base.named_modules():
        if isinstance(module, LowRankLayer) and adapter_name in module.adapter_factors:
            targets.append(name)
            for sub, pair in module.export_pairs(adapter_name).items():
                pairs[f"{name}.{sub}" if sub else name] = pair
    return pairs, targets


def _pad_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and zero columns of B add nothing to B A: padding keeps the export exact."""
    extra = rank - lora_a.shape[0]
    return F.pad(lora_a, (0, 0, 0, extra)).contiguous(), F.pad(lora_b, (0, extra)).contiguous()


def export_lora(model: Union[PeftModel, nn.Module], out_dir: Union[str, os.PathLike],
                adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``out_dir`` as a plain peft LoRA.

    ``model`` is a ``PeftModel`` or a model with adapters injected through peft (e.g. a diffusers UNet after
    ``add_adapter``). The folder holds ``adapter_config.json`` (``peft_type: LORA``) and
    ``adapter_model.safetensors`` (fp32), and loads with ``peft.PeftModel.from_pretrained(base, out_dir)``
    without visadapt installed, giving the same outputs. Modules whose pairs have smaller rank than the largest
    are zero-padded to one common rank r. Returns ``out_dir``.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"The model has no adapter named {adapter_name!r}; it has "
                         f"{sorted(getattr(model, 'peft_config', {}))}.")
    pairs, targets = _collect_pairs(base, adapter_name)
    _warn_if_peft_doubles_out_proj(base, adapter_name)
    if not pairs:
        raise ValueError(f"Adapter {adapter_name!r} is a {config.peft_type} adapter, not a visadapt low-rank one; "
                         "export_lora converts Block-LoRA and Comp-LoRA adapters.")
    rank = max(a.shape[0] for a, _ in pairs.values())
    state = {}
    for key, (lora_a, lora_b) in pairs.items():
        state[f"{PEFT_PREFIX}{key}.lora_A.weight"], state[f"{PEFT_PREFIX}{key}.lora_B.weight"] = \
            _pad_rank(lora_a, lora_b, rank)
    state.update(_modules_to_save_state(model, config, adapter_name))
    lora_config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=regex_for_modules(targets),
        modules_to_save=config.modules_to_save, base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type, inference_mode=True,
    )
    with staged_dir(out_dir) as stage:
        save_file(state, str(stage / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora_config.save_pretrained(str(stage))
    return Path(out_dir)


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
            f"peft {peft.__version__} applies a LoRA on nn.MultiheadAttention's out_proj twice (huggingface/peft#3774), "
            "so it will not reproduce this adapter's 'o' part when loading the export. The file itself is exact; "
            "load it with a fixed peft, or train with attention_parts=['q', 'k', 'v'] (the CLIP-LoRA placement).",
            stacklevel=3,
        )
