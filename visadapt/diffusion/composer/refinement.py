"""LoRA-Composer's settings, latent-optimisation losses and latent re-initialisation.

Defaults are the official release's (Young98CN/LoRA_Composer, arXiv 2403.11627). The losses read the
attention maps the processors captured at the loss resolution (H/32 for SD: ``loss_downsample=4`` on the latent):

* concept enhancement: each concept token's cross-attention, smoothed (:func:`smoothing_kernel`) and weighted by a
  Gaussian centred on the box, must reach 1 on its top-k cells inside the box:
  ``w_enhance · max(0, 1 − mean topk(A ⊙ M ⊙ G))``;
* fill: the row and column maxima of ``A ⊙ M`` must cover the box: ``w_fill · (mean|a_x − p_x| + mean|a_y − p_y|)``;
* region restriction: self-attention from queries in the box to keys outside it must vanish:
  ``w_region · max(0, mean topk(S[in, out]))``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from visadapt.diffusion.composer.attention import Composition
from visadapt.diffusion.composer.concepts import box_masks


@dataclass
class ComposerConfig:
    """Every part of LoRA-Composer can be switched off; values default to the official code.

    region_injection: concept K/V/O deltas inside their boxes in every cross-attention layer.
    concept_isolation: self-attention mask keeping each box from attending to the other boxes.
    latent_optimization: one gradient step on the latent per denoising step (steps 0..max_refine_step) on the
        enhancement + fill + region losses; stops after the first loss increase from step ``early_stop_from``.
    latent_reinit: before step 0, move the latent patch where each concept already attends into its box.
    loss_downsample: loss maps are the latent downsampled by this factor (4 → H/32 for SD); if the UNet has no
        attention there, the coarsest attention level is used.
    loss_weights: (enhancement, fill, region); the paper's α=0.25, β=0.8 correspond to (1, 0.25, 0.8).
    step_size, step_decay: φ_i = step_size · sqrt(linspace(step_decay[0], step_decay[1], T)[i]).
    gradient_checkpointing: recompute UNet activations in the refinement backward pass instead of storing them
        (less memory, one more forward of the blocks the backward passes through).
    refine_early_exit: the refinement's UNet pass (and the re-init's) stops once every loss layer has run (SD-1.5:
        after ``up_blocks.1``), instead of running the rest of the UNet whose output nothing reads. Same loss and
        latent update.
    reuse_constants: per-call constants are computed once per call, not once per step: the global prompt's
        keys and values in every cross-attention layer, the loss's box masks, centre priors and blur kernel, and
        the UNet's frozen parameters and checkpointing switch. Same loss and latent update.
    refine_autocast: ``"bf16"`` runs the refinement's UNet pass under bfloat16 autocast (the losses are still
        computed in float32 from its maps); the sampling pass keeps the pipeline's dtype. None (default): the
        pipeline's dtype. Not equal to the float32 pass: the loss moves by bf16's rounding.
    smooth_kernel, smooth_sigma, smooth_form: the attention-map blur (see :func:`smoothing_kernel`). ``"official"``
        is the official code's kernel exp(−((x−μ)/(2σ))²), a Gaussian of standard deviation σ·√2;
        ``"gaussian"`` is a standard Gaussian of standard deviation σ (torchvision's ``gaussian_blur``).
    isolation_bias: additive score per blocking box for blocked keys (see ``Composition.isolation_mask``).
    user_adapters_in_concepts: adapters the user activated on the pipeline condition the global branch only (the
        official code's background ED-LoRA; default). True also runs them in every concept's K/V/O and regional
        text encoding, as this library did before the switch existed.
    """

    region_injection: bool = True
    concept_isolation: bool = True
    latent_optimization: bool = True
    latent_reinit: bool = True
    loss_downsample: int = 4
    topk_ratio: float = 0.2
    smooth_kernel: int = 3
    smooth_sigma: float = 0.5
    smooth_form: Literal["official", "gaussian"] = "official"
    prior_sigma: float = 1.0
    loss_weights: tuple[float, float, float] = (8.0, 2.0, 10.0)
    step_size: float = 20.0
    step_decay: tuple[float, float] = (1.0, 0.5)
    max_refine_step: int = 25
    early_stop_from: int = 5
    gradient_checkpointing: bool = True
    refine_early_exit: bool = True
    reuse_constants: bool = True
    refine_autocast: Optional[Literal["bf16"]] = None
    isolation_bias: float = -1e6
    user_adapters_in_concepts: bool = False

    def __post_init__(self) -> None:
        if self.refine_autocast not in (None, "bf16"):
            raise ValueError(f"ComposerConfig(refine_autocast={self.refine_autocast!r}): use None (the pipeline's "
                             "dtype) or 'bf16'.")

    def step_sizes(self, n_steps: int) -> torch.Tensor:
        return self.step_size * torch.linspace(*self.step_decay, n_steps).sqrt()


def smoothing_kernel(size: int, sigma: float, form: str = "official") -> torch.Tensor:
    """(size, size) blur kernel summing to 1.

    ``"official"``: the official code's ``GaussianSmoothing``, exp(−((x−μ)/(2σ))²) per axis, i.e. a Gaussian of
    standard deviation σ·√2 (3×3 with σ 0.5: centre weight 0.332). The spec's "Gaussian σ 0.5" reads as
    torchvision's kernel, which is sharper (centre 0.619); that one is ``"gaussian"``: exp(−(x−μ)²/(2σ²)).
    """
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    if form == "official":
        line = torch.exp(-(x / (2 * sigma)) ** 2)
    elif form == "gaussian":
        line = torch.exp(-x ** 2 / (2 * sigma ** 2))
    else:
        raise ValueError(f"Unknown smoothing form {form!r}; choose 'official' or 'gaussian'.")
    kernel = line[:, None] * line[None, :]
    return (kernel / kernel.sum()).float()


def smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Blur (B, h, w) maps with a (k, k) kernel after reflect padding (as the official code), same size out."""
    pad = (kernel.shape[-1] - 1) // 2
    padded = F.pad(maps[:, None], (pad, pad, pad, pad), mode="reflect") if pad else maps[:, None]
    return F.conv2d(padded, kernel.to(maps)[None, None])[:, 0]


def centre_prior(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """(h, w) Gaussian bump over the box of ``mask``: coords in [−1, 1] across the box, max 1, zero outside."""
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    u = torch.linspace(-1, 1, len(rows))[:, None]
    v = torch.linspace(-1, 1, len(cols))[None, :]
    bump = torch.exp(-(u ** 2 + v ** 2) / (2 * sigma ** 2))
    prior = torch.zeros(mask.shape)
    prior[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = bump / bump.max()
    return prior


def _mean_maps(maps: dict[str, torch.Tensor]) -> torch.Tensor:
    if not maps:
        raise RuntimeError("No attention maps were captured at the loss resolution; check `loss_downsample`.")
    return torch.stack(list(maps.values())).mean(0)


def _topk_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest entries per batch row of a (B, …) tensor."""
    flat = values.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)


def composer_loss(composition: Composition, token_positions: Sequence[Sequence[int]],
                  config: ComposerConfig, cache: Optional[dict] = None) -> torch.Tensor:
    """Scalar loss from the maps captured in one conditional UNet pass (summed over the batch).

    ``cache``: a dict kept for the call; the masks, priors and kernel (constant while the boxes are) are built once
    into it instead of on every call.
    """
    cross = _mean_maps(composition.cross_maps)  # (B, n, N, L)
    self_map = _mean_maps(composition.self_maps)  # (B, N, N)
    n_tokens = cross.shape[2]
    h, w = composition.grid(n_tokens)
    store = cache.setdefault("loss", {}) if cache is not None else {}
    key = (n_tokens, cross.dtype, str(cross.device))
    if key not in store:
        store[key] = _loss_constants(composition, config, h, w, cross)
    kernel, per_concept = store[key]
    w_enhance, w_fill, w_region = config.loss_weights
    total = cross.new_zeros(())
    for concept, (m, prior, k, cols, rows, inside_flat, outside_flat) in enumerate(per_concept):
        for position in token_positions[concept]:
            a = smooth(cross[:, concept, :, position].reshape(-1, h, w), kernel)
            enhance = _topk_mean(a * m * prior, k)
            total = total + w_enhance * F.relu(1 - enhance).sum()
            inside = a * m
            fill_x = (inside.amax(1) - cols).abs().mean(1)
            fill_y = (inside.amax(2) - rows).abs().mean(1)
            total = total + w_fill * (fill_x + fill_y).sum()
        if outside_flat is not None:
            leak = self_map[:, inside_flat][:, :, outside_flat]
            total = total + w_region * F.relu(_topk_mean(leak, k)).sum()
    return total


def _loss_constants(composition: Composition, config: ComposerConfig, h: int, w: int, like: torch.Tensor):
    """The blur kernel and, per concept: mask, centre prior, top-k count, column/row targets, in/out token masks."""
    masks = box_masks(composition.boxes, h, w).to(like.device)
    kernel = smoothing_kernel(config.smooth_kernel, config.smooth_sigma, config.smooth_form).to(like)
    per_concept = []
    for mask in masks:
        flat = mask.flatten()
        per_concept.append((mask.to(like.dtype), centre_prior(mask, config.prior_sigma).to(like),
                            max(1, math.floor(config.topk_ratio * int(mask.sum()))),
                            mask.any(0).to(like), mask.any(1).to(like), flat,
                            ~flat if bool((~flat).any()) else None))
    return kernel, per_concept


def reinit_latents(latents: torch.Tensor, composition: Composition,
                   token_positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Move, per concept, the latent patch where its tokens already attend most into its box (spec §1.5).

    ``composition`` holds the cross-attention maps of one conditional pass at the loss resolution. Patches are cut
    from the original latent; later concepts overwrite earlier ones where boxes overlap; the result is
    re-standardised to the original latent's global mean and standard deviation.
    """
    cross = _mean_maps(composition.cross_maps)  # (B, n, N, L)
    h, w = composition.grid(cross.shape[2])
    scale = latents.shape[-2] // h
    masks = box_masks(composition.boxes, h, w)
    out = latents.clone()
    for concept, mask in enumerate(masks):
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        bh, bw = len(rows), len(cols)
        score = cross[:, concept][..., list(token_positions[concept])].sum(-1).reshape(-1, 1, h, w)
        window = F.conv2d(score.float(), torch.ones(1, 1, bh, bw, device=score.device))  # valid windows
        for item in range(latents.shape[0]):
            best = int(window[item, 0].flatten().argmax())
            y, x = divmod(best, window.shape[-1])
            patch = latents[item, :, y * scale:(y + bh) * scale, x * scale:(x + bw) * scale]
            y0, x0 = int(rows[0]) * scale, int(cols[0]) * scale
            out[item, :, y0:y0 + bh * scale, x0:x0 + bw * scale] = patch
    return (out - out.mean()) / out.std() * latents.std() + latents.mean()


class _LossLayersDone(Exception):
    """Raised after the last loss layer of a pass; :func:`until_loss_layers` catches it and ends the pass there."""


def loss_layers(unet, factor: int) -> list[str]:
    """Names of the attention modules at latent / ``factor``: the layers whose maps the losses read."""
    n_levels = len(unet.config.down_block_types)
    names = []
    for name in unet.attn_processors:
        part, *rest = name.split(".")
        if part == "down_blocks":
            level = int(rest[0])
        elif part == "up_blocks":
            level = n_levels - 1 - int(rest[0])
        elif part == "mid_block":
            level = n_levels - 1
        else:
            continue
        if 2 ** level == factor:
            names.append(name.removesuffix(".processor"))
    return names


def exit_modules(unet, layers: Sequence[str]) -> list[torch.nn.Module]:
    """Modules after which the loss layers ``layers`` have all run: each layer's transformer (``…attentions.k``,
    diffusers' Transformer2DModel, which gradient checkpointing does not wrap; the attention module itself in a
    model without one). A hook raising there leaves no checkpointed segment half-run."""
    names = dict.fromkeys(n.split(".transformer_blocks.")[0] for n in layers)
    return [unet.get_submodule(name) for name in names]


@contextmanager
def until_loss_layers(modules: Sequence[torch.nn.Module], enabled: bool = True) -> Iterator[None]:
    """Inside, a UNet forward stops (quietly, returning nothing) once every module in ``modules`` has run.

    The refinement reads only the loss layers' attention maps, so what the UNet computes after them (in SD-1.5
    ``up_blocks.2``/``up_blocks.3`` and the output convolution) is not needed; the loss and its gradient are those
    of the full pass. Hooks live only for the forward: a backward that recomputes checkpointed segments runs
    unhooked.
    """
    if not enabled or not modules:
        yield
        return
    pending = set(range(len(modules)))

    def hook_for(index: int):
        def hook(module, args, output):
            pending.discard(index)
            if not pending:
                raise _LossLayersDone
        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        yield
    except _LossLayersDone:
        pass
    finally:
        for handle in handles:
            handle.remove()


def loss_downsample_for(unet, wanted: int) -> int:
    """``wanted`` if some cross-attention layer runs at latent / wanted, else the coarsest one that exists."""
    factors = attention_factors(unet.config)
    if not factors:
        raise ValueError("This UNet has no cross-attention layers to compose in.")
    return wanted if wanted in factors else max(factors)


def attention_factors(config) -> set[int]:
    """Downsampling factors (relative to the latent) of the UNet levels that have cross-attention."""
    factors = {2 ** i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind}
    n_levels = len(config.down_block_types)
    if "CrossAttn" in (config.mid_block_type or ""):
        factors.add(2 ** (n_levels - 1))
    factors |= {2 ** (n_levels - 1 - i) for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
    return factors

