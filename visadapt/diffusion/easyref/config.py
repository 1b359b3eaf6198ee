"""What defines an EasyRef run: :class:`EasyRefTrainConfig` (``visadapt easyref train``) and
:class:`EasyRefEvalConfig` (``visadapt easyref eval``). Importing this module imports no torch.

EasyRef trains in three stages (the official scripts' settings; all stages: AdamW, constant learning rate, no
warm-up, no weight decay, bf16, references / caption / both dropped 5 % of the time each):

========  ==================================================================  =====  ==========  ==========
stage     trains                                                              lr     batch x acc  MLLM tokens
========  ==================================================================  =====  ==========  ==========
1         final MLLM layer + 64 reference tokens, projector, decoupled K/V    1e-4   8 x 1       256 (pad/cut)
2         stage 1's + the whole MLLM + rank-128 LoRA on every UNet attention   4e-5   4 x 2       256 (pad/cut)
3         as stage 2, on groups (references = the other images), truncation   2e-5   1 x 4       dynamic
========  ==================================================================  =====  ==========  ==========

Stages 1 and 2 train on square centre crops of the targets, stage 3 on the whole targets in their aspect ratio
(``--target-crop``, :mod:`visadapt.diffusion.easyref.data`).

Options left at ``none`` take their stage's value (:meth:`EasyRefTrainConfig.resolved`); ``run_config.json``
records the resolved values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from visadapt.run_config import PRECISIONS, RunConfig, recipe_default
from visadapt.utils.cli import ANY, AT_LEAST_1, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, check_ranges, option

TINY_MODEL = "tiny-sdxl"  # visadapt.diffusion.tiny's random SDXL pipeline
TINY_MLLM = "tiny"  # visadapt.diffusion.easyref.tiny_mllm's random Qwen2-VL
DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_MLLM = "Qwen/Qwen2-VL-2B-Instruct"
STAGES = (1, 2, 3)
TARGET_CROPS = ("square", "keep-aspect")  # how a target becomes the UNet's pixels (.data)
SIZE_MULTIPLE = 64  # keep-aspect targets: sides rounded up to a multiple of this (the official stride)

#: per stage: what the official scripts use (finetune_sdxl.py and scripts/*.sh)
STAGE_DEFAULTS: dict[int, dict] = {
    1: {"lr": 1e-4, "batch_size": 8, "grad_accum": 1, "max_seq_len": 256, "truncate_rate": 0.0, "r": 0,
        "train_mllm": False, "target_crop": "square"},
    2: {"lr": 4e-5, "batch_size": 4, "grad_accum": 2, "max_seq_len": 256, "truncate_rate": 0.0, "r": 128,
        "train_mllm": True, "target_crop": "square"},
    3: {"lr": 2e-5, "batch_size": 1, "grad_accum": 4, "max_seq_len": 0, "truncate_rate": 0.4, "r": 128,
        "train_mllm": True, "target_crop": "keep-aspect"},
}


@dataclass
class EasyRefTrainConfig(RunConfig):
    """Everything that defines one EasyRef training stage."""

    stage: int = option(1, "1: alignment pre-training, 2: single-reference fine-tuning, 3: multi-reference "
                        "fine-tuning (each stage starts from the previous one's --init)", choices=STAGES,
                        group="easyref")
    data: Optional[str] = option(None, "folder of image groups: one sub-folder per subject, a <image>.txt caption "
                                 "beside each image", group="easyref")
    model: str = option(DEFAULT_MODEL, "base SDXL pipeline: a hub id or local diffusers folder, or tiny-sdxl (random "
                        "offline pipeline, for trying the command)", group="easyref")
    mllm: str = option(DEFAULT_MLLM, "the multimodal LLM (a Qwen2-VL hub id or local folder), or tiny (random "
                       "offline Qwen2-VL)", group="easyref")
    init: Optional[str] = option(None, "start from an EasyRef adapter: the previous stage's run folder or its "
                                 "safetensors file (ours or the official layout); none: random (stage 1)",
                                 group="easyref")
    holdout: bool = option(True, "leave each group's held-back evaluation image (its last by name) out of training",
                           group="easyref")
    num_tokens: int = option(64, "reference tokens (the adapter's condition length)", group="easyref", valid=AT_LEAST_1)
    r: Optional[int] = option(None, "rank of the UNet LoRA (0: none; none: 0 in stage 1, 128 after)",
                                      group="easyref", valid=NON_NEGATIVE)
    train_mllm: Optional[bool] = option(None, "also train the whole MLLM (none: from stage 2 on)", group="easyref")
    resolution: Optional[int] = option(None, "training image size (none: the pipeline's, 1024 for SDXL)",
                                       group="data", valid=AT_LEAST_1)
    target_crop: Optional[str] = option(None, "square: centre crop of the target at --resolution; keep-aspect: "
                                        "the whole target at about --resolution² pixels, sides a multiple of "
                                        "--size-multiple, one example per device (none: square in stages 1-2, "
                                        "keep-aspect in stage 3)", choices=TARGET_CROPS, group="data")
    size_multiple: int = option(SIZE_MULTIPLE, "keep-aspect targets: sides rounded up to a multiple of this",
                                group="data", valid=AT_LEAST_1)
    max_seq_len: Optional[int] = option(None, "MLLM sequence padded / truncated to this length (0: dynamic padding; "
                                        "none: 256 in stages 1-2, dynamic in stage 3)", group="data",
                                        valid=NON_NEGATIVE)
    max_refs: int = option(28, "most references per example (stage 3)", group="data", valid=AT_LEAST_1)
    truncate_rate: Optional[float] = option(None, "probability of keeping only 2..n-1 references (none: 0.4 in "
                                            "stage 3, else 0)", group="data", valid=PROBABILITY)
    ref_drop: float = option(0.05, "probability of dropping the references alone (a black image instead)",
                             group="data", valid=PROBABILITY)
    text_drop: float = option(0.05, "probability of dropping the caption alone", group="data", valid=PROBABILITY)
    both_drop: float = option(0.05, "probability of dropping both", group="data", valid=PROBABILITY)
    steps: int = option(10000, "training steps (micro-batches)", group="optimisation", valid=AT_LEAST_1)
    lr: Optional[float] = option(None, "AdamW learning rate, constant (none: 1e-4 / 4e-5 / 2e-5 by stage)",
                                 group="optimisation", valid=POSITIVE)
    weight_decay: float = option(0.0, "AdamW weight decay", group="optimisation", valid=NON_NEGATIVE)
    gradient_checkpointing: bool = option(True, "recompute the UNet's and the MLLM's activations in the backward "
                                          "pass (less memory)", group="optimisation")
    seed: int = recipe_default("seed", 0)
    batch_size: Optional[int] = recipe_default("batch_size", None, "none: 8 / 4 / 1 by stage")
    grad_accum: Optional[int] = recipe_default("grad_accum", None, "none: 1 / 2 / 4 by stage")
    precision: str = recipe_default("precision", "bf16", "bf16 as the official runs")

    def resolved(self) -> "EasyRefTrainConfig":
        """A copy with every ``none`` stage option set to its stage's value."""
        if self.stage not in STAGES:
            raise ValueError(f"--stage {self.stage}: choose 1, 2 or 3.")
        values = {k: v for k, v in STAGE_DEFAULTS[self.stage].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **values)


