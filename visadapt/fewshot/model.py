"""The CLIP side of few-shot adaptation: loading open_clip models, building adapter configs, zero-shot heads.

The classifier is CLIP-LoRA's (Zanella & Ben Ayed, arXiv 2405.18541, and its code): class c's weight is the
L2-normalised text embedding of ``template.format(classname)``, logits are ``logit_scale · cos(image, text)`` with
a fixed scale of 100, no bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import open_clip
import peft
import torch
import torch.nn as nn
import torch.nn.functional as F

from visadapt.adapters.methods import peft_config

from .config import DEMO_MODEL, LOGIT_SCALE, METHODS, TEMPLATE, TOWERS  # noqa: F401  (re-exported)

_TOWER_PATTERNS = {"vision": r"visual\.transformer\.resblocks\.{layer}\.attn",
                   "text": r"transformer\.resblocks\.{layer}\.attn"}


@dataclass
class ClipBundle:
    """An open_clip model with what it needs to classify: tokenizer and its own image transforms."""

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess_train: Callable
    preprocess_val: Callable
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def resolve_model_name(model: str) -> str:
    """``visadapt-demo-clip`` → open_clip's ``local-dir:`` name of the shipped demo weights; others unchanged."""
    if model == DEMO_MODEL:
        from visadapt.utils.worlds.models import DEMO_CLIP_DIR

        return f"local-dir:{DEMO_CLIP_DIR}"
    return model


def needs_quick_gelu(name: str, pretrained: Optional[str]) -> bool:
    """Whether open_clip's weights ``pretrained`` were trained with QuickGELU (OpenAI's CLIPs and a few others).

    open_clip builds its plain architecture names (``ViT-B-16``) with GELU and only warns when such weights are
    loaded; the logits then move (by up to 0.44 on ViT-B-16 / openai), so these weights must get QuickGELU."""
    if not pretrained or Path(pretrained).suffix or name.startswith(("local-dir:", "hf-hub:")):
        return False
    return bool(open_clip.pretrained.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def load_clip(model: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu") -> ClipBundle:
    """Load an open_clip model by architecture name (``ViT-B-16``), ``local-dir:PATH``, ``hf-hub:ORG/REPO`` or
    ``visadapt-demo-clip``; ``pretrained`` is an open_clip tag (``openai``) or a local checkpoint file.

    Weights trained with QuickGELU get QuickGELU (:func:`needs_quick_gelu`). Checkpoints load with
    ``weights_only=True`` (safetensors preferred): a user-supplied file is never unpickled.
    """
    name = resolve_model_name(model)
    if not name.startswith(("local-dir:", "hf-hub:")) and name not in open_clip.list_models():
        raise ValueError(f"--model {model!r} is not an open_clip architecture (open_clip.list_models() lists them, "
                         f"e.g. ViT-B-16); pass local-dir:PATH or hf-hub:ORG/REPO for other models, or {DEMO_MODEL}.")
    if pretrained and not Path(pretrained).suffix and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(f"--pretrained {pretrained!r} is neither a file nor a known tag of {model!r} "
                         f"(tags: {known}; a local-dir: or hf-hub: model carries its own weights: --pretrained none).")
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such checkpoint file.")
    try:
        clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device, weights_only=True,
            force_quick_gelu=needs_quick_gelu(name, pretrained))
    except (RuntimeError, OSError) as err:  # hub downloads and cache misses, open_clip's own checks
        raise ValueError(f"--model {model} --pretrained {pretrained}: could not load it ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}). If the weights are not in the local "
                         "cache, download them once with a network (HF_HUB_OFFLINE unset), or pass a checkpoint "
                         "file (--pretrained FILE) or a local model (--model local-dir:PATH).") from err
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return ClipBundle(clip, open_clip.get_tokenizer(name), preprocess_train, preprocess_val, size,
                      tuple(cfg["mean"]), tuple(cfg["std"]))


def attention_regex(towers: Sequence[str] = TOWERS, layers: Optional[Sequence[int]] = None) -> str:
    """target_modules regex for the attention blocks of the chosen towers (all layers when ``layers`` is None)."""
    unknown = set(towers) - set(TOWERS)
    if unknown or not towers:
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {list(towers)}.")
    layer = r"\d+" if layers is None else "(" + "|".join(str(i) for i in layers) + ")"
    # The text tower's blocks sit at the top level ("transformer."), the vision tower's under "visual.".
    parts = [("^" if t == "text" else ".*") + _TOWER_PATTERNS[t].format(layer=layer) for t in towers]
    return "(" + "|".join(parts) + ")$"


def adapter_config(method: str, r: int = 2, lora_alpha: float = 1.0, lora_dropout: float = 0.25,
                   parts: Sequence[str] = ("q", "k", "v"), towers: Sequence[str] = TOWERS,
                   layers: Optional[Sequence[int]] = None, n_blocks: int = 8, block_mode: str = "input_split",
                   comp_k: float | int = 0.5, comp_side: str = "out", comp_mode: str = "project") -> peft.PeftConfig:
    """The peft config of ``method`` (:mod:`visadapt.adapters.methods`) with CLIP-LoRA's placement and scaling
    (s = lora_alpha/√r; §2.1–2.2). ``lora`` is the CLIP-LoRA layer: separate rank-r pairs on q, k and v (stock peft
    gives ``nn.MultiheadAttention`` one pair for the fused q/k/v projection instead)."""
    return peft_config(method, r, lora_alpha, lora_dropout, attention_regex(towers, layers), use_rslora=True,
                       attention_parts=list(parts), n_blocks=n_blocks, block_mode=block_mode, k=comp_k,
                       side=comp_side, mode=comp_mode)


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(C, context) token ids → (C, embed_dim) L2-normalised class embeddings."""
    return F.normalize(model.encode_text(tokens), dim=-1)


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) → (N, embed_dim) L2-normalised image embeddings."""
    return F.normalize(model.encode_image(images), dim=-1)


def prompts(classnames: Sequence[str], template: str = TEMPLATE) -> list[str]:
    return [template.format(name.replace("_", " ")) for name in classnames]
