"""Official LoRAT checkpoints (``base.bin``, ``base-378.bin``, ``large.bin``, ``large-378.bin``, ``giant.bin``,
``giant-378.bin``) onto :class:`visadapt.tracking.model.LoRAT`.

The official model (``LoRAT_DINOv2`` in github.com/LitingLin/LoRAT, LoRA patched in by
``funcs/vit_lora_utils.enable_lora_``) saves its ``state_dict`` with these names; the mapping here (C = width,
r = rank) is:

================================================  ===========================================================
official name (shape)                             here
================================================  ===========================================================
``patch_embed.proj.{weight,bias}``                same
``pos_embed`` (1, Hx·Wx, C)                       same (the already resized shared table)
``token_type_embed`` (3, C)                       same
``blocks.i.{norm1,norm2}.*``, ``ls{1,2}.gamma``   same (timm's DINOv2 blocks use DINOv2's names)
``blocks.i.attn.qkv.{q,k,v}.linear.weight`` (C,C) rows [0:C], [C:2C], [2C:3C] of ``blocks.i.attn.qkv.weight``
``blocks.i.attn.qkv.{q,k,v}.linear.bias`` (C)     the same rows of ``blocks.i.attn.qkv.bias``
``blocks.i.attn.qkv.{q,k,v}.lora.A`` (r, C)       ``lora_A`` of part q / k / v of the adapter on ``attn.qkv``
``blocks.i.attn.qkv.{q,k,v}.lora.B`` (C, r)       ``lora_B`` of that part
``blocks.i.<site>.linear.{weight,bias}``          ``blocks.i.<site>.{weight,bias}``; site = attn.proj, mlp.fc1,
                                                  mlp.fc2 (ViT-g: ``mlp.w12`` → ``mlp.fc1``, ``mlp.w3`` →
                                                  ``mlp.fc2``: DINOv2's packed SwiGLU equals timm's
                                                  ``SwiGLUPacked``, gate = SiLU(first half) · second half)
``blocks.i.<site>.lora.{A,B}``                    ``lora_A`` / ``lora_B`` of the (whole-matrix) adapter there
``lora_alpha``, ``use_rslora`` (optional)         scaling alpha / r (alpha / sqrt(r)); absent means scaling 1,
                                                  the official default (alpha = r = 64)
``head.{cls,reg}_mlp.layers.{0,1,2}.*``           same
================================================  ===========================================================

Merged checkpoints (plain ``.weight`` instead of ``.linear.weight``, or a fused ``attn.qkv.weight``) load too.
Into a model with the default adapter (:func:`visadapt.tracking.model.add_adapter`) the factors are loaded as they
are (for further training); into a plain model (``build_lorat(..., lora=False)``) they are merged into the weights
in fp32, as the official ``attach_lora_state_dict_hooks_`` does. Every checkpoint tensor must land and every model
tensor must be written: anything else raises and names the keys.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from peft.tuners.lora import LoraLayer

from visadapt.adapters import LowRankLayer
from visadapt.adapters.block_lora import BlockLoraFactors
from visadapt.utils import load_safetensors, torch_load_weights

_LORA = re.compile(r"^(?P<module>.+)\.lora\.(?P<what>A|B|alpha|use_rslora)$")
_QKV_PART = re.compile(r"^(?P<module>.+\.attn\.qkv)\.(?P<part>[qkv])$")
WHOLE = "all"


def read_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors when the file is one, else ``torch.load(weights_only=True)``
    (tensors and plain containers only; nothing else in the file is unpickled)."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte little-endian header length, then JSON
        return load_safetensors(path)
    state = torch_load_weights(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors (the official LoRAT weight files are).")
    return state


def _rename(name: str) -> str:
    name = name.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
    if name.endswith(".mlp.w12") or name.endswith(".mlp.w3"):
        name = name.replace(".mlp.w12", ".mlp.fc1").replace(".mlp.w3", ".mlp.fc2")
    return name.replace(".linear.", ".")


def _split_site(module: str) -> tuple[str, str]:
    """``blocks.0.attn.qkv.q`` → (``blocks.0.attn.qkv``, ``q``); other sites → (module, ``all``)."""
    match = _QKV_PART.match(module)
    return (match["module"], match["part"]) if match else (module, WHOLE)


def convert_official(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Official state dict → (plain weights in this model's names, {(module, part): (A, B, scaling)}).

    Plain weights use the merged layout (fused ``attn.qkv``); adapters are returned apart, unmerged.
    """
    state = dict(state)
    alpha = state.pop("lora_alpha", None)
    rslora = bool(state.pop("use_rslora", torch.tensor(False)))
    plain, qkv_parts, lora = {}, defaultdict(dict), defaultdict(dict)
    for key, tensor in state.items():
        name = _rename(key)
        match = _LORA.match(name)
        if match:
            lora[_split_site(match["module"])][match["what"]] = tensor
            continue
        module, _, tensor_name = name.rpartition(".")
        site, part = _split_site(module)
        if part != WHOLE:
            qkv_parts[f"{site}.{tensor_name}"][part] = tensor
        else:
            plain[name] = tensor
    for name, parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Checkpoint has parts {sorted(parts)} of {name}; q, k and v are all needed.")
        plain[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return plain, {site: _lora_pair(site, entry, alpha, rslora) for site, entry in lora.items()}


def _lora_pair(site: tuple[str, str], entry: dict, alpha, rslora: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    if "A" not in entry or "B" not in entry:
        raise ValueError(f"Checkpoint has an incomplete LoRA pair at {'.'.join(site)}: {sorted(entry)}.")
    lora_a, lora_b = entry["A"], entry["B"]
    alpha = entry.get("alpha", alpha)
    rslora = bool(entry.get("use_rslora", rslora))
    if alpha is None:
        return lora_a, lora_b, 1.0
    r = lora_a.shape[0]
    return lora_a, lora_b, float(alpha) / (math.sqrt(r) if rslora else r)


def _merged(weight: torch.Tensor, pairs: dict[str, tuple]) -> torch.Tensor:
    """W + s·B·A in fp32 (per q/k/v row block for a fused qkv), cast back."""
    out = weight.float().clone()
    rows = weight.shape[0] // 3
    for part, (lora_a, lora_b, scale) in pairs.items():
        sl = slice(None) if part == WHOLE else slice("qkv".index(part) * rows, ("qkv".index(part) + 1) * rows)
        out[sl] += scale * (lora_b.float() @ lora_a.float())
    return out.to(weight.dtype)


def _plain_factors(layer: LowRankLayer, module: str) -> dict[str, nn.Module]:
    names = list(layer.adapter_factors)
    if len(names) != 1:
        raise ValueError(f"{module} carries adapters {names}; load official weights into a model with one adapter.")
    parts = layer.adapter_factors[names[0]]
    if not all(isinstance(f, BlockLoraFactors) and f.groups == 1 for f in parts.values()):
        raise ValueError(f"{module}: official checkpoints hold plain LoRA; build the model with the default "
                         "adapter (lorat_adapter_config('lora')) or lora=False to merge them on load.")
    return parts


def load_official(model: nn.Module, state: Union[dict[str, torch.Tensor], str, Path]) -> dict[str, int]:
    """Load an official LoRAT checkpoint (a path or its state dict) into ``model``, in place.

    Returns {``tensors``: checkpoint tensors used, ``adapters``: LoRA pairs loaded or merged}. Raises if a
    checkpoint tensor has no place here, a model tensor gets no value, a shape differs, or the model's LoRA
    scaling is not the checkpoint's.
    """
    raw = read_state_dict(state) if isinstance(state, (str, Path)) else state
    plain, lora = convert_official(raw)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLayer)}
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("This model carries peft LoRA layers; official checkpoints load into the default adapter "
                         "(lorat_adapter_config('lora')) or into a plain model (lora=False).")
    by_module = defaultdict(dict)
    for (module, part), pair in lora.items():
        by_module[module][part] = pair
    written = _load_factors(layers, by_module) if layers else 0
    if not layers:
        for module, pairs in by_module.items():
            key = f"{module}.weight"
            if key not in plain:
                raise KeyError(f"Checkpoint has LoRA at {module} but no {key}.")
            plain[key] = _merged(plain[key], pairs)
    for module in layers:
        for tensor in ("weight", "bias"):
            if f"{module}.{tensor}" in plain:
                plain[f"{module}.base_layer.{tensor}"] = plain.pop(f"{module}.{tensor}")
    _load_plain(model, plain)
    return {"tensors": len(raw), "adapters": written or len(lora)}


