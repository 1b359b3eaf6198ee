"""Image groups for EasyRef training and evaluation: a folder per subject, read lazily.

The layout (:data:`LAYOUT`)::

    groups/                    one folder per subject: a person, a character, a style, an object
      <subject>/
        01.jpg                 the subject's images (.png .jpg .jpeg .webp .bmp)
        01.txt                 the caption of 01.jpg; several lines = several captions, one is drawn per step
        02.png
        02.txt
      <other subject>/
        ...

Captions sit beside their image as ``<image stem>.txt`` (UTF-8), the layout most captioning tools write. An optional
``<image stem>.face.txt`` holds a face box ``x1 y1 x2 y2`` (pixels of the image): stage 2 then takes the face crop as
the reference, as the official identity data does. Only the file names, captions and boxes are read when the folder
is scanned; the images are opened when an item is drawn.

What an item holds depends on the training stage (the official recipe):

- stages 1 and 2 (alignment pre-training, single-reference fine-tuning): every image is a target, and its single
  reference is the target itself, cropped the same way (whole with keep-aspect targets); in stage 2 an image with a
  face box is referenced by its face instead (a square around the box, enlarged by a random 0-50 %, kept inside the
  image, flipped half of the time);
- stage 3 (multi-reference fine-tuning): every image of a group with at least two images is a target, and its
  references are the group's *other* images, shuffled, at most ``max_refs``; with probability ``truncate_rate`` only
  the first k of them are kept, k drawn from 2..n-1 (the truncation augmentation).

How the target becomes the UNet's pixels (``target_crop``; the official stage scripts differ here):

- ``square`` (stages 1 and 2): the shorter side resized to the resolution R (bilinear), a centre R x R crop; SDXL's
  time ids are (original h, w, crop top, left, R, R);
- ``keep-aspect`` (stage 3, which the official script runs without ``--random_crop``): the whole image resized
  (bicubic) to about R² pixels in its own aspect ratio, each side rounded up to a multiple of ``size_multiple``
  (:func:`aspect_size`, the official ``adaptive_resize``); the time ids are (H, W, 0, 0, H, W) of the resized image,
  as the official dataset fills them. Targets of different shapes cannot share a micro-batch, so this trains one
  example per device, as the official stage 3 does (batch 1 per GPU).

Every item may drop its conditions (classifier-free guidance): the references alone with probability ``ref_drop``
(they become one black 512² image), the caption alone with ``text_drop`` (it becomes "" for the CLIP text encoders
and the MLLM instruction), both with ``both_drop``.

The evaluation split (:func:`holdout_split`, the MRBench protocol) holds back the last image (by name) of every group
with two images or more: the generated image is compared with it, its caption is the prompt and the group's other
images are the references. Training with ``holdout`` leaves these images out.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from visadapt.utils import DatasetLayoutError
from visadapt.utils.images import open_rgb

from ..train_common import centre_crop_pixels
from .config import SIZE_MULTIPLE, TARGET_CROPS

__all__ = ["LAYOUT", "IMAGE_SUFFIXES", "ImageGroup", "EasyRefItems", "scan_groups", "holdout_split", "open_image",
           "load_target", "aspect_size", "collate_items", "DROP_IMAGE_SIZE"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DROP_IMAGE_SIZE = 512  # a dropped reference set is one black image of this size, as in the official training
LAYOUT = """Expected layout (one folder per subject, a caption file beside each image):
  groups/
    <subject>/
      01.jpg      an image (.png .jpg .jpeg .webp .bmp)
      01.txt      its caption (one per line; one is drawn per step)
      02.png
      02.txt
      02.face.txt optional face box "x1 y1 x2 y2" (stage 2 references the face)
    <other subject>/
      ..."""


@dataclass(frozen=True)
class ImageGroup:
    """One subject: its image files (sorted by name) and each image's captions."""

    name: str
    images: tuple[Path, ...]
    captions: tuple[tuple[str, ...], ...]
    faces: tuple[Optional[tuple[float, float, float, float]], ...] = ()

    def __len__(self) -> int:
        return len(self.images)

    def without(self, index: int) -> "ImageGroup":
        keep = [i for i in range(len(self)) if i != index]
        return ImageGroup(self.name, tuple(self.images[i] for i in keep), tuple(self.captions[i] for i in keep),
                          tuple(self.faces[i] for i in keep) if self.faces else ())

    def face(self, index: int) -> Optional[tuple[float, float, float, float]]:
        return self.faces[index] if self.faces else None


