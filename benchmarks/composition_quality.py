"""Composition quality on the embedded world model: does each concept land in its box, unconfused and present?

Two concept LoRAs are trained on two held-out shapes ("a sks hexagon" in orange, "a zwx heart" in blue;
:data:`visadapt.diffusion.concept.demo.DEMO_CONCEPTS`, the app's demo concepts, cached in ``--out``). Over seeds and
two-box layouts (32×32 boxes on the 64×64 canvas: left|right, right|left, top/bottom, diagonal) four methods draw
both concepts:

* ``base``: the world model alone, prompted "a sks hexagon and a zwx heart" (it never saw either shape);
* ``set_adapters``: diffusers' multi-LoRA sampling, both LoRAs merged everywhere, same prompt;
* ``composer``: LoRA-Composer with the boxes, every part on (``ComposerConfig()``);
* ``composer -iso -opt``: LoRA-Composer with region injection only: concept isolation, latent optimisation and
  latent re-initialisation off.

Each box is cropped (32×32, the demo CLIP's input) and scored with the demo CLIP: its shape by a linear probe on the
demo CLIP's image features (the CLIP never saw the held-out shapes, so zero-shot cannot name them; the probe is
fitted on 512 rendered crops per class of all 15 shapes plus empty background, and its accuracy and its recall on
the two concepts' shapes, measured on fresh rendered crops, are printed: the recall is the ceiling a perfectly drawn
concept would reach), its colour zero-shot. Per box: ``in box`` = the box's concept shape, ``confused`` = the
other concept's shape, ``missing`` = neither (another shape or empty); ``colour`` = the concept's colour. Methods
without boxes (``base``, ``set_adapters``) are scored in the same boxes: they are told what to draw, not where.

    python benchmarks/composition_quality.py                 # 4 seeds x 4 layouts, a few minutes on 2 CPU cores
    python benchmarks/composition_quality.py --full          # 25 seeds x 4 layouts
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visadapt.diffusion import ComposerConfig, Concept
from visadapt.diffusion.concept.demo import DEMO_CONCEPTS, DEMO_STEPS, train_demo_concept
from visadapt.pipelines import LoRAComposerPipeline
from visadapt.utils.worlds import shapes as world
from visadapt.utils.worlds.judge import DemoCLIPJudge, object_crop
from visadapt.utils.worlds.models import WORLD_MODEL_DIR, load_world_model

LAYOUTS = {
    "left|right": [(0.0, 0.25, 0.5, 0.75), (0.5, 0.25, 1.0, 0.75)],
    "right|left": [(0.5, 0.25, 1.0, 0.75), (0.0, 0.25, 0.5, 0.75)],
    "top/bottom": [(0.25, 0.0, 0.75, 0.5), (0.25, 0.5, 0.75, 1.0)],
    "diagonal": [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)],
}
METHODS = ("base", "set_adapters", "composer", "composer -iso -opt")
PROBE_CLASSES = (*world.HELDOUT_SHAPES, *world.SEEN_SHAPES, "empty")


# -- the shape probe ------------------------------------------------------------------------------------------

def probe_crops(rng: np.random.Generator, label: str, n: int) -> list:
    """``n`` 32×32 crops of rendered canvases as the benchmark crops its samples, half each way: as a box crop sees
    them (the shape ``label`` near the crop's centre, jittered, sometimes cut by the border) and as
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


@dataclass
class ShapeProbe:
    """Multinomial logistic regression on demo-CLIP image features over :data:`PROBE_CLASSES`, with its recall per
    class on fresh rendered crops (what a perfectly drawn shape would score)."""

    weight: torch.Tensor
    bias: torch.Tensor
    accuracy: float
    recall: dict[str, float]

    def __call__(self, judge: DemoCLIPJudge, crops: list) -> list[str]:
        return [PROBE_CLASSES[i] for i in (judge.features(crops) @ self.weight + self.bias).argmax(-1).tolist()]


def fit_probe(judge: DemoCLIPJudge, n_train: int, n_test: int, seed: int, l2: float = 1e-5) -> ShapeProbe:
    """Fit the probe on ``n_train`` rendered crops per class (L-BFGS, ``l2`` weight penalty) and score it on
    ``n_test`` fresh ones per class."""
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rng = np.random.default_rng([seed, split == "test"])
        feats, labels = [], []
        for k, label in enumerate(PROBE_CLASSES):
            feats.append(judge.features(probe_crops(rng, label, n)))
            labels += [k] * n
        data[split] = torch.cat(feats), torch.tensor(labels)
    x, y = data["train"]
    weight = torch.zeros(x.shape[1], len(PROBE_CLASSES), requires_grad=True)
    bias = torch.zeros(len(PROBE_CLASSES), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight, bias = weight.detach(), bias.detach()
    tx, ty = data["test"]
    pred = (tx @ weight + bias).argmax(-1)
    recall = {c: float((pred[ty == k] == k).float().mean()) for k, c in enumerate(PROBE_CLASSES)}
    return ShapeProbe(weight, bias, float((pred == ty).float().mean()), recall)


# -- sampling ---------------------------------------------------------------------------------------------------

def generate(method: str, pipes: dict, loras: list[Path], boxes, seed: int, steps: int, guidance: float):
    prompt = " and ".join(c.prompt for c in DEMO_CONCEPTS)
    common = dict(num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed))
    if method == "base":
        pipes["plain"].disable_lora()
        return pipes["plain"](prompt, **common).images[0]
    if method == "set_adapters":
        pipes["plain"].enable_lora()
        pipes["plain"].set_adapters(["merged_0", "merged_1"], [1.0, 1.0])
        return pipes["plain"](prompt, **common).images[0]
    config = ComposerConfig() if method == "composer" else ComposerConfig(
        concept_isolation=False, latent_optimization=False, latent_reinit=False)
    concepts = [Concept(lora=path, prompt=c.prompt, box=box, name=c.name, tokens=[c.trigger, c.shape])
                for path, c, box in zip(loras, DEMO_CONCEPTS, boxes)]
    return pipes["composer"](prompt, concepts=concepts, composer=config, **common).images[0]


def score(judge: DemoCLIPJudge, probe: ShapeProbe, image, boxes) -> list[dict]:
    """Per concept: the probe's shape and the zero-shot colour of its box crop."""
    crops = [object_crop(image, box=box) for box in boxes]
    shapes = probe(judge, crops)
    _, colours = judge.classify(crops)
    out = []
    for n, concept in enumerate(DEMO_CONCEPTS):
        other = DEMO_CONCEPTS[1 - n]
        out.append({"in_box": shapes[n] == concept.shape, "confused": shapes[n] == other.shape,
                    "missing": shapes[n] not in (concept.shape, other.shape), "colour": colours[n] == concept.colour,
                    "shape": shapes[n]})
    return out


def concept_alone(pipe, judge: DemoCLIPJudge, probe: ShapeProbe, n_seeds: int, steps: int, guidance: float) -> str:
    """Each LoRA alone on the whole canvas ("a sks hexagon", seeds 0..n-1), the drawn shape cropped: does the model
    draw the concept at all, before any composition?"""
    lines = []
    for concept in DEMO_CONCEPTS:
        pipe.enable_lora()
        pipe.set_adapters([f"merged_{DEMO_CONCEPTS.index(concept)}"])
        images = pipe([concept.prompt] * n_seeds, num_inference_steps=steps, guidance_scale=guidance,
                      generator=[torch.Generator().manual_seed(i) for i in range(n_seeds)]).images
        crops = [object_crop(image) for image in images]
        shapes = probe(judge, crops)
        colours = judge.classify(crops)[1]
        lines.append(f"{concept.prompt!r} alone: shape {np.mean([s == concept.shape for s in shapes]):.1%}, colour "
                     f"{np.mean([c == concept.colour for c in colours]):.1%} of {n_seeds} (most drawn: "
                     f"{max(set(shapes), key=shapes.count)})")
    return "\n".join(lines)


def table(rows: dict[str, list[list[dict]]]) -> str:
    head = f"{'method':<20} {'boxes':>5} {'in box':>7} {'confused':>9} {'missing':>8} {'colour':>7} {'both in':>8}"
    lines = [head]
    for method, per_image in rows.items():
        flat = [b for image in per_image for b in image]
        both = np.mean([all(b["in_box"] for b in image) for image in per_image])
        mean = {k: np.mean([b[k] for b in flat]) for k in ("in_box", "confused", "missing", "colour")}
        lines.append(f"{method:<20} {len(flat):>5} {mean['in_box']:>7.1%} {mean['confused']:>9.1%} "
                     f"{mean['missing']:>8.1%} {mean['colour']:>7.1%} {both:>8.1%}")
    return "\n".join(lines)


def save_grid(images: dict[str, list], layouts: list, path: Path, cols: int) -> None:
    """Rows = methods, columns = the first ``cols`` samples, ×3 upscaled, boxes outlined in the concepts' order
    (orange = first concept, blue = second)."""
    from PIL import Image, ImageDraw

    side = world.CANVAS_SIZE * 3
    grid = Image.new("RGB", (cols * (side + 4), len(images) * (side + 4)), "white")
    for r, imgs in enumerate(images.values()):
        for c, (image, boxes) in enumerate(zip(imgs[:cols], layouts[:cols])):
            big = image.resize((side, side), Image.Resampling.NEAREST)
            draw = ImageDraw.Draw(big)
            for box, colour in zip(boxes, ("#ff9900", "#3399ff")):
                draw.rectangle([box[0] * side, box[1] * side, box[2] * side - 1, box[3] * side - 1], outline=colour)
            grid.paste(big, (c * (side + 4), r * (side + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="25 seeds per layout instead of 4")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per layout (overrides --full)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (DPM-Solver)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--concept-steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--out", type=Path, default=Path("runs/composition_quality"),
                        help="concept runs (cached) and results.json")
    parser.add_argument("--grid", type=Path, default=Path("docs/composition_quality.png"))
    parser.add_argument("--model", type=Path, default=WORLD_MODEL_DIR, help="world model folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_seeds = args.seeds or (25 if args.full else 4)

    start = time.perf_counter()
    loras = [train_demo_concept(c, args.out / "concepts", steps=args.concept_steps, model_dir=args.model)
             for c in DEMO_CONCEPTS]
    trained = time.perf_counter() - start
    judge = DemoCLIPJudge()
    probe = fit_probe(judge, n_train=512, n_test=128, seed=0)
    ceiling = ", ".join(f"{c.shape} {probe.recall[c.shape]:.1%}" for c in DEMO_CONCEPTS)
    print(f"concepts ready in {trained:.0f} s; shape probe accuracy on rendered crops: {probe.accuracy:.1%} "
          f"({len(PROBE_CLASSES)} classes, chance {1 / len(PROBE_CLASSES):.1%}); on the concepts' shapes: {ceiling}")
    pipes = {"plain": load_world_model(args.model),
             "composer": load_world_model(args.model, pipeline_class=LoRAComposerPipeline)}
    for i, path in enumerate(loras):
        pipes["plain"].load_lora_weights(str(path), adapter_name=f"merged_{i}")

    jobs = [(name, boxes, seed) for seed in range(n_seeds) for name, boxes in LAYOUTS.items()]
    rows: dict[str, list] = {m: [] for m in METHODS}
    images: dict[str, list] = {m: [] for m in METHODS}
    seconds = {}
    for method in METHODS:
        t0 = time.perf_counter()
        for _, boxes, seed in jobs:
            image = generate(method, pipes, loras, boxes, seed, args.steps, args.guidance)
            images[method].append(image)
            rows[method].append(score(judge, probe, image, boxes))
        seconds[method] = time.perf_counter() - t0
        print(f"{method}: {len(jobs)} images in {seconds[method]:.0f} s", flush=True)

    alone = concept_alone(pipes["plain"], judge, probe, 4 * n_seeds, args.steps, args.guidance)
    text = table(rows)
    print(f"\n{alone}\n\n{n_seeds} seeds x {len(LAYOUTS)} layouts, {args.steps} steps, guidance {args.guidance}")
    print(text)
    save_grid(images, [boxes for _, boxes, _ in jobs], args.grid, cols=min(8, len(jobs)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"seeds": n_seeds, "layouts": list(LAYOUTS), "steps": args.steps, "guidance": args.guidance,
         "probe_accuracy": probe.accuracy, "probe_recall": probe.recall, "seconds": seconds, "table": text,
         "alone": alone,
         "boxes": {m: [[{k: v for k, v in b.items()} for b in image] for image in rows[m]] for m in METHODS}},
        indent=1))
    print(f"grid: {args.grid}; total {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
