"""Demo concepts taught to the embedded world model (:mod:`visadapt.utils.worlds.models`): two held-out shapes of the
shapes world, each in one colour under a trigger word, trained with the concept trainer on rendered canvases. The
composer app and the composition benchmark compose them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import numpy as np

from visadapt.utils import atomic_path, save_json_atomic
from visadapt.utils.worlds import shapes as world
from visadapt.utils.worlds.models import WORLD_MODEL_DIR, load_world_model

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
    from .config import ConceptTrainConfig

    return ConceptTrainConfig(images=str(images), trigger=concept.trigger, instance_prompt=concept.prompt,
                              name=concept.name, steps=steps, batch_size=4, lr=2e-3, r=8,
                              unet_targets=list(COMPOSER_TARGETS), train_text_encoder=True, sample_every=0,
                              checkpoint_every=steps, seed=seed)


def train_demo_concept(concept: DemoConcept, out: Union[str, Path], steps: int = DEMO_STEPS, seed: int = 0,
                       model_dir: Union[str, Path] = WORLD_MODEL_DIR) -> Path:
    """Train ``concept`` on the world model in ``out/<name>`` (a ``visadapt concept train`` run folder) and return
    its diffusers LoRA file. A finished run with the same settings and model is reused, so a second call is instant.
    """
    from .train import train_concept

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
