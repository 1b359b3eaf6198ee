"""EasyRef (Zong et al., arXiv 2412.09618): a multimodal LLM reads several reference images and the prompt, and 64
tokens it produces condition SDXL through decoupled cross-attention. This module is the encoder and its inputs;
:mod:`visadapt.diffusion.easyref.unet` installs the decoupled cross-attention and LoRA in a UNet,
:mod:`visadapt.diffusion.easyref.files` reads and writes the checkpoints.

Public API (shapes with B prompts, N references each, Q = ``num_queries`` = 64, D = SDXL cross-attention width):

* :class:`EasyRefEncoder` ``(mllm, processor, cross_attention_dim, num_queries=64)``: Qwen2-VL (transformers) without
  its last decoder layer, that last layer run on [MLLM states; Q learned reference tokens], and the MLP projector.
  ``prepare(reference_images, prompts) -> dict`` (B lists of PIL images / paths, B prompts → processor tensors),
  ``forward(**prepared) -> (B, Q, D)``, ``encode(reference_images, prompts) -> (B, Q, D)``;
  ``mllm_states(...) -> (B, L, H)`` and ``aggregate(states, attention_mask) -> (B, Q, D)`` split the forward where
  training freezes the MLLM.
* :func:`check_references` / :func:`load_reference`: references as RGB PIL images, or :class:`EasyRefInputError`
  naming the fix.

Checkpoint fidelity: the released model was trained with three quirks of its code (transformers 4.45, SDPA), and
``EasyRefEncoder(faithful=True)`` (the default) reproduces them so the released weights give their outputs:
the final layer runs *causally* (reference token i sees every MLLM token and reference tokens ≤ i); the MLLM states
entering it are RMS-normalised by the MLLM's final norm; positions are plain 0..L−1 (then L..L+Q−1 for the
reference tokens) on all three M-RoPE sections. ``faithful=False`` is the "clean" variant (bidirectional final
layer, Qwen2-VL's M-RoPE positions); it needs its own training.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

# The instruction the released checkpoint was trained with (a data constant: keep it byte-identical).
INSTRUCTION = ("Visualize a scene that closely resembles the provided images, capturing the essence and details "
               "described in this prompt:\n")
NULL_REFERENCE_SIZE = 512  # the dropped-reference image of training (and the unconditional branch): black 512²

ImageLike = Union["PIL.Image.Image", str, os.PathLike]  # noqa: F821


class EasyRefInputError(ValueError):
    """Reference images or prompts EasyRef cannot use; the message names the fix."""


# -- references ------------------------------------------------------------------------------------------------------

def reference_pixels(image_size: int = 336) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the Qwen2-VL processor for references of about ``image_size`` px a side.

    EasyRef allows (s/28 − 1)² to (s/28)² + 1 merged 28-px cells: 121..145 visual tokens per image at 336 px.
    """
    cells = image_size // 28
    return (cells - 1) ** 2 * 28 * 28, (cells ** 2 + 1) * 28 * 28


