"""The tiny ViT backbone the tracking demo ships (``visadapt/tracking/demo_vit/``), and how to build it.

``demo_vit/config.json`` holds the timm architecture (a DINOv2-layout ViT shrunk to patch 8, 64 wide, 4 deep) and the
crop settings it was pretrained with; ``demo_vit/model.safetensors`` its weights (timm names). It was pretrained as a
whole tracker on the ``pretrain`` kind of :mod:`visadapt.tracking.world` by :mod:`visadapt.tracking.demo_pretrain`;
only the backbone is shipped, so the demo trains a fresh head (and LoRA) on the ``demo`` kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file

DEMO_VIT_DIR = Path(__file__).parent / "demo_vit"
DEMO_BACKBONE = "visadapt-demo-vit"
# The architecture and crops of the demo backbone (also written into demo_vit/config.json).
DEMO_ARCH = {"timm_name": "vit_small_patch14_dinov2",
             "vit_kwargs": {"patch_size": 8, "img_size": 64, "embed_dim": 64, "depth": 4, "num_heads": 4,
                            "init_values": 0.1},
             "z_grid": [4, 4], "x_grid": [8, 8], "template_size": 32, "search_size": 64,
             "template_area_factor": 2.0, "search_area_factor": 4.0, "window_influence": 0.45}


def demo_vit_config() -> dict:
    """The shipped ``config.json`` (architecture, crops and how it was pretrained)."""
    path = DEMO_VIT_DIR / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall visadapt, or rebuild the demo backbone with "
                                "`python -m visadapt.tracking.demo_pretrain --out visadapt/tracking/demo_vit`.")
    return json.loads(path.read_text())


def load_demo_vit() -> nn.Module:
    """The shipped backbone as a timm ``VisionTransformer`` with its pretrained weights."""
    from .model import build_vit

    config = demo_vit_config()
    vit = build_vit(config["timm_name"], **config["vit_kwargs"])
    vit.load_state_dict(load_file(str(DEMO_VIT_DIR / "model.safetensors")))
    return vit
