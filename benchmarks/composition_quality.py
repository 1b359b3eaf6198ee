"""Composition quality on the embedded world model: does each concept land in its box, in its shape and colour?

Two concept LoRAs (:data:`visadapt.diffusion.concept.demo.DEMO_CONCEPTS`, "a sks hexagon" in orange and "a zwx heart"
in blue: the app's demo concepts, the shipped files by default, or trained into ``--out`` with ``--retrain``) are drawn
together over seeds and two-box layouts (32×32 boxes on the 64×64 canvas: left|right, right|left, top/bottom,
diagonal) by each method of ``--methods``:

* ``base``: the world model alone, prompted "a sks hexagon and a zwx heart" (it never saw either shape);
* ``set_adapters``: diffusers' multi-LoRA sampling, both LoRAs merged everywhere, same prompt;
* ``injection``: LoRA-Composer with region injection only (isolation, latent optimisation, re-initialisation off);
* ``composer``: LoRA-Composer with every part on (``ComposerConfig()``, the official settings);
* ``composer`` followed by modifiers, space-separated (``"composer ds1 -opt"``): ``-iso`` / ``-opt`` / ``-reinit``
  turn one part off; ``ds1`` / ``ds2`` read the loss maps at the latent's full or half resolution instead of a
  quarter (``loss_downsample``: the 16×16 latent has no attention at a quarter, so the official setting falls back
  to the coarsest level, 8×8, which ``ds2`` names); ``step10`` / ``step5`` halve or quarter the latent
  optimisation's step size (the official 20 was set on SD's 64×64 latents); ``scene`` gives every box the whole
  sentence as its regional prompt instead of its own concept's phrase (each box still uses its own LoRA and pulls its
  own trigger and shape tokens into place).

Each box is cropped, resized to 32×32 and judged: its shape by the shape probe
(:class:`visadapt.utils.worlds.judge.ShapeProbe`, a small CNN fitted on rendered crops of all 15 shapes plus empty
background, cached in ``--out``; its recall on fresh rendered crops is printed: the ceiling a perfectly drawn concept
reaches), its colour zero-shot by the demo CLIP. Per box: ``shape`` = the box's concept shape, ``colour`` = its
colour, ``placed`` = both, ``swapped`` = the other concept's colour (attribute binding). Per image: ``filled`` = each
box holds an object (any shape: the probe does not call it empty), ``both placed`` = both boxes placed, with its Wilson
95 % interval. Methods without boxes are scored in the same boxes: they are told what to draw, not where.

Attribute binding without concepts (``--binding N``): N two-object prompts of seen shapes and colours ("a red star
and a blue circle", random pairs) drawn by the base world model; the two largest shapes of each image are cut out,
named by the probe and the demo CLIP: ``bound`` = both asked shapes drawn, each in its own colour; ``swapped`` = both
drawn with the colours exchanged.

    python benchmarks/composition_quality.py                          # 4 seeds x 4 layouts: a few minutes
    python benchmarks/composition_quality.py --seeds 50 --binding 200 --grid docs/composition_quality.png
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from visadapt.diffusion import ComposerConfig, Concept
from visadapt.diffusion.concept.demo import DEMO_CONCEPTS, SCENE_PROMPT, demo_lora_files
from visadapt.pipelines import LoRAComposerPipeline
from visadapt.utils import save_json_atomic
from visadapt.utils.worlds import shapes as world
from visadapt.utils.worlds.judge import PROBE_CLASSES, DemoCLIPJudge, ShapeProbe, fit_shape_probe, object_crop
from visadapt.utils.worlds.models import WORLD_MODEL_DIR, load_world_model

LAYOUTS = {
    "left|right": [(0.0, 0.25, 0.5, 0.75), (0.5, 0.25, 1.0, 0.75)],
    "right|left": [(0.5, 0.25, 1.0, 0.75), (0.0, 0.25, 0.5, 0.75)],
    "top/bottom": [(0.25, 0.0, 0.75, 0.5), (0.25, 0.5, 0.75, 1.0)],
    "diagonal": [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)],
}
# name -> ComposerConfig overrides (None: no composer)
METHODS = {
    "base": None,
    "set_adapters": None,
    "injection": dict(concept_isolation=False, latent_optimization=False, latent_reinit=False),
    "composer": {},
}
# "composer" followed by any of these, space-separated: "composer ds1 -opt" is ds1 with the optimisation off
COMPOSER_MODIFIERS = {
    "-iso": dict(concept_isolation=False),
    "-opt": dict(latent_optimization=False),
    "-reinit": dict(latent_reinit=False),
    "ds1": dict(loss_downsample=1),
    "ds2": dict(loss_downsample=2),
    "step10": dict(step_size=10.0),
    "step5": dict(step_size=5.0),
    "scene": {},  # not a ComposerConfig field: every box's regional prompt is the whole sentence (scene_prompts)
}


def composer_overrides(method: str) -> Optional[dict]:
    """The ComposerConfig overrides of ``method`` (None: not a composer method). KeyError for an unknown name, a
    modifier on a method other than ``composer``, a modifier given twice, or two modifiers that set the same field
    ("composer ds1 ds2")."""
    name, *modifiers = method.split()
    overrides = METHODS[name]
    if (modifiers and name != "composer") or len(set(modifiers)) < len(modifiers):
        raise KeyError(method)
    if overrides is None:
        return None
    out = dict(overrides)
    for modifier in modifiers:
        change = COMPOSER_MODIFIERS[modifier]
        if set(change) & (set(out) - set(overrides)):
            raise KeyError(method)
        out.update(change)
    return out


def scene_prompts(method: str) -> bool:
    """Whether ``method`` gives every box the whole two-object sentence as its regional prompt ("scene"), instead of
    its own concept's phrase. The world model reads "a zwx heart" as a canvas holding one shape, so with one-phrase
    regional prompts the composer draws a single object in most images (docs/benchmarks.md)."""
    return "scene" in method.split()[1:]


# "composer ds1 scene": the setting that places both concepts on this world (the app's; docs/benchmarks.md), beside
# the official one and ds1 with one-phrase regional prompts
DEFAULT_METHODS = ("base", "set_adapters", "injection", "composer", "composer ds1", "composer ds1 scene")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); (0, 1) when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# -- sampling ---------------------------------------------------------------------------------------------------

def generate(method: str, pipes: dict, loras: list[Path], boxes, seed: int, steps: int, guidance: float):
    common = dict(num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed))
    if method == "base":
        pipes["plain"].disable_lora()
        return pipes["plain"](SCENE_PROMPT, **common).images[0]
    if method == "set_adapters":
        pipes["plain"].enable_lora()
        pipes["plain"].set_adapters(["merged_0", "merged_1"], [1.0, 1.0])
        return pipes["plain"](SCENE_PROMPT, **common).images[0]
    regional = [SCENE_PROMPT if scene_prompts(method) else c.prompt for c in DEMO_CONCEPTS]
    concepts = [Concept(lora=path, prompt=text, box=box, name=c.name, tokens=[c.trigger, c.shape])
                for path, c, text, box in zip(loras, DEMO_CONCEPTS, regional, boxes)]
    return pipes["composer"](SCENE_PROMPT, concepts=concepts, composer=ComposerConfig(**composer_overrides(method)),
                             **common).images[0]


def score(judge: DemoCLIPJudge, probe: ShapeProbe, image, boxes) -> list[dict]:
    """Per concept: the probe's shape and the zero-shot colour of its box crop."""
    crops = [object_crop(image, box=box) for box in boxes]
    shapes = probe.classify(crops)
    _, colours = judge.classify(crops)
    out = []
    for n, concept in enumerate(DEMO_CONCEPTS):
        other = DEMO_CONCEPTS[1 - n]
        out.append({"shape": shapes[n] == concept.shape, "colour": colours[n] == concept.colour,
                    "placed": shapes[n] == concept.shape and colours[n] == concept.colour,
                    "swapped": colours[n] == other.colour, "drawn": shapes[n], "drawn_colour": colours[n]})
    return out


