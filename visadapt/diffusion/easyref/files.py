"""EasyRef checkpoints: our key layout and the released code's (both in the comment below), in files.

* :func:`convert_official` / :func:`to_official`: the released checkpoint's key layout ↔ ours;
* :func:`easyref_state_dict` / :func:`load_easyref_state`: our layout from / into a UNet and an encoder;
* :func:`read_easyref_file`: a ``.safetensors`` (or weights-only ``.bin``) file in either layout, as ours;
  :func:`save_easyref_file` writes one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from visadapt.utils import load_safetensors, torch_load_weights

from .encoder import EasyRefEncoder
from .unet import ADAPTER_NAME

# The key layouts.
#
# Ours (one flat dict, safetensors-ready):
#   encoder.<EasyRefEncoder.state_dict() key>    reference_tokens, final_layer.*, final_norm.weight, proj.{0,2,3}.*,
#                                                and mllm.* (transformers-5 Qwen2-VL keys) when the MLLM was tuned
#   unet.<attn>.processor.to_{k,v}_ip.0.weight   decoupled cross-attention (diffusers IPAdapterAttnProcessor2_0)
#   unet.<attn>.<to_q|to_k|to_v|to_out.0>.lora_{A,B}.weight   the "easyref" LoRA (peft keys, no adapter name)
# Official (the released training wrapper's state dict, transformers 4.45 module names):
#   image_proj_model.proj.{0,2,3}.*, mllm_final_layer.{layers.0.*, norm.weight, reference_tokens},
#   multimodal_llm.{model.*, visual.*, lm_head.*} (optional), unet.<attn>.processor.to_{k,v}_ip.weight,
#   unet.<attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight; adapter_modules.* duplicates the processors and
#   any other unet.* key is a frozen SDXL weight (both skipped when converting).

_OFFICIAL_IP = re.compile(r"unet\.(.+)\.processor\.(to_[kv]_ip)\.weight")
_OFFICIAL_LORA = re.compile(r"unet\.(.+)\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight")
_OURS_IP = re.compile(r"unet\.(.+)\.processor\.(to_[kv]_ip)\.0\.weight")
_OURS_LORA = re.compile(r"unet\.(.+)\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight")
_ENCODER_PREFIXES = [  # (official, ours)
    ("image_proj_model.", "encoder."),
    ("mllm_final_layer.layers.0.", "encoder.final_layer."),
    ("mllm_final_layer.norm.", "encoder.final_norm."),
    ("mllm_final_layer.reference_tokens", "encoder.reference_tokens"),
    ("multimodal_llm.model.", "encoder.mllm.model.language_model."),
    ("multimodal_llm.visual.", "encoder.mllm.model.visual."),
    ("multimodal_llm.lm_head.", "encoder.mllm.lm_head."),
]


def is_official(state: dict[str, Any]) -> bool:
    return any(k.startswith(("image_proj_model.", "mllm_final_layer.")) for k in state)


def convert_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released checkpoint's keys → ours (layouts in the comment above); tensors are shared, not copied."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith("adapter_modules.") or key.endswith("rotary_emb.inv_freq"):
            continue
        if m := _OFFICIAL_IP.fullmatch(key):
            out[f"unet.{m[1]}.processor.{m[2]}.0.weight"] = tensor
        elif m := _OFFICIAL_LORA.fullmatch(key):
            target = "to_out.0" if m[2] == "out" else f"to_{m[2]}"
            out[f"unet.{m[1]}.{target}.lora_{'A' if m[3] == 'down' else 'B'}.weight"] = tensor
        elif key.startswith("unet."):
            continue  # a frozen SDXL weight saved along with the adapters
        elif key.startswith("image_proj_model.proj."):
            out["encoder.proj." + key[len("image_proj_model.proj."):]] = tensor
        else:
            for official, ours in _ENCODER_PREFIXES[1:]:
                if key.startswith(official):
                    out[ours + key[len(official):]] = tensor
                    break
            else:
                unknown.append(key)
    if unknown:
        raise ValueError(f"Not an EasyRef checkpoint key: {unknown[:5]} ({len(unknown)} in all).")
    return out


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys → the released checkpoint's (the inverse of :func:`convert_official`)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := _OURS_IP.fullmatch(key):
            out[f"unet.{m[1]}.processor.{m[2]}.weight"] = tensor
        elif m := _OURS_LORA.fullmatch(key):
            short = "out" if m[2] == "to_out.0" else m[2][3:]
            out[f"unet.{m[1]}.processor.to_{short}_lora.{'down' if m[3] == 'A' else 'up'}.weight"] = tensor
        elif key.startswith("encoder.proj."):
            out["image_proj_model.proj." + key[len("encoder.proj."):]] = tensor
        else:
            for official, ours in reversed(_ENCODER_PREFIXES[1:]):
                if key.startswith(ours):
                    out[official + key[len(ours):]] = tensor
                    break
            else:
                raise ValueError(f"Not an EasyRef key of our layout: {key!r}.")
    return out


def easyref_state_dict(unet, encoder: Optional[EasyRefEncoder] = None,
                       include_mllm: bool = False) -> dict[str, torch.Tensor]:
    """Our layout from an installed ``unet`` (and ``encoder``; its MLLM weights only with ``include_mllm``)."""
    from peft import get_peft_model_state_dict

    out = {f"unet.{k}": v for k, v in unet.state_dict().items() if re.search(r"\.processor\.to_[kv]_ip\.", k)}
    if ADAPTER_NAME in (getattr(unet, "peft_config", None) or {}):
        lora = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
        out.update({f"unet.{k}": v for k, v in lora.items()})
    if encoder is not None:
        out.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()
                    if include_mllm or not k.startswith("mllm.")})
    return {k: v.detach().contiguous() for k, v in out.items()}


def load_easyref_state(unet, encoder: Optional[EasyRefEncoder], state: dict[str, torch.Tensor]) -> None:
    """Load our layout (or the official one, converted) into an installed ``unet`` and ``encoder``.

    Every decoupled layer must be in ``state``; the LoRA loads when present; encoder keys must all fit (MLLM keys are
    optional: absent means the pretrained MLLM).
    """
    from peft import set_peft_model_state_dict

    if is_official(state):
        state = convert_official(state)
    ip = {k[len("unet."):]: v for k, v in state.items() if _OURS_IP.fullmatch(k)}
    expected = {k for k in unet.state_dict() if re.search(r"\.processor\.to_[kv]_ip\.", k)}
    if set(ip) != expected:
        missing, extra = sorted(expected - set(ip)), sorted(set(ip) - expected)
        raise ValueError(f"The EasyRef weights do not fit this UNet: missing {missing[:3]}, unexpected {extra[:3]} "
                         "(an SDXL checkpoint with install_easyref(unet, num_tokens=…) matching the file is needed).")
    _load_exact(unet, ip)
    lora = {k[len("unet."):]: v for k, v in state.items() if _OURS_LORA.fullmatch(k)}
    if lora:
        if ADAPTER_NAME not in (getattr(unet, "peft_config", None) or {}):
            raise ValueError("The file has an EasyRef UNet LoRA but the UNet has none: install with r > 0.")
        result = set_peft_model_state_dict(unet, lora, adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA keys that fit no UNet layer: {result.unexpected_keys[:3]}")
    if encoder is not None:
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        required = {k for k in encoder.state_dict() if not k.startswith("mllm.")}
        missing = sorted(required - set(enc))
        if missing:
            raise ValueError(f"The EasyRef file lacks encoder weights {missing[:3]} ({len(missing)} in all).")
        _load_exact(encoder, enc)


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``module``'s own parameters and buffers; unknown keys or shapes are errors."""
    own = module.state_dict(keep_vars=True)
    for key, value in state.items():
        if key not in own:
            raise ValueError(f"{key!r} is not a weight of {type(module).__name__}.")
        if own[key].shape != value.shape:
            raise ValueError(f"{key!r}: the file has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}; "
                             "the file was made for another model size.")
        with torch.no_grad():
            own[key].copy_(value)


