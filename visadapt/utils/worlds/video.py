"""The video world: procedural tracking sequences, the embedded default of ``visadapt track train --demo``.

Each sequence shows one target (a textured shape) moving over a textured background among distractors of the same
shape (other colours or textures), with the hard cases of real tracking benchmarks:

- occlusion: an occluding bar drifts across the frame, and distractors may pass in front of the target;
- scale change: the target's size follows a smooth random walk (0.6–1.8 × its first size);
- out of view: the target may leave the frame and come back (``absence.label`` 1, no box).

:func:`write_world` writes sequences in the GOT-10k layout (``list.txt``, ``00000001.jpg …``, ``groundtruth.txt``,
``absence.label``, ``cover.label``), so ``load_sequences("got10k", root, split)`` reads them. Everything is a
function of (seed, kind, split, sequence index): the same call writes the same files.

Kinds: ``pretrain`` (the shapes the shipped demo ViT was pretrained on) and ``demo`` (other shapes and
textures, the world the demo adapts it to).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._folders import write_marked

FRAME_W, FRAME_H = 128, 96
_SUPERSAMPLE = 2
_WORLD_VERSION = 1


def _polygon(n: int, phase: float = -np.pi / 2, radii=(1.0,)) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n * len(radii)) / (n * len(radii))
    r = np.resize(np.asarray(radii, dtype=np.float64), n * len(radii))
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


_CROSS = np.array([[-0.35, -1], [0.35, -1], [0.35, -0.35], [1, -0.35], [1, 0.35], [0.35, 0.35], [0.35, 1],
                   [-0.35, 1], [-0.35, 0.35], [-1, 0.35], [-1, -0.35], [-0.35, -0.35]])
# Outlines in unit coordinates (x, y in [-1, 1]); a second polygon with fill 0 cuts a hole.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "ellipse": [(_polygon(32), 255)],
    "box": [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64), 255)],
    "triangle": [(_polygon(3) * 1.15 + [0, 0.2], 255)],
    "star": [(_polygon(5, radii=(1.0, 0.45)), 255)],
    "hexagon": [(_polygon(6, phase=0.0), 255)],
    "cross": [(_CROSS, 255)],
    "diamond": [(_polygon(4), 255)],
    "ring": [(_polygon(32), 255), (_polygon(32) * 0.5, 0)],
}
TEXTURES = ("solid", "stripes", "dots", "checks", "rings")
KINDS: dict[str, dict] = {
    "pretrain": {"shapes": ("ellipse", "box", "triangle", "star"), "textures": ("solid", "stripes", "dots", "checks")},
    "demo": {"shapes": ("hexagon", "cross", "diamond", "ring"), "textures": ("stripes", "dots", "checks", "rings")},
}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass
class _Object:
    shape: str
    colour: np.ndarray  # (3,) RGB
    texture: str
    period: float
    phase: np.ndarray  # (2,)
    size: float  # half-width in px at scale 1
    aspect: float  # half-height / half-width
    pos: np.ndarray  # centre (x, y)
    vel: np.ndarray
    log_scale: float = 0.0
    scale_vel: float = 0.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0, 1)
    rgb = np.clip(np.abs(((hue * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)  # HSV with S = V = 1
    return 60 + rgb * rng.uniform(150, 195)


def _new_object(rng: np.random.Generator, kind: dict, shape: str, pos: np.ndarray) -> _Object:
    return _Object(shape, _random_colour(rng), kind["textures"][rng.integers(len(kind["textures"]))],
                   rng.uniform(3.0, 6.0), rng.uniform(0, 6, 2), rng.uniform(6.0, 12.0), rng.uniform(0.6, 1.5),
                   pos.astype(np.float64), rng.normal(0, 1.6, 2))


def _background(rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float: smooth coloured noise plus a fine static grain."""
    coarse = rng.uniform(0, 1, (4, 5, 3))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((FRAME_W, FRAME_H), Image.BICUBIC)
    base = np.asarray(img, dtype=np.float64) / 255
    tint = rng.uniform(40, 110, 3)
    return tint + (base - 0.5) * rng.uniform(40, 90) + rng.normal(0, 6, (FRAME_H, FRAME_W, 1))


def _window(obj: _Object, theta: float) -> tuple[slice, slice]:
    """The frame rows and columns the object may cover (its box plus a pixel), clipped to the frame."""
    x1, y1, x2, y2 = _extent(obj, theta)
    cols = slice(int(np.clip(np.floor(x1) - 1, 0, FRAME_W)), int(np.clip(np.ceil(x2) + 1, 0, FRAME_W)))
    rows = slice(int(np.clip(np.floor(y1) - 1, 0, FRAME_H)), int(np.clip(np.ceil(y2) + 1, 0, FRAME_H)))
    return rows, cols