def _load_factors(layers: dict[str, LowRankLayer], by_module: dict[str, dict]) -> int:
    missing = sorted(set(layers) - set(by_module))
    extra = sorted(set(by_module) - set(layers))
    if missing or extra:
        raise ValueError(f"Adapter sites differ from the checkpoint's: model only {missing[:4]}, checkpoint only "
                         f"{extra[:4]}.")
    written = 0
    for module, pairs in by_module.items():
        layer, parts = layers[module], _plain_factors(layers[module], module)
        if set(parts) != set(pairs):
            raise ValueError(f"{module}: model parts {sorted(parts)}, checkpoint parts {sorted(pairs)}.")
        (adapter,) = layer.adapter_factors
        for part, (lora_a, lora_b, scale) in pairs.items():
            factors = parts[part]
            if not math.isclose(layer.scaling[adapter], scale, rel_tol=1e-6):
                raise ValueError(f"{module}: the model's LoRA scaling is {layer.scaling[adapter]}, the "
                                 f"checkpoint's {scale}; build it with matching lorat_adapter_config(r, lora_alpha).")
            for param, value in ((factors.lora_A, lora_a), (factors.lora_B, lora_b)):
                if param.shape != value.shape:
                    raise ValueError(f"{module}.{part}: shape {tuple(value.shape)} in the checkpoint, "
                                     f"{tuple(param.shape)} here (rank or width differ).")
                with torch.no_grad():
                    param.copy_(value)
            written += 1
    return written


def _load_plain(model: nn.Module, plain: dict[str, torch.Tensor]) -> None:
    target = {k: v for k, v in model.state_dict().items() if not re.search(r"_factors\.", k)}
    missing, unexpected = sorted(set(target) - set(plain)), sorted(set(plain) - set(target))
    if missing or unexpected:
        raise ValueError(f"Checkpoint does not match the model: {len(missing)} model tensors without a value "
                         f"({missing[:5]}), {len(unexpected)} checkpoint tensors without a place "
                         f"({unexpected[:5]}). Check the variant (B/L/g, 224/378).")
    bad = [k for k in target if target[k].shape != plain[k].shape]
    if bad:
        raise ValueError(f"Shape mismatch for {bad[:5]}: e.g. {bad[0]} is {tuple(plain[bad[0]].shape)} in the "
                         f"checkpoint, {tuple(target[bad[0]].shape)} here. Check the variant (B/L/g, 224/378).")
    model.load_state_dict(plain, strict=False)
