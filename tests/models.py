"""Tiny models built from configs, identical in every process (seeded), and their forward passes.

This module must not import visadapt: the export tests load plain LoRA files with stock peft in a subprocess
that uses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP()
    elif kind == "vit":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)
    elif kind == "clip":
        import open_clip

        model = open_clip.create_model(
            "ViT-B-32", pretrained=None, embed_dim=32,
            vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
        )
    else:
        raise KeyError(kind)
    return model.eval()


def inputs(kind: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return {"x": torch.randn(4, 16, generator=gen)}
    if kind == "vit":
        return {"x": torch.randn(2, 3, 32, 32, generator=gen)}
    return {"image": torch.randn(2, 3, 32, 32, generator=gen), "text": torch.randint(1, 49407, (3, 16), generator=gen)}


def run(kind: str, model: nn.Module) -> torch.Tensor:
    """One output tensor per model kind (CLIP: image and text features side by side)."""
    x = inputs(kind)
    with torch.no_grad():
        if kind == "clip":
            return torch.cat([model.encode_image(x["image"]).flatten(), model.encode_text(x["text"]).flatten()])
        return model(x["x"])


# target_modules per model kind, chosen to cover plain linears, split fused qkv and nn.MultiheadAttention.
TARGETS = {
    "mlp": dict(target_modules=["lin0", "lin1"]),
    "vit": dict(target_modules=["qkv", "attn.proj"], attention_parts=["q", "k", "v"]),
    "clip": dict(target_modules=r".*resblocks\.\d+\.attn"),
}