def mllm_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """The dtype EasyRef's MLLM runs in on ``device``, whatever the UNet's: bf16 where the device computes it natively
    (CUDA GPUs from Ampere on), fp32 elsewhere. The released code ran Qwen2-VL in bf16; in fp16 Qwen2-VL-2B's
    activations overflow into garbage (transformers issue 33294)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def load_processor(name_or_path: Union[str, os.PathLike]):
    """Qwen2-VL's processor (hub id or folder) with the PIL image processor: the released code's pixels.

    The released code ran transformers 4.45, whose Qwen2-VL image processor was the PIL one; transformers 5 loads a
    torchvision one by default, whose resize gives other pixels (normalised, up to 0.015-0.03 apart, mean 5e-5, on
    references sized for 336 px). A ``(model, processor)`` pair given to the pipeline keeps its own processor.
    """
    from transformers import AutoImageProcessor, AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.image_processor = AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
    if "Pil" not in type(processor.image_processor).__name__:  # a transformers without image-processor backends
        raise ImportError(f"EasyRef needs transformers' PIL image processor for Qwen2-VL (backend='pil'), which this "
                          f"transformers did not give ({type(processor.image_processor).__name__}); upgrade it: pip "
                          f"install -U transformers (tested with 5.25).")
    return processor


def _round_to_cells(image, factor: int = 28, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16384 * 28 * 28):
    """Resize to multiples of ``factor`` px, as the official data path does before the processor resizes again."""
    from PIL import Image

    w, h = image.size
    if max(h, w) / min(h, w) > 200:
        raise EasyRefInputError(f"A reference image of {w}x{h} px is too elongated (aspect ratio over 200); crop it.")
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return image if (wb, hb) == (w, h) else image.resize((wb, hb), Image.BICUBIC)


def load_reference(image: ImageLike, where: str = "reference image"):
    """An RGB PIL image from a PIL image or a path; unreadable input → :class:`EasyRefInputError` naming the fix."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise EasyRefInputError(f"{where}: no file at {str(path)!r}; pass an existing image path or a PIL image.")
        from visadapt.utils.images import pixel_limit, too_large

        with pixel_limit():
            try:
                with Image.open(path) as opened:
                    return opened.convert("RGB")
            except Image.DecompressionBombError:
                raise EasyRefInputError(f"{where}: {too_large(path, Image.MAX_IMAGE_PIXELS)}") from None
            except (UnidentifiedImageError, OSError) as error:
                raise EasyRefInputError(f"{where}: {str(path)!r} is not a readable image ({error}); pass a "
                                        "PNG/JPEG/WebP file or a PIL image.") from None
    raise EasyRefInputError(f"{where}: got {type(image).__name__}; pass a PIL image or an image file path.")


def check_references(reference_images: Any, batch: int) -> list[list]:
    """B lists of references (one list shared by every prompt when given flat) as RGB PIL images."""
    if reference_images is None or (isinstance(reference_images, (list, tuple)) and len(reference_images) == 0):
        raise EasyRefInputError("EasyRef needs reference images: pass reference_images=[image, ...] (PIL images or "
                                "paths), or scale=0 to generate without references.")
    if not isinstance(reference_images, (list, tuple)):
        reference_images = [reference_images]
    nested = all(isinstance(r, (list, tuple)) for r in reference_images)
    groups = [list(r) for r in reference_images] if nested else [list(reference_images)] * batch
    if len(groups) != batch:
        raise EasyRefInputError(f"{len(groups)} reference lists for {batch} prompts; pass one list per prompt or one "
                                "flat list shared by all prompts.")
    out = []
    for b, group in enumerate(groups):
        if not group:
            raise EasyRefInputError(f"Prompt {b} has no reference images; give it at least one (or use scale=0).")
        out.append([load_reference(img, f"reference image {i} of prompt {b}") for i, img in enumerate(group)])
    return out


# -- the encoder -----------------------------------------------------------------------------------------------------

