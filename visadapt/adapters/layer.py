"""peft tuner layers shared by every visadapt low-rank method.

A method only defines its *factors* (:class:`LowRankFactors`): the trainable parametrisation of one adapter on one
frozen matrix W (d_out × d_in), which yields an exact low-rank pair (A_eff, B_eff) with ΔW = s · B_eff A_eff. The
layers here do the rest the same way for every method: forward through :mod:`visadapt.kernels`, merge / unmerge,
several adapters, diffusers' per-adapter scales, and export to plain LoRA.

A frozen matrix can be split into *parts* (row blocks) that get their own factors: timm's fused ``qkv`` linear
into q, k, v, and ``nn.MultiheadAttention`` into q, k, v (rows of ``in_proj_weight``) and o (``out_proj``).
Parts of one matrix are stacked into a single pair, A = [A_q; A_k; A_v] and B = blockdiag(B_q, B_k, B_v), which
is still exact and lets one kernel call serve the whole fused projection.
"""

from __future__ import annotations

import math
from collections import ChainMap
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from visadapt import kernels

QKV_PARTS = ("q", "k", "v")
ATTENTION_PARTS = ("q", "k", "v", "o")
WHOLE = "all"  # part name of an unsplit matrix


class LowRankFactors(nn.Module):
    """Trainable factors of one adapter on one frozen matrix W (d_out × d_in).

    Subclasses set ``n_blocks`` (> 1 means A acts on the sum of n input chunks, as in Block-LoRA) and implement
    :meth:`factors`. They are built as ``cls(weight, config)`` with the frozen matrix they adapt.
    """

    n_blocks: int = 1

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the kernels take them: A (r, d_in / n_blocks), B (d_out, r). Differentiable."""
        raise NotImplementedError

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense exact pair: A_eff (r, d_in), B_eff (d_out, r), with ΔW = B_eff A_eff (unscaled)."""
        lora_a, lora_b = self.factors()
        return (lora_a.repeat(1, self.n_blocks) if self.n_blocks > 1 else lora_a), lora_b


def _stack(parts: list[tuple[slice, Optional[tuple[torch.Tensor, torch.Tensor]]]]):
    """One pair for a matrix split into row blocks: A = [A_1; …; A_P], B block-diagonal with each B_p on its
    rows (zero rows for parts without a pair). ``parts`` lists (rows, pair or None) in row order."""
    lora_a = torch.cat([pair[0] for _, pair in parts if pair is not None], dim=0)
    rank, col, blocks = lora_a.shape[0], 0, []
    dtype = next(pair[1].dtype for _, pair in parts if pair is not None)
    for rows, pair in parts:
        if pair is None:
            blocks.append(lora_a.new_zeros(rows.stop - rows.start, rank, dtype=dtype))
            continue
        lora_b = pair[1]
        blocks.append(F.pad(lora_b, (col, rank - col - lora_b.shape[1])))
        col += lora_b.shape[1]
    return lora_a, torch.cat(blocks, dim=0)


def _adapted_linear(x, weight, bias, lora_a, lora_b, n_blocks, scale, dropout_p, training, dropout_groups):
    if n_blocks > 1:
        return kernels.block_lora_linear(x, weight, bias, lora_a, lora_b, n_blocks, scale, dropout_p, training,
                                         dropout_groups)
    return kernels.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p, training, dropout_groups)


