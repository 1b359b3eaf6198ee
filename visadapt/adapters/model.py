"""The peft config and tuner-model base shared by visadapt's low-rank methods, and their registration with peft.

peft has no plugin discovery: a tuner type must be a member of the closed ``PeftType`` enum and be registered with
``register_peft_method`` in every process that builds or loads it. :func:`register_method` does both when
``import visadapt`` runs, so ``get_peft_model`` and ``PeftModel.from_pretrained`` then work as for any tuner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch.nn as nn
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

from visadapt.version import ADAPTER_FORMAT_VERSION, __version__

from .layer import (
    ATTENTION_PARTS,
    QKV_PARTS,
    WHOLE,
    LowRankFactors,
    LowRankLayer,
    LowRankLinear,
    LowRankMultiheadAttention,
)


@dataclass
class LowRankConfig(PeftConfig):
    """Fields common to visadapt's low-rank methods; they mirror peft's ``LoraConfig`` where both have them."""

    r: int = field(default=8, metadata={"help": "Rank of the update."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: s = alpha / r (alpha / sqrt(r) with "
                                                           "use_rslora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the low-rank branch input only."})
    use_rslora: bool = field(default=False, metadata={"help": "s = alpha / sqrt(r), as CLIP-LoRA uses."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (exact or suffix match) or one regex (full match) of the modules to "
                                        "adapt: nn.Linear or nn.MultiheadAttention."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer container name."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained in full."})
    init_weights: bool = field(default=True, metadata={"help": "B = 0, so a fresh adapter changes nothing; "
                                                               "False draws B at random (tests, debugging)."})
    attention_parts: Optional[list[str]] = field(
        default=None, metadata={"help": "Separate low-rank pairs for attention projections. On "
                                        "nn.MultiheadAttention targets: any of q, k, v, o (None = all four). On fused "
                                        "qkv linears (see fused_qkv_names): any of q, k, v (None = one joint pair)."})
    fused_qkv_names: list[str] = field(
        default_factory=lambda: ["qkv"], metadata={"help": "Names of nn.Linear layers whose rows are [q; k; v] "
                                                           "(timm's Attention.qkv)."})
    format_version: int = field(default=ADAPTER_FORMAT_VERSION, metadata={"help": "Adapter file format."})
    visadapt_version: str = field(default=__version__, metadata={"help": "visadapt version that wrote the file."})

    peft_type_name = ""  # set by each method: the PeftType member name

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType[self.peft_type_name]
        if self.format_version != ADAPTER_FORMAT_VERSION:
            raise ValueError(
                f"This adapter was saved by visadapt {self.visadapt_version} in adapter format "
                f"{self.format_version}; visadapt {__version__} reads format {ADAPTER_FORMAT_VERSION}. Install a "
                f"matching release (pip install 'visadapt=={self.visadapt_version}') or re-export it there with "
                "visadapt.export_lora, which any peft version loads."
            )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.attention_parts is not None:
            bad = set(self.attention_parts) - set(ATTENTION_PARTS)
            if bad or not self.attention_parts:
                raise ValueError(f"attention_parts must be a non-empty subset of {list(ATTENTION_PARTS)}, "
                                 f"got {self.attention_parts}.")
            self.attention_parts = [p for p in ATTENTION_PARTS if p in self.attention_parts]


class LowRankModel(BaseTuner):
    """peft tuner model for a visadapt low-rank method; subclasses set ``prefix`` and ``factors_cls``."""

    prefix: str
    factors_cls: type[LowRankFactors]
    tuner_layer_cls = LowRankLayer
    target_module_mapping: dict[str, list[str]] = {}

    @property
    def factors_attr(self) -> str:
        return f"{self.prefix}factors"

    def _prepare_adapter_config(self, peft_config: LowRankConfig, model_config: dict) -> LowRankConfig:
        if peft_config.target_modules is None:
            raise ValueError(
                "Set target_modules, e.g. ['qkv'] for timm ViTs, r'.*resblocks\\.\\d+\\.attn' for open_clip CLIP, "
                "['to_q', 'to_k', 'to_v', 'to_out.0'] for diffusers UNets."
            )
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except ValueError as err:
            if "not found in the base model" not in str(err):
                raise
            raise ValueError(f"{err}\n{_adaptable_modules_hint(model)}") from err

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, LowRankLayer) else target
        parts = _parts_for(config, base, target_name, parent, current_key)
        try:
            if isinstance(target, LowRankLayer):
                self._check_layer_compatible(target, parts, current_key, adapter_name)
                target.update_layer(adapter_name, config, parts, self.factors_attr, self.factors_cls)
                return
            layer_cls = LowRankMultiheadAttention if isinstance(base, nn.MultiheadAttention) else LowRankLinear
            new_module = layer_cls(target, adapter_name, config, self.factors_attr, self.factors_cls, parts)
        except ValueError as err:
            raise ValueError(f"{current_key}: {err}") from err
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(new_module, nn.MultiheadAttention):
            # Unloading: the wrapped module goes back untouched (peft's generic path would try to copy
            # a .weight that nn.MultiheadAttention does not have).
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _check_layer_compatible(self, layer: LowRankLayer, parts, key: str, adapter_name: str) -> None:
        if isinstance(layer, LowRankLinear) and layer.fused_qkv != (parts != (WHOLE,)):
            raise ValueError(f"Adapter {adapter_name!r} on {key!r}: the layer's existing adapters "
                             f"{'split' if layer.fused_qkv else 'do not split'} q/k/v; use the same "
                             "attention_parts setting for every adapter on a model.")

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Our keys are '<module>.<prefix>factors.<adapter>.<part>.<tensor>': the adapter sits mid-key.
        return key.replace(f".{cls.prefix}factors.{adapter_name}.", f".{cls.prefix}factors.")


def _parts_for(config: LowRankConfig, base: nn.Module, name: str, parent: nn.Module, key: str) -> tuple[str, ...]:
    if isinstance(base, nn.MultiheadAttention):
        return tuple(config.attention_parts or ATTENTION_PARTS)
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{key!r} is a {type(base).__name__}; visadapt's low-rank methods adapt nn.Linear and "
                        "nn.MultiheadAttention. Narrow target_modules (a regex gives full control).")
    if isinstance(parent, nn.MultiheadAttention):
        raise ValueError(f"{key!r} is the out_proj of an nn.MultiheadAttention, whose forward never calls it, so "
                         "an adapter there would be ignored. Target the attention module itself, with "
                         "attention_parts=['o'] for the output projection alone.")
    if config.attention_parts is None or name not in config.fused_qkv_names:
        return (WHOLE,)
    parts = tuple(p for p in QKV_PARTS if p in config.attention_parts)
    if not parts:
        raise ValueError(f"attention_parts={config.attention_parts} names none of q, k, v for the fused qkv "
                         f"linear {key!r}.")
    return parts


def _adaptable_modules_hint(model: nn.Module, limit: int = 12) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, (nn.Linear, nn.MultiheadAttention)) and n})
    if not names:
        return "This model has no nn.Linear or nn.MultiheadAttention module to adapt."
    shown = ", ".join(names[:limit]) + (", …" if len(names) > limit else "")
    return f"Adaptable module names in this model: {shown}."


def _extend_peft_type(name: str) -> PeftType:
    """Add ``name`` to peft's closed ``PeftType`` enum (idempotent); member value == name, so plain-string
    lookups in peft's registries keep working."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    return member


_REGISTERED: set[str] = set()


def register_method(config_cls: type[LowRankConfig], model_cls: type[LowRankModel]) -> None:
    """Make a visadapt method a peft tuner type (safe to call more than once)."""
    name = config_cls.peft_type_name.lower()
    if name in _REGISTERED:
        return
    if model_cls.prefix != f"{name}_":
        raise ValueError(f"{model_cls.__name__}.prefix must be {name + '_'!r}.")
    _extend_peft_type(config_cls.peft_type_name)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls)
    _REGISTERED.add(name)


def regex_for_modules(names: list[str]) -> str:
    """A target_modules regex matching exactly these module paths (a list would also match suffixes)."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"