def concept_alone(pipe, judge: DemoCLIPJudge, probe: ShapeProbe, n: int, steps: int, guidance: float,
                  first_seed: int = 0) -> dict:
    """Each LoRA alone on the whole canvas ("a sks hexagon", seeds ``first_seed`` .. ``first_seed + n - 1``), the
    drawn shape cropped: does the model draw the concept at all, before any composition? Shape, colour and both,
    each a rate over ``n`` with its Wilson interval."""
    out = {}
    for i, concept in enumerate(DEMO_CONCEPTS):
        pipe.enable_lora()
        pipe.set_adapters([f"merged_{i}"])
        images = pipe([concept.prompt] * n, num_inference_steps=steps, guidance_scale=guidance,
                      generator=[torch.Generator().manual_seed(first_seed + s) for s in range(n)]).images
        crops = [object_crop(image) for image in images]
        shapes, colours = probe.classify(crops), judge.classify(crops)[1]
        hits = sum(s == concept.shape for s in shapes)
        out[concept.prompt] = {"n": n, "first_seed": first_seed, "shape": hits / n, "shape_interval": wilson(hits, n),
                               "colour": float(np.mean([c == concept.colour for c in colours])),
                               "both": float(np.mean([s == concept.shape and c == concept.colour
                                                      for s, c in zip(shapes, colours)])),
                               "most_drawn": max(set(shapes), key=shapes.count)}
    return out