def _mask(obj: _Object, theta: float, window: tuple[slice, slice]) -> np.ndarray:
    """Coverage of ``obj`` in [0, 1] (anti-aliased) over ``window`` of the frame."""
    rows, cols = window
    h, w = rows.stop - rows.start, cols.stop - cols.start
    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)))
    s = _SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    half = obj.size * np.exp(obj.log_scale) * np.array([1.0, obj.aspect])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    offset = np.array([cols.start, rows.start])
    for poly, fill in SHAPES[obj.shape]:
        pts = ((poly * half) @ rot.T + obj.pos - offset) * s
        draw.polygon([tuple(p) for p in pts], fill=fill)
    m = np.asarray(canvas, dtype=np.float64) / 255
    return m.reshape(h, s, w, s).mean(axis=(1, 3))


def _extent(obj: _Object, theta: float) -> np.ndarray:
    """The object's full box (x1, y1, x2, y2), whether in the frame or not."""
    half = obj.size * np.exp(obj.log_scale) * np.array([1.0, obj.aspect])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = np.concatenate([(poly * half) @ rot.T for poly, fill in SHAPES[obj.shape] if fill]) + obj.pos
    return np.concatenate([pts.min(0), pts.max(0)])


_GRID_Y, _GRID_X = np.mgrid[0:FRAME_H, 0:FRAME_W].astype(np.float64)
_BAR_STRIPES = (0.8 + 0.2 * (np.arange(FRAME_H) // 4 % 2))[:, None, None]


def _paint(obj: _Object, window: tuple[slice, slice]) -> np.ndarray:
    """The object's colour with its texture (in its own frame, so it moves with it) over ``window``."""
    scale = np.exp(obj.log_scale)
    u = (_GRID_X[window] - obj.pos[0]) / scale + obj.phase[0]
    v = (_GRID_Y[window] - obj.pos[1]) / scale + obj.phase[1]
    p = obj.period
    if obj.texture == "stripes":
        pattern = np.floor(v / (p / 2)) % 2
    elif obj.texture == "dots":
        pattern = ((u % p - p / 2) ** 2 + (v % p - p / 2) ** 2 > (0.3 * p) ** 2).astype(np.float64)
    elif obj.texture == "checks":
        pattern = (np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2
    elif obj.texture == "rings":
        pattern = np.floor(np.hypot(u - obj.phase[0], v - obj.phase[1]) / (p / 2)) % 2
    else:
        pattern = np.ones_like(u)
    return obj.colour * (0.4 + 0.6 * pattern[..., None])


def _step(obj: _Object, rng: np.random.Generator, keep_inside: bool) -> None:
    obj.vel = 0.9 * obj.vel + rng.normal(0, 0.5, 2)
    speed = np.linalg.norm(obj.vel)
    if speed > 3.5:
        obj.vel *= 3.5 / speed
    obj.pos = obj.pos + obj.vel
    margin = -obj.size if not keep_inside else obj.size
    for axis, side in ((0, FRAME_W), (1, FRAME_H)):
        if obj.pos[axis] < margin and obj.vel[axis] < 0 or obj.pos[axis] > side - margin and obj.vel[axis] > 0:
            obj.vel[axis] = -obj.vel[axis]
    obj.scale_vel = 0.9 * obj.scale_vel + rng.normal(0, 0.012)
    obj.log_scale = float(np.clip(obj.log_scale + obj.scale_vel, np.log(0.6), np.log(1.8)))


def generate_sequence(seed: int, index: int, n_frames: int = 60, kind: str = "demo", split: str = "train"
                      ) -> dict[str, np.ndarray]:
    """One sequence: ``frames`` (N, H, W, 3) uint8, ``boxes`` (N, 4) xywh (NaN when out of view), ``absence``
    (N,) 0/1 and ``cover`` (N,) 0–8 (GOT-10k visible-ratio bins)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown world kind {kind!r}; choose one of {sorted(KINDS)}.")
    spec = KINDS[kind]
    rng = np.random.default_rng([seed, list(KINDS).index(kind), SPLIT_IDS.get(split, 3), index])
    shape = spec["shapes"][rng.integers(len(spec["shapes"]))]
    centre = np.array([FRAME_W, FRAME_H]) / 2
    target = _new_object(rng, spec, shape, centre + rng.uniform(-20, 20, 2))
    distractors = [_new_object(rng, spec, shape, rng.uniform([10, 10], [FRAME_W - 10, FRAME_H - 10]))
                   for _ in range(int(rng.integers(1, 4)))]
    for d in distractors:
        if rng.random() < 0.5:
            d.colour = np.clip(target.colour + rng.normal(0, 25, 3), 0, 255)  # same colour, other texture
            others = [t for t in spec["textures"] if t != target.texture]
            d.texture = others[rng.integers(len(others))]
    leaves = rng.random() < 0.3  # this target may wander out of view
    bar = None
    if rng.random() < 0.6:
        bar = {"x": rng.uniform(-20, FRAME_W + 20), "v": rng.choice([-1, 1]) * rng.uniform(0.5, 1.5),
               "w": rng.uniform(8, 16), "shade": rng.uniform(20, 200)}
    background = _background(rng)
    thetas = {id(o): rng.uniform(-0.3, 0.3) for o in [target, *distractors]}
    order = [target, *distractors]
    rng.shuffle(order)  # distractors before the target in this list are drawn behind it, after it in front
    frames = np.zeros((n_frames, FRAME_H, FRAME_W, 3), dtype=np.uint8)
    boxes = np.full((n_frames, 4), np.nan)
    absence, cover = np.zeros(n_frames, dtype=np.int64), np.zeros(n_frames, dtype=np.int64)
    for t in range(n_frames):
        if t:
            _step(target, rng, keep_inside=not leaves)
            for d in distractors:
                _step(d, rng, keep_inside=True)
            if bar is not None:
                bar["x"] += bar["v"]
        image = background.copy()
        target_mask = None
        for obj in order:
            window = _window(obj, thetas[id(obj)])
            m = _mask(obj, thetas[id(obj)], window)
            if obj is target:
                target_mask = np.zeros((FRAME_H, FRAME_W))
                target_mask[window] = m
            elif target_mask is not None:
                target_mask[window] *= 1 - m
            image[window] += m[..., None] * (_paint(obj, window) - image[window])
        if bar is not None:
            cols = slice(int(np.clip(np.ceil(bar["x"]), 0, FRAME_W)), int(np.clip(np.ceil(bar["x"] + bar["w"]), 0,
                                                                                   FRAME_W)))
            image[:, cols] = bar["shade"] * _BAR_STRIPES
            target_mask[:, cols] = 0
        image += rng.normal(0, 3, image.shape)
        frames[t] = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        full = _extent(target, thetas[id(target)])
        clipped = np.clip(full, 0, [FRAME_W, FRAME_H, FRAME_W, FRAME_H])
        ratio = min(1.0, float(target_mask.sum() / _area(target)))
        if clipped[2] - clipped[0] >= 1 and clipped[3] - clipped[1] >= 1 and ratio > 0.02:
            boxes[t] = [clipped[0], clipped[1], clipped[2] - clipped[0], clipped[3] - clipped[1]]
        else:
            absence[t] = 1
        cover[t] = _cover_bin(ratio) if not absence[t] else 0
    return {"frames": frames, "boxes": boxes, "absence": absence, "cover": cover}


def _area(obj: _Object) -> float:
    """The object's whole area in px (in or out of the frame): shoelace over its outline, holes subtracted."""
    half = obj.size * np.exp(obj.log_scale) * np.array([1.0, obj.aspect])
    total = 0.0
    for poly, fill in SHAPES[obj.shape]:
        x, y = (poly * half).T
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        total += area if fill else -area
    return total


def _cover_bin(ratio: float) -> int:
    """GOT-10k cover levels: 0 = 0 %, 1–7 = (0, 15], (15, 30], …, (90, 100), 8 = 100 %."""
    if ratio <= 0:
        return 0
    if ratio >= 0.999:
        return 8
    return int(min(7, np.ceil(ratio * 100 / 15)))


def write_world(root: str | Path, split: str = "train", n_sequences: int = 40, n_frames: int = 60, seed: int = 0,
                kind: str = "demo") -> Path:
    """Write ``n_sequences`` sequences as ``root/<split>/`` in the GOT-10k layout and return ``root``.

    The split folder is built beside its destination and renamed into place; it is reused as it is when its
    ``world.json`` marker records the same parameters.
    """
    root = Path(root)
    dest = root / split
    marker = {"split": split, "n_sequences": n_sequences, "n_frames": n_frames, "seed": seed, "kind": kind,
              "world_version": _WORLD_VERSION}

    def fill(stage: Path) -> None:
        names = []
        for i in range(n_sequences):
            name = f"World_{split.capitalize()}_{i + 1:06d}"
            names.append(name)
            seq = generate_sequence(seed, i, n_frames, kind, split)
            folder = stage / name
            folder.mkdir()
            for t, frame in enumerate(seq["frames"]):
                Image.fromarray(frame).save(folder / f"{t + 1:08d}.jpg", quality=92)
            rows = ["nan,nan,nan,nan" if np.isnan(b).any() else ",".join(f"{v:.2f}" for v in b) for b in seq["boxes"]]
            (folder / "groundtruth.txt").write_text("\n".join(rows) + "\n")
            (folder / "absence.label").write_text("\n".join(map(str, seq["absence"])) + "\n")
            (folder / "cover.label").write_text("\n".join(map(str, seq["cover"])) + "\n")
        (stage / "list.txt").write_text("\n".join(names) + "\n")

    write_marked(dest, marker, fill)
    return root
