"""Demo concepts taught to the embedded world model (:mod:`visadapt.utils.worlds.models`): two held-out shapes of the
shapes world, each in one colour under a trigger word, trained with the concept trainer on rendered canvases. The
composer app and the composition benchmark compose them.

Their LoRA files ship with the world model (:data:`SHIPPED_DIR`, with ``concepts.json``: the settings and the command
that wrote them), so the app fills its demo concepts in seconds; :func:`demo_lora_files` returns them, or trains them
anew into a folder. To rewrite the shipped files::

    OMP_NUM_THREADS=1 python -m visadapt.diffusion.concept.demo --ship
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from visadapt.utils import atomic_path, save_json_atomic, staged_dir
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
# The sentence that names both concepts: the global prompt of a composition, and on the world model every box's
# regional prompt too (a one-phrase regional prompt reads as a canvas holding one shape; docs/benchmarks.md).
SCENE_PROMPT = " and ".join(c.prompt for c in DEMO_CONCEPTS)
DEMO_IMAGES = 20
# 800 steps drew the hexagon as a hexagon in 62 % of 100 samples alone, 1500 in 79 % and 2000 in 85 % but in its colour
# in only 87 % (99 % at 1500); the heart: 98 %, 97 % and 98 % (shape probe v2, seeds 0-99; on fresh seeds 100-199 the
# shipped files: hexagon 76 %, heart 97 %).
DEMO_STEPS = 1500
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
                       model_dir: Union[str, Path] = WORLD_MODEL_DIR,
                       progress: Optional[Callable[[int, dict], None]] = None) -> Path:
    """Train ``concept`` on the world model in ``out/<name>`` (a ``visadapt concept train`` run folder) and return
    its diffusers LoRA file. A finished run with the same settings and model is reused, so a second call is instant.
    ``progress(step, record)`` is called after every training step.
    """
    from .train import train_concept

    out = Path(out).resolve()  # the cache key holds the images' path: the same folder from any working directory
    images = write_concept_images(concept, out / "images" / concept.name, seed=seed)
    config = concept_config(concept, images, steps, seed)
    run = out / concept.name
    unet_file = Path(model_dir) / "unet" / "diffusion_pytorch_model.safetensors"
    key = {"config": config.to_json(), "images": DEMO_IMAGES, "model": str(Path(model_dir).resolve()),
           "model_stamp": [unet_file.stat().st_size, unet_file.stat().st_mtime_ns]}
    marker = out / f"{concept.name}.json"
    if marker.is_file() and json.loads(marker.read_text()) == key and (run / "results.json").is_file():
        return run / json.loads((run / "results.json").read_text())["lora_files"]["diffusers"]
    shutil.rmtree(run, ignore_errors=True)  # our own cache: a stale or unfinished run is redone
    results = train_concept(config, run, pipe=load_world_model(model_dir), callbacks=[progress] if progress else ())
    save_json_atomic(key, marker)
    return run / results["lora_files"]["diffusers"]


# -- the shipped files -----------------------------------------------------------------------------------------------

SHIPPED_DIR = WORLD_MODEL_DIR / "concepts"
SHIP_COMMAND = "OMP_NUM_THREADS=1 python -m visadapt.diffusion.concept.demo --ship"
# (concept index, number of concepts, step, steps): called after every training step
Progress = Callable[[int, int, int, int], None]


def shipped_lora_files(folder: Union[str, Path] = SHIPPED_DIR) -> list[Path]:
    """The shipped LoRA file of each demo concept (``<name>.safetensors``), in :data:`DEMO_CONCEPTS` order."""
    files = [Path(folder) / f"{c.name}.safetensors" for c in DEMO_CONCEPTS]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: the demo concept LoRA(s) {', '.join(missing)} are missing; reinstall "
                                f"visadapt, or write them with `{SHIP_COMMAND}`.")
    return files


def demo_lora_files(folder: Union[str, Path, None] = None, steps: int = DEMO_STEPS,
                    model_dir: Union[str, Path] = WORLD_MODEL_DIR, progress: Optional[Progress] = None,
                    concepts: Sequence[DemoConcept] = DEMO_CONCEPTS) -> list[Path]:
    """The demo concepts' LoRA files: the shipped ones (``folder`` None), or trained into ``folder`` with
    :func:`train_demo_concept` (cached there), ``progress`` told every step."""
    if folder is None:
        if Path(model_dir).resolve() != WORLD_MODEL_DIR.resolve():
            raise ValueError(f"the shipped demo concepts fit the shipped world model, not {model_dir}; pass a folder "
                             "to train them on this model.")
        return shipped_lora_files()
    files = []
    for i, concept in enumerate(concepts):
        tell = None if progress is None else (lambda step, _record, i=i: progress(i, len(concepts), step, steps))
        files.append(train_demo_concept(concept, folder, steps=steps, model_dir=model_dir, progress=tell))
    return files


def ship(out: Union[str, Path] = SHIPPED_DIR, steps: int = DEMO_STEPS, seed: int = 0,
         work: Union[str, Path] = "runs/demo_concepts", only: Optional[str] = None) -> list[Path]:
    """Train both demo concepts on the shipped world model into ``work`` (cached there: a finished concept is not
    trained again) and write into ``out``, each file renamed into place: ``<name>.safetensors`` (diffusers LoRA) per
    concept and ``concepts.json`` (settings, command, seconds). ``only``: train that concept and write nothing (two
    such runs can train the concepts side by side; a plain run then assembles them at once)."""
    record = {"command": SHIP_COMMAND, "steps": steps, "images": DEMO_IMAGES, "seed": seed, "concepts": {}}
    loras = {}
    for concept in DEMO_CONCEPTS:
        if only and concept.name != only:
            continue
        start = time.perf_counter()
        loras[concept.name] = train_demo_concept(concept, work, steps=steps, seed=seed)
        config = concept_config(concept, Path("images"), steps, seed).to_json()
        record["concepts"][concept.name] = {"prompt": concept.prompt, "colour": concept.colour, "config": config,
                                            "seconds_this_call": round(time.perf_counter() - start, 1)}
    if only:
        return [loras[only]]
    with staged_dir(out) as stage:
        for name, lora in loras.items():
            shutil.copyfile(lora, stage / f"{name}.safetensors")
        save_json_atomic(record, stage / "concepts.json")
    return shipped_lora_files(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visadapt.diffusion.concept.demo",
                                     description="Train the world model's two demo concepts.")
    parser.add_argument("--ship", action="store_true", help=f"write the shipped files ({SHIPPED_DIR})")
    parser.add_argument("--out", type=Path, help="write them here instead")
    parser.add_argument("--work", type=Path, default=Path("runs/demo_concepts"),
                        help="the training runs, cached (default: %(default)s)")
    parser.add_argument("--only", choices=[c.name for c in DEMO_CONCEPTS],
                        help="train this concept into --work and write nothing")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    args = parser.parse_args(argv)
    if not args.ship and args.out is None and not args.only:
        parser.error("pass --ship (rewrite the shipped files), --out FOLDER or --only NAME")
    for path in ship(args.out or SHIPPED_DIR, steps=args.steps, work=args.work, only=args.only):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