# -- attribute binding of two-object prompts ---------------------------------------------------------------------

def two_objects(image, min_pixels: int = 12) -> list:
    """The two largest shapes of a canvas as 32×32 crops centred on each (the other shape painted over with the
    background), largest first; fewer when fewer stand out."""
    from PIL import Image
    from scipy import ndimage

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    labels, n = ndimage.label(np.abs(pixels - background).max(-1) > 40)
    sizes = ndimage.sum(np.ones_like(labels), labels, range(1, n + 1))
    keep = [k + 1 for k in np.argsort(sizes)[::-1][:2] if sizes[k] >= min_pixels]
    crops = []
    for k in keep:
        own = pixels.copy()
        own[(labels != k) & (labels > 0)] = background
        cy, cx = np.argwhere(labels == k).mean(0)
        h, w = labels.shape
        top, left = int(np.clip(round(cy - 16), 0, h - 32)), int(np.clip(round(cx - 16), 0, w - 32))
        crops.append(Image.fromarray(own.clip(0, 255).astype(np.uint8)).crop((left, top, left + 32, top + 32)))
    return crops


def bind_verdict(asked: list[tuple[str, str]], drawn: list[tuple[str, str]]) -> dict[str, bool]:
    """Two asked (shape, colour) pairs against the two drawn ones: ``both_shapes`` = the drawn shapes are the asked
    two; ``bound`` = each also in its own colour; ``swapped`` = each in the other's colour."""
    (s1, c1), (s2, c2) = asked
    if len(drawn) != 2 or {s for s, _ in drawn} != {s1, s2}:
        return {"both_shapes": False, "bound": False, "swapped": False}
    colour = dict(drawn)
    return {"both_shapes": True, "bound": colour[s1] == c1 and colour[s2] == c2,
            "swapped": colour[s1] == c2 and colour[s2] == c1}