def _layout_error(message: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"{message}\n{LAYOUT}")


def _read_captions(image: Path) -> tuple[str, ...]:
    path = image.with_suffix(".txt")
    if not path.is_file():
        raise _layout_error(f"{image}: no caption file; write its caption into {path.name} beside it.")
    lines = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise _layout_error(f"{path}: the caption file is empty; write at least one caption line into it.")
    return lines


def _read_face(image: Path) -> Optional[tuple[float, float, float, float]]:
    path = image.with_suffix(".face.txt")
    if not path.is_file():
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in path.read_text(encoding="utf-8").split())
    except ValueError:
        raise _layout_error(f"{path}: a face box is four numbers, x1 y1 x2 y2 in pixels; fix or remove the file.") \
            from None
    if x2 <= x1 or y2 <= y1:
        raise _layout_error(f"{path}: the face box {x1:g} {y1:g} {x2:g} {y2:g} is empty (x2 > x1 and y2 > y1 needed).")
    return x1, y1, x2, y2


def checked_face(image: Path, box: tuple[float, float, float, float],
                 size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` if it lies inside the (upright) image of ``size`` (width, height); else a
    :class:`DatasetLayoutError` naming the file, the box and the size (the crop would take the whole image)."""
    x1, y1, x2, y2 = box
    width, height = size
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise _layout_error(f"{image.with_suffix('.face.txt')}: the face box {x1:g} {y1:g} {x2:g} {y2:g} is not inside "
                            f"the {width}x{height} image {image.name} (x1 y1 x2 y2 in its pixels, 0 <= x <= {width}, "
                            f"0 <= y <= {height}); fix the box (clip it to the image) or remove the file.")
    return box


def face_crop(image, box: tuple[float, float, float, float], rng: random.Random):
    """The official face reference: a square around ``box`` (side = its longer side), each side pushed out by a
    random 0-49 % of the box (as far as the image allows), shifted back inside the image, flipped with p = 0.5."""
    from PIL import ImageOps

    width, height = image.size
    x1, y1, x2, y2 = box
    cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1)
    side = min(side * (1 + 2 * min(rng.randrange(50) / 100, (width / side - 1) / 2, (height / side - 1) / 2)),
               width, height)
    left = min(max(cx - side / 2, 0), width - side)
    top = min(max(cy - side / 2, 0), height - side)
    crop = image.crop((round(left), round(top), round(left + side), round(top + side)))
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def scan_groups(root: Union[str, Path], min_images: int = 1) -> list[ImageGroup]:
    """The groups of ``root`` (sorted by folder name); each must hold ``min_images`` captioned images or more.
    Raises :class:`~visadapt.utils.DatasetLayoutError` (showing :data:`LAYOUT`) on a wrong tree."""
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(f"{root}: no such folder; pass the folder that holds one sub-folder per subject.")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES][:3]
        hint = f" (it holds images directly: {', '.join(loose)}; move them into a sub-folder per subject)" if loose \
            else ""
        raise _layout_error(f"{root}: no group folder{hint}.")
    groups = []
    for folder in folders:
        images = tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            raise _layout_error(f"{folder}: the group folder holds no image; add the subject's images (with their "
                                ".txt captions) or remove the folder.")
        if len(images) < min_images:
            raise _layout_error(f"{folder}: {len(images)} image(s); this needs at least {min_images} per group "
                                "(references plus a target); add images or remove the folder.")
        faces = tuple(_read_face(p) for p in images)
        groups.append(ImageGroup(folder.name, images, tuple(_read_captions(p) for p in images),
                                 faces if any(faces) else ()))
    return groups


def holdout_split(groups: Sequence[ImageGroup]) -> tuple[list[ImageGroup], list[tuple[ImageGroup, int]]]:
    """(groups without their held-back image, [(group, index of its held-back target)]): the last image by name of
    each group with two images or more is held back; a single-image group stays whole and has no target."""
    train, targets = [], []
    for group in groups:
        if len(group) >= 2:
            targets.append((group, len(group) - 1))
            train.append(group.without(len(group) - 1))
        else:
            train.append(group)
    return train, targets


def open_image(path: Path):
    """The image at ``path`` as upright RGB; an unreadable or too large file raises :class:`DatasetLayoutError`
    naming it (:func:`~visadapt.utils.images.open_rgb`)."""
    return open_rgb(path, DatasetLayoutError, "replace or remove it (and its .txt)")


def aspect_size(width: int, height: int, resolution: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(width, height) of a keep-aspect target, the official ``adaptive_resize``: a square image becomes R x R; any
    other is scaled to an area of R² when its area is over 1.1² or under 0.8² times R² (kept as it is in between);
    then each side is rounded up to a multiple of ``multiple``."""
    times = math.sqrt(height * width / resolution ** 2)
    if width == height:
        width = height = resolution
    elif times > 1.1 or times < 0.8:
        width, height = math.ceil(width / times), math.ceil(height / times)
    return multiple * math.ceil(width / multiple), multiple * math.ceil(height / multiple)


def load_target(image, resolution: int, target_crop: str = "square",
                multiple: int = SIZE_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The target as the official stage scripts prepare it (module docstring): ((3, H, W) pixels in [-1, 1], (6,)
    SDXL time ids (original h, w, crop top, left, target h, w), the PIL image the pixels show). ``square``:
    H = W = ``resolution``; ``keep-aspect``: (W, H) = :func:`aspect_size`."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    if target_crop == "square":
        return centre_crop_pixels(image, resolution, Image.Resampling.BILINEAR)
    if target_crop != "keep-aspect":
        raise ValueError(f"target_crop must be one of {TARGET_CROPS}, got {target_crop!r}.")
    width, height = aspect_size(*image.size, resolution, multiple)
    resized = image.resize((width, height), Image.Resampling.BICUBIC)  # the official call's (PIL's default) filter
    pixels = pil_to_tensor(resized).float() / 127.5 - 1
    # the official dataset measures the "original" size after the resize and crops nothing
    return pixels, torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32), resized


class EasyRefItems(Dataset):
    """Item ``(index, seed)`` → one training example (see the module docstring); every random choice (caption,
    references, truncation, drops) comes from ``seed``, so a resumed run sees the same examples.

    An example is a dict: ``pixels`` (3, H, W) in [-1, 1] (H = W = R for ``square`` targets), ``time_ids`` (6,),
    ``caption`` (str, "" when dropped), ``references`` (list of PIL images), ``refs_dropped`` (bool).
    """

    def __init__(self, groups: Sequence[ImageGroup], stage: int, resolution: int, ref_drop: float = 0.05,
                 text_drop: float = 0.05, both_drop: float = 0.05, truncate_rate: float = 0.0,
                 max_refs: int = 28, target_crop: str = "square", size_multiple: int = SIZE_MULTIPLE) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}.")
        if target_crop not in TARGET_CROPS:
            raise ValueError(f"target_crop must be one of {TARGET_CROPS}, got {target_crop!r}.")
        self.groups, self.stage, self.resolution = list(groups), stage, resolution
        self.target_crop, self.size_multiple = target_crop, size_multiple
        self.ref_drop, self.text_drop, self.both_drop = ref_drop, text_drop, both_drop
        self.truncate_rate, self.max_refs = truncate_rate, max_refs
        min_size = 2 if stage == 3 else 1
        self.index = [(g, i) for g, group in enumerate(self.groups) if len(group) >= min_size
                      for i in range(len(group))]
        if not self.index:
            raise _layout_error("Stage 3 trains on groups of two images or more (a target and its references); "
                                "no group has two." if stage == 3 else "No image to train on.")

    def __len__(self) -> int:
        return len(self.index)

    def reference_files(self, group: ImageGroup, target: int, rng: random.Random) -> list[Path]:
        """Stage 3's references of ``target``: the group's other images, shuffled, capped, maybe truncated."""
        files = [p for i, p in enumerate(group.images) if i != target]
        rng.shuffle(files)
        files = files[:self.max_refs]
        if len(files) > 2 and rng.random() < self.truncate_rate:
            files = files[:rng.randint(2, len(files) - 1)]
        return files

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        rng = random.Random(seed)
        g, i = self.index[index]
        group = self.groups[g]
        caption = rng.choice(group.captions[i])
        image = open_image(group.images[i])
        pixels, time_ids, shown = load_target(image, self.resolution, self.target_crop, self.size_multiple)
        if self.stage == 3:
            refs = [open_image(p) for p in self.reference_files(group, i, rng)]
        elif self.stage == 2 and group.face(i) is not None:
            refs = [face_crop(image, checked_face(group.images[i], group.face(i), image.size), rng)]
        else:  # the official code crops the reference as the target when it crops, else reads the file as it is
            refs = [shown if self.target_crop == "square" else image]
        draw, dropped = rng.random(), False
        if draw < self.ref_drop:
            dropped = True
        elif draw < self.ref_drop + self.text_drop:
            caption = ""
        elif draw < self.ref_drop + self.text_drop + self.both_drop:
            caption, dropped = "", True
        if dropped:
            refs = [black_image()]
        return {"pixels": pixels, "time_ids": time_ids, "caption": caption, "references": refs,
                "refs_dropped": dropped}


def black_image(size: int = DROP_IMAGE_SIZE):
    """What stands for dropped references (training) and the unconditional branch (sampling)."""
    from PIL import Image

    return Image.new("RGB", (size, size))


def collate_items(items: list[dict]) -> dict:
    """Stack the tensors; keep captions and references as lists (the MLLM processor takes them as they are).
    Targets of different sizes (keep-aspect) cannot be stacked: that raises a ``ValueError`` naming the fix."""
    shapes = sorted({tuple(x["pixels"].shape[1:]) for x in items})
    if len(shapes) > 1:
        sizes = ", ".join(f"{w}x{h}" for h, w in shapes)
        raise ValueError(f"Targets of different sizes ({sizes} px) cannot share a micro-batch. With --target-crop "
                         "keep-aspect train one example per device, as the official stage 3 (--batch-size equal to "
                         "the number of processes; raise --grad-accum for a larger batch), or pass --target-crop "
                         "square.")
    return {"pixels": torch.stack([x["pixels"] for x in items]),
            "time_ids": torch.stack([x["time_ids"] for x in items]),
            "captions": [x["caption"] for x in items], "references": [x["references"] for x in items],
            "refs_dropped": torch.tensor([x["refs_dropped"] for x in items])}


def write_demo_groups(root: Union[str, Path], n_groups: int = 3, per_group: int = 4, size: int = 48,
                      seed: int = 0) -> Path:
    """A small synthetic dataset in :data:`LAYOUT` (coloured shapes, one colour per group) for tests and trying the
    commands; returns ``root``."""
    from PIL import Image, ImageDraw

    root = Path(root)
    rng = random.Random(seed)
    palette = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (160, 60, 200), (30, 190, 200)]
    shapes = ("circle", "square", "triangle")
    for g in range(n_groups):
        colour, shape = palette[g % len(palette)], shapes[g % len(shapes)]
        folder = root / f"{['red', 'green', 'blue', 'yellow', 'purple', 'cyan'][g % 6]}_{shape}_{g}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_group):
            image = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            r = rng.randint(size // 5, size // 3)
            cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            if shape == "circle":
                draw.ellipse(box, fill=colour)
            elif shape == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            image.save(folder / f"{i:02d}.png")
            name = folder.name.rsplit("_", 1)[0].replace("_", " ")
            (folder / f"{i:02d}.txt").write_text(f"a {name} on a plain background\na photo of a {name}\n")
    return root


def group_summary(groups: Sequence[ImageGroup]) -> dict[str, Optional[int]]:
    """Counts for results.json."""
    sizes = [len(g) for g in groups]
    return {"groups": len(groups), "images": sum(sizes), "min_group": min(sizes, default=None),
            "max_group": max(sizes, default=None)}
