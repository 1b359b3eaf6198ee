"""EasyRef (Zong et al., arXiv 2412.09618): a multimodal LLM reads several reference images and the prompt, and 64
tokens it produces condition SDXL through decoupled cross-attention.

Public API (shapes with B prompts, N references each, Q = ``num_queries`` = 64, D = SDXL cross-attention width):

* :class:`EasyRefEncoder` ``(mllm, processor, cross_attention_dim, num_queries=64)``: Qwen2-VL (transformers) without
  its last decoder layer, that last layer run on [MLLM states; Q learned reference tokens], and the MLP projector.
  ``prepare(reference_images, prompts) -> dict`` (B lists of PIL images / paths, B prompts → processor tensors),
  ``forward(**prepared) -> (B, Q, D)``, ``encode(reference_images, prompts) -> (B, Q, D)``;
  ``mllm_states(...) -> (B, L, H)`` and ``aggregate(states, attention_mask) -> (B, Q, D)`` split the forward where
  training freezes the MLLM.
* :func:`install_easyref` ``(unet, num_tokens=64, scale=1.0, lora_rank=128)``: diffusers' IP-Adapter machinery on
  every cross-attention layer (``IPAdapterAttnProcessor2_0`` with ``to_k_ip``/``to_v_ip`` initialised from the
  layer's ``to_k``/``to_v``; an identity ``unet.encoder_hid_proj``), and the UNet LoRA as the peft adapter
  ``"easyref"`` on q/k/v/out of every attention layer. The UNet then takes the tokens as
  ``added_cond_kwargs["image_embeds"] = [c[:, None]]`` (c: (B, Q, D)), exactly as diffusers feeds IP-Adapter tokens;
  see :func:`unet_image_embeds`. :func:`set_easyref_scale` sets λ; :func:`remove_easyref` undoes the install.
* :func:`convert_official` / :func:`to_official`: the released checkpoint's key layout ↔ ours (see there);
  :func:`easyref_state_dict` / :func:`load_easyref_state`: our layout from / into a UNet and an encoder;
  :func:`read_easyref_file`: a ``.safetensors`` (or weights-only ``.bin``) file in either layout, as ours.

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
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

# The instruction the released checkpoint was trained with (a data constant: keep it byte-identical).
INSTRUCTION = ("Visualize a scene that closely resembles the provided images, capturing the essence and details "
               "described in this prompt:\n")
ADAPTER_NAME = "easyref"
LORA_TARGETS = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"  # peft regex: q/k/v/out of self- and cross-attention
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
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise EasyRefInputError(f"{where}: {str(path)!r} is not a readable image ({error}); pass a PNG/JPEG/WebP "
                                    "file or a PIL image.") from None
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
    """Decoder layers on x (B, L, H) with an explicit additive mask: padding keys hidden, and future keys too when
    ``causal``. Rows left with no key (left padding) stay finite: every key gets the same large negative bias."""
    length = x.shape[1]
    allowed = attention_mask.bool()[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    allowed = allowed.expand(-1, 1, length, length)
    bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
    position_embeddings = rotary(x, positions)
    for layer in layers:
        x = layer(x, attention_mask=bias, position_embeddings=position_embeddings)
        x = x[0] if isinstance(x, tuple) else x
    return x


# -- the UNet side ---------------------------------------------------------------------------------------------------

def _attention(unet, processor_name: str) -> nn.Module:
    return unet.get_submodule(processor_name.rsplit(".processor", 1)[0])


def _base(linear: nn.Module) -> nn.Module:
    return getattr(linear, "base_layer", linear)


def _decoupled_processors(unet) -> list:
    """The UNet's IP-Adapter processors, also when a wrapping processor holds one as ``.base`` (the composer's)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    found = []
    for processor in unet.attn_processors.values():
        processor = processor if isinstance(processor, IPAdapterAttnProcessor2_0) else getattr(processor, "base", None)
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            found.append(processor)
    return found


def is_easyref_installed(unet) -> bool:
    return bool(_decoupled_processors(unet))


