"""How the world model's drawings are judged: the demo CLIP names the drawn shape and colour.

:func:`object_crop` cuts the 32×32 window around the drawn shape (the size the demo CLIP sees),
:class:`DemoCLIPJudge` names its shape and colour zero-shot, and :func:`recognition` measures how often both match
the prompt (the world model's shape recognition that its pretraining reports, see :mod:`visadapt.utils.worlds`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes as world
from .models import DEMO_CLIP_DIR

CLIP_PROMPT = "a photo of a {}."  # the demo CLIP's zero-shot template
_FOREGROUND = 40  # a pixel is part of a shape when a channel differs this much from the background


def object_crop(image, size: int = world.IMAGE_SIZE, box: Optional[Sequence[float]] = None):
    """The ``size``×``size`` window centred on the drawn shape (pixels that stand out from the border's median).

    ``box`` ([xmin, ymin, xmax, ymax] fractions) first crops the image to that box and resizes it to ``size``, as the
    composition benchmark scores a box. A canvas with no shape gives its centre window.
    """
    from PIL import Image

    if box is not None:
        w, h = image.size
        image = image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
        return image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    mask = np.abs(pixels - np.median(border, axis=0)).max(-1) > _FOREGROUND
    h, w = mask.shape
    cy, cx = (np.argwhere(mask).mean(0) if mask.any() else (h / 2, w / 2))
    top = int(np.clip(round(cy - size / 2), 0, h - size))
    left = int(np.clip(round(cx - size / 2), 0, w - size))
    return image.crop((left, top, left + size, top + size))


class DemoCLIPJudge:
    """Zero-shot shape (over ``shapes``) and colour classification of 32×32 crops with the demo CLIP."""

    def __init__(self, shapes: Sequence[str] = world.SEEN_SHAPES, colours: Sequence[str] = world.COLOURS) -> None:
        import open_clip

        name = f"local-dir:{DEMO_CLIP_DIR}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name)
        self.model.eval()
        tokenizer = open_clip.get_tokenizer(name)
        self.shapes, self.colours = tuple(shapes), tuple(colours)
        with torch.no_grad():
            self.shape_text = F.normalize(self.model.encode_text(
                tokenizer([CLIP_PROMPT.format(s) for s in self.shapes])), dim=-1)
            self.colour_text = F.normalize(self.model.encode_text(
                tokenizer([CLIP_PROMPT.format(f"{c} shape") for c in self.colours])), dim=-1)

    @torch.no_grad()
    def features(self, crops: Sequence) -> torch.Tensor:
        """``(N, D)`` normalised image features of PIL crops."""
        batch = torch.stack([self.preprocess(c) for c in crops])
        return F.normalize(self.model.encode_image(batch), dim=-1)

    def classify(self, crops: Sequence) -> tuple[list[str], list[str]]:
        """(shape names, colour names), one each per crop."""
        feats = self.features(crops)
        shapes = (feats @ self.shape_text.T).argmax(-1).tolist()
        colours = (feats @ self.colour_text.T).argmax(-1).tolist()
        return [self.shapes[i] for i in shapes], [self.colours[i] for i in colours]


def recognition(pipe, n_seeds: int = 1, steps: int = 20, guidance: float = 5.0, seed: int = 0,
                shapes: Sequence[str] = world.SEEN_SHAPES, colours: Sequence[str] = world.COLOURS,
                judge: Optional[DemoCLIPJudge] = None, batch: int = 16) -> dict:
    """Sample "a <colour> <shape>" for every pair (``n_seeds`` seeds each, image i seeded ``seed + i``) and report
    how often the demo CLIP names the prompt's shape and colour, beside chance and beside the same judge on rendered
    canvases of the same prompts (what a perfect model would score)."""
    judge = judge or DemoCLIPJudge()
    pairs = [(s, c) for _ in range(n_seeds) for s in shapes for c in colours]
    prompts = [world.canvas_phrase(s, c) for s, c in pairs]
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed + j) for j in range(i, min(i + batch, len(prompts)))]
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens).images
    rng = np.random.default_rng(seed)
    renders = [world.render_canvas([replace(world.sample_canvas(rng, 1, (s,))[0], colour=c)], rng) for s, c in pairs]
    result = {"prompts": len(prompts), "steps": steps, "guidance": guidance,
              "shape_chance": 1 / len(judge.shapes), "colour_chance": 1 / len(judge.colours)}
    for label, imgs in (("samples", images), ("renders", renders)):
        shape, colour = judge.classify([object_crop(im) for im in imgs])
        result[f"{label}_shape_accuracy"] = float(np.mean([p == s for p, (s, _) in zip(shape, pairs)]))
        result[f"{label}_colour_accuracy"] = float(np.mean([p == c for p, (_, c) in zip(colour, pairs)]))
    result["images"] = images
    return result
