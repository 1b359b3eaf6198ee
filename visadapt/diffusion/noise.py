"""What a diffusion UNet learns to predict, shared by every trainer of the diffusion task."""

from __future__ import annotations

import torch


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
