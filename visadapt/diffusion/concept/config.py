"""What defines a concept run: :class:`ConceptTrainConfig`, the one place the options of ``visadapt concept train``
are named, typed, defaulted and explained. Importing this module imports no torch.

Defaults follow diffusers' DreamBooth LoRA examples (``train_dreambooth_lora.py`` / ``_sdxl.py``): rank 4, AdamW
lr 1e-4, batch 1, a constant schedule, prior-preservation weight 1.0, the noise-prediction MSE (or the velocity
target when the scheduler predicts ``v_prediction``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from visadapt.adapters.methods import METHODS
from visadapt.run_config import RunConfig, recipe_default
from visadapt.utils.cli import AT_LEAST_1, DROPOUT, NON_NEGATIVE, POSITIVE, option

TINY_MODELS = ("tiny-sd", "tiny-sdxl")  # the offline random pipelines of visadapt.diffusion.tiny
MIN_IMAGES = 3


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass
class ConceptTrainConfig(RunConfig):
    """Everything that defines a concept (DreamBooth-style LoRA) run."""

    model: Optional[str] = option(None, "base pipeline: a hub id or local diffusers folder (SD-1.x/2.x or SDXL), or "
                                  "tiny-sd / tiny-sdxl (random offline pipelines, for trying the command)",
                                  group="concept")
    images: Optional[str] = option(None, "folder of 3-20 instance images (.png/.jpg/.jpeg/.webp/.bmp); each is "
                                   "resized (shorter side) and centre-cropped to --resolution", group="concept")
    trigger: Optional[str] = option(None, "the trigger word that names the concept (e.g. sks); must be a word of "
                                    "--instance-prompt", group="concept")
    instance_prompt: Optional[str] = option(None, "prompt of the instance images, with the trigger word (e.g. "
                                            "'a photo of sks dog')", group="concept")
    name: Optional[str] = option(None, "concept name: the exported files' name and the composer's adapter name "
                                 "(none: the trigger word)", group="concept")
    class_prompt: Optional[str] = option(None, "prior preservation: prompt of the class (e.g. 'a photo of a dog'); "
                                         "none: no prior preservation", group="prior preservation")
    class_images: Optional[str] = option(None, "folder of class images; topped up to --num-class-images with the "
                                         "base pipeline (seeded) when it holds fewer", group="prior preservation")
    num_class_images: int = option(100, "class images used for prior preservation", group="prior preservation",
                                   valid=AT_LEAST_1)
    prior_loss_weight: float = option(1.0, "weight of the class images' loss", group="prior preservation",
                                      valid=NON_NEGATIVE)
    class_steps: int = option(25, "sampling steps of generated class images", group="prior preservation",
                              valid=AT_LEAST_1)
    method: str = option("lora", "LoRA, Block-LoRA or Comp-LoRA (ignored with --peft-config)", choices=METHODS,
                         group="adapter")
    peft_config: Optional[str] = option(None, "JSON file of a visadapt peft config (peft_type BLOCK_LORA or "
                                        "COMP_LORA, as save_pretrained writes it); replaces --method/--rank",
                                        group="adapter")
    r: int = option(4, "LoRA rank", group="adapter", valid=AT_LEAST_1)
    lora_alpha: Optional[float] = option(None, "LoRA alpha, scale lora_alpha / r (none: lora_alpha = r)",
                                         group="adapter", valid=POSITIVE)
    lora_dropout: float = option(0.0, "LoRA dropout", group="adapter", valid=DROPOUT)
    n_blocks: int = option(4, "Block-LoRA: input chunks sharing one down-projection", group="adapter", valid=AT_LEAST_1)
    comp_k: float = option(0.5, "Comp-LoRA: top singular directions kept free (count, or fraction < 1)",
                           group="adapter", valid=POSITIVE)
    unet_targets: Sequence[str] = option(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules with LoRA",
                                         parse=_names, group="adapter")
    train_text_encoder: bool = option(False, "also put LoRA on the text encoder(s)", group="adapter")
    text_targets: Sequence[str] = option(["q_proj", "k_proj", "v_proj", "out_proj"], "text-encoder modules with "
                                         "LoRA (with --train-text-encoder)", parse=_names, group="adapter")
    resolution: Optional[int] = option(None, "training image size (none: the pipeline's, e.g. 512 for SD-1.5, "
                                       "1024 for SDXL)", group="optimisation", valid=AT_LEAST_1)
    steps: int = option(400, "training steps (micro-batches)", group="optimisation", valid=AT_LEAST_1)
    lr: float = option(1e-4, "AdamW learning rate", group="optimisation", valid=POSITIVE)
    text_lr: Optional[float] = option(None, "learning rate of the text encoders' LoRA (none: --lr)",
                                      group="optimisation", valid=POSITIVE)
    weight_decay: float = option(1e-2, "AdamW weight decay", group="optimisation", valid=NON_NEGATIVE)
    warmup_steps: int = option(0, "linear warm-up, then constant", group="optimisation", valid=NON_NEGATIVE)
    half_weights: bool = option(False, "keep the frozen base weights in the --precision dtype (fp16/bf16): about "
                                "half the memory, as diffusers' DreamBooth scripts do; the adapter stays fp32",
                                group="optimisation")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)",
                                          group="optimisation")
    seed: int = recipe_default("seed", 0)
    batch_size: int = recipe_default("batch_size", 1)
    grad_clip: Optional[float] = recipe_default("grad_clip", 1.0)
    sample_every: Optional[int] = option(None, "steps between sample grids (none: only at the end; 0: never)",
                                         group="samples", valid=NON_NEGATIVE)
    sample_prompt: Optional[str] = option(None, "prompt of the sample grids (none: --instance-prompt)",
                                          group="samples")
    sample_count: int = option(4, "images per sample grid", group="samples", valid=AT_LEAST_1)
    sample_steps: int = option(25, "sampling steps of the sample images", group="samples", valid=AT_LEAST_1)

    def concept_name(self) -> str:
        return self.name or self.trigger or "concept"
