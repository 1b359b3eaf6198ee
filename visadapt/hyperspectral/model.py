"""LoLA-SpecViT as a timm model (Zidi et al., arXiv 2506.17759; ``improved_GCPE.py`` of the official code,
FadiZidiDz/LoLA-SpecViT-Model).

``import visadapt.hyperspectral`` registers ``lola_specvit_base`` (the release's configuration, 254.6 M parameters)
and smaller sizes down to ``lola_specvit_tiny``::

    model = timm.create_model("lola_specvit_base", num_classes=9)            # input [B, 15 PCA bands, 15, 15]
    model = timm.create_model("lola_specvit_tiny", in_chans=10, img_size=9, num_classes=6)

Input layout is ``[B, C_pca, H, W]`` (the paper's; the 3-D front-end's depth axis is spectral).
``official_axis_permute=True`` reproduces the release's ``[B, H, W, C]`` scramble for score-parity runs (§2.6).
Switches for the ablations: ``lora_placement`` (none | attn | attn_mlp | all), ``lora_gate_residual`` (gated
"enhanced" LoRA vs plain LoRA at the block sites), ``official_init`` (the release's global trunc-normal re-draw,
which leaves LoRA B and R non-zero, vs zero-initialised B and R), and :func:`set_trainable` for the freezing regime.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, SwiGLU, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, create_model, generate_default_cfgs, register_model

from .lora import PLACEMENTS, lora_layers, make_linear, placement_sites

__all__ = ["LoLASpecViT", "set_trainable", "FREEZE_REGIMES", "count_parameters", "build_model"]

FREEZE_REGIMES = ("official", "standard", "full")


class BandDropout(nn.Module):
    """Drops whole (channel, depth-slice) planes of a 5-D map, or whole channels of a 4-D one; identity at eval."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = x.shape[:3] + (1, 1) if x.ndim == 5 else x.shape[:2] + (1, 1)
        mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * mask / (1 - self.p)


class SqueezeExcite(nn.Module):
    """s = sigmoid(W2 ReLU(W1 mean(x))), x ← x·s; no biases; works on 4-D and 5-D maps."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Linear(channels, hidden, bias=False)
        self.expand = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=tuple(range(2, x.ndim)))
        s = torch.sigmoid(self.expand(F.relu(self.reduce(z))))
        return x * s.view(*s.shape, *([1] * (x.ndim - 2)))


class SpectralFrontEnd(nn.Module):
    """Three 3-D convs (kernels (7,3,3), (5,3,3), (3,3,3), "same" padding) with BN3d + SiLU, BandDropout, SE-3D,
    then the mean over the spectral depth: [B, C_pca, H, W] → [B, channels[-1], H, W]."""

    def __init__(self, channels: Sequence[int] = (32, 64, 96), band_drop: float = 0.1, se_reduction: int = 16) -> None:
        super().__init__()
        layers, c_in = [], 1
        for c_out, k in zip(channels, (7, 5, 3)):
            layers += [nn.Conv3d(c_in, c_out, (k, 3, 3), padding=(k // 2, 1, 1)), nn.BatchNorm3d(c_out), nn.SiLU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.band_drop = BandDropout(band_drop)
        self.se = SqueezeExcite(c_in, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.band_drop(self.convs(x.unsqueeze(1))))
        return x.mean(dim=2)


class PatchEmbed(nn.Module):
    """Conv2d(k=4, s=2, p=1) + BN + SiLU, to channels-last tokens [B, h, w, C]."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, 4, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(embed_dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x))).permute(0, 2, 3, 1)


