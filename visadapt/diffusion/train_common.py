"""What the diffusion task's trainers (concept LoRAs, EasyRef) share: the training scheduler, the half-precision
frozen weights, the UNet's target, the image files and the image crop."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Union

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


MAX_PIXELS_ENV = "VISADAPT_MAX_IMAGE_PIXELS"  # raises PIL's decompression-bomb limit for trusted, huge images


def _pixel_limit():
    """PIL's ``Image.MAX_IMAGE_PIXELS``, or :data:`MAX_PIXELS_ENV` (a count, or ``none`` for no limit) when set."""
    from PIL import Image

    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return Image.MAX_IMAGE_PIXELS
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r}: pass a pixel count (e.g. 400000000) or none.") from None


def _claimed_size(path: Path) -> str:
    """``W×H`` from the header of an image PIL refused as too large (opening reads the header, not the pixels)."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as opened:
            return f"{opened.width}x{opened.height} ({opened.width * opened.height} pixels)"
    except Exception:  # noqa: BLE001 - only the message's detail is lost
        return "size unknown"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@contextlib.contextmanager
def pixel_limit():
    """PIL's decompression-bomb limit set from :data:`MAX_PIXELS_ENV` for the block (as it was when unset)."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, _pixel_limit()
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def too_large(path: Path, limit: Any) -> str:
    """The message for an image PIL refused as a decompression bomb: the file, its size, the limit, the fix."""
    return (f"{path}: the image is {_claimed_size(path)}, over twice PIL's decompression-bomb limit of {limit} "
            f"pixels; downscale it, or if you trust the file raise the limit: set {MAX_PIXELS_ENV}=<pixels> (or none) "
            "in the environment, or PIL.Image.MAX_IMAGE_PIXELS in Python.")


def open_rgb(path: Union[str, Path], error: type = ValueError, fix: str = "replace or remove it"):
    """The image file at ``path`` as upright RGB (EXIF orientation applied). An unreadable file, or one over PIL's
    decompression-bomb limit, raises ``error`` (a ``ValueError`` subclass) naming the file and ``fix``; the limit
    message gives the size and how to raise the limit (:data:`MAX_PIXELS_ENV` or ``PIL.Image.MAX_IMAGE_PIXELS``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    with pixel_limit():
        try:
            with Image.open(path) as opened:
                return ImageOps.exif_transpose(opened).convert("RGB")
        except Image.DecompressionBombError:
            raise error(too_large(path, Image.MAX_IMAGE_PIXELS)) from None
        except (UnidentifiedImageError, OSError) as err:
            raise error(f"{path}: cannot read the image ({err}); {fix}.") from err
