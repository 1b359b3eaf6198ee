"""What defines a LoRAT training run: :class:`TrackConfig`, the one place its options are named, typed, defaulted and
explained. ``visadapt track train`` builds its flags from it; importing this module imports no torch.

Defaults are the official LoRAT recipe (arXiv 2403.05231; code github.com/LitingLin/LoRAT, ``config/LoRAT``):
B-224 on DINOv2, LoRA r 64 / α 64 on q, k, v, proj, fc1, fc2 with both factors trunc-normal (``bert`` init),
131,072 pairs per epoch for 170 epochs at batch 128, AdamW lr 1e-4 (betas 0.9 / 0.999, weight decay 0.1, none for
1-D and embedding parameters), a 2-epoch linear warmup from 1e-7 then a per-step cosine to 1e-6, gradient clipping
at norm 1, fp16 autocast on CUDA.

Datasets are given as ``NAME:ROOT[:SPLIT]`` (``NAME`` a reader of :mod:`visadapt.tracking.datasets`), e.g.
``--data got10k:/data/GOT-10k:train lasot:/data/LaSOT``; every dataset of the mix gets the same share of the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from visadapt.adapters.methods import METHODS
from visadapt.run_config import RunConfig, recipe_default
from visadapt.utils.cli import AT_LEAST_1, NON_NEGATIVE, POSITIVE, option

VARIANT_NAMES = ("B-224", "B-378", "L-224", "L-378", "g-224", "g-378", "demo")


@dataclass(frozen=True)
class DataSpec:
    """One ``NAME:ROOT[:SPLIT]`` entry of ``--data`` / ``--eval-data``."""

    name: str
    root: str
    split: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        name, sep, rest = text.partition(":")
        if not sep or not name or not rest:
            raise ValueError(f"--data {text!r}: write NAME:ROOT[:SPLIT], e.g. got10k:/data/GOT-10k:train.")
        root, split = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and "/" not in tail and "\\" not in tail:
            root, split = head, tail
        return cls(name, root, split)

    def __str__(self) -> str:
        return f"{self.name}:{self.root}" + (f":{self.split}" if self.split else "")


@dataclass
class TrackConfig(RunConfig):
    """Everything that defines a LoRAT run; see the module docstring for where the defaults come from."""

    data: Sequence[str] = option([], "training datasets, NAME:ROOT[:SPLIT] each (NAME: got10k, folder, or another "
                                 "reader of visadapt.tracking.datasets); equal share per dataset", group="data")
    eval_data: Optional[str] = option(None, "dataset scored after training, NAME:ROOT[:SPLIT] (none: no evaluation)",
                                      group="data")
    samples_per_epoch: int = option(131072, "training pairs per epoch", group="data", valid=AT_LEAST_1)
    max_gap: int = option(100, "largest frame distance between template and search frame", group="data",
                          valid=AT_LEAST_1)
    translation_jitter: float = option(3.0, "search-crop shift, in multiples of the target's half size (w + h)/2",
                                       group="data", valid=NON_NEGATIVE)
    scale_jitter: float = option(0.25, "search-crop scale jitter: s / exp(N(0, 1) · this), per axis", group="data",
                                 valid=NON_NEGATIVE)
    augment: bool = option(True, "flips, colour jitter and DeiT-III 3-augment on the crops (official order)",
                           group="data")
    crop: str = option("exact", "crops for training and the saved tracker: exact (sub-pixel) or official (whole-pixel "
                       "windows at a realised scale, as the released checkpoints)", choices=("exact", "official"),
                       group="data")

    variant: str = option("B-224", "paper variant (DINOv2 ViT and crop sizes), or demo: the tiny shipped ViT",
                          choices=VARIANT_NAMES, group="model")
    weights: Optional[str] = option(None, "backbone weights as a local timm safetensors file (none: timm's hub "
                                    "weights for a paper variant, the shipped ones for demo)", group="model")
    method: str = option("lora", "adapter on q, k, v, proj, fc1, fc2 of every block", choices=METHODS, group="model")
    peft_config: Optional[str] = option(None, "any peft method from a JSON peft config (replaces --method)",
                                        group="model")
    r: int = option(64, "adapter rank", group="model", valid=AT_LEAST_1)
    lora_alpha: float = option(64.0, "adapter alpha (scale lora_alpha / r)", group="model", valid=POSITIVE)
    init: str = option("bert", "bert: A and B trunc-normal(0.02) (official); lora: the method's own (zero B)",
                       choices=("bert", "lora"), group="model")

    epochs: int = option(170, "epochs (the GOT-10k-only protocol uses 100)", group="optimisation", valid=AT_LEAST_1)
    lr: float = option(1e-4, "AdamW learning rate", group="optimisation", valid=POSITIVE)
    min_lr: float = option(1e-6, "end of the cosine schedule", group="optimisation", valid=NON_NEGATIVE)
    warmup_epochs: float = option(2.0, "linear warmup before the cosine, in epochs", group="optimisation",
                                  valid=NON_NEGATIVE)
    warmup_lr: float = option(1e-7, "learning rate at the start of the warmup", group="optimisation",
                              valid=NON_NEGATIVE)
    weight_decay: float = option(0.1, "AdamW weight decay (none for 1-D and embedding parameters)",
                                 group="optimisation", valid=NON_NEGATIVE)
    eval_batch_size: int = option(16, "sequences tracked in lockstep during evaluation", group="optimisation",
                                  valid=AT_LEAST_1)
    batch_size: int = recipe_default("batch_size", 128)
    grad_clip: Optional[float] = recipe_default("grad_clip", 1.0)

    def data_specs(self) -> list[DataSpec]:
        return [DataSpec.parse(text) for text in self.data]

    def eval_spec(self) -> Optional[DataSpec]:
        return DataSpec.parse(self.eval_data) if self.eval_data else None