class EasyRefEncoder(nn.Module):
    """References + prompt → Q conditioning tokens for SDXL: (B, Q, D).

    ``mllm``: a transformers ``Qwen2VLForConditionalGeneration`` (its last decoder layer moves into
    ``self.final_layer``; the model keeps the others). ``processor``: its ``Qwen2VLProcessor`` (chat template
    included). ``cross_attention_dim``: D (2048 for SDXL). ``num_queries``: Q learned reference tokens (64).
    ``image_size``: references are resized to about this many pixels a side (336 as released; the processor's
    min/max pixels are set from it). ``instruction``: prefixed to every prompt. ``faithful``: see the module doc.

    Parameters: ``mllm`` (the truncated Qwen2-VL), ``final_layer`` (its former last decoder layer), ``final_norm``
    (a copy of its final RMSNorm), ``reference_tokens`` (Q, H), ``proj`` (Linear H→H, GELU, Linear H→D, LayerNorm D).
    """

    def __init__(self, mllm: nn.Module, processor, cross_attention_dim: int, num_queries: int = 64, *,
                 faithful: bool = True, image_size: int = 336, instruction: str = INSTRUCTION) -> None:
        super().__init__()
        language = mllm.model.language_model
        if getattr(mllm, "_easyref_truncated", False):
            raise ValueError("This Qwen2-VL already lost its last layer to another EasyRefEncoder; load a fresh one.")
        if len(language.layers) < 2:
            raise ValueError("EasyRef splits off the MLLM's last decoder layer: the model needs at least 2 layers.")
        hidden = language.config.hidden_size
        self.final_layer = language.layers[-1]
        language.layers = nn.ModuleList(list(language.layers)[:-1])
        mllm._easyref_truncated = True
        self.mllm = mllm
        self.final_norm = copy.deepcopy(language.norm)
        self.reference_tokens = nn.Parameter(0.1 * torch.randn(num_queries, hidden))
        self.proj = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, cross_attention_dim),
                                  nn.LayerNorm(cross_attention_dim))
        self.processor = processor
        self.faithful, self.image_size, self.instruction = faithful, image_size, instruction
        if hasattr(processor, "image_processor"):
            min_pixels, max_pixels = reference_pixels(image_size)
            size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
            processor.image_processor.size = size
            for attr, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
                if hasattr(processor.image_processor, attr):
                    setattr(processor.image_processor, attr, value)

    @property
    def num_queries(self) -> int:
        return self.reference_tokens.shape[0]

    @property
    def cross_attention_dim(self) -> int:
        return self.proj[2].out_features

    @property
    def device(self) -> torch.device:
        return self.reference_tokens.device

    def place(self, device: Union[str, torch.device]) -> "EasyRefEncoder":
        """Move to ``device`` in :func:`mllm_dtype` there (bf16 or fp32, never the UNet's fp16); the tokens are cast
        to the UNet's dtype where they enter it."""
        return self.to(device=device, dtype=mllm_dtype(device))

    # -- inputs --

    def messages(self, n_images: int, prompt: str) -> list[dict]:
        """One user turn: every reference image first, then the instruction and the prompt."""
        content = [{"type": "image"} for _ in range(n_images)]
        return [{"role": "user", "content": content + [{"type": "text", "text": self.instruction + prompt}]}]

    def prepare(self, reference_images: Sequence[Sequence[ImageLike]], prompts: Sequence[str],
                max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Processor tensors for B prompts, each with its list of references (PIL images or paths).

        Returns ``input_ids`` / ``attention_mask`` (B, L), ``pixel_values`` (P, C·2·14·14) and ``image_grid_thw``
        (ΣN, 3). Padded to the longest prompt, or to ``max_length`` with truncation (raises if that would cut image
        tokens).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        groups = check_references(reference_images, len(prompts))
        texts = [self.processor.apply_chat_template(self.messages(len(g), p), tokenize=False,
                                                    add_generation_prompt=True) for g, p in zip(groups, prompts)]
        images = [_round_to_cells(img) for group in groups for img in group]
        padding = {"padding": True} if max_length is None else {"padding": "max_length", "truncation": True,
                                                                 "max_length": max_length}
        inputs = self.processor(text=texts, images=images, return_tensors="pt", **padding)
        keep = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        return {k: inputs[k] for k in keep if k in inputs}

    # -- computation --

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor, mm_token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, Q, D) conditioning tokens from :meth:`prepare`'s tensors."""
        states, positions = self.mllm_states(input_ids, attention_mask, pixel_values, image_grid_thw,
                                             mm_token_type_ids, return_positions=True)
        return self.aggregate(states, attention_mask.to(states.device), positions)

    def encode(self, reference_images: Sequence[Sequence[ImageLike]], prompts: Sequence[str]) -> torch.Tensor:
        """:meth:`prepare` then :meth:`forward`, one prompt at a time: (B, Q, D).

        One at a time because padding moves the reference tokens' plain positions (as it did in training, where
        batches were padded): unpadded, each prompt gets exactly what the released inference code computes.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        groups = check_references(reference_images, len(prompts))
        return torch.cat([self(**self.prepare([group], [prompt])) for group, prompt in zip(groups, prompts)])

    def mllm_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                    image_grid_thw: torch.Tensor, mm_token_type_ids: Optional[torch.Tensor] = None,
                    return_positions: bool = False):
        """(B, L, H) states of the truncated MLLM after its final RMSNorm (image features scattered into the
        ``<|image_pad|>`` positions); with ``return_positions`` also their (3, B, L) rotary positions."""
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        model = self.mllm.model
        language = model.language_model
        embeds = language.embed_tokens(input_ids)
        features = model.get_image_features(pixel_values.to(device), image_grid_thw.to(device))
        features = getattr(features, "pooler_output", features)
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        slots = input_ids == self.mllm.config.image_token_id
        if int(slots.sum()) != features.shape[0]:
            raise EasyRefInputError(f"{int(slots.sum())} image tokens in the text for {features.shape[0]} image "
                                    "features: the prompt was truncated; raise max_length or shorten the prompt.")
        embeds = embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))
        positions = self._positions(input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
        states = _run_layers(language.layers, language.rotary_emb, embeds, attention_mask, positions, causal=True)
        states = language.norm(states)  # the truncated model's hidden_states[-1] is normalised (checkpoint quirk)
        return (states, positions) if return_positions else states

    def aggregate(self, states: torch.Tensor, attention_mask: torch.Tensor,
                  positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final layer on [states; reference tokens], its norm, the last Q rows, the projector: (B, Q, D).

        ``states`` (B, L, H), ``attention_mask`` (B, L); ``positions`` (3, B, L) only matter for ``faithful=False``.
        """
        batch, length, _ = states.shape
        queries = self.num_queries
        tokens = self.reference_tokens.to(states.dtype)[None].expand(batch, -1, -1)
        x = torch.cat([states, tokens], 1)
        mask = torch.cat([attention_mask.to(states.device), attention_mask.new_ones(batch, queries)], 1)
        if self.faithful or positions is None:
            positions = _plain_positions(batch, length + queries, states.device)
        else:
            start = positions.amax(dim=(0, 2), keepdim=True) + 1  # reference tokens continue after the sequence
            extra = start + torch.arange(queries, device=states.device)[None, None]
            positions = torch.cat([positions, extra.expand(3, -1, -1)], 2)
        rotary = self.mllm.model.language_model.rotary_emb
        x = _run_layers([self.final_layer], rotary, x, mask, positions, causal=self.faithful)
        x = self.final_norm(x)[:, -queries:]
        return self.proj(x.to(self.proj[0].weight.dtype))

    def _positions(self, input_ids, attention_mask, image_grid_thw, mm_token_type_ids) -> torch.Tensor:
        batch, length = input_ids.shape
        if self.faithful:
            return _plain_positions(batch, length, input_ids.device)
        kwargs = {"image_grid_thw": image_grid_thw.to(input_ids.device), "attention_mask": attention_mask}
        if mm_token_type_ids is not None:
            kwargs["mm_token_type_ids"] = mm_token_type_ids.to(input_ids.device)
        positions, _ = self.mllm.model.get_rope_index(input_ids, **kwargs)
        return positions[-3:]


