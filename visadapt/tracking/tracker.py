"""LoRAT's tracking loop (arXiv 2403.05231; official code github.com/LitingLin/LoRAT, the one-stream tracker
evaluator and its Hann-window post-processing).

Init: template crop (area factor 2) around the first box, its foreground mask and frame 0's mean colour (the padding
of every later search crop) are cached. Each frame: search crop (factor 4 at 224 px, 5 at 378 px) around the
previous box (w, h clamped ≥ 10 px), one forward of template + search, score p = sigmoid(logits), pick
argmax((1 − 0.45)·p + 0.45·hann), map that cell's box back to the frame and clip it. No template update.
Boxes at this API are xywh in frame pixels (continuous, x2 = x + w).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .geometry import box_from_crop, box_to_crop, crop_image, crop_params, normalize, template_mask
from .model import LoRAT, LoRATVariant

Frame = Union[torch.Tensor, np.ndarray]


def hann_window(grid: tuple[int, int]) -> torch.Tensor:
    """Outer product of symmetric Hann windows (H, W) (``torch.hann_window(N, periodic=False)``)."""
    return torch.outer(torch.hann_window(grid[0], periodic=False), torch.hann_window(grid[1], periodic=False))


def decode_best(score_map: torch.Tensor, boxes: torch.Tensor, window_influence: float = 0.45
                ) -> tuple[torch.Tensor, float, int]:
    """One sample: score_map (H, W) logits, boxes (H, W, 4) → (box (4,) normalised xyxy, confidence, cell index).

    The cell maximises (1 − w)·sigmoid(score) + w·hann; the confidence is the un-penalised sigmoid there.
    """
    prob = score_map.float().sigmoid()
    window = hann_window(tuple(prob.shape)).to(prob.device)
    index = int(torch.argmax((1 - window_influence) * prob + window_influence * window))
    return boxes.reshape(-1, 4)[index], float(prob.flatten()[index]), index


def _as_chw(frame: Frame) -> torch.Tensor:
    """(H, W, 3) uint8 array or (3, H, W) tensor → (3, H, W) float32 in 0–255."""
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"Expected an (H, W, 3) RGB array, got shape {frame.shape}.")
        frame = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
    if frame.ndim != 3 or frame.shape[0] != 3:
        raise ValueError(f"Expected a (3, H, W) tensor, got shape {tuple(frame.shape)}.")
    return frame.float()


def _xywh_to_xyxy(box) -> torch.Tensor:
    x, y, w, h = (float(v) for v in box)
    return torch.tensor([x, y, x + w, y + h], dtype=torch.float64)


class Tracker:
    """Single-object tracker around a :class:`LoRAT` model (merge adapters first for speed; not required)."""

    def __init__(self, model: LoRAT, template_size: int, search_size: int, search_area_factor: float,
                 template_area_factor: float = 2.0, window_influence: float = 0.45, min_box_size: float = 10.0,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        patch = model.patch_size
        if template_size != model.z_grid[0] * patch or search_size != model.x_grid[0] * patch:
            raise ValueError(f"Crop sizes {template_size}/{search_size} px do not match the model's grids "
                             f"{model.z_grid}/{model.x_grid} × {patch} px; use Tracker.for_variant.")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.template_size, self.search_size = template_size, search_size
        self.template_factor, self.search_factor = template_area_factor, search_area_factor
        self.window_influence, self.min_box_size = window_influence, min_box_size
        self._z: Optional[torch.Tensor] = None

    @classmethod
    def for_variant(cls, model: LoRAT, variant: LoRATVariant, **kwargs) -> "Tracker":
        return cls(model, variant.template_px, variant.search_px, variant.search_area_factor,
                   variant.template_area_factor, **kwargs)

    def init(self, frame: Frame, box: tuple[float, float, float, float]) -> None:
        """Cache the template crop, its foreground mask and frame 0's mean colour; ``box`` xywh."""
        image = _as_chw(frame)
        xyxy = _xywh_to_xyxy(box)
        params = crop_params(xyxy, self.template_factor, self.template_size)
        self._fill = image.mean(dim=(1, 2))
        z = normalize(crop_image(image, params, self._fill))
        mask = template_mask(box_to_crop(xyxy, params), self.template_size, self.model.z_grid)
        self._z = z.unsqueeze(0).to(self.device)
        self._z_mask = mask.unsqueeze(0).to(self.device)
        self._state = xyxy

    def _search_box(self) -> torch.Tensor:
        centre = (self._state[:2] + self._state[2:]) / 2
        size = (self._state[2:] - self._state[:2]).clamp(min=self.min_box_size)
        return torch.cat((centre - size / 2, centre + size / 2))

    @torch.no_grad()
    def track(self, frame: Frame) -> tuple[tuple[float, float, float, float], float]:
        """→ (box xywh in frame pixels, confidence in (0, 1))."""
        if self._z is None:
            raise RuntimeError("Call Tracker.init(frame, box) with the first frame before track().")
        image = _as_chw(frame)
        params = crop_params(self._search_box(), self.search_factor, self.search_size)
        x = normalize(crop_image(image, params, self._fill)).unsqueeze(0).to(self.device)
        out = self.model(self._z, x.to(self._z.dtype), self._z_mask)
        box, score, _ = decode_best(out["score_map"][0], out["boxes"][0], self.window_influence)
        frame_box = box_from_crop(box.double().cpu() * self.search_size, params)
        h, w = image.shape[1:]
        clipped = torch.stack((frame_box[0].clamp(0, w), frame_box[1].clamp(0, h),
                               frame_box[2].clamp(0, w), frame_box[3].clamp(0, h)))
        if clipped[2] > clipped[0] and clipped[3] > clipped[1]:
            self._state = clipped
        x1, y1, x2, y2 = (float(v) for v in self._state)
        return (x1, y1, x2 - x1, y2 - y1), score
