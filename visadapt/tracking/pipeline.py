"""A LoRAT tracker as a pipeline: ``TrackingPipeline.from_pretrained(folder)(frames, box) -> boxes, scores``.

LoRAT: Lin et al., ECCV 2024, arXiv 2403.05231; official code github.com/LitingLin/LoRAT.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from visadapt.utils import PIPELINE_CONFIG, load_safetensors, read_pipeline_config, staged_dir

from .checkpoint import load_official
from .model import LoRAT, build_vit, get_variant, merge
from .tracker import Frame, Tracker

CONFIG_NAME = PIPELINE_CONFIG
WEIGHTS_NAME = "model.safetensors"


@dataclass
class TrackingOutput:
    boxes: np.ndarray  # (N, 4) xywh in frame pixels; row 0 is the given box
    scores: np.ndarray  # (N,) confidence; 1.0 for frame 0 (the given box)


def variant_config(variant: str, **overrides: Any) -> dict:
    """The pipeline config of a paper variant (``B-224`` …); ``overrides`` replace fields (e.g. ``vit_kwargs``)."""
    spec = get_variant(variant)
    config = {"variant": variant, "timm_name": spec.timm_name, "vit_kwargs": {}, "z_grid": list(spec.z_grid),
              "x_grid": list(spec.x_grid), "template_size": spec.template_px, "search_size": spec.search_px,
              "template_area_factor": spec.template_area_factor, "search_area_factor": spec.search_area_factor,
              "window_influence": 0.45}
    return {**config, **overrides}


def _build(config: dict) -> LoRAT:
    vit = build_vit(config["timm_name"], pretrained=False, **config.get("vit_kwargs", {}))
    return LoRAT(vit, tuple(config["z_grid"]), tuple(config["x_grid"]))


class TrackingPipeline:
    """Track one object through a sequence of frames ((H, W, 3) uint8 arrays or (3, H, W) tensors).

    ``save_pretrained`` writes ``pipeline.json`` (architecture, crop sizes and factors, window influence) and
    ``model.safetensors`` (every weight, adapters merged); ``from_pretrained`` reads them with safetensors only.
    ``from_official`` builds a paper variant from a released LoRAT weight file, tracking as the official code does
    (config ``crop: official``, ``outside: clipped``; see :class:`Tracker`); other pipelines default to exact crops
    and keep the previous box for a prediction wholly outside the frame.
    """

    def __init__(self, model: LoRAT, config: dict, device: Optional[Union[str, torch.device]] = None) -> None:
        self.config = dict(config)
        self.model = model.to(device) if device is not None else model
        self.tracker = Tracker(self.model, config["template_size"], config["search_size"],
                               config["search_area_factor"], config["template_area_factor"],
                               config["window_influence"], crop=config.get("crop", "exact"),
                               outside=config.get("outside", "previous"))

    @classmethod
    def from_official(cls, variant: str, weights: Union[str, Path], device=None) -> "TrackingPipeline":
        """A paper variant with a released weight file (``base.bin``, ``large-378.bin`` …), merged on load."""
        config = variant_config(variant, crop="official", outside="clipped")  # what the weights were tested with
        model = _build(config)
        load_official(model, weights)
        return cls(model, config, device)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None) -> "TrackingPipeline":
        path = Path(path)
        config = read_pipeline_config(path, "TrackingPipeline.save_pretrained")
        model = _build(config)
        state = load_safetensors(path / WEIGHTS_NAME)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{path / WEIGHTS_NAME} does not match {CONFIG_NAME}: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}.")
        return cls(model, config, device)

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write ``pipeline.json`` and ``model.safetensors`` (adapters folded in, the model itself unchanged)."""
        path = Path(path)
        model = self.model
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            model = merge(copy.deepcopy(model))
        with staged_dir(path) as stage:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, stage / WEIGHTS_NAME)
            (stage / CONFIG_NAME).write_text(json.dumps(self.config, indent=1))
        return path

    def __call__(self, frames: Iterable[Frame], box: tuple[float, float, float, float]) -> TrackingOutput:
        """Boxes (xywh) and scores for every frame; ``box`` (xywh) is the target in the first frame."""
        iterator = iter(frames)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError("No frames given; the first frame is needed with the initial box.") from None
        self.tracker.init(first, box)
        boxes, scores = [tuple(float(v) for v in box)], [1.0]
        for frame in iterator:
            out, score = self.tracker.track(frame)
            boxes.append(out)
            scores.append(score)
        return TrackingOutput(np.asarray(boxes, dtype=np.float64), np.asarray(scores, dtype=np.float64))
