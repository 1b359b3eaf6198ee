"""CoACT's encoders: a pretrained backbone, the student (backbone + adapter + bias-free classifier) and its teacher
(the same backbone without adapter, an EMA of the student's shared weights).

Backbones (``--backbone``):

- ``hf-vit:HUB_ID_OR_DIR``: a Hugging Face ``ViTModel`` checkpoint (default ``google/vit-base-patch16-224-in21k``,
  the official backbone) loaded into a timm ViT, with its pooler: the embedding is ``tanh(W_p LN(h_cls) + b_p)``,
  the official ``pooler_output`` (timm's own in21k weights drop that layer). Read with safetensors (or
  ``torch.load(weights_only=True)`` for ``pytorch_model.bin``).
- ``timm:NAME``: a timm model's pooled feature (``num_classes=0``); ``--pretrained FILE`` loads local weights,
  ``--pretrained random`` none (smoke tests).
- ``open_clip:NAME``: an open_clip vision tower (its projected embedding); ``--pretrained`` is a tag or a file.
- ``visadapt-demo-clip``: the vision tower of the tiny CLIP pretrained on the shapes world (no download).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import peft
import torch
import torch.nn as nn
import torch.nn.functional as F

from visadapt.adapters.methods import peft_config, read_peft_config

from .config import DEMO_BACKBONE, IncrementalConfig

# Parameters that sit before the first block (they join the controlled fine-tuning only with ft_start_layer = -1).
INPUT_SIDE = ("patch_embed", "pos_embed", "cls_token", "reg_token", "conv1", "class_embedding",
              "positional_embedding", "ln_pre", "norm_pre")


@dataclass
class Backbone:
    """A pretrained image encoder: ``trunk`` maps (N, 3, S, S) to (N, D); ``pooler`` (optional) is the dense layer
    of the pooled feature tanh(pooler(trunk(x))); blocks are ``<blocks>.<i>``; ``kind`` is timm or open_clip."""

    trunk: nn.Module
    pooler: Optional[nn.Linear]
    dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    blocks: str
    num_blocks: int
    kind: str


class Encoder(nn.Module):
    """(N, 3, S, S) → (N, D): the trunk's feature, through tanh(pooler) when there is one."""

    def __init__(self, trunk: nn.Module, pooler: Optional[nn.Linear]) -> None:
        super().__init__()
        self.trunk, self.pooler = trunk, pooler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        return torch.tanh(self.pooler(f)) if self.pooler is not None else f


# ------------------------------------------------------------------------------------------------- backbones
def hf_vit_to_timm(state: dict[str, torch.Tensor], depth: int) -> tuple[dict[str, torch.Tensor], dict]:
    """HF ``ViTModel`` weights → (timm ``VisionTransformer`` state dict, pooler state dict). q, k, v are stacked
    into timm's fused ``qkv`` (rows q, k, v)."""
    s = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in state.items()}
    out = {"cls_token": s["embeddings.cls_token"], "pos_embed": s["embeddings.position_embeddings"],
           "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"]}
    for i in range(depth):
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        for kind in ("weight", "bias"):
            out[t + f"attn.qkv.{kind}"] = torch.cat([s[att + f"{p}.{kind}"] for p in ("query", "key", "value")])
            out[t + f"attn.proj.{kind}"] = s[h + f"attention.output.dense.{kind}"]
            out[t + f"norm1.{kind}"] = s[h + f"layernorm_before.{kind}"]
            out[t + f"norm2.{kind}"] = s[h + f"layernorm_after.{kind}"]
            out[t + f"mlp.fc1.{kind}"] = s[h + f"intermediate.dense.{kind}"]
            out[t + f"mlp.fc2.{kind}"] = s[h + f"output.dense.{kind}"]
    pooler = {k[len("pooler.dense."):]: v for k, v in s.items() if k.startswith("pooler.dense.")}
    return out, pooler


