"""LoRAT's tracking loop (arXiv 2403.05231; official code github.com/LitingLin/LoRAT, the one-stream tracker
evaluator and its Hann-window post-processing).

Init: template crop (area factor 2) around the first box, its foreground mask and frame 0's mean colour (the padding
of every later search crop) are cached. Each frame: search crop (factor 4 at 224 px, 5 at 378 px) around the
previous box (w, h clamped ≥ 10 px), one forward of template + search, score p = sigmoid(logits), pick
argmax((1 − 0.45)·p + 0.45·hann), map that cell's box back to the frame and clip it. No template update.
Boxes at this API are xywh in frame pixels (continuous, x2 = x + w).

``crop="official"`` takes the official whole-pixel crops (:func:`geometry.crop_image_official`), on which the
released checkpoints were trained and tested; ``outside="clipped"`` reports a prediction that falls wholly outside
the frame as the official code does, as its zero-area clipped box (the default reports the previous box; either way
the search continues around the previous box).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .datasets import read_frame
from .geometry import CROPS, box_from_crop, box_to_crop, crop, crop_params, normalize, template_mask
from .model import LoRAT, LoRATVariant

Frame = Union[torch.Tensor, np.ndarray]
OUTSIDE = ("previous", "clipped")  # what a prediction wholly outside the frame is reported as


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
        frame = torch.from_numpy(np.array(frame, copy=not frame.flags.writeable, order="C")).permute(2, 0, 1)
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
                 device: Optional[Union[str, torch.device]] = None, crop: str = "exact",
                 outside: str = "previous") -> None:
        if crop not in CROPS or outside not in OUTSIDE:
            raise ValueError(f"crop {crop!r} / outside {outside!r}: choose crop from {CROPS}, outside from {OUTSIDE}.")
        patch = model.patch_size
        if template_size != model.z_grid[0] * patch or search_size != model.x_grid[0] * patch:
            raise ValueError(f"Crop sizes {template_size}/{search_size} px do not match the model's grids "
                             f"{model.z_grid}/{model.x_grid} × {patch} px; use Tracker.for_variant.")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.template_size, self.search_size = template_size, search_size
        self.template_factor, self.search_factor = template_area_factor, search_area_factor
        self.window_influence, self.min_box_size = window_influence, min_box_size
        self.crop, self.outside = crop, outside
        self._z: Optional[torch.Tensor] = None

    @classmethod
    def for_variant(cls, model: LoRAT, variant: LoRATVariant, **kwargs) -> "Tracker":
        return cls(model, variant.template_px, variant.search_px, variant.search_area_factor,
                   variant.template_area_factor, **kwargs)

    def init(self, frame: Frame, box: tuple[float, float, float, float]) -> None:
        """Cache the template crop, its foreground mask and frame 0's mean colour; ``box`` xywh."""
        self._z, self._z_mask, self._fill, self._state = self.template(frame, box)

    def template(self, frame: Frame, box) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sequence's start: template (1, 3, Sz, Sz) and mask (1, Hz, Wz) on the device, frame 0's mean colour
        (3,) and the state box (4,) xyxy float64."""
        image = _as_chw(frame)
        xyxy = _xywh_to_xyxy(box)
        if not (xyxy[2] > xyxy[0] and xyxy[3] > xyxy[1]):
            raise ValueError(f"The initial box {tuple(box)} has no area; give x,y,w,h with w > 0 and h > 0.")
        height, width = image.shape[1:]
        if not (xyxy[2] > 0 and xyxy[0] < width and xyxy[3] > 0 and xyxy[1] < height):
            raise ValueError(f"The initial box x,y,w,h = {tuple(float(v) for v in box)} lies outside the "
                             f"{width}x{height} first frame; give a box that overlaps the target in it "
                             f"(0 <= x < {width}, 0 <= y < {height}, in pixels).")
        params = crop_params(xyxy, self.template_factor, self.template_size)
        fill = image.mean(dim=(1, 2))
        z, params = crop(image, params, fill, self.crop)
        z = normalize(z)
        mask = template_mask(box_to_crop(xyxy, params), self.template_size, self.model.z_grid)
        dtype = next(self.model.parameters()).dtype  # crops are float32; a bf16/fp16 model takes its own dtype
        return z.unsqueeze(0).to(self.device, dtype), mask.unsqueeze(0).to(self.device), fill, xyxy

    def _search_box(self, state: Optional[torch.Tensor] = None) -> torch.Tensor:
        state = self._state if state is None else state
        centre = (state[:2] + state[2:]) / 2
        size = (state[2:] - state[:2]).clamp(min=self.min_box_size)
        return torch.cat((centre - size / 2, centre + size / 2))

    def search(self, image: torch.Tensor, state: torch.Tensor, fill: torch.Tensor):
        """Search crop (3, Sx, Sx) around ``state`` (w, h clamped ≥ ``min_box_size``) and the crop parameters it
        realises."""
        params = crop_params(self._search_box(state), self.search_factor, self.search_size)
        x, params = crop(image, params, fill, self.crop)
        return normalize(x), params

    def update(self, score_map: torch.Tensor, boxes: torch.Tensor, params, state: torch.Tensor,
               image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One sample's outputs → (new state xyxy, reported box xyxy, confidence); the state stays when the box
        leaves the image, and the reported box is then the state or the zero-area clipped box (``outside``)."""
        box, score, _ = decode_best(score_map, boxes, self.window_influence)
        frame_box = box_from_crop(box.double().cpu() * self.search_size, params)
        h, w = image_hw
        clipped = torch.stack((frame_box[0].clamp(0, w), frame_box[1].clamp(0, h),
                               frame_box[2].clamp(0, w), frame_box[3].clamp(0, h)))
        if clipped[2] > clipped[0] and clipped[3] > clipped[1]:
            return clipped, clipped, score
        return state, clipped if self.outside == "clipped" else state, score

    @torch.no_grad()
    def track(self, frame: Frame) -> tuple[tuple[float, float, float, float], float]:
        """→ (box xywh in frame pixels, confidence in (0, 1))."""
        if self._z is None:
            raise RuntimeError("Call Tracker.init(frame, box) with the first frame before track().")
        image = _as_chw(frame)
        x, params = self.search(image, self._state, self._fill)
        out = self.model(self._z, x.unsqueeze(0).to(self.device, self._z.dtype), self._z_mask)
        self._state, box, score = self.update(out["score_map"][0], out["boxes"][0], params, self._state,
                                              tuple(image.shape[1:]))
        return _xywh(box), score

    @torch.no_grad()
    def track_many(self, videos: Sequence[Sequence[Frame]], boxes: Sequence, batch_size: int = 16,
                   progress: Optional[Callable[[int], None]] = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Track several videos in lockstep: one forward per frame index for up to ``batch_size`` videos.

        ``videos``: sequences of frames (arrays, tensors, or anything :func:`load` turns into one, e.g. paths,
        read when needed); ``boxes``: the first-frame box (xywh) of each. Returns per video (boxes (N, 4) xywh with
        row 0 the given box, scores (N,) with 1.0 first), the same results as :meth:`init` + :meth:`track` one
        video at a time. ``progress(n)`` is called with the number of frames done after each step.
        """
        results: list = [None] * len(videos)
        for begin in range(0, len(videos), batch_size):
            chunk = list(range(begin, min(begin + batch_size, len(videos))))
            starts = [self.template(_read(videos[i][0]), boxes[i]) for i in chunk]
            z = torch.cat([s[0] for s in starts])
            z_mask = torch.cat([s[1] for s in starts])
            states = [s[3] for s in starts]
            tracks = [[_xywh(s)] for s in states]
            scores = [[1.0] for _ in chunk]
            for t in range(1, max(len(videos[i]) for i in chunk)):
                active = [k for k, i in enumerate(chunk) if t < len(videos[i])]
                images = [_as_chw(_read(videos[chunk[k]][t])) for k in active]
                crops = [self.search(img, states[k], starts[k][2]) for k, img in zip(active, images)]
                x = torch.stack([c[0] for c in crops]).to(self.device, z.dtype)
                out = self.model(z[active], x, z_mask[active])
                for j, k in enumerate(active):
                    states[k], box, score = self.update(out["score_map"][j], out["boxes"][j], crops[j][1],
                                                        states[k], tuple(images[j].shape[1:]))
                    tracks[k].append(_xywh(box))
                    scores[k].append(score)
                if progress is not None:
                    progress(len(active))
            for k, i in enumerate(chunk):
                results[i] = (np.asarray(tracks[k], dtype=np.float64), np.asarray(scores[k], dtype=np.float64))
        return results


def _xywh(state: torch.Tensor) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in state)
    return (x1, y1, x2 - x1, y2 - y1)


def _read(frame) -> Frame:
    """A frame, or a path to an image file read now (as an (H, W, 3) uint8 array)."""
    return frame if isinstance(frame, (np.ndarray, torch.Tensor)) else read_frame(frame)