def install_easyref(unet, num_tokens: int = 64, scale: float = 1.0, lora_rank: int = 128) -> None:
    """Give ``unet`` EasyRef's decoupled cross-attention and (``lora_rank`` > 0) its LoRA, in place.

    Every cross-attention layer gets diffusers' ``IPAdapterAttnProcessor2_0`` (one IP-Adapter of ``num_tokens``
    tokens): out = softmax(Q K_txtᵀ/√d) V_txt + λ·softmax(Q (W'_K c)ᵀ/√d) (W'_V c), W'_K/W'_V (``to_k_ip[0]`` /
    ``to_v_ip[0]``) initialised from the layer's W_K/W_V; self-attention processors stay as they are.
    ``unet.encoder_hid_proj`` becomes an identity IP-Adapter projection, so the UNet takes c (B, Q, D) as
    ``added_cond_kwargs["image_embeds"] = [c[:, None]]`` (:func:`unet_image_embeds`). The LoRA (rank r, alpha r →
    scale 1, B = 0 at init) is the peft adapter ``"easyref"`` on to_q/to_k/to_v/to_out.0 of every attention layer.
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    if is_easyref_installed(unet):
        raise ValueError("This UNet already has IP-Adapter/EasyRef layers; call remove_easyref(unet) first.")
    if unet.encoder_hid_proj is not None:
        raise ValueError("This UNet already projects its encoder states (encoder_hid_proj is set); EasyRef needs an "
                         "SDXL-style UNet without one.")
    processors = {}
    for name, processor in unet.attn_processors.items():
        attn = _attention(unet, name)
        if not attn.is_cross_attention:
            processors[name] = processor
            continue
        to_k, to_v = _base(attn.to_k), _base(attn.to_v)
        new = IPAdapterAttnProcessor2_0(hidden_size=to_k.out_features, cross_attention_dim=to_k.in_features,
                                        num_tokens=(num_tokens,), scale=scale)
        with torch.no_grad():
            new.to_k_ip[0].weight.copy_(to_k.weight)
            new.to_v_ip[0].weight.copy_(to_v.weight)
        processors[name] = new.to(device=to_k.weight.device, dtype=to_k.weight.dtype)
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity()])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    if lora_rank > 0:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS,
                                    init_lora_weights=True), adapter_name=ADAPTER_NAME)


def remove_easyref(unet) -> None:
    """Undo :func:`install_easyref`: default attention processors, no ``encoder_hid_proj``, no "easyref" adapter."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    processors = {name: AttnProcessor2_0() if isinstance(p, IPAdapterAttnProcessor2_0) else p
                  for name, p in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    adapters = getattr(unet, "peft_config", None) or {}
    if ADAPTER_NAME in adapters:
        if len(adapters) == 1:
            unet.unload_lora()  # the last adapter: unwrap the layers too, so the UNet saves as plain SDXL again
        else:
            unet.delete_adapters(ADAPTER_NAME)


def set_easyref_scale(unet, scale: float) -> None:
    """λ of every decoupled cross-attention layer (0 skips the reference branch; the LoRA is not touched)."""
    found = _decoupled_processors(unet)
    if not found:
        raise ValueError("This UNet has no EasyRef layers; call install_easyref(unet) first.")
    for processor in found:
        processor.scale = [float(scale)] * len(processor.to_k_ip)


def unet_image_embeds(tokens: torch.Tensor) -> list[torch.Tensor]:
    """(B, Q, D) EasyRef tokens → the ``added_cond_kwargs["image_embeds"]`` value of an installed UNet."""
    return [tokens[:, None]]


# -- state dicts -----------------------------------------------------------------------------------------------------
#
# Ours (one flat dict, safetensors-ready):
#   encoder.<EasyRefEncoder.state_dict() key>    reference_tokens, final_layer.*, final_norm.weight, proj.{0,2,3}.*,
#                                                and mllm.* (transformers-5 Qwen2-VL keys) when the MLLM was tuned
#   unet.<attn>.processor.to_{k,v}_ip.0.weight   decoupled cross-attention (diffusers IPAdapterAttnProcessor2_0)
#   unet.<attn>.<to_q|to_k|to_v|to_out.0>.lora_{A,B}.weight   the "easyref" LoRA (peft keys, no adapter name)
# Official (the released training wrapper's state dict, transformers 4.45 module names):
#   image_proj_model.proj.{0,2,3}.*, mllm_final_layer.{layers.0.*, norm.weight, reference_tokens},
#   multimodal_llm.{model.*, visual.*, lm_head.*} (optional), unet.<attn>.processor.to_{k,v}_ip.weight,
#   unet.<attn>.processor.to_{q,k,v,out}_lora.{down,up}.weight; adapter_modules.* duplicates the processors and
#   any other unet.* key is a frozen SDXL weight (both skipped when converting).

