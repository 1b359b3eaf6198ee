"""What defines a hyperspectral run: :class:`HSITrainConfig`, the one place its options are named, typed, defaulted
and explained. ``visadapt hsi train`` builds its flags from it; importing this module imports no torch.

Defaults are the LoLA-SpecViT release's trainer (Zidi et al., arXiv 2506.17759; ``enhanced_training.py`` of the
official code, FadiZidiDz/LoLA-SpecViT-Model): 15 whitened PCA components, 15×15 patches, a stratified 10 % training
split with seed 345, AdamW lr 2e-5 wd 0.01, batch 32 × gradient accumulation 2, 5-epoch warm-up then SGDR (T0=10,
T_mult=2) per iteration, label smoothing 0.1, gradient clipping 0.5, 100 epochs, the release's freezing. Three
deliberate differences, each a switch: the model is not selected on the test set (the final weights are evaluated;
``val`` carves a validation split from the training pixels), patches are reflect-padded (``padding="zero"`` is the
release), and patches are not z-scored per band (``input_norm="band"`` is the release; it removes each band's patch
mean, i.e. the pixel's spectrum, and cost about 20 points of OA on the demo scene).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from visadapt.run_config import RunConfig, recipe_default
from visadapt.utils.cli import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED,
    CountOrFraction,
    Range,
    option,
)

# The keys of visadapt.hyperspectral.data.DATASETS (a test keeps the two equal).
DATASET_NAMES = ("hanchuan", "honghu", "indian_pines", "longkou", "pavia_centre", "pavia_university", "salinas")
MODEL_ARGS = ("lora_placement", "lora_gate_residual", "official_init", "official_axis_permute", "cycle_lora_scale",
              "r", "lora_alpha")

#: --train: a per-class count, or a fraction of each class's pixels below 1 (all of them would leave no test pixel)
TRAIN_PIXELS = CountOrFraction(AT_LEAST_1, Range(0, 1, low_open=True, high_open=True))
#: --val: the same out of the training pixels, 0 for none
VAL_PIXELS = CountOrFraction(NON_NEGATIVE, Range(0, 1, high_open=True))


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass
class HSITrainConfig(RunConfig):
    """Everything that defines a hyperspectral run; see the module docstring for where the defaults come from."""

    dataset: Optional[str] = option(None, "a known dataset, read from --root by its usual file names and .mat keys",
                                    choices=DATASET_NAMES, group="scene")
    root: Optional[str] = option(None, "folder holding the dataset's files (or data/, Matlab_data_format/ under it)",
                                 group="scene")
    data: Optional[str] = option(None, "cube file (H, W, bands): .mat, .npz or .npy", group="scene")
    data_key: Optional[str] = option(None, "variable of the cube in --data (needed when the file holds several)",
                                     group="scene")
    gt: Optional[str] = option(None, "ground-truth file (H, W), 0 = unlabelled, 1..K", group="scene")
    gt_key: Optional[str] = option(None, "variable of the ground truth in --gt (needed when the file holds "
                                   "several)", group="scene")
    class_names: Optional[Sequence[str]] = option(None, "comma-separated, label 1 first (known datasets have "
                                                  "theirs)", parse=_names, group="scene")
    model: str = option("lola_specvit_base", "timm model: lola_specvit_base | _small | _tiny", group="model")
    lora_placement: str = option("all", "LoRA sites: attention; + MLP; + classifier head",
                                 choices=("none", "attn", "attn_mlp", "all"), group="model")
    lora_gate_residual: bool = option(True, "gated LoRA with a full-rank residual (the release); --no-... puts "
                                      "plain LoRA at the block sites", group="model")
    r: Optional[int] = option(None, "LoRA rank (none: the model's; 16 for base)", group="model", valid=AT_LEAST_1)
    lora_alpha: Optional[float] = option(None, "LoRA alpha, scale = lora_alpha / r (none: the model's)",
                                         group="model", valid=POSITIVE)
    official_init: bool = option(True, "the release's global trunc-normal init of LoRA B and R; --no-... starts "
                                 "them at zero (standard LoRA)", group="model")
    official_axis_permute: bool = option(False, "feed [B, H, W, C] as the release does", group="model")
    cycle_lora_scale: bool = option(False, "assumption: cycle the LoRA scale with the restarts (see "
                                    "visadapt.hyperspectral.schedule)", group="model")
    lora_scale_min: float = option(0.5, "lowest LoRA scale of --cycle-lora-scale", group="model", valid=PROBABILITY)
    lora_backend: str = option("builtin", "peft: plain LoRA through peft.get_peft_model (needs "
                               "--no-lora-gate-residual), merged when saved", choices=("builtin", "peft"),
                               group="model")
    freeze: str = option("official", "official: only LoRA trains (the release); standard: only the LoRA-wrapped "
                         "base linears are frozen; full: everything trains",
                         choices=("official", "standard", "full"), group="model")
    pca_components: int = option(15, "whitened PCA components", flag="--pca", group="data", valid=AT_LEAST_1)
    patch_size: int = option(15, "patch size (odd)", flag="--patch", group="data", valid=AT_LEAST_1)
    padding: str = option("reflect", "patch padding at the scene border; zero = the release",
                          choices=("reflect", "zero"), group="data")
    input_norm: str = option("none", "per-sample z-score of patches; band = the release's (removes each band's "
                             "patch mean)", choices=("none", "patch", "band"), group="data")
    train: Union[float, int] = option(0.1, "training pixels: a fraction (< 1) or a count per class", group="data",
                                      valid=TRAIN_PIXELS)
    val: Union[float, int] = option(0, "validation pixels held out of the training pixels: fraction or count per "
                                    "class", group="data", valid=VAL_PIXELS)
    split_seed: int = option(345, "seed of the stratified split", group="data", valid=SEED)
    split_file: Optional[str] = option(None, "reuse the training pixels of another run (its split.json)",
                                       group="data")
    epochs: int = option(100, "passes over the training pixels", group="optimisation", valid=AT_LEAST_1)
    lr: float = option(2e-5, "AdamW learning rate", group="optimisation", valid=POSITIVE)
    weight_decay: float = option(0.01, "AdamW weight decay", group="optimisation", valid=NON_NEGATIVE)
    warmup_epochs: int = option(5, "linear warm-up", group="optimisation", valid=NON_NEGATIVE)
    t0: float = option(10.0, "first SGDR cycle (epochs)", group="optimisation", valid=POSITIVE)
    t_mult: int = option(2, "SGDR cycle growth", group="optimisation", valid=AT_LEAST_1)
    eta_min: float = option(1e-6, "SGDR floor", group="optimisation", valid=NON_NEGATIVE)
    lora_lr_scale: float = option(1.0, "λ on the cosine part of the LoRA group's lr (2.0 = the model file's unused "
                                  "scheduler)", group="optimisation", valid=NON_NEGATIVE)
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", group="optimisation", valid=PROBABILITY)
    eval_batch_size: int = option(256, "pixels per evaluation batch", group="optimisation", valid=AT_LEAST_1)
    class_map: bool = option(True, "predict every pixel of the scene for the class map", group="optimisation")
    seed: int = recipe_default("seed", 345)
    grad_accum: int = recipe_default("grad_accum", 2)
    grad_clip: Optional[float] = recipe_default("grad_clip", 0.5)

    def model_kwargs(self) -> dict:
        kw = {k: getattr(self, k) for k in MODEL_ARGS if getattr(self, k) is not None}
        if self.lora_backend == "peft":
            kw["lora_placement"] = "none"
            kw.pop("r", None), kw.pop("lora_alpha", None)
        return kw
