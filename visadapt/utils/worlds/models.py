"""The models shipped with the worlds: where their weights lie and how to load them.

- the demo CLIP (:data:`DEMO_CLIP_DIR`, an open_clip ``local-dir:`` folder; ``visadapt-demo-clip`` in the few-shot
  and incremental tasks), pretrained on the shapes world (:mod:`visadapt.utils.worlds.shapes`);
- the demo ViT (:data:`DEMO_VIT_DIR`: ``config.json`` holds the timm architecture, a DINOv2-layout ViT shrunk to
  patch 8, 64 wide, 4 deep, and the crop settings it was pretrained with; ``model.safetensors`` its weights in timm
  names), pretrained as a whole tracker on the ``pretrain`` kind of the video world
  (:mod:`visadapt.utils.worlds.video`); only the backbone is shipped, so the tracking demo trains a fresh head (and
  LoRA) on the ``demo`` kind;
- the world model (:data:`WORLD_MODEL_DIR`), a tiny Stable Diffusion pipeline that draws the shapes world's 64×64
  canvases from prompts such as "a red star" or "a red star and a blue circle", judged by
  :mod:`visadapt.utils.worlds.judge`.

How each was pretrained: :mod:`visadapt.utils.worlds`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

_HERE = Path(__file__).parent

DEMO_CLIP_DIR = _HERE / "demo_clip"
DEMO_VIT_DIR = _HERE / "demo_vit"
WORLD_MODEL_DIR = _HERE / "world_model"

DEMO_VIT = "visadapt-demo-vit"
# The architecture and crops of the demo ViT (also written into demo_vit/config.json).
DEMO_ARCH = {"timm_name": "vit_small_patch14_dinov2",
             "vit_kwargs": {"patch_size": 8, "img_size": 64, "embed_dim": 64, "depth": 4, "num_heads": 4,
                            "init_values": 0.1},
             "z_grid": [4, 4], "x_grid": [8, 8], "template_size": 32, "search_size": 64,
             "template_area_factor": 2.0, "search_area_factor": 4.0, "window_influence": 0.45}


def demo_vit_config() -> dict:
    """The shipped ``config.json`` of the demo ViT (architecture, crops and how it was pretrained)."""
    path = DEMO_VIT_DIR / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall visadapt, or rebuild the demo ViT with "
                                "`python pretrain/demo_vit.py --out visadapt/utils/worlds/demo_vit`.")
    return json.loads(path.read_text())


def load_demo_vit() -> torch.nn.Module:
    """The demo ViT as a timm ``VisionTransformer`` (no classifier head) with its pretrained weights."""
    import timm
    from safetensors.torch import load_file

    config = demo_vit_config()
    vit = timm.create_model(config["timm_name"], pretrained=False, num_classes=0, **config["vit_kwargs"])
    vit.load_state_dict(load_file(str(DEMO_VIT_DIR / "model.safetensors")))
    return vit


def load_world_model(path: Union[str, Path] = WORLD_MODEL_DIR, pipeline_class=None, device: str = "cpu"):
    """The world model as ``pipeline_class`` (default diffusers' ``StableDiffusionPipeline``), fp32, offline."""
    import torch
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: no world model here (no model_index.json); reinstall visadapt or rebuild it "
                                "with `python pretrain/world_model.py --out <folder>`.")
    cls = pipeline_class or StableDiffusionPipeline
    pipe = cls.from_pretrained(str(path), dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
                               local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
