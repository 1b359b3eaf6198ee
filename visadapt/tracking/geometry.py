"""SiamFC-style cropping and the template foreground mask of LoRAT (arXiv 2403.05231; official code
github.com/LitingLin/LoRAT: ``trackit/core/utils/siamfc_cropping.py`` and the ``LoRAT`` data transform).

Boxes are continuous xyxy in pixels (x2 = x + w). A crop is an isotropic scale ``s`` and a translation ``t``:
crop pixel u = s·x + t per axis, image pixel x = (u − t) / s.

:func:`crop_image` resamples with ``grid_sample`` at exactly (s, t). The official code instead resizes a
whole-pixel window of the image into a whole-pixel window of the crop and returns the (s, t) that this realises
(:func:`crop_image_official`: up to a few % scale and a few px shift from the asked ones); the released checkpoints
were trained and tested on those crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropParams:
    """u = scale · x + translation (per axis, x then y); ``size`` is the square output side in pixels."""

    scale: tuple[float, float]
    translation: tuple[float, float]
    size: int


def crop_params(box: torch.Tensor, area_factor: float, size: int) -> CropParams:
    """Official ``get_scale_and_translation_factors``: padded size w' = w + (f − 1)(w + h)/2 (same for h),
    s = sqrt(S² / (w'h')), t = (S/2, S/2) − s·centre. ``box`` (4,) xyxy pixels with positive size."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        raise ValueError(f"Box {[x1, y1, x2, y2]} has no area; crops need w > 0 and h > 0.")
    pad = (area_factor - 1) * (w + h) / 2
    s = math.sqrt(size * size / ((w + pad) * (h + pad)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return CropParams((s, s), (size / 2 - s * cx, size / 2 - s * cy), size)


def jittered_crop_params(box: torch.Tensor, area_factor: float, size: int, rng: np.random.Generator,
                         scale_jitter: float = 0.25, translation_jitter: float = 3.0, min_object_size: float = 10.0,
                         retry_count: int = 10) -> Optional[CropParams]:
    """Training crop of the search region (official ``prepare_siamfc_cropping_with_augmentation``, LoRAT config
    ``scale_jitter: 0.25``, ``translation_jitter: 3``, ``min_object_size: 10``).

    Per axis: s_a = s / exp(0.25·ε_a), ε ~ N(0, 1) (the aspect ratio is jittered too), then
    t_a += U(−1, 1) · 3·(w·s_x + h·s_y)/2. Accepted when the mapped box meets the crop and, clipped to it, is at least
    ``min_object_size`` px on both sides; after ``retry_count + 2`` draws without success returns None (the official
    sampler then drops the pair and draws another).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    base = crop_params(box, area_factor, size)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    wh = np.array([x2 - x1, y2 - y1])
    for _ in range(retry_count + 2):
        scale = base.scale[0] / np.exp(rng.standard_normal(2) * scale_jitter)
        translation = size / 2 - centre * scale
        translation = translation + rng.uniform(-1, 1, 2) * (wh * scale).sum() * 0.5 * translation_jitter
        p = CropParams((float(scale[0]), float(scale[1])), (float(translation[0]), float(translation[1])), size)
        out = box_to_crop(torch.tensor([x1, y1, x2, y2], dtype=torch.float64), p)
        clipped = out.clamp(0, size)
        if (out[2] <= 0 or out[3] <= 0 or out[0] >= size or out[1] >= size
                or (clipped[2:] - clipped[:2]).min() < min_object_size):
            continue
        return p
    return None


def box_to_crop(box: torch.Tensor, p: CropParams) -> torch.Tensor:
    """(..., 4) xyxy image pixels → crop pixels."""
    scale = box.new_tensor([p.scale[0], p.scale[1]] * 2)
    shift = box.new_tensor([p.translation[0], p.translation[1]] * 2)
    return box * scale + shift


def box_from_crop(box: torch.Tensor, p: CropParams) -> torch.Tensor:
    """(..., 4) xyxy crop pixels → image pixels (exact inverse of :func:`box_to_crop`)."""
    scale = box.new_tensor([p.scale[0], p.scale[1]] * 2)
    shift = box.new_tensor([p.translation[0], p.translation[1]] * 2)
    return (box - shift) / scale


def crop_image(image: torch.Tensor, p: CropParams, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear affine crop (align_corners=False): image (3, H, W) float → (3, S, S); outside pixels get ``fill``
    (3,), by default the image's per-channel mean, as the official code pads."""
    _, h, w = image.shape
    fill = image.mean(dim=(1, 2)) if fill is None else fill.to(image)
    u = torch.arange(p.size, dtype=torch.float64) + 0.5  # crop pixel centres
    xs = (u - p.translation[0]) / p.scale[0]
    ys = (u - p.translation[1]) / p.scale[1]
    gx, gy = 2 * xs / w - 1, 2 * ys / h - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).to(image.dtype)
    shifted = (image - fill.view(3, 1, 1)).unsqueeze(0)
    out = F.grid_sample(shifted, grid.unsqueeze(0).to(image.device), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[0] + fill.view(3, 1, 1)


CROPS = ("exact", "official")


def _pixel_span(start: float, end: float) -> tuple[int, int]:
    """Whole pixels touched by [start, end): floor(start), floor(end + 1 − 1e-4) (official ``bbox_rasterize``)."""
    return math.floor(start), math.floor(end + 1 - 1e-4)


def _official_window(scale: float, shift: float, extent: int, size: int) -> tuple[int, int, int, int]:
    """One axis of the official crop: the crop window [o1, o2) the image covers and the image window [i1, i2)
    mapped into it, both in whole pixels."""
    o1, o2 = _pixel_span(min(max(shift, 0.0), size), min(max(shift + scale * extent, 0.0), size))
    o1, o2 = min(max(o1, 0), size), min(max(o2, 0), size)
    i1, i2 = _pixel_span((o1 - shift) / scale, (o2 - shift) / scale)
    return o1, o2, min(max(i1, 0), extent), min(max(i2, 0), extent)


def crop_image_official(image: torch.Tensor, p: CropParams, fill: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, CropParams]:
    """The official crop: image (3, H, W) float → ((3, S, S), the realised CropParams).

    Per axis the crop window the image lands in is widened to whole pixels, mapped back and widened again to whole
    image pixels; that image window is resized (bilinear, align_corners=False) onto the crop window and the rest is
    ``fill`` (default: the image mean). The realised scale is crop window / image window and the shift puts the
    windows' starts together, so boxes map exactly with the returned parameters, not with ``p``."""
    _, h, w = image.shape
    fill = image.mean(dim=(1, 2)) if fill is None else fill.to(image)
    out = fill.view(3, 1, 1).expand(3, p.size, p.size).clone()
    (ox1, ox2, ix1, ix2), (oy1, oy2, iy1, iy2) = (_official_window(p.scale[a], p.translation[a], extent, p.size)
                                                  for a, extent in ((0, w), (1, h)))
    if ox2 <= ox1 or oy2 <= oy1 or ix2 <= ix1 or iy2 <= iy1:
        return out, p  # the image misses the crop: only padding
    window = image[None, :, iy1:iy2, ix1:ix2]
    out[:, oy1:oy2, ox1:ox2] = F.interpolate(window, (oy2 - oy1, ox2 - ox1), mode="bilinear", align_corners=False)[0]
    sx, sy = (ox2 - ox1) / (ix2 - ix1), (oy2 - oy1) / (iy2 - iy1)
    return out, CropParams((sx, sy), (ox1 - ix1 * sx, oy1 - iy1 * sy), p.size)


def crop(image: torch.Tensor, p: CropParams, fill: torch.Tensor | None = None, kind: str = "exact"
         ) -> tuple[torch.Tensor, CropParams]:
    """``kind`` ``exact`` (:func:`crop_image`, ``p`` as asked) or ``official`` (:func:`crop_image_official`) →
    ((3, S, S), the parameters that map image boxes into this crop)."""
    if kind == "exact":
        return crop_image(image, p, fill), p
    if kind == "official":
        return crop_image_official(image, p, fill)
    raise ValueError(f"crop {kind!r}: choose one of {CROPS}.")


def normalize(crop: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) in 0–255 → /255 then ImageNet mean/std."""
    mean = crop.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = crop.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (crop / 255 - mean) / std


def rasterise(box: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cells a box touches: box (..., 4) xyxy in grid units → (..., H, W) bool. Start floor(x1), end-exclusive
    floor(x2 + 1 − 1e-4) (any partly covered cell counts), clipped to the grid (official ``bbox_rasterize``)."""
    h, w = grid
    start = torch.floor(box[..., :2])
    end = torch.floor(box[..., 2:] + 1 - 1e-4)
    limit = box.new_tensor([w, h])
    start, end = start.clamp(min=0).minimum(limit), end.clamp(min=0).minimum(limit)
    cols = torch.arange(w, device=box.device, dtype=box.dtype)
    rows = torch.arange(h, device=box.device, dtype=box.dtype)
    in_x = (cols >= start[..., 0:1]) & (cols < end[..., 0:1])  # (..., W)
    in_y = (rows >= start[..., 1:2]) & (rows < end[..., 1:2])  # (..., H)
    return in_y.unsqueeze(-1) & in_x.unsqueeze(-2)


def template_mask(box_in_crop: torch.Tensor, crop_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Template token types (…, Hz, Wz) int64: 1 on cells the template box touches, 0 elsewhere (§4)."""
    stride = box_in_crop.new_tensor([grid[1] / crop_size, grid[0] / crop_size] * 2)
    return rasterise(box_in_crop * stride, grid).long()
