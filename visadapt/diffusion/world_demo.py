"""The embedded world model (:data:`WORLD_MODEL_DIR`) and how it is judged.

The world model is a tiny Stable Diffusion pipeline, shipped with visadapt, that draws the shapes world's 64×64
canvases from prompts such as "a red star" or "a red star and a blue circle" (trained by
:mod:`visadapt.diffusion.world_pretrain`, seen shapes only). The demo CLIP (:data:`visadapt.utils.world.
DEMO_CLIP_DIR`) judges what it draws: :func:`object_crop` cuts the 32×32 window around the drawn shape (the size the
demo CLIP sees), :class:`DemoCLIPJudge` names its shape and colour zero-shot, and :func:`recognition` measures how
often both match the prompt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from visadapt.utils import atomic_path, save_json_atomic, world

WORLD_MODEL_DIR = Path(__file__).parent / "world_model"
CLIP_PROMPT = "a photo of a {}."  # the demo CLIP's zero-shot template
_FOREGROUND = 40  # a pixel is part of a shape when a channel differs this much from the background


def load_world_model(path: Union[str, Path] = WORLD_MODEL_DIR, pipeline_class=None, device: str = "cpu"):
    """The world model as ``pipeline_class`` (default diffusers' ``StableDiffusionPipeline``), fp32, offline."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: no world model here (no model_index.json); reinstall visadapt or rebuild it "
                                "with `python -m visadapt.diffusion.world_pretrain --out <folder>`.")
    cls = pipeline_class or StableDiffusionPipeline
    pipe = cls.from_pretrained(str(path), dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
                               local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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

        name = f"local-dir:{world.DEMO_CLIP_DIR}"
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



# -- demo concepts: held-out shapes taught to the world model ------------------------------------------------------

@dataclass(frozen=True)
class DemoConcept:
    """A held-out shape in one colour, taught to the world model under a trigger word ("a sks hexagon")."""

    name: str
    trigger: str
    shape: str
    colour: str

    @property
    def prompt(self) -> str:
        return f"a {self.trigger} {self.shape}"


DEMO_CONCEPTS = (DemoConcept("sks_hexagon", "sks", "hexagon", "orange"),
                 DemoConcept("zwx_heart", "zwx", "heart", "blue"))
DEMO_IMAGES = 8
DEMO_STEPS = 400
# The composer reads a concept LoRA's cross-attention K/V/O deltas in the UNet (as LoRA-Composer does) and encodes the
# concept's regional prompt with its text-encoder LoRA, so the demo concepts train exactly those: merged with
# set_adapters and composed in boxes, the same weights act. Without the text-encoder part, 150 steps taught neither
# shape nor colour (on a checkpoint of the world model the demo CLIP found the heart's colour in 4 % of its samples,
# 71-79 % with the text-encoder part).
COMPOSER_TARGETS = ("attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def write_concept_images(concept: DemoConcept, folder: Path, n: int = DEMO_IMAGES, seed: int = 0) -> Path:
    """``n`` canvases of the concept alone (its shape and colour, random size and place) as PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, world.HELDOUT_SHAPES.index(concept.shape)])
    for i in range(n):
        obj = replace(world.sample_canvas(rng, 1, (concept.shape,))[0], colour=concept.colour)
        with atomic_path(folder / f"{i}.png") as tmp:
            world.render_canvas([obj], rng).save(tmp, format="PNG")
    return folder


def concept_config(concept: DemoConcept, images: Path, steps: int = DEMO_STEPS, seed: int = 0):
    """The concept run: LoRA rank 8 on the composer's UNet targets and on the text encoder's attention, batch 4,
    lr 2e-3, no sample grids."""
    from .concept.config import ConceptTrainConfig

    return ConceptTrainConfig(images=str(images), trigger=concept.trigger, instance_prompt=concept.prompt,
                              name=concept.name, steps=steps, batch_size=4, lr=2e-3, rank=8,
                              unet_targets=list(COMPOSER_TARGETS), train_text_encoder=True, sample_every=0,
                              checkpoint_every=steps, seed=seed)


def train_demo_concept(concept: DemoConcept, out: Union[str, Path], steps: int = DEMO_STEPS, seed: int = 0,
                       model_dir: Union[str, Path] = WORLD_MODEL_DIR) -> Path:
    """Train ``concept`` on the world model in ``out/<name>`` (a ``visadapt concept train`` run folder) and return
    its diffusers LoRA file. A finished run with the same settings and model is reused, so a second call is instant.
    """
    from .concept.train import train_concept

    out = Path(out).resolve()  # the cache key holds the images' path: the same folder from any working directory
    images = write_concept_images(concept, out / "images" / concept.name, seed=seed)
    config = concept_config(concept, images, steps, seed)
    run = out / concept.name
    unet_file = Path(model_dir) / "unet" / "diffusion_pytorch_model.safetensors"
    key = {"config": config.to_json(), "model": str(Path(model_dir).resolve()),
           "model_stamp": [unet_file.stat().st_size, unet_file.stat().st_mtime_ns]}
    marker = out / f"{concept.name}.json"
    if marker.is_file() and json.loads(marker.read_text()) == key and (run / "results.json").is_file():
        return run / json.loads((run / "results.json").read_text())["lora_files"]["diffusers"]
    shutil.rmtree(run, ignore_errors=True)  # our own cache: a stale or unfinished run is redone
    results = train_concept(config, run, pipe=load_world_model(model_dir))
    save_json_atomic(key, marker)
    return run / results["lora_files"]["diffusers"]