_OFFICIAL_IP = re.compile(r"unet\.(.+)\.processor\.(to_[kv]_ip)\.weight")
_OFFICIAL_LORA = re.compile(r"unet\.(.+)\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight")
_OURS_IP = re.compile(r"unet\.(.+)\.processor\.(to_[kv]_ip)\.0\.weight")
_OURS_LORA = re.compile(r"unet\.(.+)\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight")
_ENCODER_PREFIXES = [  # (official, ours)
    ("image_proj_model.", "encoder."),
    ("mllm_final_layer.layers.0.", "encoder.final_layer."),
    ("mllm_final_layer.norm.", "encoder.final_norm."),
    ("mllm_final_layer.reference_tokens", "encoder.reference_tokens"),
    ("multimodal_llm.model.", "encoder.mllm.model.language_model."),
    ("multimodal_llm.visual.", "encoder.mllm.model.visual."),
    ("multimodal_llm.lm_head.", "encoder.mllm.lm_head."),
]


def is_official(state: dict[str, Any]) -> bool:
    return any(k.startswith(("image_proj_model.", "mllm_final_layer.")) for k in state)


def convert_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released checkpoint's keys → ours (layouts in the comment above); tensors are shared, not copied."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith("adapter_modules.") or key.endswith("rotary_emb.inv_freq"):
            continue
        if m := _OFFICIAL_IP.fullmatch(key):
            out[f"unet.{m[1]}.processor.{m[2]}.0.weight"] = tensor
        elif m := _OFFICIAL_LORA.fullmatch(key):
            target = "to_out.0" if m[2] == "out" else f"to_{m[2]}"
            out[f"unet.{m[1]}.{target}.lora_{'A' if m[3] == 'down' else 'B'}.weight"] = tensor
        elif key.startswith("unet."):
            continue  # a frozen SDXL weight saved along with the adapters
        elif key.startswith("image_proj_model.proj."):
            out["encoder.proj." + key[len("image_proj_model.proj."):]] = tensor
        else:
            for official, ours in _ENCODER_PREFIXES[1:]:
                if key.startswith(official):
                    out[ours + key[len(official):]] = tensor
                    break
            else:
                unknown.append(key)
    if unknown:
        raise ValueError(f"Not an EasyRef checkpoint key: {unknown[:5]} ({len(unknown)} in all).")
    return out


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys → the released checkpoint's (the inverse of :func:`convert_official`)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := _OURS_IP.fullmatch(key):
            out[f"unet.{m[1]}.processor.{m[2]}.weight"] = tensor
        elif m := _OURS_LORA.fullmatch(key):
            short = "out" if m[2] == "to_out.0" else m[2][3:]
            out[f"unet.{m[1]}.processor.to_{short}_lora.{'down' if m[3] == 'A' else 'up'}.weight"] = tensor
        elif key.startswith("encoder.proj."):
            out["image_proj_model.proj." + key[len("encoder.proj."):]] = tensor
        else:
            for official, ours in reversed(_ENCODER_PREFIXES[1:]):
                if key.startswith(ours):
                    out[official + key[len(ours):]] = tensor
                    break
            else:
                raise ValueError(f"Not an EasyRef key of our layout: {key!r}.")
    return out


def easyref_state_dict(unet, encoder: Optional[EasyRefEncoder] = None,
                       include_mllm: bool = False) -> dict[str, torch.Tensor]:
    """Our layout from an installed ``unet`` (and ``encoder``; its MLLM weights only with ``include_mllm``)."""
    from peft import get_peft_model_state_dict

    out = {f"unet.{k}": v for k, v in unet.state_dict().items() if re.search(r"\.processor\.to_[kv]_ip\.", k)}
    if ADAPTER_NAME in (getattr(unet, "peft_config", None) or {}):
        lora = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
        out.update({f"unet.{k}": v for k, v in lora.items()})
    if encoder is not None:
        out.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()
                    if include_mllm or not k.startswith("mllm.")})
    return {k: v.detach().contiguous() for k, v in out.items()}


