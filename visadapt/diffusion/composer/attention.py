"""LoRA-Composer's attention edits as one diffusers attention processor.

The UNet runs once per step with its base weights. Two layers change, and only while a :class:`Composition` is
passed in ``cross_attention_kwargs={"composition": ...}``:

* cross-attention (region-aware LoRA injection): concept n's keys and values come from its own regional text
  encoding E_n through ``W_K + ΔW_K^n`` and ``W_V + ΔW_V^n``; queries inside box n attend to them and their result
  goes through ``W_O + ΔW_O^n``. Pixels covered by several boxes average their concepts; pixels in no box keep the
  global prompt's output. The deltas are read from the peft adapters loaded on the UNet and applied through
  :mod:`visadapt.kernels` (one routed call for every concept's output projection). Adapters the user activated
  on the pipeline condition the global branch only (the official background ED-LoRA): concept K/V/O are the base
  weights plus the concept's own delta, unless ``Composition.user_adapters_in_concepts`` is set.
* self-attention (concept isolation): a query inside box n cannot attend to keys inside any other concept's box.

While ``composition.capture`` is set, layers at the loss resolution also store their attention probabilities
(averaged over heads) for the latent optimisation; every other layer uses fused SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from visadapt import kernels
from visadapt.diffusion.composer.concepts import Box, box_masks


@dataclass
class Composition:
    """Per-call state shared by the processors of one UNet.

    ``text_cond`` / ``text_uncond``: (n_concepts, L, D) regional text encodings (conditional / negative), encoded
    with each concept's text-encoder LoRA; or layer-wise (n_concepts, X, L, D), one encoding per cross-attention layer
    (ED-LoRA's P+ tokens), with ``cross_layers`` mapping each cross-attention processor name to its index in X.
    ``latent_size`` (h, w) and ``prompt_batch`` (images per UNet call without guidance) are set once the latents
    exist.
    """

    adapter_names: Sequence[str]
    weights: Sequence[float]
    boxes: Sequence[Box]
    text_cond: torch.Tensor
    text_uncond: Optional[torch.Tensor] = None
    inject: bool = True
    isolate: bool = True
    isolation_bias: float = -1e6
    user_adapters_in_concepts: bool = False
    cross_layers: Optional[dict[str, int]] = None
    latent_size: Optional[tuple[int, int]] = None
    prompt_batch: int = 1
    loss_downsample: int = 4
    cache_text_kv: bool = False
    capture: bool = False
    cross_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → (B, n, N, L)
    self_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → (B, N, N)
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _stacks: dict[int, Optional[tuple]] = field(default_factory=dict, repr=False)
    _isolation: dict[tuple, Optional[torch.Tensor]] = field(default_factory=dict, repr=False)
    _routing: dict[tuple, "Routing"] = field(default_factory=dict, repr=False)
    _region_kv: dict[tuple, tuple[list, list]] = field(default_factory=dict, repr=False)
    _text_kv: dict[tuple, tuple] = field(default_factory=dict, repr=False)

    def grid(self, n_tokens: int) -> tuple[int, int]:
        """(h, w) of a layer with ``n_tokens`` spatial tokens: the latent downsampled by a power of two."""
        if self.latent_size is None:
            raise RuntimeError("Composition.latent_size must be set before the UNet runs.")
        h, w = self.latent_size
        for level in range(8):
            gh, gw = math.ceil(h / 2 ** level), math.ceil(w / 2 ** level)
            if gh * gw == n_tokens:
                return gh, gw
        raise ValueError(f"{n_tokens} tokens is not a downsampled {h}x{w} latent grid.")

    @property
    def loss_tokens(self) -> int:
        (h, w), f = self.latent_size, self.loss_downsample
        return math.ceil(h / f) * math.ceil(w / f)

    def masks(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        """(n_concepts, n_tokens) bool: which tokens of a layer each box covers."""
        key = (n_tokens, str(device))
        if key not in self._masks:
            gh, gw = self.grid(n_tokens)
            self._masks[key] = box_masks(self.boxes, gh, gw).flatten(1).to(device)
        return self._masks[key]

    def region_text(self, batch: int, layer: Optional[str] = None) -> torch.Tensor:
        """(n_concepts, batch, L, D) regional encodings of cross-attention layer ``layer`` lined up with the UNet batch.

        A batch of twice the prompt batch is a classifier-free-guidance batch: negative half first, as diffusers
        concatenates it.
        """
        text_cond, text_uncond = self.text_cond, self.text_uncond
        if text_cond.ndim == 4:
            if self.cross_layers is None or layer not in self.cross_layers:
                raise ValueError(f"Layer-wise regional text but no layer index for cross-attention layer {layer!r}.")
            index = self.cross_layers[layer]
            text_cond = text_cond[:, index]
            text_uncond = text_uncond[:, index] if text_uncond is not None else None
        cond = text_cond[:, None].expand(-1, self.prompt_batch, -1, -1)
        if batch == self.prompt_batch:
            return cond
        if batch == 2 * self.prompt_batch and text_uncond is not None:
            return torch.cat([text_uncond[:, None].expand_as(cond), cond], dim=1)
        raise ValueError(f"UNet batch {batch} does not match the composition's prompt batch {self.prompt_batch}.")

    def isolation_mask(self, n_tokens: int, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        """(N, N) additive bias: query q in box n may not see keys in any other box j ≠ n.

        The official code adds ``isolation_bias`` (−1e6) once per blocking pair: blocked[q, k] = Σ_{n ∋ q} Σ_{j≠n}
        M_j(k) = C(q)·C(k) − Σ_n M_n(q)·M_n(k), with C the box count per token. Where boxes overlap and cover the
        canvas, a query in the overlap has every key blocked; the count still ranks them (keys in one box only are
        blocked less than keys in the overlap), so the softmax keeps the least-blocked keys. Here each row's
        smallest count is subtracted first: the softmax is the same (a constant per row), no row is all-blocked,
        and nothing overflows in fp16 (the bias is clipped to half the dtype's most negative value). Rows with an
        unblocked key match the official output; only all-blocked rows differ, where the official fp32 scores
        −1e6·count + QKᵀ are rounded to 1/16 (1/8 past 2e6) and its fp16 ones are all −inf (NaN rows).
        """
        key = (n_tokens, dtype, str(device))
        if key not in self._isolation:
            masks = self.masks(n_tokens, device).float()
            count = masks.sum(0)
            blocked = count[:, None] * count[None, :] - masks.T @ masks
            blocked = blocked - blocked.amin(1, keepdim=True)
            floor = torch.finfo(dtype).min / 2
            bias = (blocked * self.isolation_bias).clamp(min=floor).to(dtype)
            self._isolation[key] = bias if bool((blocked > 0).any()) else None
        return self._isolation[key]

    def routing(self, n_tokens: int, device: torch.device) -> "Routing":
        """Where each concept's box tokens go in a layer of ``n_tokens`` tokens (see :class:`Routing`)."""
        key = (n_tokens, str(device))
        if key not in self._routing:
            masks = self.masks(n_tokens, device)
            count = masks.sum(0)
            positions = torch.cat([mask.nonzero()[:, 0] for mask in masks])
            owner = torch.cat([torch.full((int(m.sum()),), i, device=device) for i, m in enumerate(masks)])
            self._routing[key] = Routing(masks, owner, positions, 1.0 / count[positions], count > 0)
        return self._routing[key]

    def region_kv(self, layer: str, attn, batch: int, like: torch.Tensor) -> tuple[list, list]:
        """Per concept, the keys and values (B, H, L, d) of its regional text in one cross-attention layer.

        The text is the same at every step, so each layer projects it once per call and batch size.
        """
        key = (layer, batch, like.dtype, str(like.device), _autocast_dtype(like.device))
        if key not in self._region_kv:
            texts = self.region_text(batch, layer).to(like)
            to_k, to_v = self.concept_layer(attn.to_k), self.concept_layer(attn.to_v)
            stack_k, stack_v = self.lora_stack(attn.to_k), self.lora_stack(attn.to_v)
            self._region_kv[key] = (
                [_heads(_projected(to_k, text, stack_k, c), attn.heads) for c, text in enumerate(texts)],
                [_heads(_projected(to_v, text, stack_v, c), attn.heads) for c, text in enumerate(texts)])
        return self._region_kv[key]

    def text_kv(self, layer: str, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, L, d) of the global prompt ``context`` in one cross-attention layer.

        With ``cache_text_kv`` they are projected once per call: the pipeline passes the same embeddings tensor at
        every step (checked by identity, so a new tensor is projected anew), and the weights do not change within a
        call. One entry per layer, batch size and autocast state.
        """
        def project():
            text = attn.norm_encoder_hidden_states(context) if attn.norm_cross else context
            return _heads(attn.to_k(text), attn.heads), _heads(attn.to_v(text), attn.heads)

        if not self.cache_text_kv:
            return project()
        key = (layer, context.shape[0], _autocast_dtype(context.device))
        hit = self._text_kv.get(key)
        if hit is None or hit[0] is not context:
            hit = self._text_kv[key] = (context, *project())
        return hit[1], hit[2]

    def concept_layer(self, module: torch.nn.Module) -> torch.nn.Module:
        """The layer a concept's delta is added to: the base layer, or with ``user_adapters_in_concepts`` the layer
        as the pipeline runs it (base plus the adapters the user activated)."""
        return module if self.user_adapters_in_concepts else getattr(module, "base_layer", module)

    def lora_stack(self, module: torch.nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor, list[float]]]:
        """Every concept's LoRA on ``module`` stacked for :func:`visadapt.kernels.routed_lora`.

        A (n, r, d_in), B (n, d_out, r), scales (n floats) = peft scaling × concept weight. Ranks are zero-padded to the
        largest one (zero rows add nothing). None when no concept adapts the module.
        """
        key = id(module)
        if key not in self._stacks:
            self._stacks[key] = _stack(module, self.adapter_names, self.weights)
        return self._stacks[key]


class Routing(NamedTuple):
    """Box tokens of one layer size, concept after concept: ``positions`` (T,) their token indices, ``owner`` (T,)
    their concept, ``share`` (T,) 1 / (boxes covering the token); ``masks`` (n, N); ``covered`` (N,) in any box."""

    masks: torch.Tensor
    owner: torch.Tensor
    positions: torch.Tensor
    share: torch.Tensor
    covered: torch.Tensor


def _stack(module, names: Sequence[str], weights: Sequence[float]):
    lora_a, lora_b = getattr(module, "lora_A", {}), getattr(module, "lora_B", {})
    present = [n for n in names if n in lora_a]
    if not present:
        return None
    rank = max(lora_a[n].weight.shape[0] for n in present)
    ref = lora_a[present[0]].weight
    d_in, d_out = ref.shape[1], lora_b[present[0]].weight.shape[0]
    a = ref.new_zeros(len(names), rank, d_in)
    b = ref.new_zeros(len(names), d_out, rank)
    scales = [0.0] * len(names)  # plain floats: reading them never waits for the GPU
    for i, (name, weight) in enumerate(zip(names, weights)):
        if name in present:
            r = lora_a[name].weight.shape[0]
            a[i, :r], b[i, :, :r] = lora_a[name].weight, lora_b[name].weight
            scales[i] = float(module.scaling[name]) * weight
    return a, b, scales


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device``'s type, or None: cached projections are per precision."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) → (B, N, H·d)."""
    return x.transpose(1, 2).flatten(2)


def _attend(q, k, v, scale: float, bias: Optional[torch.Tensor], keep_probs: bool):
    """Multi-head attention; with ``keep_probs`` an explicit softmax whose probabilities are also returned."""
    if not keep_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1)
    return probs @ v, probs


def _projected(layer: torch.nn.Module, x: torch.Tensor, stack, concept: int) -> torch.Tensor:
    """layer(x) + concept's LoRA delta on x."""
    out = layer(x)
    if stack is None:
        return out
    a, b, scales = stack
    return out + kernels.lora_linear(x, None, None, a[concept], b[concept], scales[concept])


class ComposerAttnProcessor:
    """``AttnProcessor2_0`` that applies LoRA-Composer's edits when called with a :class:`Composition`.

    Without one (or on layers it does not handle: 4-D inputs, group or spatial norms, q/k norms, attention masks)
    it is exactly ``AttnProcessor2_0``, so a pipeline with these processors and no concepts is the base pipeline.

    ``base``: the layer's IP-Adapter processor when it has one (diffusers' ``IPAdapterAttnProcessor2_0``, as EasyRef
    installs). The image tokens then arrive with the text (``encoder_hidden_states = (text, [tokens])``) and go
    through its decoupled branch in the global path: out_global = softmax(Q K_txtᵀ) V_txt + Σ λ·softmax(Q K_ipᵀ) V_ip;
    concept boxes keep their regional text only.
    """

    def __init__(self, name: str, base: Optional[torch.nn.Module] = None) -> None:
        self.name = name
        self.base = base if base is not None and hasattr(base, "to_k_ip") else AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 composition: Optional[Composition] = None) -> torch.Tensor:
        if composition is None or not self._handles(attn, hidden_states, attention_mask):
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if encoder_hidden_states is None:
            out = self._self_attention(attn, hidden_states, composition)
        elif composition.inject:
            out = self._cross_attention(attn, hidden_states, encoder_hidden_states, composition)
        else:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _handles(attn, hidden_states, attention_mask) -> bool:
        return (hidden_states.ndim == 3 and attention_mask is None and attn.spatial_norm is None
                and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None)

    def _capturing(self, composition: Composition, n_tokens: int) -> bool:
        return composition.capture and n_tokens == composition.loss_tokens

    def _self_attention(self, attn, hidden_states, composition: Composition) -> torch.Tensor:
        n_tokens = hidden_states.shape[1]
        bias = (composition.isolation_mask(n_tokens, hidden_states.dtype, hidden_states.device)
                if composition.isolate else None)
        q, k, v = (_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        capture = self._capturing(composition, n_tokens)
        out, probs = _attend(q, k, v, attn.scale, bias, keep_probs=capture)
        if capture:
            composition.self_maps[self.name] = probs.mean(1)
        return attn.to_out[1](attn.to_out[0](_merge(out)))

    def _cross_attention(self, attn, hidden_states, context, composition: Composition) -> torch.Tensor:
        batch, n_tokens, _ = hidden_states.shape
        context, image_tokens = context if isinstance(context, tuple) else (context, None)
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k0, v0 = composition.text_kv(self.name, attn, context)
        glob = F.scaled_dot_product_attention(q, k0, v0)
        if image_tokens is not None:
            glob = glob + self._image_branch(attn, q, image_tokens)
        out = attn.to_out[0](_merge(glob))  # global prompt (and image tokens) everywhere

        route = composition.routing(n_tokens, hidden_states.device)
        keys, values = composition.region_kv(self.name, attn, batch, hidden_states)
        capture = self._capturing(composition, n_tokens)
        pieces, maps = [], []
        for k, v, mask in zip(keys, values, route.masks):
            if capture:  # the losses need this concept's map over the whole image, not only inside its box
                region, probs = _attend(q, k, v, attn.scale, None, keep_probs=True)
                maps.append(probs.mean(1))
                region = region[:, :, mask]
            else:
                region, _ = _attend(q[:, :, mask], k, v, attn.scale, None, keep_probs=False)
            pieces.append(_merge(region))
        if capture:
            composition.cross_maps[self.name] = torch.stack(maps, 1)

        tokens = torch.cat(pieces, 1)
        projected = composition.concept_layer(attn.to_out[0])(tokens)
        stack_o = composition.lora_stack(attn.to_out[0])
        if stack_o is not None:
            a, b, scales = stack_o
            projected = projected + kernels.routed_lora(tokens, a, b, scales, route.owner.expand(batch, -1))
        share = route.share.to(projected.dtype)[None, :, None]
        regional = torch.zeros_like(out).index_add(1, route.positions, projected * share)
        out = torch.where(route.covered[None, :, None], regional, out)
        return attn.to_out[1](out)

    def _image_branch(self, attn, q: torch.Tensor, image_tokens: list) -> torch.Tensor:
        """Σ λ_i · softmax(Q K_ipᵀ/√d) V_ip over the IP-Adapters of ``base``: (B, H, N, d)."""
        base = self.base
        if not hasattr(base, "to_k_ip"):
            raise ValueError(f"Layer {self.name} got image tokens but has no IP-Adapter (decoupled) projections.")
        out = torch.zeros_like(q)
        for tokens, scale, to_k, to_v in zip(image_tokens, base.scale, base.to_k_ip, base.to_v_ip):
            if (all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0):
                continue
            if isinstance(scale, list) and len(set(scale)) > 1:
                raise ValueError("Per-image IP-Adapter scales are not supported inside a composition.")
            weight = scale[0] if isinstance(scale, list) else scale
            k = to_k(tokens).reshape(q.shape[0], -1, to_k.out_features)
            v = to_v(tokens).reshape(q.shape[0], -1, to_v.out_features)
            out = out + weight * F.scaled_dot_product_attention(q, _heads(k, attn.heads), _heads(v, attn.heads))
        return out
