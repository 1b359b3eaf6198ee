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


# -- the shape probe: a small CNN that names any of the 15 shapes (and "empty") in a 32×32 crop ----------------------

PROBE_CLASSES = (*world.HELDOUT_SHAPES, *world.SEEN_SHAPES, "empty")


def probe_crops(rng: np.random.Generator, label: str, n: int) -> list:
    """``n`` 32×32 crops of rendered canvases as the composition benchmark crops its samples, half each way: as a box
    crop sees them (the shape ``label`` near the crop's centre, jittered, sometimes cut by the border) and as
    :func:`object_crop` cuts a canvas drawn alone (centred on the shape); ``"empty"``: background only."""
    crops = []
    for i in range(n):
        if label == "empty":
            objects = []
        else:
            obj = world.sample_canvas(rng, 1, (label,))[0]
            if i % 2:
                crops.append(object_crop(world.render_canvas([obj], rng)))
                continue
            objects = [replace(obj, centre=(32 + rng.uniform(-6, 6), 32 + rng.uniform(-6, 6)))]
        canvas = world.render_canvas(objects, rng)
        crops.append(canvas.crop((16, 16, 48, 48)))
    return crops


def _pixels(crops: Sequence) -> torch.Tensor:
    """PIL crops (resized to 32×32 when not) → (N, 1, 32, 32) silhouettes: how far each pixel stands out from the
    crop's border (the background), whatever the shape's colour, scaled to about [-1, 1]."""
    from PIL import Image

    size = (world.IMAGE_SIZE, world.IMAGE_SIZE)
    pixels = torch.from_numpy(np.stack([np.asarray((c if c.size == size else c.resize(
        size, Image.Resampling.BICUBIC)).convert("RGB")) for c in crops])).float()
    border = torch.cat([pixels[:, 0], pixels[:, -1], pixels[:, :, 0], pixels[:, :, -1]], dim=1)
    silhouette = (pixels - border.median(dim=1).values[:, None, None]).abs().amax(-1)
    return (silhouette / 127.5 - 1.0)[:, None]


class ShapeProbe(torch.nn.Module):
    """Names the shape of a 32×32 crop among :data:`PROBE_CLASSES` from its silhouette (colour is the demo CLIP's
    job): five 3×3 conv layers with batch norm, global max pooling, linear.

    The demo CLIP never saw the held-out shapes, and a linear probe on its image features finds only about half of
    rendered hexagons (it calls them circles). A first CNN (three conv layers, global *average* pooling) still
    confused hexagons, circles and pentagons (recall 66 %, 59 %, 82 % on rendered crops): averaging over the crop
    throws away where the corners are. Max pooling keeps the strongest corner response wherever it is, and this
    probe, fitted by :func:`fit_shape_probe` on rendered crops of every class, separates all 16 classes;
    :attr:`recall` holds its recall per class on fresh rendered crops (what a perfectly drawn shape scores).
    """

    cache_version = 2  # in the fit cache's name: a cache of another architecture is never loaded

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn

        def conv(c_in: int, c_out: int) -> list:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.net = nn.Sequential(*conv(1, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64), *conv(64, 64),
                                 nn.MaxPool2d(2), *conv(64, 128), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                 nn.Linear(128, len(PROBE_CLASSES)))
        self.accuracy: float = float("nan")
        self.recall: dict[str, float] = {}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    @torch.no_grad()
    def classify(self, crops: Sequence) -> list[str]:
        """One class name of :data:`PROBE_CLASSES` per PIL crop."""
        self.eval()
        return [PROBE_CLASSES[i] for i in self(_pixels(crops)).argmax(-1).tolist()]

    def save(self, path) -> None:
        """Weights as safetensors, accuracy and recall in its metadata (written atomically)."""
        import json

        from safetensors.torch import save_file

        from visadapt.utils import atomic_path

        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={"accuracy": str(self.accuracy), "recall": json.dumps(self.recall)})

    @classmethod
    def load(cls, path) -> "ShapeProbe":
        import json

        from safetensors import safe_open

        from visadapt.utils.io import load_safetensors

        probe = cls()
        probe.load_state_dict(load_safetensors(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        probe.accuracy, probe.recall = float(meta.get("accuracy", "nan")), json.loads(meta.get("recall", "{}"))
        return probe.eval()


def fit_shape_probe(n_train: int = 1024, n_test: int = 128, epochs: int = 4, seed: int = 0,
                    cache=None, batch_size: int = 128, blur: float = 1.5) -> ShapeProbe:
    """Fit a :class:`ShapeProbe` on ``n_train`` rendered crops per class (:func:`probe_crops`; Adam lr 2e-3,
    ``batch_size``, ``epochs`` passes, the learning rate decayed linearly; the epoch best on ``n_test`` validation
    crops per class is kept) and measure it on ``n_test`` other fresh crops per class. Half the training crops are
    blurred (Gaussian, radius up to ``blur`` pixels): the world model draws softer edges than the renderer, and a
    probe fitted on sharp crops only called every soft hexagon a circle.

    ``cache``: a ``.safetensors`` path; the architecture's version and the settings are appended to its stem
    (``probe_v2_1024x4b128blur1.5_s0``), a probe already fitted there with the same settings is loaded, a new fit is
    saved there. About 3 minutes on one idle CPU core.
    """
    from pathlib import Path

    from tqdm.auto import tqdm

    if cache is not None:
        cache = Path(cache)
        settings = f"v{ShapeProbe.cache_version}_{n_train}x{epochs}b{batch_size}blur{blur:g}_s{seed}"
        cache = cache.with_name(f"{cache.stem}_{settings}{cache.suffix or '.safetensors'}")
        if cache.is_file():
            return ShapeProbe.load(cache)
    data = {}
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test), ("val", n_test))):
        rng = np.random.default_rng([seed, k])
        crops = [c for label in PROBE_CLASSES for c in probe_crops(rng, label, n)]
        if split == "train" and blur:  # the world model draws softer edges than the renderer: half are blurred
            from PIL import ImageFilter

            crops = [c.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, blur))) if rng.random() < 0.5 else c
                     for c in crops]
        data[split] = _pixels(crops), torch.arange(len(PROBE_CLASSES)).repeat_interleave(n)
    x, y = data["train"]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = ShapeProbe()
    opt = torch.optim.Adam(probe.parameters(), lr=2e-3)
    batches = -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (epochs * batches + 1))
    best = (-1.0, None)
    for _ in tqdm(range(epochs), desc="shape probe", unit="epoch"):
        probe.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        probe.eval()
        with torch.no_grad():  # keep the epoch that does best on the validation split: the fit can swing
            val = float((probe(data["val"][0]).argmax(-1) == data["val"][1]).float().mean())
        if val > best[0]:
            best = (val, {k: v.clone() for k, v in probe.state_dict().items()})
    probe.load_state_dict(best[1])
    tx, ty = data["test"]
    with torch.no_grad():
        pred = probe(tx).argmax(-1)
    probe.accuracy = float((pred == ty).float().mean())
    probe.recall = {c: float((pred[ty == k] == k).float().mean()) for k, c in enumerate(PROBE_CLASSES)}
    if cache is not None:
        probe.save(cache)
    return probe