def load_easyref_state(unet, encoder: Optional[EasyRefEncoder], state: dict[str, torch.Tensor]) -> None:
    """Load our layout (or the official one, converted) into an installed ``unet`` and ``encoder``.

    Every decoupled layer must be in ``state``; the LoRA loads when present; encoder keys must all fit (MLLM keys are
    optional: absent means the pretrained MLLM).
    """
    from peft import set_peft_model_state_dict

    if is_official(state):
        state = convert_official(state)
    ip = {k[len("unet."):]: v for k, v in state.items() if _OURS_IP.fullmatch(k)}
    expected = {k for k in unet.state_dict() if re.search(r"\.processor\.to_[kv]_ip\.", k)}
    if set(ip) != expected:
        missing, extra = sorted(expected - set(ip)), sorted(set(ip) - expected)
        raise ValueError(f"The EasyRef weights do not fit this UNet: missing {missing[:3]}, unexpected {extra[:3]} "
                         "(an SDXL checkpoint with install_easyref(unet, num_tokens=…) matching the file is needed).")
    _load_exact(unet, ip)
    lora = {k[len("unet."):]: v for k, v in state.items() if _OURS_LORA.fullmatch(k)}
    if lora:
        if ADAPTER_NAME not in (getattr(unet, "peft_config", None) or {}):
            raise ValueError("The file has an EasyRef UNet LoRA but the UNet has none: install with lora_rank > 0.")
        result = set_peft_model_state_dict(unet, lora, adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA keys that fit no UNet layer: {result.unexpected_keys[:3]}")
    if encoder is not None:
        enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        required = {k for k in encoder.state_dict() if not k.startswith("mllm.")}
        missing = sorted(required - set(enc))
        if missing:
            raise ValueError(f"The EasyRef file lacks encoder weights {missing[:3]} ({len(missing)} in all).")
        _load_exact(encoder, enc)


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``module``'s own parameters and buffers; unknown keys or shapes are errors."""
    own = module.state_dict(keep_vars=True)
    for key, value in state.items():
        if key not in own:
            raise ValueError(f"{key!r} is not a weight of {type(module).__name__}.")
        if own[key].shape != value.shape:
            raise ValueError(f"{key!r}: the file has shape {tuple(value.shape)}, the model {tuple(own[key].shape)}; "
                             "the file was made for another model size.")
        with torch.no_grad():
            own[key].copy_(value)


def save_easyref_file(state: dict[str, torch.Tensor], path: Union[str, os.PathLike], official: bool = False,
                      metadata: Optional[dict[str, str]] = None) -> Path:
    """Write a state dict in our layout (:func:`easyref_state_dict`) to one ``.safetensors`` file, atomically: as is,
    or with ``official`` in the released code's layout (:func:`to_official`). The only writer of EasyRef files.

    Tied weights (Qwen2-VL-2B's ``lm_head`` is its embedding) are written as copies: safetensors refuses shared
    storage."""
    from safetensors.torch import save_file

    from visadapt.utils.io import atomic_path

    state = to_official(state) if official else state
    tensors, seen = {}, set()
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        tensors[key] = value.clone() if value.data_ptr() in seen else value
        seen.add(value.data_ptr())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "method": "easyref", **(metadata or {})})
    return path


def read_easyref_file(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """A checkpoint file in our layout or the official one (converted): ``.safetensors``, or a ``.bin``/``.pt`` read
    with ``weights_only`` (DeepSpeed's ``{"module": ...}`` wrapper unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No EasyRef checkpoint at {str(path)!r}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("module", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{str(path)!r} holds no EasyRef weights.")
    return convert_official(state) if is_official(state) else state


def checkpoint_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``num_tokens`` and ``lora_rank`` (0 without a LoRA) of a checkpoint in our layout."""
    if "encoder.reference_tokens" not in state:
        raise ValueError("Not an EasyRef checkpoint: it has no reference tokens (encoder.reference_tokens, or "
                         "mllm_final_layer.reference_tokens in the released layout). Pass the EasyRef file, not a "
                         "LoRA or a base model.")
    ranks = [v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")]
    return {"num_tokens": int(state["encoder.reference_tokens"].shape[0]), "lora_rank": int(ranks[0]) if ranks else 0}
