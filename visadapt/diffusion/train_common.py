"""What the diffusion task's trainers (concept LoRAs, EasyRef) share: the training scheduler, the half-precision
frozen weights, the UNet's target and the image crop (image files open with :func:`visadapt.utils.images.open_rgb`)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate's mixed_precision → the weights' dtype


def training_scheduler(pipe):
    """DDPM with the pipeline's noise schedule and prediction type, as diffusers' DreamBooth scripts train."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def halve_frozen_weights(modules: Iterable[torch.nn.Module], mixed_precision: str) -> None:
    """Under fp16/bf16 ``mixed_precision`` (accelerate's setting), the frozen parameters of ``modules`` (not the
    trainable ones, not buffers) go to that dtype, in place; otherwise nothing changes."""
    dtype = HALF_DTYPES.get(mixed_precision)
    if dtype is None:
        return
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target of the UNet for ``scheduler``'s ``prediction_type``: the noise (epsilon) or the velocity
    (v_prediction, ``scheduler.get_velocity``). Shapes as ``latents`` (B, C, H, W); ``timesteps`` (B,)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"The pipeline's scheduler predicts {kind!r}; visadapt trains epsilon and v_prediction models. "
                     "Load the pipeline with a DDPM/DDIM/Euler scheduler configured for one of them.")


def centre_crop_pixels(image: Any, resolution: int, resample: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Shorter side of a PIL RGB ``image`` resized to ``resolution`` with ``resample`` and centre-cropped: the pixels
    (3, R, R) in [-1, 1], SDXL's (6,) time ids (original h, w, crop top, left, R, R) and the cropped PIL image."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    crop = image.resize((new_w, new_h), resample).crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    pixels = data.permute(2, 0, 1).float() / 127.5 - 1
    return pixels, torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.float32), crop