def binding(pipe, judge: DemoCLIPJudge, probe: ShapeProbe, n: int, steps: int, guidance: float,
            seed: int = 0) -> dict:
    """``n`` prompts "a <c1> <s1> and a <c2> <s2>" (distinct seen shapes, distinct colours, image i seeded
    ``seed + i``) drawn by ``pipe``: how often both shapes are drawn, how often each in its own colour (bound) and how
    often with the colours exchanged (swapped)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        shapes = rng.choice(world.SEEN_SHAPES, 2, replace=False)
        colours = rng.choice(world.COLOURS, 2, replace=False)
        pairs.append(list(zip(shapes.tolist(), colours.tolist())))
    counts = {"both_shapes": 0, "bound": 0, "swapped": 0}
    pipe.disable_lora()
    for i in range(0, n, 16):
        chunk = pairs[i:i + 16]
        prompts = [" and ".join(world.canvas_phrase(s, c) for s, c in pair) for pair in chunk]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                      generator=[torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]).images
        for pair, image in zip(chunk, images):
            crops = two_objects(image)
            if len(crops) < 2:
                continue
            verdict = bind_verdict(pair, list(zip(probe.classify(crops), judge.classify(crops)[1])))
            for key in counts:
                counts[key] += verdict[key]
    out = {"prompts": n, **counts}
    for key in ("both_shapes", "bound", "swapped"):
        out[f"{key}_rate"] = counts[key] / n
        out[f"{key}_interval"] = wilson(counts[key], n)
    return out


# -- reporting -------------------------------------------------------------------------------------------------

def summary(per_image: list[list[dict]]) -> dict:
    """Rates over boxes (shape, colour, placed, swapped), per concept (``placed_<name>`` and its Wilson interval)
    and per image: ``both_placed`` (with its interval) and ``both_filled`` (each box holds an object, whatever its
    shape: a method that draws a single object cannot place both concepts)."""
    flat = [b for image in per_image for b in image]
    both = sum(all(b["placed"] for b in image) for image in per_image)
    filled = sum(all(b["drawn"] != "empty" for b in image) for image in per_image)
    out = {k: float(np.mean([b[k] for b in flat])) for k in ("shape", "colour", "placed", "swapped")}
    for n, concept in enumerate(DEMO_CONCEPTS):
        hits = sum(image[n]["placed"] for image in per_image)
        out[f"placed_{concept.name}"] = hits / len(per_image)
        out[f"placed_{concept.name}_interval"] = wilson(hits, len(per_image))
    out.update(images=len(per_image), boxes=len(flat), both_filled=filled / len(per_image),
               both_placed=both / len(per_image),
               both_placed_interval=wilson(both, len(per_image)))
    return out


def _rate(rate: float, interval: tuple[float, float]) -> str:
    return f"{rate:6.1%} [{interval[0]:5.1%}, {interval[1]:5.1%}]"


def table(rows: dict[str, list[list[dict]]]) -> str:
    """One line per method: box rates, both boxes filled, each concept placed and both placed with their 95 % Wilson
    intervals."""
    names = [c.shape for c in DEMO_CONCEPTS]
    width = max([17, *map(len, rows)])
    head = (f"{'method':<{width}} {'images':>6} {'shape':>6} {'colour':>7} {'placed':>7} {'swapped':>8} "
            f"{'filled':>7} " + " ".join(f"{n + ' placed [95% CI]':>24}" for n in names)
            + f" {'both placed [95% CI]':>24}")
    lines = [head]
    for method, per_image in rows.items():
        s = summary(per_image)
        each = " ".join(f"{_rate(s[f'placed_{c.name}'], s[f'placed_{c.name}_interval']):>24}" for c in DEMO_CONCEPTS)
        lines.append(f"{method:<{width}} {s['images']:>6} {s['shape']:>6.1%} {s['colour']:>7.1%} {s['placed']:>7.1%} "
                     f"{s['swapped']:>8.1%} {s['both_filled']:>7.1%} {each} "
                     f"{_rate(s['both_placed'], s['both_placed_interval']):>24}")
    return "\n".join(lines)


def save_grid(images: dict[str, list], columns: list[tuple[str, int, list]], path: Path, cols: int) -> None:
    """Rows = methods (named on the left), columns = the first ``cols`` samples (layout and seed on top), ×3
    upscaled, boxes outlined in the concepts' order (orange = first concept, blue = second). Written atomically."""
    from PIL import Image, ImageDraw

    from visadapt.utils import atomic_path

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    side, gap, top = world.CANVAS_SIZE * 3, 4, 30
    left = max(118, 12 + math.ceil(max(map(measure, images))))  # the longest method name fits
    grid = Image.new("RGB", (left + cols * (side + gap), top + len(images) * (side + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (layout, seed, _) in enumerate(columns[:cols]):
        draw.text((left + c * (side + gap) + 4, 2), f"{layout}\nseed {seed}", fill="black")
    for r, (method, imgs) in enumerate(images.items()):
        draw.text((4, top + r * (side + gap) + side // 2 - 6), method, fill="black")
        for c, (image, (_, _, boxes)) in enumerate(zip(imgs[:cols], columns[:cols])):
            big = image.resize((side, side), Image.Resampling.NEAREST)
            box_draw = ImageDraw.Draw(big)
            for box, colour in zip(boxes, ("#ff9900", "#3399ff")):
                box_draw.rectangle([box[0] * side, box[1] * side, box[2] * side - 1, box[3] * side - 1],
                                   outline=colour)
            grid.paste(big, (left + c * (side + gap), top + r * (side + gap)))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, ``--grid`` resolved (default: under ``--out``, never the docs' copy)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="seeds per layout (images per method: 4 x seeds)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds --first-seed .. --first-seed + --seeds - 1 (runs side by side, merged after)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)}, or 'composer' followed by modifiers "
                             f"({' '.join(COMPOSER_MODIFIERS)}, e.g. 'composer ds1 -opt') (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (DPM-Solver)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--alone", type=int, default=100, help="samples of each concept alone (0: skip)")
    parser.add_argument("--alone-seed", type=int, default=100,
                        help="first seed of the concepts-alone samples (default %(default)s: the demo's step count "
                             "was chosen on seeds 0-99)")
    parser.add_argument("--binding", type=int, default=0, help="two-object prompts for attribute binding (0: skip)")
    parser.add_argument("--retrain", action="store_true",
                        help="train the demo concepts into --out/concepts instead of using the shipped files")
    parser.add_argument("--out", type=Path, default=Path("runs/composition_quality"),
                        help="results.json, the grid, the shape probe and retrained concepts")
    parser.add_argument("--grid", type=Path, default=None,
                        help="where the grid goes (default: --out/composition_quality.png; the docs' copy is "
                             "docs/composition_quality.png)")
    parser.add_argument("--model", type=Path, default=WORLD_MODEL_DIR, help="world model folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.methods = list(dict.fromkeys(" ".join(m.split()) for m in args.methods.split(",") if m.strip()))
    unknown = []
    for method in args.methods:
        try:
            composer_overrides(method)
        except KeyError:
            unknown.append(method)
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}, or 'composer' "
                     f"followed by any of {' '.join(COMPOSER_MODIFIERS)}")
    args.grid = args.grid or args.out / "composition_quality.png"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = args.methods
    torch.set_num_threads(args.threads)
    grid_path = args.grid

    start = time.perf_counter()
    loras = demo_lora_files(args.out / "concepts" if args.retrain else None, model_dir=args.model)
    pipes = {"plain": load_world_model(args.model),
             "composer": load_world_model(args.model, pipeline_class=LoRAComposerPipeline)}
    for i, path in enumerate(loras):
        pipes["plain"].load_lora_weights(str(path), adapter_name=f"merged_{i}")

    # Draw first, judge after: the probe's fit (or its cached file) is needed only then.
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(name, seed, boxes) for seed in seeds for name, boxes in LAYOUTS.items()]
    images: dict[str, list] = {m: [] for m in methods}
    seconds = {}
    for method in methods:
        t0 = time.perf_counter()
        images[method] = [generate(method, pipes, loras, boxes, seed, args.steps, args.guidance)
                          for _, seed, boxes in jobs]
        seconds[method] = time.perf_counter() - t0
        print(f"{method}: {len(jobs)} images in {seconds[method]:.0f} s", flush=True)

    judge = DemoCLIPJudge()
    probe = fit_shape_probe(cache=args.out / "shape_probe.safetensors")
    ceiling = ", ".join(f"{c.shape} {probe.recall[c.shape]:.1%}" for c in DEMO_CONCEPTS)
    print(f"shape probe accuracy on rendered crops: {probe.accuracy:.1%} ({len(PROBE_CLASSES)} classes, chance "
          f"{1 / len(PROBE_CLASSES):.1%}); on the concepts' shapes: {ceiling}", flush=True)
    rows = {m: [score(judge, probe, image, boxes) for image, (_, _, boxes) in zip(images[m], jobs)]
            for m in methods}

    alone = (concept_alone(pipes["plain"], judge, probe, args.alone, args.steps, args.guidance, args.alone_seed)
             if args.alone else {})
    for prompt, a in alone.items():
        print(f"{prompt!r} alone: shape {_rate(a['shape'], a['shape_interval']).strip()}, colour {a['colour']:.1%}, "
              f"both {a['both']:.1%} of {a['n']} from seed {a['first_seed']} (most drawn: {a['most_drawn']})",
              flush=True)
    bound = binding(pipes["plain"], judge, probe, args.binding, args.steps, args.guidance) if args.binding else {}
    if bound:
        print(f"binding, {bound['prompts']} two-object prompts (base model): both shapes drawn "
              f"{bound['both_shapes_rate']:.1%}, bound {bound['bound_rate']:.1%} "
              f"[{bound['bound_interval'][0]:.1%}, {bound['bound_interval'][1]:.1%}], swapped "
              f"{bound['swapped_rate']:.1%} [{bound['swapped_interval'][0]:.1%}, "
              f"{bound['swapped_interval'][1]:.1%}]", flush=True)

    text = table(rows)
    print(f"\n{args.seeds} seeds x {len(LAYOUTS)} layouts, {args.steps} steps, guidance {args.guidance}")
    print(text)
    save_grid(images, jobs, grid_path, cols=min(8, len(jobs)))
    save_json_atomic({"seeds": list(seeds), "layouts": list(LAYOUTS), "steps": args.steps, "guidance": args.guidance,
                      "loras": [str(p) for p in loras], "probe_accuracy": probe.accuracy,
                      "probe_recall": probe.recall, "seconds": seconds, "alone": alone, "binding": bound,
                      "table": text, "summary": {m: summary(rows[m]) for m in methods},
                      "boxes": rows}, args.out / "results.json")
    print(f"grid: {grid_path}; results: {args.out / 'results.json'}; total "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
