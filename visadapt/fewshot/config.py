"""What defines a few-shot run: :class:`TrainConfig`, the one place its options are named, typed, defaulted and
explained. ``visadapt fewshot train`` builds its flags from it. Importing this module imports no torch, so the
command line answers ``--help`` at once.

Defaults are CLIP-LoRA's fixed hyperparameters (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of
Vision-Language Models", CVPR-W 2024, §4): rank 2 on q, k, v of both towers, alpha 1 with scale alpha/√r, dropout
0.25, AdamW lr 2e-4 wd 1e-2, cosine schedule, batch 32, 500 × shots iterations, "a photo of a {}." and logits
100 · cos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from visadapt.adapters.methods import METHODS
from visadapt.run_config import RunConfig
from visadapt.utils.cli import (
    AT_LEAST_1,
    DROPOUT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    CountOrFraction,
    Range,
    option,
)

DEMO_MODEL = "visadapt-demo-clip"  # the tiny CLIP shipped in visadapt/utils/worlds/demo_clip
TEMPLATE = "a photo of a {}."
LOGIT_SCALE = 100.0
TOWERS = ("vision", "text")
# The keys of visadapt.fewshot.data.DATASETS (a test keeps the two equal).
DATASET_NAMES = ("caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagefolder", "imagenet",
                 "oxford_flowers", "oxford_pets", "stanford_cars", "sun397", "ucf101")


def _logit_scale(text: str) -> Optional[float]:
    return None if text in ("model", "none") else float(text)


#: Comp-LoRA's k: a count of protected directions, or an energy fraction in (0, 1)
COMP_K = CountOrFraction(AT_LEAST_1, Range(0, 1, low_open=True, high_open=True))


def _comp_k(text: str) -> Union[int, float]:
    return float(text) if "." in text else int(text)


@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a few-shot run (the training loop's options: :class:`RunConfig`)."""

    dataset: Optional[str] = option(None, "a CoOp dataset read from --root, or 'imagefolder' (root/train/<class>/*, "
                                    "root/test/<class>/*, or one folder of class sub-folders)",
                                    choices=DATASET_NAMES, group="data")
    root: Optional[str] = option(None, "folder holding the dataset folders (CoOp's $DATA), or the image folder "
                                 "itself", group="data")
    model: str = option("ViT-B-16", f"open_clip architecture (ViT-B-16), local-dir:PATH, hf-hub:ORG/REPO, or "
                        f"{DEMO_MODEL}", group="model")
    pretrained: Optional[str] = option("openai", "open_clip tag or local checkpoint file (loaded with "
                                       "weights_only=True); none: random weights", group="model")
    shots: int = option(16, "labelled images per class", group="data", valid=AT_LEAST_1)
    short_classes: str = option("error", "a class with fewer training images than --shots: stop (error), draw with "
                                "replacement (repeat) or take them all (all)", choices=("error", "repeat", "all"),
                                group="data")
    method: str = option("lora", "CLIP-LoRA, Block-LoRA or Comp-LoRA (ignored with --peft-config)",
                         choices=METHODS, group="method")
    peft_config: Optional[str] = option(None, "JSON peft config (any peft method: DoRA, VeRA, …); replaces "
                                        "--method", group="method")
    r: int = option(2, "LoRA rank", group="method", valid=AT_LEAST_1)
    lora_alpha: float = option(1.0, "scale = lora_alpha / sqrt(r)", group="method", valid=POSITIVE)
    lora_dropout: float = option(0.25, "dropout on the adapter input, drawn independently per projection",
                            group="method", valid=DROPOUT)
    parts: Sequence[str] = option(("q", "k", "v"), "attention projections: q, k, v, o", group="method")
    towers: Sequence[str] = option(TOWERS, "vision, text", group="method")
    layers: Optional[Sequence[int]] = option(None, "block indices (none: every block)", group="method",
                                             valid=NON_NEGATIVE)
    n_blocks: int = option(8, "Block-LoRA input chunks", group="method", valid=AT_LEAST_1)
    block_mode: str = option("input_split", "Block-LoRA: chunks of the input or of the rank",
                             choices=("input_split", "rank_split"), group="method")
    comp_k: Union[int, float] = option(0.5, "Comp-LoRA protected directions: a count (int) or an energy fraction",
                                       parse=_comp_k, group="method", valid=COMP_K)
    comp_side: str = option("out", "Comp-LoRA: protect the output, input or both subspaces",
                            choices=("out", "in", "both"), group="method")
    comp_mode: str = option("project", "Comp-LoRA: project every step, or only the initialisation",
                            choices=("project", "init_only"), group="method")
    glad: bool = option(False, "GLAD's regularised gradient (two passes per step)", group="method")
    glad_rho: float = option(0.05, "GLAD's SAM radius", group="method", valid=POSITIVE)
    glad_alpha: float = option(0.8, "GLAD's weight of the SAM gradient", group="method", valid=PROBABILITY)
    glad_rule: str = option("interp", "GLAD: interpolate the gradients, or project out the conflict",
                            choices=("interp", "project"), group="method")
    lr: float = option(2e-4, "AdamW learning rate", group="optimisation", valid=POSITIVE)
    weight_decay: float = option(1e-2, "AdamW weight decay", group="optimisation", valid=NON_NEGATIVE)
    min_lr: float = option(1e-6, "the cosine schedule's floor", group="optimisation", valid=NON_NEGATIVE)
    iters: Optional[int] = option(None, "gradient steps (none: 500 × shots)", group="optimisation", valid=AT_LEAST_1)
    template: str = option(TEMPLATE, "prompt of each class name", group="evaluation")
    logit_scale: Optional[float] = option(LOGIT_SCALE, "logits = scale · cos; 'model': the model's learned scale",
                                          parse=_logit_scale, group="evaluation", valid=POSITIVE)
    crop_scale_min: float = option(0.08, "RandomResizedCrop's lower area bound", group="optimisation", valid=FRACTION)
    sampling_order: str = option("clip-lora", "few-shot draw: clip-lora draws val before train, coop train first",
                                 choices=("clip-lora", "coop"), group="data")
    fewshot_split: Optional[str] = option(None, "reuse the shots of another run (its fewshot_split.json)",
                                          group="data")
    eval_zeroshot_on: Sequence[str] = option((), "forgetting: zero-shot top-1 with and without the adapter on these "
                                             "datasets (CoOp names under --root, or image folders)",
                                             group="evaluation")
    eval_batch_size: int = option(256, "images per evaluation batch", group="evaluation", valid=AT_LEAST_1)

    @property
    def total_iters(self) -> int:
        return self.iters if self.iters is not None else 500 * self.shots

    def method_name(self) -> str:
        name = f"peft:{Path(self.peft_config).stem}" if self.peft_config else self.method
        return name + ("+glad" if self.glad else "")