@dataclass
class EasyRefEvalConfig:
    """``visadapt easyref eval``: generate for every group's held-back target and score it (MRBench protocol)."""

    data: Optional[str] = option(None, "folder of image groups (the training layout); each group's last image is "
                                 "the target, the others are the references", group="easyref")
    adapter: Optional[str] = option(None, "the EasyRef adapter: a training run folder or its safetensors file "
                                    "(ours or the official layout)", group="easyref")
    model: str = option(DEFAULT_MODEL, "base SDXL pipeline (hub id, local folder, or tiny-sdxl)", group="easyref")
    mllm: str = option(DEFAULT_MLLM, "the multimodal LLM (hub id, local folder, or tiny)", group="easyref")
    scale: float = option(1.0, "reference scale λ", group="sampling", valid=ANY)
    steps: int = option(30, "denoising steps", group="sampling", valid=AT_LEAST_1)
    guidance_scale: float = option(5.0, "classifier-free guidance scale", group="sampling", valid=ANY)
    negative_prompt: str = option("monochrome, lowres, bad anatomy, worst quality, low quality",
                                  "negative prompt", group="sampling")
    size: Optional[int] = option(None, "image size (none: the pipeline's)", group="sampling", valid=AT_LEAST_1)
    images_per_group: int = option(1, "images generated per group (seeds seed, seed+1, …); scores are averaged",
                                   group="sampling", valid=AT_LEAST_1)
    seed: int = option(0, "sampling seed", group="sampling", valid=SEED)
    clip_model: str = option("ViT-L-14", "open_clip model for CLIP-I and CLIP-T: an architecture, local-dir:FOLDER, "
                             "or visadapt-demo-clip (shipped, offline; not comparable with MRBench)", group="metrics")
    clip_pretrained: str = option("openai", "open_clip weights: a tag (downloaded, or from the cache offline) or a "
                                  "local checkpoint file", group="metrics")
    dino_model: str = option("vit_base_patch14_dinov2.lvd142m", "timm DINOv2 model for DINO-I: a pretrained name, "
                             "local-dir:FOLDER (timm's config.json + model.safetensors), or visadapt-demo-vit "
                             "(shipped, offline)", group="metrics")
    max_groups: Optional[int] = option(None, "evaluate only the first N groups", group="metrics", valid=AT_LEAST_1)
    precision: str = option("auto", "auto: fp16 on CUDA, fp32 on CPU", choices=PRECISIONS, group="metrics")

    def __post_init__(self) -> None:
        check_ranges(self)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