def _plain_positions(batch: int, length: int, device) -> torch.Tensor:
    """(3, B, L): 0..L−1 on all three M-RoPE sections (what the released model saw)."""
    return torch.arange(length, device=device).view(1, 1, -1).expand(3, batch, -1)


def _run_layers(layers, rotary, x: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                causal: bool) -> torch.Tensor:
    """Decoder layers on x (B, L, H): padding keys hidden, and future keys too when ``causal``.

    Without padding (stage 3 and sampling: one group, unpadded) the layers get no mask and SDPA its ``is_causal``
    flag, so its fused kernels keep the attention's memory linear in L; a materialised (B, 1, L, L) mask would grow
    with the square of the references' tokens (10k tokens for 100 references at 336 px: 0.4 GB per mask, more for
    the attention weights kept for backward). Padded batches (and non-SDPA attention) get an explicit additive mask;
    rows left with no key (left padding) stay finite: every key gets the same large negative bias."""
    length = x.shape[1]
    position_embeddings = rotary(x, positions)
    if _sdpa_layers(layers) and bool(attention_mask.bool().all()):
        mask_kwargs = {"attention_mask": None, "is_causal": causal}
    else:
        allowed = attention_mask.bool()[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = allowed.expand(-1, 1, length, length)
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed,
                                                                                      torch.finfo(x.dtype).min)
        mask_kwargs = {"attention_mask": bias}
    for layer in layers:
        x = layer(x, position_embeddings=position_embeddings, **mask_kwargs)
        x = x[0] if isinstance(x, tuple) else x
    return x


def _sdpa_layers(layers) -> bool:
    """Whether every layer attends through transformers' SDPA (which honours ``is_causal``; eager attention would
    ignore it and attend to the future)."""
    implementations = {getattr(getattr(getattr(layer, "self_attn", None), "config", None), "_attn_implementation",
                               None) for layer in layers}
    return implementations == {"sdpa"}