class ReduceSize(nn.Module):
    """GCViT-like downsampler: DWConv3×3 → SiLU → SE-2D → Conv1×1 (C→2C) → BN → Conv3×3 stride 2 (§3)."""

    def __init__(self, dim: int, se_reduction: int = 16) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.act = nn.SiLU()
        self.se = SqueezeExcite(dim, se_reduction)
        self.pwconv = nn.Conv2d(dim, 2 * dim, 1, bias=False)
        self.norm = nn.BatchNorm2d(2 * dim)
        self.reduction = nn.Conv2d(2 * dim, 2 * dim, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C] → [B, ⌈H/2⌉, ⌈W/2⌉, 2C]
        x = x.permute(0, 3, 1, 2)
        x = self.reduction(self.norm(self.pwconv(self.se(self.act(self.dwconv(x))))))
        return x.permute(0, 2, 3, 1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w×w windows with a Swin-style relative position bias.

    As in the release, maps smaller than the window are zero-padded to it and the pad tokens are not masked (§3).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, lora: Optional[str], r: int, lora_alpha: float
                 ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads.")
        self.num_heads, self.window_size, self.scale = num_heads, window_size, (dim // num_heads) ** -0.5
        self.qkv = make_linear(dim, 3 * dim, lora, r, lora_alpha)
        self.proj = make_linear(dim, dim, lora, r, lora_alpha)
        w = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * w - 1) + rel[..., 1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        b, h, w_, c = x.shape
        w = self.window_size
        ph, pw = (-h) % w, (-w_) % w
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w_ + pw
        win = x.view(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        n = w * w
        qkv = self.qkv(win).reshape(-1, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias.permute(2, 0, 1).to(x.dtype),
                                             scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(-1, n, c))
        out = out.view(b, hp // w, wp // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return out[:, :h, :w_]


class Mlp(nn.Module):
    """LoRA fc1 (C→4C) → SwiGLU(4C→4C→4C) → LoRA fc2 (4C→C); the SwiGLU is timm's and carries no LoRA."""

    def __init__(self, dim: int, hidden: int, lora: Optional[str], r: int, lora_alpha: float) -> None:
        super().__init__()
        self.fc1 = make_linear(dim, hidden, lora, r, lora_alpha)
        self.swiglu = SwiGLU(hidden, hidden, hidden)
        self.fc2 = make_linear(hidden, dim, lora, r, lora_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.swiglu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm window-attention block with the SwiGLU MLP and stochastic depth."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, drop_path: float,
                 attn_lora: Optional[str], mlp_lora: Optional[str], r: int, lora_alpha: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, attn_lora, r, lora_alpha)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_lora, r, lora_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    def __init__(self, blocks: list[Block], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class LoLASpecViT(nn.Module):
    """Local-attention SwiGLU ViT with LoRA for hyperspectral patches (Zidi et al. 2025); see the module docstring.

    ``forward(x)`` takes ``[B, in_chans, H, W]`` patches (per-sample z-scored PCA bands) and returns ``[B, K]``
    logits; ``forward_features`` returns the normed tokens ``[B, N, num_features]``.
    """

    def __init__(self, in_chans: int = 15, img_size: Union[int, tuple[int, int]] = 15, num_classes: int = 16,
                 embed_dim: int = 96, depths: Sequence[int] = (3, 4, 19), num_heads: Sequence[int] = (4, 8, 16),
                 window_size: Union[int, Sequence[int]] = (7, 7, 7), mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.2, pos_drop: float = 0.1, band_drop: float = 0.1, se_reduction: int = 16,
                 conv_channels: Sequence[int] = (32, 64, 96), r: int = 16, lora_alpha: float = 32.0,
                 lora_gate_residual: bool = True, lora_placement: str = "all", official_init: bool = True,
                 official_axis_permute: bool = False, cycle_lora_scale: bool = False, **kwargs) -> None:
        super().__init__()
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        if "lora_r" in kwargs:  # a pipeline.json written before peft's names were adopted
            raise TypeError("LoLASpecViT: lora_r was renamed r (peft's name); rename it in the model_kwargs of "
                            "the pipeline.json that passes it.")
        if kwargs:
            raise TypeError(f"LoLASpecViT got unexpected arguments {sorted(kwargs)}.")
        if lora_placement not in PLACEMENTS:
            raise ValueError(f"lora_placement must be one of {PLACEMENTS}, got {lora_placement!r}.")
        n_stages = len(depths)
        if len(num_heads) != n_stages:
            raise ValueError("depths and num_heads must have one entry per stage.")
        windows = [window_size] * n_stages if isinstance(window_size, int) else list(window_size)
        img_size = to_2tuple(img_size)
        if official_axis_permute and not (img_size[0] == img_size[1] == in_chans):
            raise ValueError("official_axis_permute only makes sense when H = W = in_chans (the release's 15×15×15).")
        self.in_chans, self.img_size, self.num_classes = in_chans, img_size, num_classes
        self.official_axis_permute, self.cycle_lora_scale = official_axis_permute, cycle_lora_scale
        self.lora_placement, self.lora_gate_residual = lora_placement, lora_gate_residual
        self.r, self.lora_alpha = r, lora_alpha
        sites = placement_sites(lora_placement)
        block_lora = "gated" if lora_gate_residual else "plain"
        attn_lora = block_lora if "attn" in sites else None
        mlp_lora = block_lora if "mlp" in sites else None
        self._head_lora = "plain" if "head" in sites else None

        self.spectral = SpectralFrontEnd(conv_channels, band_drop, se_reduction)
        self.patch_embed = PatchEmbed(conv_channels[-1], embed_dim)
        grid = tuple((s + 2 - 4) // 2 + 1 for s in img_size)  # from the actual patch size (§3)
        self.grid_size = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0], grid[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, dim, k = [], embed_dim, 0
        for i, (depth, heads, win) in enumerate(zip(depths, num_heads, windows)):
            blocks = [Block(dim, heads, win, mlp_ratio, rates[k + j], attn_lora, mlp_lora, r, lora_alpha)
                      for j in range(depth)]
            k += depth
            last = i == n_stages - 1
            stages.append(Stage(blocks, None if last else ReduceSize(dim, se_reduction)))
            dim = dim if last else 2 * dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dim
        self.norm = nn.LayerNorm(dim)
        self.head = self._make_head(num_classes)
        self.official_init = official_init
        self.apply(self._init_weights)
        trunc_normal_(self.pos_embed, std=0.02)
        if not official_init:
            for layer in lora_layers(self):
                layer.reset_lora(zero=True)

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return make_linear(self.num_features, num_classes, self._head_lora, self.r, self.lora_alpha)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The release's model-level init: every nn.Linear (LoRA A, B, G, R included) ~ trunc-normal(0, 0.02),
        zero biases; LN 1/0; relative-position tables trunc-normal(0.02); convs keep PyTorch's default."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, WindowAttention):
            trunc_normal_(m.relative_position_bias_table, std=0.02)

    # ------------------------------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} | {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        if isinstance(self.head, nn.Module):
            self.head.apply(self._init_weights)
            if not self.official_init:
                for layer in lora_layers(self.head):
                    layer.reset_lora(zero=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected patches [B, {self.in_chans}, H, W], got {tuple(x.shape)}.")
        if self.official_axis_permute:
            x = x.permute(0, 2, 3, 1)  # the release's [B, H, W, C] (§2.6)
        x = self.patch_embed(self.spectral(x))
        if x.shape[1:3] != self.pos_embed.shape[1:3]:
            raise ValueError(f"patch size {tuple(self.img_size)} gives a {tuple(self.pos_embed.shape[1:3])} token "
                             f"grid; this input gives {tuple(x.shape[1:3])}. Build the model with img_size = the "
                             "patch size.")
        x = self.pos_drop(x + self.pos_embed)
        x = self.stages(x)
        return self.norm(x.flatten(1, 2))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------------------- LoRA API
    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if "lora_" in n]

    def freeze_all_but_lora(self) -> None:
        set_trainable(self, "official")

    def update_lora_scale(self, factor: float) -> None:
        """Multiply every LoRA scale s = α/r by ``factor`` (the ``cycle_lora_scale`` option; 1 = the release)."""
        for layer in lora_layers(self):
            layer.lora_factor.fill_(float(factor))


def set_trainable(model: nn.Module, regime: str) -> None:
    """Freezing regimes (§4):

    - ``official`` (the release's ``freeze_non_lora=True``): only LoRA A, B, G, R train; the randomly initialised
      backbone (convs, norms, SE, embeddings, SwiGLU, downsamplers, every W0/b0) stays frozen. BN running statistics
      still update in train mode.
    - ``standard`` (the release's ablation script): only the base W0/b0 of the LoRA-wrapped linears are frozen;
      everything else trains.
    - ``full``: every parameter trains.
    """
    if regime not in FREEZE_REGIMES:
        raise ValueError(f"freeze regime must be one of {FREEZE_REGIMES}, got {regime!r}.")
    lora_bases = {id(p) for layer in lora_layers(model) for p in layer.base.parameters()}
    for name, p in model.named_parameters():
        if regime == "official":
            p.requires_grad_("lora_" in name)
        elif regime == "standard":
            p.requires_grad_(id(p) not in lora_bases)
        else:
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- timm registry
def _cfg(**kw) -> dict:
    return {"url": "", "num_classes": 16, "input_size": (15, 15, 15), "fixed_input_size": True,
            "mean": (0.0,) * 15, "std": (1.0,) * 15, "first_conv": "spectral.convs.0", "classifier": "head",
            "license": "apache-2.0", **kw}


default_cfgs = generate_default_cfgs({  # the variable name is read by timm's register_model
    "lola_specvit_base.untrained": _cfg(),
    "lola_specvit_small.untrained": _cfg(),
    "lola_specvit_tiny.untrained": _cfg(),
})

MODEL_ARGS = {
    # The release (improved_GCPE.py): 254.6 M parameters, 73.6 M trainable under official freezing.
    "lola_specvit_base": dict(embed_dim=96, depths=(3, 4, 19), num_heads=(4, 8, 16), conv_channels=(32, 64, 96)),
    "lola_specvit_small": dict(embed_dim=64, depths=(2, 2, 6), num_heads=(2, 4, 8), conv_channels=(16, 32, 64)),
    # For CPUs and tests: one block per stage, 16-wide front-end.
    "lola_specvit_tiny": dict(embed_dim=32, depths=(1, 1, 1), num_heads=(2, 4, 8), conv_channels=(8, 16, 16),
                              r=4, lora_alpha=8.0),
}


def _create(variant: str, pretrained: bool = False, **kwargs) -> LoLASpecViT:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights were released for LoLA-SpecViT; use pretrained=False "
                         "(the release trains from a random backbone) or load a run with "
                         "visadapt.pipelines.HyperspectralPipeline.")
    return build_model_with_cfg(LoLASpecViT, variant, pretrained, **dict(MODEL_ARGS[variant], **kwargs))


@register_model
def lola_specvit_base(pretrained: bool = False, **kwargs) -> LoLASpecViT:
    """LoLA-SpecViT as released: widths 96/192/384, depths 3/4/19, r=16, α=32, gated LoRA everywhere."""
    return _create("lola_specvit_base", pretrained, **kwargs)


@register_model
def lola_specvit_small(pretrained: bool = False, **kwargs) -> LoLASpecViT:
    """Widths 64/128/256, depths 2/2/6, 16-32-64 front-end."""
    return _create("lola_specvit_small", pretrained, **kwargs)


@register_model
def lola_specvit_tiny(pretrained: bool = False, **kwargs) -> LoLASpecViT:
    """Widths 32/64/128, one block per stage, 8-16-16 front-end, r=4, α=8: trains on a laptop CPU."""
    return _create("lola_specvit_tiny", pretrained, **kwargs)


def lola_peft_model(model: LoLASpecViT, placement: Optional[str] = None, **kwargs):
    """Wrap a model built with ``lora_placement="none"`` in peft plain LoRA on the sites of ``placement``."""
    import peft

    from .lora import lola_peft_config

    if lora_layers(model):
        raise ValueError("peft LoRA goes on a model built with lora_placement='none' (this one has built-in LoRA).")
    return peft.get_peft_model(model, lola_peft_config(placement or "all", **kwargs))


def build_model(name: str, in_chans: int, patch_size: int, num_classes: int, **kwargs) -> nn.Module:
    """A LoLA-SpecViT from timm's registry for ``in_chans`` PCA components and ``patch_size`` patches."""
    return create_model(name, in_chans=in_chans, img_size=patch_size, num_classes=num_classes, **kwargs)
