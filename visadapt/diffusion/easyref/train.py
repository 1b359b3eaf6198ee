"""EasyRef's progressive training (``visadapt easyref train --stage 1|2|3``), as a page on
:class:`visadapt.training.Trainer`.

One run is one stage; each later stage starts from the previous one's adapter (``--init``). The loss is the official
one: encode the target image with the VAE, noise it with SDXL's training scheduler (DDPM) at a uniform timestep and
regress the UNet's prediction (epsilon, or velocity for a v-prediction scheduler) with the MSE. The UNet sees the
caption through both CLIP text encoders (frozen, as SDXL) and the references through the 64 EasyRef tokens: the
multimodal LLM reads [references; instruction + caption], its final layer turns 64 learned reference tokens into the
condition, the projector maps it to the cross-attention width, and the decoupled cross-attention adds it in every
``attn2``.

What trains (the rest is frozen):

- stage 1: the final MLLM layer (+ its norm and the reference tokens), the projector, the decoupled ``to_k_ip`` /
  ``to_v_ip``; the MLLM runs without gradients;
- stages 2 and 3: the same, plus the whole MLLM (vision tower and language layers; an untied ``lm_head``, which no
  forward uses, stays frozen) and a rank-128 LoRA on q/k/v/out of every UNet attention layer.

Examples come from :class:`~visadapt.diffusion.easyref.data.EasyRefItems` (references, drops, truncation); the
MLLM's inputs are built in the data loader (padded / truncated to 256 tokens in stages 1-2, padded to the longest in
stage 3). Stages 1-2 see square centre crops of the targets; stage 3 sees whole targets in their aspect ratio
(``--target-crop keep-aspect``, with SDXL time ids to match), one example per device as the official stage 3.

The run folder holds, besides what every run holds (``run_config.json``, ``results.json`` with the loss on a fixed
evaluation batch before and after training, ``training_curve.png``, ``report.md``): ``easyref.safetensors`` (our
layout, :func:`visadapt.diffusion.easyref.files.easyref_state_dict`) and ``official/model.safetensors`` (the
official repository's key layout, :func:`visadapt.diffusion.easyref.files.to_official`, which its training script
takes as ``--pretrained_easy_ref_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from visadapt.training import StepCallback, Trainer

from ..train_common import denoising_target, halve_frozen_weights, training_scheduler
from .config import SIZE_MULTIPLE, TINY_MLLM, TINY_MODEL, EasyRefTrainConfig
from .data import EasyRefItems, collate_items, group_summary, holdout_split, scan_groups

__all__ = ["EasyRefTrainer", "EasyRefTrainModel", "train_easyref", "load_mllm", "load_sdxl", "adapter_file",
           "ADAPTER_FILE", "OFFICIAL_FILE"]

ADAPTER_FILE = "easyref.safetensors"
OFFICIAL_FILE = "official/model.safetensors"
EVAL_ITEMS = 4  # examples in the fixed evaluation batch
EVAL_TIMESTEPS = 3  # timesteps per example in it


# ------------------------------------------------------------------------------------------------- loading
def load_sdxl(model: str):
    """The base SDXL pipeline in fp32: ``tiny-sdxl`` (offline, random) or a hub id / local diffusers folder."""
    if model == TINY_MODEL:
        from ..tiny import tiny_pipeline

        return tiny_pipeline("sdxl")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model).to(dtype=torch.float32)
    if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "unet", None) is None:
        raise ValueError(f"--model {model}: a {type(pipe).__name__}; EasyRef adapts an SDXL pipeline (two text "
                         "encoders, a UNet), e.g. stabilityai/stable-diffusion-xl-base-1.0.")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_mllm(name: str, seed: int = 0):
    """(Qwen2-VL model in fp32, its processor): ``tiny`` (offline, random) or a hub id / local folder."""
    if name == TINY_MLLM:
        from .tiny_mllm import tiny_qwen2vl

        return tiny_qwen2vl(seed=seed)
    from transformers import Qwen2VLForConditionalGeneration

    from .encoder import load_processor

    model = Qwen2VLForConditionalGeneration.from_pretrained(name, dtype=torch.float32, attn_implementation="sdpa")
    return model, load_processor(name)  # the PIL image processor, as the released training saw its pixels


def adapter_file(path: Union[str, Path]) -> Path:
    """An EasyRef weights file: ``path`` itself, or the adapter a training run folder holds."""
    path = Path(path)
    if path.is_dir():
        for name in (ADAPTER_FILE, OFFICIAL_FILE, "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {ADAPTER_FILE} (nor {OFFICIAL_FILE}); pass a finished EasyRef training "
                                "run folder or the adapter's .safetensors file.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass an EasyRef training run folder or a .safetensors file.")
    return path


# -------------------------------------------------------------------------------------------------- model
class EasyRefTrainModel(nn.Module):
    """The modules a prediction runs: the UNet (with EasyRef installed), the encoder and the frozen text encoders.
    ``forward`` is one noise prediction. The VAE, which only encodes the targets, stays outside: a DeepSpeed engine
    holding this module in bf16 leaves it in fp32, as the official script keeps it."""

    def __init__(self, pipe, encoder: nn.Module, train_mllm: bool) -> None:
        super().__init__()
        self.unet, self.encoder = pipe.unet, encoder
        self.text_encoders = nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2])
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        self.train_mllm = train_mllm

    @torch.no_grad()
    def text(self, captions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 77, D) penultimate states of both CLIP encoders side by side, (B, D2) pooled (SDXL's conditioning)."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def references(self, mllm_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, Q, D) EasyRef tokens; the MLLM runs without gradients unless it trains (stage 1 saves its graph)."""
        with torch.set_grad_enabled(self.train_mllm and torch.is_grad_enabled()):
            states, positions = self.encoder.mllm_states(**mllm_inputs, return_positions=True)
        return self.encoder.aggregate(states, mllm_inputs["attention_mask"].to(states.device), positions)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str],
                mllm_inputs: dict[str, torch.Tensor], time_ids: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) noisy latents, (B,) timesteps, B captions, the processor's tensors, (B, 6) time ids →
        (B, 4, h, w) prediction."""
        from .unet import unet_image_embeds

        embeds, pooled = self.text(captions, noisy.device)
        tokens = self.references(mllm_inputs)
        cond = {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype),
                "image_embeds": unet_image_embeds(tokens)}
        # The latents follow the UNet's weights: under DeepSpeed bf16 the engine holds them in bf16 and accelerate's
        # autocast is off (the official script casts them to its weight dtype); elsewhere autocast casts the same.
        noisy = noisy.to(self.unet.conv_in.weight.dtype)
        return self.unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample


# ------------------------------------------------------------------------------------------------ trainer
class EasyRefTrainer(Trainer):
    """Trains one EasyRef stage into ``out_dir``; see the module docstring. ``config`` is resolved
    (:meth:`EasyRefTrainConfig.resolved`) before anything runs."""

    def __init__(self, config: EasyRefTrainConfig, out_dir: Union[str, Path], resume: bool = False,
                 callbacks: Sequence[StepCallback] = (), pipe=None, mllm=None) -> None:
        self._pipe, self._mllm = pipe, mllm
        super().__init__(config.resolved(), out_dir, resume=resume, callbacks=callbacks)

    def validate(self) -> None:
        c = self.cfg
        if not c.data:
            raise ValueError("Pass --data: a folder with one sub-folder of captioned images per subject.")
        if c.stage > 1 and not c.init:
            import warnings

            warnings.warn(f"Stage {c.stage} without --init starts from random EasyRef weights; pass the previous "
                          "stage's run folder to continue the progressive training.", stacklevel=2)
        if c.ref_drop + c.text_drop + c.both_drop > 1:  # each one's range is declared with the option
            raise ValueError("--ref-drop + --text-drop + --both-drop must not exceed 1.")

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from .encoder import EasyRefEncoder
        from .files import load_easyref_state, read_easyref_file
        from .unet import install_easyref

        c, acc = self.cfg, self.accelerator
        self._one_target_size_per_device()
        groups = scan_groups(c.data)
        train_groups, held = holdout_split(groups) if c.holdout else (groups, [])
        self.data_summary = {**group_summary(train_groups), "held_out_images": len(held)}
        pipe = self.pipe = self._pipe if self._pipe is not None else load_sdxl(c.model)
        mllm, processor = self._mllm if self._mllm is not None else load_mllm(c.mllm, c.seed)
        self.resolution = c.resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self._check_size_multiple(pipe)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, mllm):
            module.requires_grad_(False)
        torch.manual_seed(c.seed)  # reference tokens, projector: the same init for the same seed
        encoder = EasyRefEncoder(mllm, processor, pipe.unet.config.cross_attention_dim, num_queries=c.num_tokens)
        install_easyref(pipe.unet, num_tokens=c.num_tokens, r=c.r)
        if c.init:
            load_easyref_state(pipe.unet, encoder, read_easyref_file(adapter_file(c.init)))
        self._select_trainable(pipe.unet, encoder)
        if c.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if c.train_mllm:
                getattr(mllm, "activation_checkpointing_enable", mllm.gradient_checkpointing_enable)()
        # Under bf16/fp16 the frozen weights (not the VAE's, as the official code keeps it in fp32) go to that dtype:
        # the frozen MLLM of stage 1 and SDXL's frozen UNet and text encoders take half the memory.
        halve_frozen_weights([pipe.unet, pipe.text_encoder, pipe.text_encoder_2, encoder], acc.mixed_precision)
        pipe.to(acc.device)
        encoder.to(acc.device)
        self.encoder = encoder
        self.step_memory = self._check_memory(train_groups)
        self.noise_scheduler = training_scheduler(pipe)
        self.model = EasyRefTrainModel(pipe, encoder, c.train_mllm)
        self.train_set = self._items(train_groups, c.ref_drop, c.text_drop, c.both_drop, c.truncate_rate)
        self.eval_set = self._items(train_groups, 0.0, 0.0, 0.0, 0.0)
        self.collate_fn, self.total_steps = self.collate, c.steps
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)  # constant, no warm-up

    def _check_memory(self, groups) -> "StepMemory":  # noqa: F821
        """Estimate what one step needs besides the loaded weights (:mod:`visadapt.diffusion.easyref.memory`) and
        stop now, with the numbers and the fix, if that is more than is free."""
        from .memory import check_step_memory, estimate_step_memory

        c, acc, encoder = self.cfg, self.accelerator, self.encoder
        references = min(c.max_refs, max(len(g) for g in groups) - 1) if c.stage == 3 else 1
        caption = max((text for g in groups for captions in g.captions for text in captions), key=len, default="")
        template = encoder.processor.apply_chat_template(encoder.messages(0, caption), tokenize=False,
                                                         add_generation_prompt=True)
        trainable = sum(p.numel() for m in (self.pipe.unet, encoder) for p in m.parameters() if p.requires_grad)
        need = estimate_step_memory(
            encoder.mllm.config, image_size=encoder.image_size, references=max(references, 1),
            batch=max(1, c.batch_size // acc.num_processes),
            prompt_tokens=len(encoder.processor.tokenizer(template).input_ids), max_seq_len=c.max_seq_len,
            num_queries=c.num_tokens, train_mllm=c.train_mllm, checkpointing=c.gradient_checkpointing,
            act_bytes=2 if acc.mixed_precision in ("bf16", "fp16") else 4, trainable_params=trainable,
            optimizer_shards=acc.num_processes if self.deepspeed else 1)
        check_step_memory(need, acc.device, stage=c.stage, references=max(references, 1))
        return need

    def _items(self, groups, ref_drop: float, text_drop: float, both_drop: float, truncate: float) -> EasyRefItems:
        c = self.cfg
        return EasyRefItems(groups, c.stage, self.resolution, ref_drop=ref_drop, text_drop=text_drop,
                            both_drop=both_drop, truncate_rate=truncate, max_refs=c.max_refs,
                            target_crop=c.target_crop, size_multiple=c.size_multiple)

    def _one_target_size_per_device(self) -> None:
        """Keep-aspect targets differ in size and cannot be stacked: like the official stage 3 (batch 1 per GPU), each
        device takes one example per micro-batch (the batch is split across devices)."""
        c, processes = self.cfg, self.accelerator.num_processes
        if c.target_crop == "keep-aspect" and c.batch_size > processes:
            raise ValueError(f"--target-crop keep-aspect trains whole targets of different sizes, one per device (the "
                             f"official stage 3: batch 1 per GPU), but --batch-size {c.batch_size} puts "
                             f"{c.batch_size / processes:g} on each of {processes} device(s). Pass --batch-size "
                             f"{processes} (raise --grad-accum for a larger batch) or --target-crop square.")

    def _check_size_multiple(self, pipe) -> None:
        """Keep-aspect sides must map to latents the UNet can halve at each of its down-sampling blocks."""
        c = self.cfg
        need = int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.down_block_types) - 1)
        if c.target_crop == "keep-aspect" and c.size_multiple % need:
            raise ValueError(f"--size-multiple {c.size_multiple}: this pipeline needs target sides that are multiples "
                             f"of {need} (the VAE's factor times the UNet's down-sampling); pass a multiple of {need} "
                             f"(the official {SIZE_MULTIPLE} for SDXL).")

    def _select_trainable(self, unet, encoder) -> None:
        """Stage 1: final layer, its norm, reference tokens, projector, to_k_ip/to_v_ip; later stages also the whole
        MLLM and the UNet LoRA. The projector and reference tokens are new modules and train by default."""
        c = self.cfg
        for name, param in unet.named_parameters():
            param.requires_grad_(".to_k_ip." in name or ".to_v_ip." in name
                                 or (c.r > 0 and ".lora_" in name and ".easyref." in name))
        for name, param in encoder.named_parameters():
            param.requires_grad_(not name.startswith("mllm.") or c.train_mllm)
        mllm = encoder.mllm
        head, embed = getattr(mllm, "lm_head", None), mllm.get_input_embeddings()
        if head is not None and head.weight is not embed.weight:
            head.requires_grad_(False)  # never used to encode: a trainable lm_head would get no gradient

    def collate(self, items: list[dict]) -> dict:
        """Stack the examples and build the MLLM's inputs (in the loader's workers)."""
        batch = collate_items(items)
        max_length = self.cfg.max_seq_len or None
        batch["mllm"] = self.encoder.prepare(batch.pop("references"), batch["captions"], max_length=max_length)
        return batch

    # -------------------------------------------------------------------------------------------- training

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → scaled VAE latents (a sample of the posterior; the VAE in fp32). Random draws
        come from ``generator`` (a CPU one) or the global CPU RNG, which checkpoints save."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.accelerator.device, vae.dtype)).latent_dist
        draw = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)  # CPU RNG: resumable, any device
        return ((dist.mean + dist.std * draw) * vae.config.scaling_factor).float()

    def losses(self, batch: dict, noise: Optional[torch.Tensor] = None, timesteps: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B,) MSE of the prediction against the scheduler's target; noise and timesteps drawn unless given."""
        device = self.accelerator.device
        latents = self.latents(batch["pixels"], generator)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator).to(device)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                      generator=generator)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = self.model(noisy, timesteps, batch["captions"], batch["mllm"], batch["time_ids"].to(device)).float()
        target = denoising_target(self.noise_scheduler, latents, noise, timesteps).float()
        return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))

    def compute_loss(self, batch) -> torch.Tensor:
        return self.losses(batch).mean()

    @torch.no_grad()
    def eval_loss(self) -> float:
        """The loss on a fixed batch (the first :data:`EVAL_ITEMS` examples without drops, :data:`EVAL_TIMESTEPS`
        evenly spaced timesteps each, latent samples and noise from the seed): the same before and after training.
        Examples of different sizes (keep-aspect targets) run apart, and no forward takes more examples than a
        training micro-batch puts on a device: what fits training fits its evaluation (all 12 examples of a
        100-reference stage-3 run in one forward took 12 times a step's reference memory). The global RNG is left as
        it was, so evaluating never changes training."""
        c, n = self.cfg, min(EVAL_ITEMS, len(self.eval_set))
        items = [self.eval_set[(i, c.seed + i)] for i in range(n)] * EVAL_TIMESTEPS
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.tensor([int(steps * (k + 0.5) / EVAL_TIMESTEPS) for k in range(EVAL_TIMESTEPS)
                                  for _ in range(n)])
        generator = torch.Generator().manual_seed(c.seed + 1)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            by_size.setdefault(tuple(item["pixels"].shape), []).append(i)
        per_device = max(1, c.batch_size // self.accelerator.num_processes)
        chunks = [index[k:k + per_device] for index in by_size.values() for k in range(0, len(index), per_device)]
        self.model.eval()
        try:
            with self.accelerator.autocast():
                losses = [self.losses(self.collate([items[i] for i in index]), timesteps=timesteps[index],
                                      generator=generator) for index in chunks]
            return torch.cat(losses).mean().item()
        finally:
            self.model.train()

    def before_training(self, state: dict) -> None:
        if "eval_loss_before" not in state:
            state["eval_loss_before"] = self.eval_loss()

    # ---------------------------------------------------------------------------------------------- outputs
    def evaluate(self, state: dict) -> dict:
        c = self.cfg
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"stage": c.stage, "base_model": c.model, "mllm": c.mllm, "init": c.init, "steps": state["step"],
                "resolution": self.resolution, "target_crop": c.target_crop, "num_tokens": c.num_tokens,
                "lora_rank": c.r,
                "train_mllm": c.train_mllm, "data": self.data_summary, "examples": len(self.train_set),
                "eval_loss_before": state["eval_loss_before"], "eval_loss_after": self.eval_loss(),
                "trainable_params": trainable,
                "prediction_type": self.noise_scheduler.config.prediction_type}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Our layout of what this stage trained (the MLLM's weights only when it trained), in fp32 on the CPU."""
        from .files import easyref_state_dict

        state = easyref_state_dict(self.pipe.unet, self.encoder, include_mllm=self.cfg.train_mllm)
        return {key: value.detach().float() for key, value in state.items()}

    def write_outputs(self, results: dict, state: dict) -> None:
        from .files import save_easyref_file

        ours = self.adapter_state()
        meta = {"format": "visadapt-easyref", "stage": str(self.cfg.stage), "num_tokens": str(self.cfg.num_tokens),
                "lora_rank": str(self.cfg.r)}
        files = {"ours": ADAPTER_FILE, "official": OFFICIAL_FILE}
        for kind, official in (("ours", False), ("official", True)):
            save_easyref_file(ours, self.out / files[kind], official=official, metadata=meta)
        results["adapter_files"] = files

    def report(self, results: dict) -> str:
        return (f"# EasyRef stage {results['stage']}\n\n"
                f"- base `{results['base_model']}`, MLLM `{results['mllm']}`, init `{results['init']}`\n"
                f"- {results['examples']} examples from {results['data']['groups']} groups at "
                f"{results['resolution']} px, {results['steps']} steps, {results['trainable_params']:,} trainable "
                f"parameters (LoRA rank {results['lora_rank']}, "
                f"MLLM {'trained' if results['train_mllm'] else 'frozen'})"
                f"\n- loss on the fixed evaluation batch: {results['eval_loss_before']:.4f} → "
                f"{results['eval_loss_after']:.4f}\n- files: {', '.join(results['adapter_files'].values())}\n\n"
                "![training curve](training_curve.png)\n")

    def curve_title(self) -> str:
        return f"EasyRef stage {self.cfg.stage}"


def train_easyref(config: EasyRefTrainConfig, out_dir: Union[str, Path], resume: bool = False,
                  callbacks: Sequence[StepCallback] = (), pipe=None, mllm: Optional[tuple[Any, Any]] = None) -> dict:
    """Train one EasyRef stage and write its run folder; returns what ``results.json`` holds. ``pipe`` (an SDXL
    pipeline) and ``mllm`` ((Qwen2-VL model, processor)) replace ``config.model`` / ``config.mllm``; they are
    modified in place (EasyRef installed, weights trained)."""
    return EasyRefTrainer(config, out_dir, resume=resume, callbacks=callbacks, pipe=pipe, mllm=mllm).run()
