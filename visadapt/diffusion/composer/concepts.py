"""What a user composes: concepts (a LoRA, a regional prompt, a box, a weight) and their masks on a feature grid.

Boxes follow diffusers' GLIGEN convention: ``[xmin, ymin, xmax, ymax]`` as fractions of the image in [0, 1].
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .lora_files import lora_file

Box = Sequence[float]

# Words the latent optimisation does not pull into a box by default: function words and prompt boilerplate.
STOP_WORDS = frozenset("""
a an the this that these those some any each every one two
of in on at to for from by with without into onto over under above below near beside behind between among
inside outside through across along around against during before after up down off out
and or but nor so as than then while
is are was were be been being has have had do does did
i me my we our you your he him his she her it its they them their
very really most more much many
photo photograph photography picture image shot render rendering illustration drawing painting
""".split())

# Fractions are snapped by this much before ceil/floor, so 0.3 · 10 lands on cell 3 and not 4.
_SNAP = 1e-6


@dataclass
class Concept:
    """One concept placed in the image.

    Args:
        lora: a ``.safetensors`` LoRA file (peft/diffusers or kohya format), a folder written by
            ``visadapt.export_lora``, a Mix-of-Show ED-LoRA ``.pth`` file (:mod:`visadapt.diffusion.composer.edlora`;
            write its new tokens, e.g. ``<cat1> <cat2>``, in ``prompt``) or the name of an adapter already loaded into
            the pipeline.
        prompt: the regional prompt, encoded by the text encoder with this concept's LoRA active.
        box: ``[xmin, ymin, xmax, ymax]`` in [0, 1] (fractions of width and height).
        weight: multiplies the concept's LoRA deltas (UNet K/V/O and text encoder).
        name: adapter name; defaults to the adapter name given as ``lora`` or the file's stem (the folder's name
            for diffusers' and peft's generic ``pytorch_lora_weights`` / ``adapter_model`` files).
        negative_prompt: regional negative prompt; defaults to the call's ``negative_prompt``.
        tokens: words of ``prompt`` whose cross-attention the latent optimisation pulls into the box. LoRA-Composer
            uses the concept's trigger tokens (an ED-LoRA file's new tokens, when the prompt has them); otherwise the
            default is the prompt's content words: every word not in :data:`STOP_WORDS` (articles, prepositions,
            conjunctions, pronouns and photo boilerplate such as "photo", "picture"), so in "a photo of a cat" only
            "cat" is pulled into the box.
    """

    lora: Union[str, os.PathLike]
    prompt: str
    box: Box
    weight: float = 1.0
    name: Optional[str] = None
    negative_prompt: Optional[str] = None
    tokens: Optional[Sequence[str]] = field(default=None)

    def __post_init__(self) -> None:
        if Path(self.lora).is_dir():  # a folder written by export_lora stands for its one LoRA file
            self.lora = lora_file(self.lora)
        self.box = validate_box(self.box, self.label)
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"Concept {self.label}: the regional prompt is empty; describe what goes in the box.")

    @property
    def is_file(self) -> bool:
        return str(self.lora).endswith((".safetensors", ".pth")) or Path(self.lora).exists()

    @property
    def adapter_name(self) -> str:
        if self.name:
            return self.name
        return adapter_name_for(self.lora) if self.is_file else str(self.lora)

    @property
    def label(self) -> str:
        return repr(self.name or Path(str(self.lora)).name)


# Names diffusers and peft give every LoRA file: such a file is named by its folder so two folders' don't collide.
GENERIC_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


def adapter_name_for(path: Union[str, os.PathLike]) -> str:
    """A peft adapter name from a file (or export folder) name; peft names must not contain dots."""
    path = Path(path)
    if path.name in GENERIC_FILE_NAMES:
        path = path.absolute().parent
    stem = path.name.removesuffix(".safetensors").removesuffix(".pth")
    return re.sub(r"[^0-9A-Za-z_-]", "_", stem) or "concept"


def validate_box(box: Box, label: str = "") -> tuple[float, float, float, float]:
    """Check a GLIGEN box: four numbers in [0, 1] with xmin < xmax and ymin < ymax."""
    where = f"Concept {label}: " if label else ""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{where}box must be four numbers [xmin, ymin, xmax, ymax], got {box!r}.") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}box must be four finite numbers [xmin, ymin, xmax, ymax], got {box!r}.")
    xmin, ymin, xmax, ymax = values
    if min(values) < 0 or max(values) > 1:
        raise ValueError(f"{where}box {list(values)} is outside the canvas: coordinates are fractions of the image "
                         "in [0, 1] (GLIGEN convention [xmin, ymin, xmax, ymax]); divide pixels by width/height.")
    if xmax <= xmin or ymax <= ymin:
        raise ValueError(f"{where}box {list(values)} is empty: need xmin < xmax and ymin < ymax.")
    return values


def box_mask(box: Box, height: int, width: int) -> torch.Tensor:
    """(height, width) bool mask of the cells a box covers on a feature grid.

    Rows ``ceil(ymin·h) .. floor(ymax·h)`` (half-open), columns likewise, as LoRA-Composer maps boxes. A box thinner
    than one cell at a coarse level still covers the cell its centre falls in, so no concept vanishes there.
    """
    xmin, ymin, xmax, ymax = box
    y0, y1 = math.ceil(ymin * height - _SNAP), math.floor(ymax * height + _SNAP)
    x0, x1 = math.ceil(xmin * width - _SNAP), math.floor(xmax * width + _SNAP)
    if y1 <= y0:
        y0 = min(int((ymin + ymax) / 2 * height), height - 1)
        y1 = y0 + 1
    if x1 <= x0:
        x0 = min(int((xmin + xmax) / 2 * width), width - 1)
        x1 = x0 + 1
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def box_masks(boxes: Sequence[Box], height: int, width: int) -> torch.Tensor:
    """(n_concepts, height, width) bool masks."""
    return torch.stack([box_mask(b, height, width) for b in boxes])


def check_unique_names(concepts: Sequence[Concept]) -> None:
    seen: dict[str, int] = {}
    for i, concept in enumerate(concepts):
        name = concept.adapter_name
        if name in seen:
            raise ValueError(f"Concepts {seen[name]} and {i} share the name {name!r}; give each concept its own "
                             "`name=` (it is the adapter name) or use one concept per LoRA.")
        seen[name] = i


def content_words(prompt: str) -> list[str]:
    """The words of ``prompt`` that are not in :data:`STOP_WORDS` (all its words if every one is)."""
    words = re.findall(r"<[^<>\s]+>|[\w'-]+", prompt)
    content = [w for w in words if w.lower() not in STOP_WORDS]
    return content or words


def token_positions(tokenizer, prompt: str, words: Optional[Sequence[str]]) -> list[int]:
    """Positions (in the tokenised prompt, start token = 0) of the tokens of ``words``; of the prompt's content words
    (:func:`content_words`) if None.

    Each word is tokenised alone and its token ids are searched for in the prompt's ids, so words that split into
    several tokens are found whole (the official code split on spaces, which breaks on such words). Words are
    found in order: a word listed twice is its first two occurrences.
    """
    ids = tokenizer(prompt, truncation=False).input_ids
    n_words = len(ids) - 2  # without start and end tokens
    positions: list[int] = []
    start = 1
    for word in content_words(prompt) if words is None else words:
        sub = tokenizer(word, add_special_tokens=False).input_ids
        hits = [i for i in range(1, 1 + n_words - len(sub) + 1) if ids[i:i + len(sub)] == sub] if sub else []
        later = [i for i in hits if i >= start]
        if not hits:
            if words is None:  # a word the tokenizer reads differently in context; skip it
                continue
            raise ValueError(f"Token {word!r} is not in the regional prompt {prompt!r}; `tokens=` must list words of "
                             "the prompt.")
        first = later[0] if later else hits[0]
        positions.extend(range(first, first + len(sub)))
        start = first + len(sub)
    return positions or list(range(1, 1 + n_words))


def check_prompt_length(tokenizer, prompt: str, label: str) -> None:
    limit = tokenizer.model_max_length
    length = len(tokenizer(prompt, truncation=False).input_ids)
    if length > limit:
        raise ValueError(f"Concept {label}: the regional prompt is {length} tokens but the text encoder takes at "
                         f"most {limit} (start and end tokens included); shorten it.")
