"""Tiny random SD-1.x and SDXL pipelines built from configs, and LoRA files for them: the embedded default.

Nothing here downloads. The tokenizer is CLIP's real 49408-token BPE, rebuilt from the merges file that ships in
open_clip's wheel, so prompts tokenise as they would with a real checkpoint. Images from these pipelines are noise:
they exist to run the composition machinery end to end (tests, the README example, the app with no model).
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Literal, Sequence, Union

import torch

# The LoRA targets people train on SD: attention projections in the UNet and the text encoder.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode().split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token=pad_token)


def _text_encoder(tokenizer, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=32)


def _scheduler():
    from diffusers import DPMSolverMultistepScheduler

    # LoRA-Composer samples with DPM-Solver; betas as in SD-1.x.
    return DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)


def tiny_pipeline(kind: Literal["sd", "sdxl"] = "sd", seed: int = 0, pipeline_class=None):
    """A random pipeline small enough for a CPU test (``vae_scale_factor`` 2: sizes must be multiples of 16).

    ``pipeline_class`` defaults to diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``; any
    subclass (such as the composer pipelines) works.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    if kind == "sd":
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        cls = pipeline_class or StableDiffusionPipeline
        pipe = cls(vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, unet=unet,
                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
                   requires_safety_checker=False)
    elif kind == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=32)
        cls = pipeline_class or StableDiffusionXLPipeline
        pipe = cls(vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer,
                   text_encoder_2=_text_encoder(tokenizer, with_projection=True), tokenizer_2=clip_tokenizer("!"),
                   unet=unet, scheduler=_scheduler(), image_encoder=None, feature_extractor=None)
    else:
        raise ValueError(f"Unknown tiny pipeline {kind!r}; choose 'sd' or 'sdxl'.")
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # SD-1.5: cross-attention on three of four levels
SD15_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def sd15_layout_unet(widths: Sequence[int] = (32, 32, 32, 32), layers_per_block: int = 1, seed: int = 0):
    """A random UNet with SD-1.5's block layout in miniature (``widths`` per level, 32-dim cross-attention as the
    tiny text encoder), for tests and benchmarks whose subject is where SD's attention levels lie (latent / 1, 2, 4
    with attention, / 8 without)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, block_out_channels=tuple(widths), layers_per_block=layers_per_block, cross_attention_dim=32,
        down_block_types=SD15_DOWN_BLOCKS, up_block_types=SD15_UP_BLOCKS, attention_head_dim=8, norm_num_groups=32)


def save_random_lora(pipe, path: Union[str, os.PathLike], seed: int = 0, rank: int = 4,
                     unet_targets: Sequence[str] = UNET_TARGETS, text_targets: Sequence[str] = TEXT_TARGETS,
                     std: float = 0.5, kohya: bool = False) -> Path:
    """Write a random LoRA for ``pipe`` to ``path`` (``.safetensors``), as a trained one would be written.

    peft/diffusers format by default (``save_lora_weights``); ``kohya=True`` writes the A1111/kohya key layout
    (``lora_unet_*``, ``lora_te_*``, ``lora_down``/``lora_up``/``alpha``) that most community LoRAs use.
    Both LoRA matrices are random, so the LoRA changes the output from the first step.
    """
    path = Path(path)
    parts = {"unet": (pipe.unet, unet_targets)}
    for key in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, key, None) is not None and text_targets:
            parts[key] = (getattr(pipe, key), text_targets)
    state: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for prefix, (model, targets) in parts.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                a = torch.randn(rank, module.in_features, generator=gen) * std / module.in_features ** 0.5
                b = torch.randn(module.out_features, rank, generator=gen) * std / rank ** 0.5
                state[f"{prefix}.{name}.lora_A.weight"], state[f"{prefix}.{name}.lora_B.weight"] = a, b
    if kohya:
        state = _to_kohya(state, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path


_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def _to_kohya(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """peft keys ``unet.a.b.lora_A.weight`` → kohya ``lora_unet_a_b.lora_down.weight`` (+ ``.alpha``)."""
    prefixes = {k.split(".", 1)[0] for k in state}
    te_prefix = {"text_encoder": "lora_te1" if "text_encoder_2" in prefixes else "lora_te"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if component.startswith("text_encoder") and not module.startswith("text_model."):
            module = "text_model." + module  # kohya names the transformers-4 module tree
        name = te_prefix.get(component, _KOHYA_PREFIX[component]) + "_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out
