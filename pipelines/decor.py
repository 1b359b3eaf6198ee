"""DECOR on any SD/SDXL text-to-image pipeline: ``pipe(prompt, decor=Decor(["dog"], strength=0.8))``.

``DecorMixin`` overrides ``encode_prompt``: the conditional embeddings it returns are projected away from the
undesired words, encoded by the same text encoder(s) in their current LoRA state. The negative embeddings are left
as they are. ``DecorPipeline`` / ``DecorXLPipeline`` are the plain pipelines with the mixin, for SD/SDXL + LoRA.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from visadapt.diffusion.composer.decor import Decor, DecorProjector, encoder_dims, undesired_rows


class DecorMixin:
    """Adds ``decor=`` to the pipeline call (put it before the diffusers pipeline class in the bases)."""

    _decor: Optional[Decor] = None

    def __call__(self, *args, decor: Optional[Decor] = None, **kwargs):
        with self.decor_active(decor):
            return super().__call__(*args, **kwargs)

    @contextmanager
    def decor_active(self, decor: Optional[Decor]) -> Iterator[None]:
        previous, self._decor = self._decor, decor
        try:
            yield
        finally:
            self._decor = previous

    def encode_prompt(self, *args, **kwargs):
        out = super().encode_prompt(*args, **kwargs)
        if self._decor is None:
            return out
        return (self.apply_decor(out[0], self._decor), *out[1:])

    def fit_decor(self, decor: Decor, width: int) -> DecorProjector:
        """Projector(s) from the undesired words, encoded by the text encoder(s) as they are configured now."""

        def encode(text: str) -> torch.Tensor:
            return super(DecorMixin, self).encode_prompt(prompt=text, device=self._execution_device,
                                                         num_images_per_prompt=1, do_classifier_free_guidance=False)[0]

        rows = undesired_rows(encode, self.tokenizer or getattr(self, "tokenizer_2", None), decor)
        return DecorProjector.fit(rows, encoder_dims(self, width), decor.energy)

    def apply_decor(self, embeds: torch.Tensor, decor: Decor) -> torch.Tensor:
        """(B, L, D) prompt embeddings projected with strength α per text encoder."""
        projector = self.fit_decor(decor, embeds.shape[-1])
        return projector.apply(embeds, decor.strengths(len(projector.dims)))


class DecorPipeline(DecorMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with ``decor=``."""


class DecorXLPipeline(DecorMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with ``decor=`` (one strength, or one per text encoder)."""
