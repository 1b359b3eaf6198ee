"""LoRAT's training pairs (arXiv 2403.05231; official code github.com/LitingLin/LoRAT,
``trackit/data/methods/siamese_tracker_train`` and the LoRAT data transform).

:class:`TrainingPairs` is a torch ``Dataset`` of (template, search) pairs drawn from a mix of datasets:

- every dataset of the mix gets an equal quota (item ``i`` belongs to dataset ``i mod D``), and within a dataset
  the sequences are visited round-robin in a shuffled order (each pass a fresh permutation);
- "interval" pair sampling: the template frame is a random visible frame, the search frame a random visible frame
  at most ``max_gap`` (100) frames away, not the template frame itself; with none, the search frame is the template
  frame (a length-1 track, e.g. a COCO object, always uses one image twice);
- crops: template area factor 2 without jitter, search area factor 4 (5 at 378 px) with the scale / translation
  jitter of :func:`~visadapt.tracking.geometry.jittered_crop_params` (a pair whose jitter never fits is dropped and
  another pair is drawn); sampled exactly, or (``crop="official"``) as the official whole-pixel windows with the
  boxes mapped by the scale and shift those realise;
- augmentation, in the official order: horizontal flip (p 0.5, template and search independently), colour jitter
  (brightness, contrast, saturation factors U(0.6, 1.4), random order, independently), then DeiT-III's 3-augment
  applied jointly (one of grayscale, solarize at 128, Gaussian blur radius U(0.1, 2), same choice and parameters for
  both); boxes clipped to the crops, ImageNet normalisation, the template mask and the search target.

A sample is a function of the dataset seed and its key: ``pairs[(index, augmentation_seed)]`` (what
:class:`visadapt.training.ShotBatches` yields, a function of (seed, step)) or ``pairs.sample(epoch, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from .datasets import TrackingSequence, read_frame
from .geometry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    box_to_crop,
    crop,
    crop_params,
    jittered_crop_params,
    template_mask,
)


@dataclass(frozen=True)
class PairSettings:
    """Crop sizes, factors and jitter of one model (``z_grid`` / ``x_grid``: its token grids)."""

    template_size: int
    search_size: int
    z_grid: tuple[int, int]
    search_area_factor: float = 4.0
    template_area_factor: float = 2.0
    max_gap: int = 100
    scale_jitter: float = 0.25
    translation_jitter: float = 3.0
    min_object_size: float = 10.0
    augment: bool = True
    crop: str = "exact"  # or "official": whole-pixel windows (geometry.crop_image_official), boxes mapped to match


def load_frame(path) -> torch.Tensor:
    """An image file → (3, H, W) float32 in 0–255."""
    return torch.from_numpy(read_frame(path)).permute(2, 0, 1).float()


def _xyxy(box: np.ndarray) -> torch.Tensor:
    x, y, w, h = (float(v) for v in box)
    return torch.tensor([x, y, x + w, y + h], dtype=torch.float64)


def hflip(image: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a crop (3, S, S) and its xyxy box (4,) in crop pixels."""
    size = image.shape[-1]
    return image.flip(-1), torch.stack((size - box[2], box[1], size - box[0], box[3]))


