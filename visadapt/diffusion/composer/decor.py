"""DECOR: project prompt embeddings away from the directions of undesired words (Jang et al., arXiv 2412.09169).

Given undesired token embeddings X̃ (m, d) from the pipeline's own text encoder, the thin SVD X̃ = Ũ Σ̃ Ṽᵀ spans
the subspace to remove, and each prompt embedding row x becomes ``x − α · x Ṽ Ṽᵀ``: α = 0 changes nothing,
α = 1 removes every component along the undesired directions. SDXL concatenates two encoders' outputs (768 + 1280
dims) that live in different spaces, so each block gets its own projector and may get its own α.

No official code exists; what the spec marks as inferred is an option here: the prompt template the words are
encoded in, whether the end-of-text row joins the word rows, how much SVD energy to keep, and that only the
conditional embeddings are projected (the negative prompt stays as it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch


@dataclass
class Decor:
    """What to suppress and how strongly.

    words: undesired words or short phrases (e.g. the objects a style LoRA leaks).
    strength: α in [0, 1]; one value, or one per text encoder (SDXL: ``(α_clip_l, α_clip_g)``).
    template: prompt each word is encoded in; its word-token rows become X̃.
    include_eot: also take each encoding's end-of-text row (it summarises the phrase).
    energy: keep the leading singular directions covering this fraction of X̃'s energy (1.0 = all).
    """

    words: Sequence[str]
    strength: Union[float, Sequence[float]] = 1.0
    template: str = "{}"
    include_eot: bool = False
    energy: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.words, str):
            self.words = [self.words]
        self.words = [w.strip() for w in self.words if w and w.strip()]
        if not self.words:
            raise ValueError("DECOR needs at least one undesired word.")
        strengths = [self.strength] if isinstance(self.strength, (int, float)) else list(self.strength)
        if not all(0.0 <= float(a) <= 1.0 for a in strengths):
            raise ValueError(f"DECOR strength must lie in [0, 1], got {self.strength!r}.")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"DECOR energy must lie in (0, 1], got {self.energy}.")

    def strengths(self, n_blocks: int) -> list[float]:
        if isinstance(self.strength, (int, float)):
            return [float(self.strength)] * n_blocks
        if len(self.strength) != n_blocks:
            raise ValueError(f"DECOR got {len(self.strength)} strengths for {n_blocks} text encoders.")
        return [float(a) for a in self.strength]


class DecorProjector:
    """Orthonormal bases of the undesired subspaces, one per embedding block.

    ``bases[i]``: (d_i, r_i) with orthonormal columns Ṽ_i; ``dims`` the block widths, summing to the embedding dim.
    """

    def __init__(self, bases: Sequence[torch.Tensor], dims: Sequence[int]) -> None:
        self.bases, self.dims = list(bases), list(dims)

    @classmethod
    def fit(cls, rows: torch.Tensor, dims: Sequence[int], energy: float = 1.0) -> "DecorProjector":
        """Fit from undesired rows X̃ (m, D), D = Σ dims, by a thin SVD per block."""
        bases = []
        for block in rows.float().split(list(dims), dim=-1):
            _, sigma, vh = torch.linalg.svd(block, full_matrices=False)
            keep = sigma > sigma.max() * max(block.shape) * torch.finfo(sigma.dtype).eps  # numerical rank
            share = (sigma ** 2).cumsum(0) / (sigma ** 2).sum()
            keep &= torch.arange(len(sigma)) <= int((share < energy - 1e-9).sum())
            bases.append(vh[keep].T.contiguous())
        return cls(bases, dims)

    def apply(self, embeds: torch.Tensor, strengths: Sequence[float]) -> torch.Tensor:
        """(…, D) embeddings → X (I − α P) per block, in the input dtype."""
        blocks = []
        for block, basis, alpha in zip(embeds.split(self.dims, dim=-1), self.bases, strengths):
            x = block.float()
            basis = basis.to(x.device)
            blocks.append((x - alpha * (x @ basis) @ basis.T).to(embeds.dtype))
        return torch.cat(blocks, dim=-1)


def undesired_rows(encode: Callable[[str], torch.Tensor], tokenizer, decor: Decor) -> torch.Tensor:
    """X̃ (m, D): the rows of each undesired word's tokens in ``encode(template.format(word))`` (1, L, D)."""
    rows = []
    for word in decor.words:
        text = decor.template.format(word)
        ids = tokenizer(text).input_ids
        sub = tokenizer(word, add_special_tokens=False).input_ids
        start = next((i for i in range(len(ids)) if ids[i:i + len(sub)] == sub), None)
        if start is None:
            raise ValueError(f"DECOR template {decor.template!r} must contain the word; '{{}}' is replaced by it.")
        embeds = encode(text)[0]
        picked = list(range(start, start + len(sub))) + ([len(ids) - 1] if decor.include_eot else [])
        rows.append(embeds[picked])
    return torch.cat(rows)


def encoder_dims(pipe, width: int) -> list[int]:
    """Widths of the text encoders whose outputs are concatenated in a prompt embedding of ``width``."""
    dims = [enc.config.hidden_size for enc in (getattr(pipe, "text_encoder", None),
                                                getattr(pipe, "text_encoder_2", None)) if enc is not None]
    return dims if sum(dims) == width else [width]
