"""What defines an incremental run: :class:`IncrementalConfig`, the one place its options are named, typed,
defaulted and explained. ``visadapt incremental train`` builds its flags from it; importing this module imports no
torch.

Defaults are CoACT's (Roy et al., arXiv 2405.16625, and the official code ShuvenduRoy/CoACT-FSCIL): ViT-B/16
ImageNet-21k with its pooled feature (dense + tanh), LoRA r 16 / α 16 / dropout 0.1 on query and value, a bias-free
dot-product classifier whose rows start as class prototypes, SGD (momentum 0.9, Nesterov, weight decay 5e-4), a
cosine schedule per epoch, batch 64, two views, SupCon τ 0.07 between the student's view 1 and the EMA teacher's
(m 0.999) view 2, loss weights 1. Where the code and the paper's figure disagree or the spec could not be settled,
the choice is an option whose default is the official code's behaviour:

- ``mask_unseen`` (off): predict over every classifier row, the random rows of future classes included (official);
  on: only the rows of classes seen so far.
- ``consistency_logits`` (``all``): the MSE consistency over every logit (official; the base model's rows of later
  classes are random); ``base``: over the base-session classes' logits only.
- ``incremental_contrast`` (``code``): one SupCon over [student, base-session teacher, pretrained encoder] (official
  code); ``figure``: the paper figure's two losses, SupCon with the current EMA teacher plus SupCon with the frozen
  base-session student.
- ``consistency_weight`` (1): 0 drops the MSE term (the figure does not show it).
- ``epochs_incremental`` (0, the released FSCIL recipe) and ``incremental_layers`` (``classifier,pet``): whether
  and what the incremental sessions tune.

Deliberate differences from the official code: the base session keeps its final weights (the code keeps the epoch
with the best *test* accuracy), runs are seeded (the code never seeds), the EMA skips shared weights that never
train (for them it is the identity: teacher and student both hold the pretrained value), and the frozen base-session
model stays frozen in later sessions (the code's forward also moves that model's teacher toward its student by EMA,
by about 0.1 % of their difference a step, which would make the base model differ from session to session).
Without ``--official-recipe`` two more defaults are ours: fp16 autocast on CUDA (the code trains in fp32) and a
fresh SGD per later session (the code's one SGD carries momentum across them: ``shared_inc_optimizer``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from visadapt.adapters.methods import METHODS
from visadapt.run_config import RunConfig, recipe_default
from visadapt.utils.cli import (
    ANY,
    AT_LEAST_1,
    DROPOUT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED,
    Range,
    option,
)

SETTINGS = ("fscil", "fscit")
# (total classes, base classes, way, sessions incl. the base session) per setting and dataset.
FSCIL_TABLE = {"cifar100": (100, 60, 5, 9), "mini_imagenet": (100, 60, 5, 9), "cub200": (200, 100, 10, 11)}
FSCIT_TABLE = {
    "caltech101": (102, 12, 10, 10), "cifar100": (100, 10, 10, 10), "country211": (211, 22, 21, 10),
    "cub200": (200, 20, 20, 10), "dtd": (47, 7, 5, 9), "eurosat": (10, 1, 1, 10), "fgvc_aircraft": (100, 10, 10, 10),
    "food101": (101, 11, 10, 10), "gtsrb": (43, 7, 4, 10), "mini_imagenet": (100, 10, 10, 10),
    "oxford_flowers": (102, 12, 10, 10), "oxford_pets": (37, 5, 4, 9), "resisc45": (45, 5, 5, 9),
    "stanford_cars": (196, 28, 21, 9), "sun397": (397, 45, 44, 9), "voc2007": (20, 2, 2, 10),
}
DATASET_NAMES = tuple(sorted({*FSCIL_TABLE, *FSCIT_TABLE, "imagefolder"}))
# The official per-dataset settings (utils/constants.py of the CoACT code), FSCIT:
# lr, epochs_base, ft_start_layer, ft_start_epoch, encoder_lr_factor, incremental layers, epochs_incremental,
# inc_lr_factor (None: the code's value is not set for the dataset, keep ours).
_FSCIT_RECIPES = {
    "caltech101": (0.1, 50, 6, 0, 0.1, "pet", 1, 0.01), "cifar100": (0.1, 50, 9, 0, 0.001, "classifier", 1, 0.001),
    "country211": (0.5, 50, 6, 10, 0.01, "classifier", 0, None),
    "cub200": (0.1, 50, 6, 25, 0.1, "classifier,pet", 0, None),
    "dtd": (0.5, 30, -1, 10, 0.1, "classifier,pet", 1, 0.001),
    "eurosat": (0.5, 50, -1, 10, 0.01, "classifier", 1, 0.001),
    "fgvc_aircraft": (0.1, 50, 11, 0, 0.1, "classifier", 0, None),
    "food101": (0.5, 50, 11, 10, 1.0, "classifier", 0, None), "gtsrb": (0.1, 30, 6, 0, 0.1, "classifier", 0, None),
    "mini_imagenet": (0.1, 30, 3, 25, 0.5, "pet", 1, 0.001),
    "oxford_flowers": (0.5, 50, -1, 0, 0.01, "classifier", 0, None),
    "oxford_pets": (0.1, 50, 11, 25, 0.5, "classifier,pet", 1, 0.001),
    "resisc45": (0.1, 50, 3, 0, 0.1, "classifier", 0, None),
    "stanford_cars": (0.1, 30, -1, 0, 0.01, "classifier", 0, None),
    "sun397": (0.1, 30, 11, 10, 0.01, "classifier", 1, 0.001),
    "voc2007": (0.1, 30, 3, 25, 0.1, "classifier", 1, 0.001),
}
# FSCIL: lr, epochs_base, adapt_blocks, ft_start_layer, ft_start_epoch, encoder_lr_factor (no incremental tuning).
_FSCIL_RECIPES = {"cifar100": (0.001, 25, 12, 11, 10, 0.01), "mini_imagenet": (0.001, 25, 12, 11, 10, 0.01),
                  "cub200": (0.1, 25, 6, -1, 0, 0.01)}


def official_recipe(setting: str, dataset: str) -> dict:
    """The CoACT code's per-dataset settings (README recipe + constants) as config fields; {} if it has none.
    Every recipe trains in fp32 (``precision="no"``): the code has no autocast; and builds one optimizer for all
    later sessions (``shared_inc_optimizer``), as the code does after session 0."""
    if setting == "fscil" and dataset in _FSCIL_RECIPES:
        lr, epochs, blocks, layer, epoch, enc = _FSCIL_RECIPES[dataset]
        return dict(lr=lr, epochs_base=epochs, adapt_blocks=blocks, ft_start_layer=layer, ft_start_epoch=epoch,
                    encoder_lr_factor=enc, shots=5, epochs_incremental=0, incremental_layers=["classifier", "pet"],
                    precision="no", shared_inc_optimizer=True)
    if setting == "fscit" and dataset in _FSCIT_RECIPES:
        lr, epochs, layer, epoch, enc, layers, inc_epochs, inc_lr = _FSCIT_RECIPES[dataset]
        recipe = dict(lr=lr, epochs_base=epochs, adapt_blocks=12, ft_start_layer=layer, ft_start_epoch=epoch,
                      encoder_lr_factor=enc, shots=10, epochs_incremental=inc_epochs,
                      incremental_layers=layers.split(","), precision="no",
                      shared_inc_optimizer=True)
        if inc_lr is not None:
            recipe["inc_lr_factor"] = inc_lr
        return recipe
    return {}

RECIPES = ("coact", "finetune", "prototypes")
MOMENTUM = Range(0, 1, high_open=True)  #: SGD momentum: 1 would never forget a gradient
FT_START_LAYER = Range(-1)  #: -1: the whole backbone joins
DEFAULT_BACKBONE = "hf-vit:google/vit-base-patch16-224-in21k"
DEMO_BACKBONE = "visadapt-demo-clip"


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass
class IncrementalConfig(RunConfig):
    """Everything that defines an incremental run; see the module docstring for where the defaults come from."""

    official_recipe: bool = option(False, "take the CoACT code's per-dataset settings (lr, epochs, fine-tuned "
                                   "blocks, incremental tuning, shots) for every option not given on the command "
                                   "line", group="data")
    setting: str = option("fscil", "fscil: a large base session then N-way K-shot sessions; fscit: every session "
                          "is N-way K-shot", choices=SETTINGS, group="data")
    dataset: Optional[str] = option(None, "cifar100, cub200, mini_imagenet (their standard files), a FSCIT dataset "
                                    "name (image folders) or imagefolder", choices=DATASET_NAMES, group="data")
    root: Optional[str] = option(None, "folder holding the dataset's files", group="data")
    shots: int = option(5, "training images per novel class (and per base class under fscit)", group="data",
                        valid=AT_LEAST_1)
    index_list: Optional[str] = option(None, "few-shot pools in the official `class_id sample_index` format (the "
                                       "first --shots lines of a class are used); none: the official list shipped "
                                       "for cifar100, cub200 and mini_imagenet (first 5 a class = CEC's samples), "
                                       "else drawn with --split-seed; draw: drawn with --split-seed. Saved as "
                                       "index_list.txt", group="data")
    cec_sessions: Optional[str] = option(None, "folder of CEC's session_<s>.txt files (training rows, or image "
                                         "paths for CUB/miniImageNet): their samples become the pools",
                                         group="data")
    split_seed: int = option(1, "seed of drawn few-shot pools (--index-list draw, or a dataset without a standard "
                             "list)", group="data", valid=SEED)
    base_classes: Optional[int] = option(None, "classes of session 0 (none: the spec table's)", group="data",
                                         valid=AT_LEAST_1)
    way: Optional[int] = option(None, "new classes per session (none: the table's)", group="data", valid=AT_LEAST_1)
    sessions: Optional[int] = option(None, "sessions including session 0 (none: the table's)", group="data",
                                     valid=AT_LEAST_1)
    image_size: Optional[int] = option(None, "input side in pixels (none: the backbone's, 224 for ViT-B/16)",
                                       group="data", valid=AT_LEAST_1)
    crop_scale_min: float = option(0.08, "smallest RandomResizedCrop area", group="data", valid=FRACTION)

    backbone: str = option(DEFAULT_BACKBONE, "hf-vit:HUB_ID_OR_DIR (HF ViT weights in timm, with the pooler), "
                           "timm:NAME, open_clip:NAME, or visadapt-demo-clip", group="model")
    pretrained: Optional[str] = option(None, "timm: a local weights file (none: timm's hub weights); open_clip: a "
                                       "tag or a local file", group="model")
    pooler: bool = option(True, "hf-vit: embed with the pooled feature tanh(W LN(cls) + b) (official); --no-pooler "
                          "embeds LN(cls)", group="model")
    recipe: str = option("coact", "coact; finetune (naive per-session LoRA fine-tuning: CE only, no teacher, no "
                         "consistency); prototypes (frozen backbone, prototype rows only)", choices=RECIPES,
                         group="model")
    method: str = option("lora", "adapter of the student", choices=METHODS, group="model")
    peft_config: Optional[str] = option(None, "any peft method from a JSON peft config (replaces --method)",
                                        group="model")
    r: int = option(16, "adapter rank", group="model", valid=AT_LEAST_1)
    lora_alpha: float = option(16.0, "adapter alpha (scale lora_alpha / r)", group="model", valid=POSITIVE)
    lora_dropout: float = option(0.1, "dropout on the adapter input", group="model", valid=DROPOUT)
    adapt_blocks: int = option(12, "n >= 0: adapters on blocks 0..n-1; n < 0: on blocks |n|..last", group="model",
                               valid=ANY)
    classifier: str = option("dot", "dot: plain dot products with the prototype rows (official); cosine: "
                             "normalised rows and features times --cosine-scale", choices=("dot", "cosine"),
                             group="model")
    cosine_scale: float = option(16.0, "logit scale of the cosine classifier", group="model", valid=POSITIVE)

    epochs_base: int = option(25, "epochs of session 0", group="optimisation", valid=NON_NEGATIVE)
    epochs_incremental: int = option(0, "epochs of each later session (0: prototypes only)", group="optimisation",
                                     valid=NON_NEGATIVE)
    incremental_layers: Sequence[str] = option(["classifier", "pet"], "what later sessions tune: classifier, pet",
                                               parse=_names, group="optimisation")
    lr: float = option(0.1, "base-session learning rate (adapter and classifier)", group="optimisation", valid=POSITIVE)
    momentum: float = option(0.9, "SGD momentum (Nesterov)", group="optimisation", valid=MOMENTUM)
    weight_decay: float = option(5e-4, "SGD weight decay", group="optimisation", valid=NON_NEGATIVE)
    ft_start_layer: int = option(500, "controlled fine-tuning: first backbone block that joins (-1: the whole "
                                 "backbone; past the last block: never)", group="optimisation", valid=FT_START_LAYER)
    ft_start_epoch: int = option(0, "controlled fine-tuning: epoch from which those blocks train",
                                 group="optimisation", valid=NON_NEGATIVE)
    encoder_lr_factor: float = option(0.01, "lr factor of the joined backbone blocks", group="optimisation",
                                      valid=NON_NEGATIVE)
    inc_lr_factor: float = option(0.001, "lr factor of the later sessions (constant)", group="optimisation",
                                  valid=NON_NEGATIVE)
    shared_inc_optimizer: bool = option(False, "one SGD for all later sessions, so its momentum carries from one "
                                        "session into the next (official, on under --official-recipe); off: a "
                                        "fresh SGD per session", group="optimisation")
    temperature: float = option(0.07, "SupCon temperature", group="optimisation", valid=POSITIVE)
    ema_momentum: float = option(0.999, "teacher EMA momentum, per step", group="optimisation", valid=PROBABILITY)
    ce_weight: float = option(1.0, "cross-entropy weight of session 0", group="optimisation", valid=NON_NEGATIVE)
    inc_ce_weight: float = option(1.0, "cross-entropy weight of the later sessions", group="optimisation",
                                  valid=NON_NEGATIVE)
    supcon_weight: float = option(1.0, "SupCon weight", group="optimisation", valid=NON_NEGATIVE)
    consistency_weight: float = option(1.0, "MSE logit consistency weight (later sessions)", group="optimisation",
                                       valid=NON_NEGATIVE)
    consistency_logits: str = option("all", "consistency over all logits (official) or the base classes' only",
                                     choices=("all", "base"), group="optimisation")
    incremental_contrast: str = option("code", "later sessions' SupCon: code = [student, base teacher, pretrained]; "
                                       "figure = with the current teacher + with the base student",
                                       choices=("code", "figure"), group="optimisation")
    mask_unseen: bool = option(False, "predict over the rows of seen classes only (the official code does not)",
                               group="optimisation")
    eval_batch_size: int = option(100, "images per evaluation batch", group="optimisation", valid=AT_LEAST_1)
    batch_size: int = recipe_default("batch_size", 64)


    def with_recipe(self) -> "IncrementalConfig":
        """The config the recipe runs: ``finetune`` drops the teacher and the consistency term and tunes adapter and
        classifier at the base lr; ``prototypes`` trains nothing."""
        if self.recipe == "finetune":
            return dataclasses.replace(self, supcon_weight=0.0, consistency_weight=0.0, inc_lr_factor=1.0,
                                       incremental_layers=["classifier", "pet"])
        if self.recipe == "prototypes":
            return dataclasses.replace(self, epochs_base=0, epochs_incremental=0, supcon_weight=0.0,
                                       consistency_weight=0.0)
        return self
