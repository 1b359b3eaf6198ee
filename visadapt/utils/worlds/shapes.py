"""The shapes world: tiny procedurally generated captioned images, the embedded default of the few-shot demo; the
pattern world built from it, the incremental demo's classes (:func:`pattern_samples`); and canvases of one or two
shapes, the images of the world model.

Every image shows one flat shape on a dark, noisy grey background, ``IMAGE_SIZE`` pixels square. A
:class:`Scene` has four attributes:

- ``shape``: one of ``SEEN_SHAPES`` (circle, oval, square, ...) or ``HELDOUT_SHAPES`` (hexagon, heart, ...);
- ``colour``: one of ``COLOURS`` (red, orange, ...), jittered per image;
- ``texture``: solid, striped, dotted or checkered, drawn in a darker shade of the colour;
- ``size``: small or large.

:func:`render` draws a scene at a random position near the centre, with a small random rotation (small, so that a
square never turns into a diamond), a random background level and pixel noise. :func:`caption` describes it in
varied words ("a large red striped circle", "a photo of a small blue square with dots", "a picture of a pink
shape", ...), often leaving attributes out.

The demo CLIP (:data:`visadapt.utils.worlds.models.DEMO_CLIP_DIR`, ``--model visadapt-demo-clip``; trained by
``pretrain/demo_clip.py``) only ever sees ``SEEN_SHAPES``: the ``HELDOUT_SHAPES`` never appear in its
pretraining images, and their names never appear in its captions (none of their BPE tokens does either), so
zero-shot accuracy on them is near chance. They are the
few-shot task: an adapter trained on a few labelled images must teach the model both what the new words mean
and which images they name, while zero-shot accuracy on the seen tasks measures what it forgets.

:data:`TASKS` names the classification tasks and :func:`write_task` writes one to disk in the ``imagefolder``
layout (``<task>/<split>/<class>/<idx>.png``) that the few-shot data loader reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ._folders import write_marked

IMAGE_SIZE = 32

SEEN_SHAPES = ("circle", "oval", "square", "rectangle", "triangle", "diamond", "pentagon", "star", "cross", "ring")
# Outlines distinct from every seen shape at IMAGE_SIZE, named by words that share no BPE token with any caption.
HELDOUT_SHAPES = ("hexagon", "heart", "arrow", "crescent", "hourglass")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
TEXTURES = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "large")

# Bump when rendering changes, so that datasets written by an older world are rebuilt instead of reused.
_WORLD_VERSION = 1
_RGB = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 220, 40), "green": (40, 180, 60),
    "cyan": (40, 205, 220), "blue": (40, 80, 235), "purple": (145, 60, 205), "pink": (245, 125, 195),
}
# Shape radius as a fraction of the image side.
_RADIUS = {"small": (0.22, 0.28), "large": (0.34, 0.44)}
_POSITION_RANGE = 0.5  # of the room the shape has: a ViT trained from scratch learns shapes faster near the centre
_MAX_ROTATION_DEG = 12.0
_SUPERSAMPLE = 2  # draw at twice the size and average down: anti-aliased edges and textures
_TEXTURE_PERIOD = 4.0  # pixels at IMAGE_SIZE, whatever the shape size, so textures stay visible on small shapes

_SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
_TEXTURE_ADJECTIVES = {
    "solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "spotted"), "checkered": ("checkered",),
}
_TEXTURE_NOUNS = {"striped": ("stripes",), "dotted": ("dots", "spots"), "checkered": ("a checkered pattern", "checks")}
# How often a caption mentions each attribute.
_P_MENTION = {"size": 0.6, "colour": 0.85, "texture": 0.6, "shape": 0.85}
_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ")


@dataclass(frozen=True)
class Scene:
    """What an image shows; where and how exactly it is drawn is up to :func:`render`."""

    shape: str
    colour: str
    texture: str
    size: str


@dataclass(frozen=True)
class Task:
    """A classification task: classify scenes by ``attribute``, one class per value in ``values``.

    ``classes`` are the class names (as written in prompts); the other attributes are random, with shapes drawn
    from ``shapes``.
    """

    attribute: str
    values: tuple[str, ...]
    classes: tuple[str, ...]
    shapes: tuple[str, ...] = SEEN_SHAPES


TASKS: dict[str, Task] = {
    "heldout-shapes": Task("shape", HELDOUT_SHAPES, HELDOUT_SHAPES, shapes=HELDOUT_SHAPES),
    "shapes": Task("shape", SEEN_SHAPES, SEEN_SHAPES),
    "colours": Task("colour", COLOURS, tuple(f"{c} shape" for c in COLOURS)),
    "textures": Task("texture", TEXTURES, tuple(f"{t} shape" for t in TEXTURES)),
}


def sample_scene(rng: np.random.Generator, shapes: tuple[str, ...] = SEEN_SHAPES) -> Scene:
    """A scene with uniformly random attributes, its shape drawn from ``shapes``."""
    return Scene(
        shape=shapes[rng.integers(len(shapes))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        size=SIZES[rng.integers(len(SIZES))],
    )


# --- rendering ---------------------------------------------------------------------------------------------------

def _regular_polygon(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    """``(n, 2)`` vertices of a regular n-gon, the first one pointing up."""
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return radii[:, None] * _regular_polygon(2 * points)


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    return np.stack([x, y + 2.5], axis=1) / 16.5


def _rect(half_w: float, half_h: float) -> np.ndarray:
    return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])


# Each outline is a list of (polygon in unit coordinates, fill); later polygons paint over earlier ones, so a
# fill of 0 cuts a hole (ring, crescent).
_CROSS = np.array([[-0.3, -0.95], [0.3, -0.95], [0.3, -0.3], [0.95, -0.3], [0.95, 0.3], [0.3, 0.3], [0.3, 0.95],
                   [-0.3, 0.95], [-0.3, 0.3], [-0.95, 0.3], [-0.95, -0.3], [-0.3, -0.3]])
_ARROW = np.array([[-1.0, -0.22], [0.15, -0.22], [0.15, -0.6], [1.0, 0.0], [0.15, 0.6], [0.15, 0.22], [-1.0, 0.22]])
_HOURGLASS = np.array([[-0.75, -0.95], [0.75, -0.95], [0.1, 0.0], [0.75, 0.95], [-0.75, 0.95], [-0.1, 0.0]])
_OUTLINES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_regular_polygon(40), 255)],
    "oval": [(_regular_polygon(40) * [1.0, 0.55], 255)],
    "square": [(_rect(0.78, 0.78), 255)],
    "rectangle": [(_rect(1.0, 0.5), 255)],
    "triangle": [(_regular_polygon(3) + [0, 0.2], 255)],
    "diamond": [(_regular_polygon(4) * [0.62, 1.0], 255)],
    "pentagon": [(_regular_polygon(5) + [0, 0.08], 255)],
    "star": [(_star(), 255)],
    "cross": [(_CROSS, 255)],
    "ring": [(_regular_polygon(40), 255), (_regular_polygon(40, 0.55), 0)],
    "hexagon": [(_regular_polygon(6, phase=0.0), 255)],
    "heart": [(_heart(), 255)],
    "arrow": [(_ARROW, 255)],
    "crescent": [(_regular_polygon(40), 255), (_regular_polygon(40, 0.85) + [0.45, -0.15], 0)],
    "hourglass": [(_HOURGLASS, 255)],
}


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float = _TEXTURE_PERIOD) -> np.ndarray:
    """1 where the texture shows the full colour, 0 where it shows the darker shade; ``u, v`` in pixels, relative to
    the shape's centre (plus a random phase below one period)."""
    p = period
    if texture == "striped":
        return (np.floor(v / (p / 2)) % 2 == 0).astype(np.float32)
    if texture == "dotted":
        du, dv = u % p - p / 2, v % p - p / 2
        return (du * du + dv * dv > (0.3 * p) ** 2).astype(np.float32)
    if texture == "checkered":
        return ((np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2 == 0).astype(np.float32)
    # the pattern world's kinds (PATTERN_KINDS), never drawn in the shapes world
    if texture == "barred":  # vertical stripes
        return (np.floor(u / (p / 2)) % 2 == 0).astype(np.float32)
    if texture == "ringed":  # concentric rings about a point within a period of the shape's centre
        return (np.floor(np.hypot(u, v) / (p / 2)) % 2 == 0).astype(np.float32)
    return np.ones_like(u, dtype=np.float32)


def render_array(scene: Scene, rng: np.random.Generator, image_size: int = IMAGE_SIZE,
                 period: float = _TEXTURE_PERIOD) -> np.ndarray:
    """Draw ``scene``; returns ``(image_size, image_size, 3)`` uint8 RGB. Position, rotation, colour and noise
    come from ``rng``; ``period`` is the texture's in pixels at ``IMAGE_SIZE`` (the pattern world varies it)."""
    s = _SUPERSAMPLE
    side = image_size * s
    radius = rng.uniform(*_RADIUS[scene.size]) * side
    room = side / 2 - 0.9 * radius  # how far the centre may move: the shape may touch the border, not leave
    centre = side / 2 + rng.uniform(-1, 1, size=2) * room * _POSITION_RANGE
    theta = np.deg2rad(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

    mask_img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask_img)
    for polygon, fill in _OUTLINES[scene.shape]:
        points = polygon @ rot.T * radius + centre
        draw.polygon([tuple(p) for p in points], fill=fill)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0

    # Texture in the shape's own (rotated) frame, so stripes turn with the shape.
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / s
    dx, dy = x - centre[0] / s, y - centre[1] / s
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    pattern = _texture(scene.texture, u + rng.uniform(0, period), v + rng.uniform(0, period), period)

    colour = np.clip(np.array(_RGB[scene.colour]) * rng.uniform(0.85, 1.05) + rng.normal(0, 8, 3), 0, 255)
    fill = colour * (0.35 + 0.65 * pattern[..., None])
    background = rng.uniform(0, 70)
    image = background + mask * (fill - background)
    image = image.reshape(image_size, s, image_size, s, 3).mean(axis=(1, 3))
    image += rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, image_size: int = IMAGE_SIZE,
           period: float = _TEXTURE_PERIOD) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size`` pixels square (see :func:`render_array`)."""
    return Image.fromarray(render_array(scene, rng, image_size, period))


# --- captions ----------------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def caption(scene: Scene, rng: np.random.Generator, shape_only: bool = False) -> str:
    """A varied description of ``scene``, e.g. "a large red striped circle", "a photo of a small blue square with
    dots", "a picture of a pink shape."; size, colour and texture are each sometimes left out, and the shape is
    sometimes called just "shape" or "object". ``shape_only``: name the shape and nothing else ("a circle.")."""
    mention = {**{a: 0.0 for a in _P_MENTION}, "shape": 1.0} if shape_only else _P_MENTION
    size = _pick(rng, _SIZE_WORDS[scene.size]) if rng.random() < mention["size"] else ""
    colour = scene.colour if rng.random() < mention["colour"] else ""
    with_texture = rng.random() < mention["texture"]
    named = rng.random() < mention["shape"] or not (colour or with_texture)
    noun = scene.shape if named else _pick(rng, ("shape", "object"))

    texture_adjective, texture_tail = "", ""
    if with_texture:
        if scene.texture != "solid" and rng.random() < 0.4:
            texture_tail = f" with {_pick(rng, _TEXTURE_NOUNS[scene.texture])}"
        else:
            texture_adjective = _pick(rng, _TEXTURE_ADJECTIVES[scene.texture])
    if colour and not texture_adjective and rng.random() < 0.25:
        words = [size, noun]
        tail = f" that is {colour}{texture_tail}"
    else:
        words = [size, colour, texture_adjective, noun]
        tail = texture_tail
    phrase = " ".join(w for w in words if w) + tail
    article = "an" if phrase[0] in "aeiou" else "a"
    full_stop = "." if rng.random() < 0.5 else ""
    return f"{_pick(rng, _PREFIXES)}{article} {phrase}{full_stop}"


# --- the pattern world: the class-incremental demo's classes ----------------------------------------------------
# Classes told apart by a cue the demo CLIP was never trained on: coarse textures. The CLIP's captions name the
# shape, colour, size and the three fine textures (period _TEXTURE_PERIOD), so its frozen features separate the
# shapes below and barely the kinds (nearest class mean 90-91 % on the 3 shapes, 36-39 % on the 5 kinds, chance 20 %;
# `python benchmarks/incremental.py --probe`). A class is a (shape, texture kind) pair, drawn large with the texture at
# PATTERN_PERIOD pixels, colour and placement random. Class i is (PATTERN_SHAPES[i % 3], PATTERN_KINDS[i % 5]): as 3
# and 5 are coprime, the 15 classes are every pair once, and any five consecutive classes hold every kind and every
# shape, so a base session of the first five teaches all the cue's values that the later classes recombine.

PATTERN_SHAPES = ("circle", "square", "triangle")
PATTERN_KINDS = ("striped", "barred", "dotted", "checkered", "ringed")  # barred: vertical stripes; ringed: rings
PATTERN_PERIOD = 8.0  # pixels at IMAGE_SIZE: twice the shapes world's, and two of its kinds are new
PATTERN_CLASSES = tuple((PATTERN_SHAPES[i % len(PATTERN_SHAPES)], PATTERN_KINDS[i % len(PATTERN_KINDS)])
                        for i in range(len(PATTERN_SHAPES) * len(PATTERN_KINDS)))


def pattern_name(shape: str, kind: str) -> str:
    """"striped circle", "barred square", ... (a pattern class's name)."""
    return f"{kind} {shape}"


def pattern_samples(classes: Sequence[tuple[str, str]] = PATTERN_CLASSES, n_per_class: int = 30,
                    stream: Sequence[int] = (0,)) -> Iterator[tuple[Image.Image, int]]:
    """``n_per_class`` (image, index in ``classes``) pairs per (shape, texture kind) class, class by class: a large
    shape with the kind's texture at :data:`PATTERN_PERIOD` pixels, colour, position and rotation random.

    Class ``i`` draws from its own random stream, seeded ``[*stream, i]``, so the first ``n`` images of a class do
    not depend on ``n_per_class`` or on the other classes.
    """
    for label, (shape, kind) in enumerate(classes):
        if shape not in _OUTLINES or kind not in (*TEXTURES, *PATTERN_KINDS):
            raise ValueError(f"pattern class ({shape!r}, {kind!r}): the shape must be one of the world's "
                             f"({', '.join(_OUTLINES)}) and the kind one of {', '.join((*TEXTURES, *PATTERN_KINDS))}.")
        rng = np.random.default_rng([*stream, label])
        for _ in range(n_per_class):
            scene = Scene(shape, COLOURS[rng.integers(len(COLOURS))], kind, "large")
            yield render(scene, rng, period=PATTERN_PERIOD), label


# --- tasks on disk -----------------------------------------------------------------------------------------------

_SPLITS = ("train", "val", "test")


def task_samples(task: str, split: str, n_per_class: int, seed: int,
                 image_size: int = IMAGE_SIZE) -> Iterator[tuple[Image.Image, int]]:
    """``n_per_class`` (image, class index) pairs per class of ``TASKS[task]``, class by class.

    Each (seed, split, class) has its own random stream, so splits never share images and the first ``n`` images
    of a class do not depend on ``n_per_class``.
    """
    spec = TASKS[task]
    for label, value in enumerate(spec.values):
        rng = np.random.default_rng([seed, _SPLITS.index(split), label])
        for _ in range(n_per_class):
            scene = sample_scene(rng, spec.shapes)
            scene = Scene(**{**asdict(scene), spec.attribute: value})
            yield render(scene, rng, image_size), label


def shape_samples(shapes: Sequence[str], n_per_class: int, stream: Sequence[int] = (0,)
                  ) -> Iterator[tuple[Image.Image, int]]:
    """``n_per_class`` (image, index in ``shapes``) pairs per shape, shape by shape; colour, texture and size random.

    Shape ``i`` draws from its own random stream, seeded ``[*stream, i]``.
    """
    for label, shape in enumerate(shapes):
        rng = np.random.default_rng([*stream, label])
        for _ in range(n_per_class):
            yield render(sample_scene(rng, (shape,)), rng), label


def write_task(root: Path, task: str, n_train: int, n_val: int, n_test: int, seed: int) -> Path:
    """Write ``TASKS[task]`` as ``root/<task>/{train,val,test}/<class>/<idx>.png`` and return ``root/<task>``.

    ``<class>`` is the class name with spaces as underscores; ``n_*`` images per class, a split with 0 is left out.
    The folder is built beside its destination and renamed into place, and reused as it is when its
    ``world.json`` marker records the same parameters.
    """
    root = Path(root)
    dest = root / task
    marker = {"task": task, "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed,
              "image_size": IMAGE_SIZE, "world_version": _WORLD_VERSION}
    class_dirs = [name.replace(" ", "_") for name in TASKS[task].classes]

    def fill(stage: Path) -> None:
        for split, n in zip(_SPLITS, (n_train, n_val, n_test)):
            if n == 0:
                continue
            for idx, (image, label) in enumerate(task_samples(task, split, n, seed)):
                folder = stage / split / class_dirs[label]
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{idx % n}.png")

    write_marked(dest, marker, fill)
    return dest


# --- canvases: one or two shapes at free positions (the world model's images) -------------------------------------
# Added beside the single-shape world above, which they leave as it is. A canvas is CANVAS_SIZE pixels square; each
# shape keeps the proportions of a single-shape image of IMAGE_SIZE (its radius drawn as render_array draws it,
# relative to IMAGE_SIZE), so a IMAGE_SIZE crop around a shape looks like the images the demo CLIP was trained on.

CANVAS_SIZE = 64
_CANVAS_GAP = 2.0  # pixels between the outlines' bounding circles of two shapes on one canvas


@dataclass(frozen=True)
class CanvasObject:
    """One shape on a canvas: ``centre`` (x, y) and ``radius`` in canvas pixels."""

    shape: str
    colour: str
    centre: tuple[float, float]
    radius: float


def canvas_phrase(shape: str, colour: Optional[str]) -> str:
    """"a red star", "an orange circle", or "a star" when ``colour`` is None."""
    words = f"{colour} {shape}" if colour else shape
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def sample_canvas(rng: np.random.Generator, n_objects: int, shapes: tuple[str, ...] = SEEN_SHAPES,
                  canvas_size: int = CANVAS_SIZE) -> list[CanvasObject]:
    """``n_objects`` (1 or 2) shapes of random shape, colour, size and position; two shapes never overlap."""
    objects: list[CanvasObject] = []
    while len(objects) < n_objects:
        scene = sample_scene(rng, shapes)
        radius = rng.uniform(*_RADIUS[scene.size]) * IMAGE_SIZE
        centre = tuple(rng.uniform(0.9 * radius, canvas_size - 0.9 * radius, size=2))
        if all(np.hypot(centre[0] - o.centre[0], centre[1] - o.centre[1]) > radius + o.radius + _CANVAS_GAP
               for o in objects):
            objects.append(CanvasObject(scene.shape, scene.colour, centre, radius))
    return objects


def canvas_caption(objects: list[CanvasObject], rng: np.random.Generator, p_colour: float = 0.9) -> str:
    """"a red star" / "a red star and a blue circle" (objects in random order; colours sometimes left out)."""
    order = rng.permutation(len(objects))
    return " and ".join(canvas_phrase(objects[i].shape, objects[i].colour if rng.random() < p_colour else None)
                        for i in order)


def render_canvas_array(objects: list[CanvasObject], rng: np.random.Generator,
                        canvas_size: int = CANVAS_SIZE) -> np.ndarray:
    """Draw flat (solid) shapes on a dark grey background with light pixel noise: ``(S, S, 3)`` uint8 RGB.

    Rotation, colour jitter and the background level are drawn from ``rng`` as in :func:`render_array`.
    """
    s = _SUPERSAMPLE
    side = canvas_size * s
    image = np.full((side, side, 3), rng.uniform(0, 70), dtype=np.float32)
    for obj in objects:
        theta = np.deg2rad(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        mask_img = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(mask_img)
        for polygon, fill in _OUTLINES[obj.shape]:
            points = polygon @ rot.T * obj.radius * s + np.asarray(obj.centre) * s
            draw.polygon([tuple(p) for p in points], fill=fill)
        mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0
        colour = np.clip(np.array(_RGB[obj.colour]) * rng.uniform(0.85, 1.05) + rng.normal(0, 8, 3), 0, 255)
        image += mask * (colour - image)
    image = image.reshape(canvas_size, s, canvas_size, s, 3).mean(axis=(1, 3))
    image += rng.normal(0, rng.uniform(1, 4), image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_canvas(objects: list[CanvasObject], rng: np.random.Generator,
                  canvas_size: int = CANVAS_SIZE) -> Image.Image:
    """:func:`render_canvas_array` as a PIL image."""
    return Image.fromarray(render_canvas_array(objects, rng, canvas_size))