class LowRankLayer(BaseTunerLayer):
    """State and adapter bookkeeping common to the linear and attention layers.

    Each method keeps its adapters in a ``ModuleDict`` {adapter: {part: factors}} named after its peft prefix (e.g.
    ``block_lora_factors``), so that peft's trainability and save logic recognise them. One layer can hold adapters
    of several visadapt methods (one dict each, listed in ``adapter_layer_names``): they are switched, stacked,
    merged and saved per adapter like adapters of one method.
    """

    other_param_names = ("r", "lora_alpha", "scaling", "dropout_p", "use_rslora")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.adapter_layer_names: tuple[str, ...] = ()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    @property
    def adapter_factors(self) -> ChainMap[str, nn.ModuleDict]:
        """Adapter name -> its {part: factors}, over every method on this layer (a live view, not a copy)."""
        return ChainMap(*(getattr(self, attr) for attr in self.adapter_layer_names))

    # --- what a concrete layer defines -------------------------------------------------------------------------
    def _matrices(self) -> dict[str, torch.Tensor]:
        """Part name -> the frozen matrix it adapts, for building the factors."""
        raise NotImplementedError

    # --- adapters -----------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, parts: tuple[str, ...], factors_attr: str,
                     factors_cls: type[LowRankFactors]) -> None:
        """Add adapter ``adapter_name`` of the method whose factors are ``factors_cls``, kept in ``factors_attr``."""
        if factors_attr not in self.adapter_layer_names:
            setattr(self, factors_attr, nn.ModuleDict())
            self.adapter_layer_names = (*self.adapter_layer_names, factors_attr)
        other = next((attr for attr in self.adapter_layer_names
                      if attr != factors_attr and adapter_name in getattr(self, attr)), None)
        if other is not None:
            raise ValueError(f"Adapter name {adapter_name!r} is already taken on this layer by a "
                             f"{other.removesuffix('_factors')} adapter; give each adapter its own name.")
        matrices = self._matrices()
        with torch.no_grad():
            getattr(self, factors_attr)[adapter_name] = nn.ModuleDict(
                {part: factors_cls(matrices[part], config) for part in parts}
            )
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.use_rslora[adapter_name] = config.use_rslora
        self.dropout_p[adapter_name] = config.lora_dropout
        self.scaling[adapter_name] = self._default_scaling(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _methods(self) -> str:
        """The methods on this layer as a repr prefix, like peft's ``lora.Linear``: ``block_lora+comp_lora``."""
        return "+".join(attr.removesuffix("_factors") for attr in self.adapter_layer_names)

    def _default_scaling(self, adapter: str) -> float:
        r = self.r[adapter]
        return self.lora_alpha[adapter] / (math.sqrt(r) if self.use_rslora[adapter] else r)

    # diffusers calls these three on every BaseTunerLayer (set_adapters weights, cross_attention_kwargs["scale"]).
    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._default_scaling(adapter)

    def scale_layer(self, scale: float) -> None:
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] = (
                    self._default_scaling(adapter) if scale is None else self.scaling[adapter] / scale
                )

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.adapter_factors]

    def _pair(self, adapter: str, parts: tuple[str, ...], rows: list[slice], dense: bool):
        """One (A, B, n_blocks, ranks) for the given parts of this adapter, or None if it adapts none of them.
        ranks: the rows of A each present part holds, in order (each part draws its own dropout mask)."""
        factors = self.adapter_factors[adapter]
        present = [p for p in parts if p in factors]
        if not present:
            return None
        n_blocks = 1 if dense else factors[present[0]].n_blocks
        pairs = {p: factors[p].pair() if dense else factors[p].factors() for p in present}
        ranks = [pairs[p][0].shape[0] for p in present]
        if len(parts) == 1:
            return (*pairs[parts[0]], n_blocks, ranks)
        return (*_stack([(row, pairs.get(p)) for p, row in zip(parts, rows)]), n_blocks, ranks)

    def _adapted(self, x, weight, bias, parts, rows):
        """x Wᵀ + b plus every active adapter's delta on these parts, through the kernels."""
        out = None
        for adapter in self._active():
            pair = self._pair(adapter, parts, rows, dense=False)
            if pair is None:
                continue
            lora_a, lora_b, n_blocks, ranks = pair
            fused = out is None  # the first adapter rides along with the base matmul
            y = _adapted_linear(x, weight if fused else None, bias if fused else None, lora_a, lora_b, n_blocks,
                                self.scaling[adapter], self.dropout_p[adapter], self.training, ranks)
            out = y if fused else out + y
        return F.linear(x, weight, bias) if out is None else out

    def _delta_weight(self, adapter, parts, rows) -> Optional[torch.Tensor]:
        pair = self._pair(adapter, parts, rows, dense=True)
        if pair is None:
            return None
        lora_a, lora_b, _, _ = pair
        return (lora_b @ lora_a) * self.scaling[adapter]

    def export_pairs(self, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Sub-module path (relative to this layer in the plain-LoRA layout) -> (A, s·B), fp32, detached.

        s is the adapter's own scale (alpha/r, or alpha/√r with rslora), not a live set_adapters weight."""
        raise NotImplementedError

    # --- merging ------------------------------------------------------------------------------------------------
    def _add_to_base(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.adapter_factors:
                self._add_to_base(adapter, +1.0, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add_to_base(self.merged_adapters.pop(), -1.0)

    @staticmethod
    def _add_delta(param: torch.Tensor, delta: Optional[torch.Tensor], adapter: str, safe_merge: bool) -> None:
        if delta is None:
            return
        delta = delta.detach().to(param.dtype)
        with torch.no_grad():
            if safe_merge and not torch.isfinite(param + delta).all():
                raise ValueError(f"Merging adapter {adapter!r} gives non-finite weights; the adapter is broken.")
            param.add_(delta)


def _row_slices(d: int, parts: tuple[str, ...]) -> list[slice]:
    return [slice(i * d, (i + 1) * d) for i in range(len(parts))]


class LowRankLinear(nn.Module, LowRankLayer):
    """An ``nn.Linear`` with low-rank adapters. ``fused_qkv=True`` treats its rows as [q; k; v] parts."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: Any, factors_attr: str,
                 factors_cls: type[LowRankFactors], parts: tuple[str, ...]) -> None:
        super().__init__()
        LowRankLayer.__init__(self, base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.fused_qkv = parts != (WHOLE,)
        if self.fused_qkv and self.out_features % 3:
            raise ValueError(f"A fused qkv linear needs out_features divisible by 3, got {self.out_features}.")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, parts, factors_attr, factors_cls)

    @property
    def _parts(self) -> tuple[str, ...]:
        return QKV_PARTS if self.fused_qkv else (WHOLE,)

    @property
    def _rows(self) -> list[slice]:
        if self.fused_qkv:
            return _row_slices(self.out_features // 3, QKV_PARTS)
        return [slice(0, self.out_features)]

    def _matrices(self) -> dict[str, torch.Tensor]:
        weight = self.get_base_layer().weight
        return {p: weight[row] for p, row in zip(self._parts, self._rows)}

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = self._delta_weight(adapter, self._parts, self._rows)
        return torch.zeros_like(self.get_base_layer().weight) if delta is None else delta

    def _add_to_base(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        self._add_delta(self.get_base_layer().weight, sign * self.get_delta_weight(adapter), adapter, safe_merge)

    def export_pairs(self, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        lora_a, lora_b, _, _ = self._pair(adapter, self._parts, self._rows, dense=True)
        return {"": (lora_a.detach().float(), (lora_b * self._default_scaling(adapter)).detach().float())}

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True  # get_delta_weight is exact, so peft's own convert_to_lora works too

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self._active():
            return self.base_layer(x, *args, **kwargs)
        if type(base) is nn.Linear and not args and not kwargs:
            return self._adapted(x, base.weight, base.bias, self._parts, self._rows)
        # A subclass of nn.Linear may do more than x Wᵀ + b: keep its forward and add the deltas.
        out = self.base_layer(x, *args, **kwargs)
        return out + self._adapted(x, None, None, self._parts, self._rows).to(out.dtype)

    def __repr__(self) -> str:
        return f"{self._methods()}.{super().__repr__()}"


class LowRankMultiheadAttention(nn.Module, LowRankLayer):
    """``nn.MultiheadAttention`` with low-rank adapters on any of q, k, v (``in_proj_weight``) and o (``out_proj``).

    The forward re-implements the module's attention with explicit projections, so the deltas go through the
    kernels (and only the low-rank inputs are saved for backward) instead of re-materialising the merged weight.
    """

    def __init__(self, base_layer: nn.MultiheadAttention, adapter_name: str, config: Any, factors_attr: str,
                 factors_cls: type[LowRankFactors], parts: tuple[str, ...]) -> None:
        super().__init__()
        if not base_layer._qkv_same_embed_dim or base_layer.bias_k is not None or base_layer.add_zero_attn:
            raise ValueError(
                "visadapt adapts nn.MultiheadAttention only with kdim == vdim == embed_dim, add_bias_kv=False and "
                "add_zero_attn=False (the configuration of CLIP and open_clip)."
            )
        LowRankLayer.__init__(self, base_layer)
        self.embed_dim, self.num_heads = base_layer.embed_dim, base_layer.num_heads
        # peft expects these of every tuner layer; its own LoRA reports an MHA by in_proj's shape (d -> 3d)
        self.in_features, self.out_features = self.embed_dim, 3 * self.embed_dim
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, parts, factors_attr, factors_cls)

    def _matrices(self) -> dict[str, torch.Tensor]:
        mha = self.get_base_layer()
        matrices = {p: mha.in_proj_weight[row] for p, row in zip(QKV_PARTS, _row_slices(self.embed_dim, QKV_PARTS))}
        return {**matrices, "o": mha.out_proj.weight}

    def _in_rows(self) -> list[slice]:
        return _row_slices(self.embed_dim, QKV_PARTS)

    def get_delta_weight(self, adapter: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(Δ in_proj_weight (3d, d) or None, Δ out_proj.weight (d, d) or None)."""
        d = self.embed_dim
        return (self._delta_weight(adapter, QKV_PARTS, self._in_rows()),
                self._delta_weight(adapter, ("o",), [slice(0, d)]))

    def _add_to_base(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        mha = self.get_base_layer()
        delta_in, delta_out = self.get_delta_weight(adapter)
        self._add_delta(mha.in_proj_weight, None if delta_in is None else sign * delta_in, adapter, safe_merge)
        self._add_delta(mha.out_proj.weight, None if delta_out is None else sign * delta_out, adapter, safe_merge)

    def export_pairs(self, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """peft's LoRA puts one pair on ``in_proj_weight`` and one on ``base_layer.out_proj``."""
        d, s = self.embed_dim, self._default_scaling(adapter)
        out = {}
        for key, parts, rows in (("", QKV_PARTS, self._in_rows()), ("base_layer.out_proj", ("o",), [slice(0, d)])):
            pair = self._pair(adapter, parts, rows, dense=True)
            if pair is not None:
                out[key] = (pair[0].detach().float(), (pair[1] * s).detach().float())
        return out

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        mha = self.get_base_layer()
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged or not self._active():
            return mha(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                       attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        self_attention = query is key and key is value  # decided before reshapes make new tensors
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not mha.batch_first or unbatched:  # work batch-first: (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project_in(query, key, value, self_attention)
        n, l_q, s_k = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # (N, H, L, hd)
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, (n, self.num_heads, l_q, s_k), q)
        dropout_p = mha.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            attn = F.dropout(weights, dropout_p, self.training) @ v
        else:
            attn, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
        attn = attn.transpose(1, 2).flatten(2)  # (N, L, E)
        out = self._adapted(attn, mha.out_proj.weight, mha.out_proj.bias, ("o",), [slice(0, self.embed_dim)])
        if not mha.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if weights is not None:
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        return out, weights

    def __repr__(self) -> str:
        return f"{self._methods()}.{super().__repr__()}"

    def _project_in(self, query, key, value, self_attention: bool):
        mha, d = self.get_base_layer(), self.embed_dim
        weight, bias, rows = mha.in_proj_weight, mha.in_proj_bias, self._in_rows()
        if self_attention:  # one fused projection for q, k and v
            return self._adapted(query, weight, bias, QKV_PARTS, rows).chunk(3, dim=-1)
        return tuple(
            self._adapted(x, weight[row], None if bias is None else bias[row], (part,), [slice(0, d)])
            for x, part, row in zip((query, key, value), QKV_PARTS, rows)
        )



def _additive_mask(attn_mask, key_padding_mask, is_causal, shape, like):
    """nn.MultiheadAttention's masks (bool = disallowed, or additive floats) as one additive (N, H, L, S) mask."""
    n, heads, l_q, s_k = shape

    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
        return mask.to(like.dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(l_q, s_k, dtype=torch.bool, device=like.device).triu(1)
    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(n, heads, l_q, s_k) if mask.dim() == 3 else mask.expand(n, heads, l_q, s_k)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(n, 1, 1, s_k)
        mask = pad if mask is None else mask + pad
    return mask