def save_easyref_file(state: dict[str, torch.Tensor], path: Union[str, os.PathLike], official: bool = False,
                      metadata: Optional[dict[str, str]] = None) -> Path:
    """Write a state dict in our layout (:func:`easyref_state_dict`) to one ``.safetensors`` file, atomically: as is,
    or with ``official`` in the released code's layout (:func:`to_official`). The only writer of EasyRef files.

    Tied weights (Qwen2-VL-2B's ``lm_head`` is its embedding) are written as copies: safetensors refuses shared
    storage."""
    from safetensors.torch import save_file

    from visadapt.utils.io import atomic_path

    state = to_official(state) if official else state
    tensors, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        tensors[key] = value.clone() if value.data_ptr() in seen else value
        seen.add(value.data_ptr())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "method": "easyref", **(metadata or {})})
    return path


def read_easyref_file(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """A checkpoint file in our layout or the official one (converted): ``.safetensors``, or a ``.bin``/``.pt`` read
    with ``weights_only`` (DeepSpeed's ``{"module": ...}`` wrapper unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No EasyRef checkpoint at {str(path)!r}.")
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        state = torch_load_weights(path)
        state = state.get("module", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{str(path)!r} holds no EasyRef weights.")
    return convert_official(state) if is_official(state) else state


def checkpoint_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``num_tokens`` and the LoRA rank ``r`` (0 without a LoRA) of a checkpoint in our layout."""
    if "encoder.reference_tokens" not in state:
        raise ValueError("Not an EasyRef checkpoint: it has no reference tokens (encoder.reference_tokens, or "
                         "mllm_final_layer.reference_tokens in the released layout). Pass the EasyRef file, not a "
                         "LoRA or a base model.")
    ranks = [v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")]
    return {"num_tokens": int(state["encoder.reference_tokens"].shape[0]), "r": int(ranks[0]) if ranks else 0}
