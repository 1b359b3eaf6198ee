"""LoRAT: a one-stream DINOv2 tracker with LoRA (Lin et al., "Tracking Meets LoRA: Faster Training, Larger Model,
Stronger Performance", ECCV 2024, arXiv 2403.05231; official code github.com/LitingLin/LoRAT, ``trackit``).

The module follows ``trackit/models/methods/LoRAT/lorat.py`` (``LoRAT_DINOv2``) and keeps its parameter names, so
an official state dict maps onto it almost one to one (see :mod:`visadapt.tracking.checkpoint`):

- ``patch_embed``, ``blocks``, ``norm``: taken from a timm DINOv2 ViT (no CLS / register / mask token is used);
- ``pos_embed`` (1, Hx·Wx, C): the pretrained 37×37 table resized bicubically to the search grid, shared by both
  inputs: the template takes its top-left Hz×Wz window ("decoupled" position embedding);
- ``token_type_embed`` (3, C): 0 template background, 1 template foreground, 2 search region;
- ``head``: the MLP-only anchor-free head (``modules/head/mlp.py``).

LoRA (r = 64, alpha = 64 on q, k, v, proj, fc1, fc2 of every block) goes through peft: by default a visadapt
``BlockLoraConfig(n_blocks=1)`` (plain LoRA with separate q/k/v pairs on timm's fused ``qkv``, as the official
``LinearWithLoRA_QKVFused``), and any visadapt or peft config can replace it (:func:`lorat_adapter_config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import peft
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.nn.init import trunc_normal_

from visadapt.adapters import LowRankLayer
from visadapt.adapters.methods import peft_config

PATCH = 14
TOKEN_TEMPLATE_BG, TOKEN_TEMPLATE_FG, TOKEN_SEARCH = 0, 1, 2
LORA_TARGETS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


@dataclass(frozen=True)
class LoRATVariant:
    """One row of the paper's variant table (official ``config/LoRAT/*``)."""

    timm_name: str  # timm architecture; pretrained weights are ``<timm_name>.lvd142m``
    template_px: int
    search_px: int
    search_area_factor: float
    drop_path: float
    template_area_factor: float = 2.0

    @property
    def z_grid(self) -> tuple[int, int]:
        return (self.template_px // PATCH,) * 2

    @property
    def x_grid(self) -> tuple[int, int]:
        return (self.search_px // PATCH,) * 2


VARIANTS: dict[str, LoRATVariant] = {
    "B-224": LoRATVariant("vit_base_patch14_dinov2", 112, 224, 4.0, 0.0),
    "B-378": LoRATVariant("vit_base_patch14_dinov2", 196, 378, 5.0, 0.0),
    "L-224": LoRATVariant("vit_large_patch14_dinov2", 112, 224, 4.0, 0.1),
    "L-378": LoRATVariant("vit_large_patch14_dinov2", 196, 378, 5.0, 0.1),
    "g-224": LoRATVariant("vit_giant_patch14_dinov2", 112, 224, 4.0, 0.4),
    "g-378": LoRATVariant("vit_giant_patch14_dinov2", 196, 378, 5.0, 0.4),
}


def get_variant(name: str) -> LoRATVariant:
    if name not in VARIANTS:
        raise ValueError(f"Unknown LoRAT variant {name!r}; choose one of {', '.join(VARIANTS)}.")
    return VARIANTS[name]


def reference_points(grid: tuple[int, int]) -> torch.Tensor:
    """Cell centres (H, W, 2) as normalised (x, y): ((j + 0.5) / W, (i + 0.5) / H) (official
    ``get_anchor_free_reference_points``)."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1)


class Mlp(nn.Module):
    """``layers``: Linear(C, C) → GELU → Linear(C, C) → GELU → Linear(C, k) (official head ``Mlp``)."""

    def __init__(self, dim: int, out_features: int, num_layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(dim, out_features if i == num_layers - 1 else dim) for i in range(num_layers))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i != len(self.layers) - 1:
                x = self.act(x)
        return x


class MlpAnchorFreeHead(nn.Module):
    """Per-token score and l/t/r/b box (§7 of the paper's method; official ``MlpAnchorFreeHead``)."""

    def __init__(self, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.cls_mlp = Mlp(dim, 1)
        self.reg_mlp = Mlp(dim, 4)
        self.grid = grid
        self.register_buffer("bbox_offset", reference_points(grid), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, H·W, C) → ``score_map`` logits (B, H, W) fp32 and ``boxes`` normalised xyxy (B, H, W, 4) fp32."""
        h, w = self.grid
        score = self.cls_mlp(x).float().view(-1, h, w)
        ltrb = self.reg_mlp(x).float().view(-1, h, w, 4).sigmoid()
        offset = self.bbox_offset.to(ltrb.device).unsqueeze(0)
        boxes = torch.cat((offset - ltrb[..., :2], offset + ltrb[..., 2:]), dim=-1)
        return {"score_map": score, "boxes": boxes}


POS_EMBED_MODES = ("resize", "window")


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], mode: str = "resize") -> torch.Tensor:
    """(1, N, C) square table without prefix tokens → (1, H·W, C).

    ``resize`` (default; the native DINOv2 path that produced the paper's numbers): bicubic, align_corners=False,
    explicit output size, no +0.1 offset. ``window``: the official timm path (``timm_vit/lorat.py``, June 2025):
    the top-left H×W window of the table without interpolation, resizing only when the table is smaller.
    """
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"pos_embed_mode must be one of {POS_EMBED_MODES}, got {mode!r}.")
    n, c = pos.shape[1], pos.shape[2]
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"Position table with {n} entries is not a square grid; pass it without prefix tokens.")
    if (side, side) == tuple(grid):
        return pos.clone()
    if mode == "window" and side >= grid[0] and side >= grid[1]:
        return pos.reshape(1, side, side, c)[:, :grid[0], :grid[1]].reshape(1, grid[0] * grid[1], c).clone()
    table = pos.reshape(1, side, side, c).permute(0, 3, 1, 2)
    table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c)


class LoRAT(nn.Module):
    """One-stream tracker: template tokens then search tokens through every ViT block, head on search tokens.

    ``vit`` is a timm ``VisionTransformer`` with patch size 14 and one class token (DINOv2 layout); only its
    ``patch_embed``, ``blocks`` and ``norm`` are kept. ``pos_embed_mode``: see :func:`resize_pos_embed`.
    """

    def __init__(self, vit: nn.Module, z_grid: tuple[int, int], x_grid: tuple[int, int],
                 drop_path: Optional[float] = None, pos_embed_mode: str = "resize") -> None:
        super().__init__()
        if z_grid[0] > x_grid[0] or z_grid[1] > x_grid[1]:
            raise ValueError(f"The template grid {z_grid} must fit in the search grid {x_grid}.")
        self.z_grid, self.x_grid = tuple(z_grid), tuple(x_grid)
        self.patch_embed, self.blocks, self.norm = vit.patch_embed, vit.blocks, vit.norm
        self.embed_dim = vit.embed_dim
        prefix = getattr(vit, "num_prefix_tokens", 1)
        self.pos_embed = nn.Parameter(resize_pos_embed(vit.pos_embed.data[:, prefix:], self.x_grid, pos_embed_mode),
                                      requires_grad=False)
        self.token_type_embed = nn.Parameter(torch.empty(3, self.embed_dim, device=self.pos_embed.device))
        trunc_normal_(self.token_type_embed, std=0.02)
        self.head = MlpAnchorFreeHead(self.embed_dim, self.x_grid)
        if drop_path is not None:
            set_uniform_drop_path(self, drop_path)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.proj.kernel_size[0]

    def _tokens(self, img: torch.Tensor) -> torch.Tensor:
        return self.patch_embed.proj(img).flatten(2).transpose(1, 2)  # (B, H·W, C), no size check

    def z_tokens(self, z: torch.Tensor, z_mask: torch.Tensor) -> torch.Tensor:
        """z (B, 3, 14Hz, 14Wz), z_mask (B, Hz, Wz) int64 in {0, 1} → (B, Hz·Wz, C)."""
        hz, wz = self.z_grid
        hx, wx = self.x_grid
        pos = self.pos_embed.view(1, hx, wx, -1)[:, :hz, :wz].reshape(1, hz * wz, -1)
        # A one-hot product instead of indexing: the same values, and a backward without the atomic adds of indexed
        # accumulation, whose order (so the gradient's last bits) varied between runs on several CPU threads.
        one_hot = F.one_hot(z_mask.flatten(1).long(), len(self.token_type_embed)).to(self.token_type_embed.dtype)
        return self._tokens(z) + pos + one_hot @ self.token_type_embed

    def x_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, 14Hx, 14Wx) → (B, Hx·Wx, C)."""
        return self._tokens(x) + self.pos_embed + self.token_type_embed[TOKEN_SEARCH].view(1, 1, -1)

    def features(self, z: torch.Tensor, x: torch.Tensor, z_mask: torch.Tensor) -> torch.Tensor:
        """Search-token features (B, Hx·Wx, C) after the fused blocks and the final norm."""
        tz = self.z_tokens(z, z_mask)
        h = torch.cat((tz, self.x_tokens(x)), dim=1)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)[:, tz.shape[1]:]

    def forward(self, z: torch.Tensor, x: torch.Tensor, z_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """→ {``score_map`` (B, Hx, Wx) logits, ``boxes`` (B, Hx, Wx, 4) normalised xyxy in the search crop}."""
        return self.head(self.features(z, x, z_mask))


def set_uniform_drop_path(model: nn.Module, rate: float) -> None:
    """Same drop-path rate in every block (DINOv2 ``drop_path_uniform=True``; timm spreads it linearly).

    timm's per-sample ``DropPath`` is used; DINOv2's "batch-subset residual" (rate > 0.1) drops the same expected
    share of samples but draws them as one subset per batch, so training noise differs slightly.
    """
    from timm.layers import DropPath

    for block in model.blocks:
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


def build_vit(timm_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm DINOv2 ViT; ``pretrained=True`` loads ``<timm_name>.lvd142m`` from the hub (never in tests)."""
    import timm

    name = f"{timm_name}.lvd142m" if pretrained and "." not in timm_name else timm_name
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


def lorat_adapter_config(method: str = "lora", r: int = 64, lora_alpha: float = 64.0, lora_dropout: float = 0.0,
                         **kwargs: Any) -> peft.PeftConfig:
    """The official LoRA sites (q, k, v, proj, fc1, fc2 of every block) for an adapter method
    (:mod:`visadapt.adapters.methods`).

    ``lora``: plain LoRA, separate q/k/v pairs (``BlockLoraConfig(n_blocks=1, attention_parts=q,k,v)``);
    ``block-lora`` / ``comp-lora``: the visadapt methods on the same sites (extra ``kwargs``, e.g. ``k=2``, are
    their config fields). Any other peft config can be passed to :func:`add_adapter` instead.
    """
    return peft_config(method, r, lora_alpha, lora_dropout, LORA_TARGETS, attention_parts=["q", "k", "v"], **kwargs)


def _adapter_factors(model: nn.Module):
    """Every (A, B) parameter pair of the injected adapters (visadapt factors and peft LoRA)."""
    for module in model.modules():
        if isinstance(module, LowRankLayer):
            for parts in module.adapter_factors.values():
                for factors in parts.values():
                    yield factors.lora_A, factors.lora_B
        elif isinstance(module, BaseTunerLayer) and hasattr(module, "lora_A"):
            for name in module.lora_A:
                yield module.lora_A[name].weight, module.lora_B[name].weight


def add_adapter(model: LoRAT, config: Optional[peft.PeftConfig] = None, init: str = "bert") -> LoRAT:
    """Freeze the backbone and inject ``config`` (default: the official LoRA, :func:`lorat_adapter_config`).

    ``init="bert"`` (official default) draws both A and B from trunc-normal(std 0.02), so the initial delta is
    small but non-zero; ``init="lora"`` keeps the method's own init (zero B for LoRA). Trainable afterwards:
    adapters, ``token_type_embed``, ``head``.
    """
    if init not in ("bert", "lora"):
        raise ValueError(f"init must be 'bert' (official) or 'lora' (zero B), got {init!r}.")
    config = config or lorat_adapter_config()
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)
    if init == "bert":
        with torch.no_grad():
            for lora_a, lora_b in _adapter_factors(model):
                trunc_normal_(lora_a, std=0.02)
                trunc_normal_(lora_b, std=0.02)
    model.token_type_embed.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


def merge(model: LoRAT) -> LoRAT:
    """Fold every adapter into its frozen weight and put the plain timm layers back (in place; returns model).

    The result is the plain ViT blocks + head the official code runs at inference (``merge_on_eval``).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    return model


def build_lorat(variant: str = "B-224", pretrained: bool = False, adapter: Optional[peft.PeftConfig] = None,
                lora: bool = True, init: str = "bert", pos_embed_mode: str = "resize", **vit_kwargs: Any) -> LoRAT:
    """A paper variant (``B-224``, ``B-378``, ``L-224``, ``L-378``, ``g-224``, ``g-378``).

    ``lora=False`` gives the plain (merged-layout) model, e.g. to load an official checkpoint for inference.
    ``vit_kwargs`` go to ``timm.create_model`` (e.g. ``embed_dim``, ``depth`` for a tiny test model).
    Build under ``torch.device('meta')`` to count parameters without memory.
    """
    spec = get_variant(variant)
    vit = build_vit(spec.timm_name, pretrained=pretrained, **vit_kwargs)
    model = LoRAT(vit, spec.z_grid, spec.x_grid, drop_path=spec.drop_path, pos_embed_mode=pos_embed_mode)
    return add_adapter(model, adapter, init) if lora else model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{``lora``, ``head``, ``trainable``, ``total``} parameter counts."""
    lora = sum(a.numel() + b.numel() for a, b in _adapter_factors(model))
    head = sum(p.numel() for p in model.head.parameters())
    return {"lora": lora, "head": head, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """AdamW groups of the trainable parameters as the official optimiser builds them: no weight decay for 1-D
    parameters (biases, norms) and for names containing ``embed`` (the token-type table); decay for the rest
    (LoRA A/B, head weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or "embed" in name or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