def colour_jitter(image: torch.Tensor, rng: np.random.Generator, strength: float = 0.4) -> torch.Tensor:
    """Brightness, contrast and saturation factors U(1 − s, 1 + s) in a random order; image (3, H, W) in [0, 1]."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    factors = rng.uniform(1 - strength, 1 + strength, 3)
    for i in rng.permutation(3):
        image = ops[i](image, float(factors[i]))
    return image


def three_augment(images: Sequence[torch.Tensor], rng: np.random.Generator) -> list[torch.Tensor]:
    """DeiT-III 3-augment, one draw for all ``images`` ((3, H, W) in [0, 1]): grayscale (3 channels), solarize
    (PIL threshold 128) or Gaussian blur with radius (sigma) U(0.1, 2)."""
    choice = int(rng.integers(3))
    if choice == 0:
        return [TF.rgb_to_grayscale(img, num_output_channels=3) for img in images]
    if choice == 1:
        return [torch.where(img >= 128 / 255, 1 - img, img) for img in images]
    sigma = float(rng.uniform(0.1, 2.0))
    kernel = 2 * int(np.ceil(3 * sigma)) + 1
    return [TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma]) for img in images]


def _normalise01(image: torch.Tensor) -> torch.Tensor:
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


class TrainingPairs(Dataset):
    """(template, search) pairs from ``datasets`` (name → sequences), ``samples_per_epoch`` items.

    An item is a dict: ``z`` (3, Sz, Sz) and ``x`` (3, Sx, Sx) normalised crops, ``z_mask`` (Hz, Wz) int64 token
    types, ``box`` (4,) the search target as normalised xyxy in the search crop (the target of ``lorat_loss``),
    ``z_box`` (4,) the template box in template-crop pixels; plus ``sequence`` and ``frames`` (template, search)
    for inspection.
    """

    def __init__(self, datasets: dict[str, list[TrackingSequence]], settings: PairSettings, samples_per_epoch: int,
                 seed: int = 0) -> None:
        self.settings, self.samples_per_epoch, self.seed = settings, int(samples_per_epoch), int(seed)
        self.names, self.sequences, self.visible = [], [], []
        for name, sequences in datasets.items():
            usable = [(s, np.flatnonzero(s.visible)) for s in sequences]
            usable = [(s, v) for s, v in usable if len(v)]
            if not usable:
                raise ValueError(f"Dataset {name!r} has no sequence with a visible annotated frame to train on.")
            self.names.append(name)
            self.sequences.append([s for s, _ in usable])
            self.visible.append([v for _, v in usable])
        if not self.names:
            raise ValueError("No training dataset given; pass at least one --data.")
        if self.samples_per_epoch < 1:
            raise ValueError("samples_per_epoch must be >= 1.")

    def __len__(self) -> int:
        return self.samples_per_epoch

    def sequence_of(self, index: int) -> tuple[int, int]:
        """(dataset, sequence) of item ``index``: equal quota per dataset, shuffled round-robin within one."""
        d = index % len(self.names)
        k = index // len(self.names)
        n = len(self.sequences[d])
        order = np.random.default_rng([self.seed, d, k // n]).permutation(n)
        return d, int(order[k % n])

    def sample(self, epoch: int, index: int) -> dict:
        """Item ``index`` of epoch ``epoch``."""
        return self._draw(index, np.random.default_rng([self.seed, epoch, index]))

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict:
        index, aug = key if isinstance(key, tuple) else (key, 0)
        return self._draw(int(index), np.random.default_rng([self.seed, int(aug), int(index)]))

    def _frames(self, d: int, s: int, rng: np.random.Generator) -> tuple[int, int]:
        visible = self.visible[d][s]
        z = int(visible[rng.integers(len(visible))])
        near = visible[(np.abs(visible - z) <= self.settings.max_gap) & (visible != z)]
        return z, int(near[rng.integers(len(near))]) if len(near) else z

    def _draw(self, index: int, rng: np.random.Generator, max_tries: int = 100) -> dict:
        d, s = self.sequence_of(index)
        for _ in range(max_tries):
            out = self._pair(d, s, rng)
            if out is not None:
                return out
            s = int(rng.integers(len(self.sequences[d])))  # the official sampler drops the pair, draws another
        raise RuntimeError(f"No training pair with a usable search crop in {max_tries} draws from dataset "
                           f"{self.names[d]!r}; its boxes may be too small (< {self.settings.min_object_size} px "
                           "after cropping).")

    def _pair(self, d: int, s: int, rng: np.random.Generator) -> Optional[dict]:
        cfg, seq = self.settings, self.sequences[d][s]
        z_index, x_index = self._frames(d, s, rng)
        z_box, x_box = _xyxy(seq.boxes[z_index]), _xyxy(seq.boxes[x_index])
        x_params = jittered_crop_params(x_box, cfg.search_area_factor, cfg.search_size, rng,
                                        cfg.scale_jitter, cfg.translation_jitter, cfg.min_object_size)
        if x_params is None:
            return None
        z_params = crop_params(z_box, cfg.template_area_factor, cfg.template_size)
        z_image = load_frame(seq.frames[z_index])
        x_image = z_image if x_index == z_index else load_frame(seq.frames[x_index])
        z, z_params = crop(z_image, z_params, kind=cfg.crop)
        x, x_params = crop(x_image, x_params, kind=cfg.crop)
        z, x = z / 255, x / 255
        zb, xb = box_to_crop(z_box, z_params), box_to_crop(x_box, x_params)
        if cfg.augment:
            if rng.random() < 0.5:
                z, zb = hflip(z, zb)
            if rng.random() < 0.5:
                x, xb = hflip(x, xb)
            z, x = colour_jitter(z.clamp(0, 1), rng), colour_jitter(x.clamp(0, 1), rng)
            z, x = three_augment([z, x], rng)
        zb, xb = zb.clamp(0, cfg.template_size), xb.clamp(0, cfg.search_size)
        return {"z": _normalise01(z).float(), "x": _normalise01(x).float(),
                "z_mask": template_mask(zb, cfg.template_size, cfg.z_grid),
                "box": (xb / cfg.search_size).float(), "z_box": zb.float(),
                "sequence": f"{self.names[d]}/{seq.name}", "frames": (z_index, x_index)}


def collate_pairs(items: list[dict]) -> dict:
    """Stack a list of :class:`TrainingPairs` items into a batch (tensors stacked, the rest as lists)."""
    return {k: torch.stack([it[k] for it in items]) if isinstance(items[0][k], torch.Tensor)
            else [it[k] for it in items] for k in items[0]}