def _hf_files(source: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, weights) of a HF ViT checkpoint folder or hub id."""
    from visadapt.utils import load_safetensors, torch_load_weights

    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import hf_hub_download

            config = hf_hub_download(source, "config.json")
            try:
                weights = hf_hub_download(source, "model.safetensors")
            except Exception:  # older repositories ship only the PyTorch file
                weights = hf_hub_download(source, "pytorch_model.bin")
        except Exception as err:
            raise ValueError(f"--backbone hf-vit:{source}: could not get it from the hub ({type(err).__name__}). "
                             "Download it once with a network, or pass a local folder holding config.json and "
                             "model.safetensors.") from err
        folder, files = Path(config).parent, [Path(weights)]
    else:
        files = [folder / "model.safetensors", folder / "pytorch_model.bin"]
    weights = next((f for f in files if f.is_file()), None)
    if not (folder / "config.json").is_file() or weights is None:
        raise FileNotFoundError(f"{folder}: a HF ViT folder needs config.json and model.safetensors (or "
                                "pytorch_model.bin).")
    state = load_safetensors(weights) if weights.suffix == ".safetensors" else torch_load_weights(weights)
    return json.loads((folder / "config.json").read_text()), state


def load_hf_vit(source: str, pooler: bool = True) -> Backbone:
    """A HF ViT checkpoint as a timm ViT (LayerNorm eps, GELU and token pooling as HF) plus its pooler."""
    import timm.models.vision_transformer as vt

    config, state = _hf_files(source)
    d, depth = config["hidden_size"], config["num_hidden_layers"]
    trunk = vt.VisionTransformer(img_size=config.get("image_size", 224), patch_size=config.get("patch_size", 16),
                                 embed_dim=d, depth=depth, num_heads=config["num_attention_heads"],
                                 mlp_ratio=config["intermediate_size"] / d, qkv_bias=config.get("qkv_bias", True),
                                 num_classes=0, global_pool="token",
                                 norm_layer=partial(nn.LayerNorm, eps=config.get("layer_norm_eps", 1e-12)))
    timm_state, pooler_state = hf_vit_to_timm(state, depth)
    trunk.load_state_dict(timm_state)
    head = None
    if pooler:
        if not pooler_state:
            raise ValueError(f"hf-vit:{source} has no pooler weights; pass --no-pooler to embed LN(cls).")
        head = nn.Linear(d, d)
        head.load_state_dict(pooler_state)
    return Backbone(trunk, head, d, config.get("image_size", 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "blocks",
                    depth, "timm")


def load_timm(name: str, pretrained: Optional[str]) -> Backbone:
    import timm

    kwargs: dict = {"num_classes": 0, "pretrained": pretrained != "random"}
    if pretrained and pretrained != "random":
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"--pretrained {pretrained}: no such weights file for timm:{name}.")
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained}
    try:
        trunk = timm.create_model(name, **kwargs)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"timm:{name}: could not load it ({type(err).__name__}). Download the weights once with a "
                         "network, or pass --pretrained FILE.") from err
    cfg = trunk.pretrained_cfg
    return Backbone(trunk, None, trunk.num_features, cfg.get("input_size", (3, 224, 224))[-1],
                    tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3)), "blocks",
                    len(trunk.blocks), "timm")


def load_open_clip(name: str, pretrained: Optional[str]) -> Backbone:
    import open_clip

    try:
        visual = open_clip.create_model(name, pretrained=pretrained or None, weights_only=True).visual
    except (RuntimeError, OSError) as err:
        raise ValueError(f"open_clip:{name} --pretrained {pretrained}: could not load it ({type(err).__name__}). "
                         "Download the weights once with a network, or pass a local file.") from err
    cfg = visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return Backbone(visual, None, visual.output_dim, size, tuple(cfg["mean"]), tuple(cfg["std"]),
                    "transformer.resblocks", len(visual.transformer.resblocks), "open_clip")


def load_backbone(cfg: IncrementalConfig) -> Backbone:
    """The backbone ``--backbone`` names (see the module docstring)."""
    spec = cfg.backbone
    if spec == DEMO_BACKBONE:
        from visadapt.utils.worlds.models import DEMO_CLIP_DIR

        return load_open_clip(f"local-dir:{DEMO_CLIP_DIR}", None)
    kind, _, name = spec.partition(":")
    if kind == "hf-vit" and name:
        return load_hf_vit(name, cfg.pooler)
    if kind == "timm" and name:
        return load_timm(name, cfg.pretrained)
    if kind == "open_clip" and name:
        return load_open_clip(name, cfg.pretrained)
    raise ValueError(f"--backbone {spec!r}: expected hf-vit:HUB_ID_OR_DIR, timm:NAME, open_clip:NAME or "
                     f"{DEMO_BACKBONE}.")


# -------------------------------------------------------------------------------------------------- adapters
def block_indices(adapt_blocks: int, num_blocks: int) -> list[int]:
    """n >= 0 → blocks 0..n-1; n < 0 → blocks |n|..last (the official ``--adapt_blocks``)."""
    return list(range(min(adapt_blocks, num_blocks))) if adapt_blocks >= 0 else list(range(-adapt_blocks, num_blocks))


def adapter_config(cfg: IncrementalConfig, backbone: Backbone) -> Optional[peft.PeftConfig]:
    """The student's adapter: ``--method`` (:mod:`visadapt.adapters.methods`; LoRA by default) on q and v of the
    chosen blocks, or any peft config from ``--peft-config``; None for the prototypes recipe."""
    if cfg.recipe == "prototypes":
        return None
    if cfg.peft_config:
        return read_peft_config(cfg.peft_config)
    blocks = block_indices(cfg.adapt_blocks, backbone.num_blocks)
    if not blocks:
        raise ValueError(f"--adapt-blocks {cfg.adapt_blocks} selects no block of {backbone.num_blocks}.")
    site = r"\.attn\.qkv" if backbone.kind == "timm" else r"\.attn"
    target = backbone.blocks.replace(".", r"\.") + r"\.(" + "|".join(map(str, blocks)) + ")" + site
    return peft_config(cfg.method, cfg.r, cfg.lora_alpha, cfg.lora_dropout, target, attention_parts=["q", "v"])


def shared_name(student_name: str) -> str:
    """A student parameter's name in the teacher (peft's wrapper prefixes removed)."""
    return student_name.replace("base_model.model.", "").replace(".base_layer", "")


class CoactModel(nn.Module):
    """Student (``student`` encoder + ``classifier`` rows, C × D, no bias) and ``teacher`` (no adapter, no grad).

    ``forward(x)`` gives the student's logits (N, C). The teacher starts equal to the student's shared weights.
    """

    def __init__(self, backbone: Backbone, num_classes: int, adapter: Optional[peft.PeftConfig],
                 classifier: str = "dot", cosine_scale: float = 16.0) -> None:
        super().__init__()
        self.blocks, self.kind, self.num_blocks = backbone.blocks, backbone.kind, backbone.num_blocks
        self.teacher = Encoder(copy.deepcopy(backbone.trunk), copy.deepcopy(backbone.pooler)).requires_grad_(False)
        trunk = copy.deepcopy(backbone.trunk)
        if adapter is not None:
            trunk = peft.get_peft_model(trunk, adapter)
        self.student = Encoder(trunk, copy.deepcopy(backbone.pooler))
        # peft leaves exactly the adapter's weights trainable in the trunk it wraps
        self.adapter_names = sorted(f"student.trunk.{n}" for n, p in trunk.named_parameters()
                                    if p.requires_grad and adapter is not None)
        self.classifier = nn.Linear(backbone.dim, num_classes, bias=False)
        self.classifier_kind, self.cosine_scale = classifier, cosine_scale
        teacher = {n for n, _ in self.teacher.named_parameters()}
        self.shared = {f"student.{n}": f"teacher.{shared_name(n)}" for n, _ in self.student.named_parameters()
                       if f"student.{n}" not in self.adapter_names}
        missing = teacher - {t[len("teacher."):] for t in self.shared.values()}
        if missing:
            raise ValueError(f"Teacher weights without a student counterpart: {sorted(missing)[:3]}.")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) → (N, D) student embedding."""
        return self.student(x)

    def logits(self, features: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, D) → (N, C): dot products with the rows (or scaled cosines)."""
        w = self.classifier.weight if weight is None else weight
        if self.classifier_kind == "cosine":
            return self.cosine_scale * F.normalize(features, dim=-1) @ F.normalize(w, dim=-1).T
        return features @ w.T

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """(N, 3, S, S) → logits (N, C), or (features (N, D), logits) with ``return_features``."""
        features = self.embed(x)
        logits = self.logits(features)
        return (features, logits) if return_features else logits

    def stage2_names(self, ft_start_layer: int) -> list[str]:
        """Shared student weights of controlled fine-tuning: blocks >= ℓ and everything after the blocks (final
        norm, projection, pooler); ℓ = -1: the whole backbone; ℓ past the last block: none."""
        if ft_start_layer < 0:
            return list(self.shared)
        if ft_start_layer >= self.num_blocks:
            return []
        chosen = []
        for name in self.shared:
            bare = shared_name(name).removeprefix("student.trunk.")
            if bare.startswith(self.blocks + "."):
                if int(bare[len(self.blocks) + 1:].split(".")[0]) >= ft_start_layer:
                    chosen.append(name)
            elif not bare.split(".")[0].startswith(INPUT_SIDE):
                chosen.append(name)
        return chosen

    def tracked_names(self, ft_start_layer: int) -> list[str]:
        """What can change in a run: adapter, classifier, the controlled-FT weights and their teacher copies."""
        stage2 = self.stage2_names(ft_start_layer)
        return sorted({*self.adapter_names, "classifier.weight", *stage2, *(self.shared[n] for n in stage2)})

    def tracked_state(self, ft_start_layer: int) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.tracked_names(ft_start_layer)}

    def load_tracked(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise ValueError(f"Saved weights do not fit this model (unknown {unknown[:3]}); same --backbone and "
                             "adapter options are needed.")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
