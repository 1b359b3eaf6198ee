"""Pretrain the embedded world model: a tiny Stable Diffusion pipeline that draws the shapes world's canvases.

    OMP_NUM_THREADS=1 python pretrain/world_model.py --out visadapt/utils/worlds/world_model

Each stage has a step count and a time budget (``--vae-minutes`` 5, ``--unet-minutes`` 25) and its learning rate
follows a cosine over whichever runs out first, so the run ends on time however busy the machine is; ``--init
FOLDER`` continues from a world model's VAE and UNet, ``--save-every`` writes the UNet's EMA during training. The
shipped weights came from two runs (seed 0, one torch thread, on two CPU cores shared with other jobs):

1. this command with the defaults: 355 VAE steps and 2152 UNet steps (batch 16) in 32.6 minutes (shape 22.5 %,
   colour 47.5 % in the final check: the VAE's reconstructions had lost much of the colour);
2. ``--init visadapt/utils/worlds/world_model --vae-lr 5e-4 --vae-minutes 12 --vae-steps 2000 --unet-minutes 80
   --unet-steps 20000 --pool 8192 --save-every 10 --eval-seeds 2 --out <folder>`` (then copied here): 1663 VAE
   steps (now with the foreground weight; reconstruction MSE 0.0034 on fresh canvases) and 10151 UNet steps in 94.5
   minutes. The final check printed shape 81.9 % (chance 10 %; 86.9 % on renders of the same prompts) and colour
   98.8 % (chance 12.5 %; 100 % on renders) over 160 samples.

The pipeline is diffusers' ``StableDiffusionPipeline`` layout, small enough to ship (a few MB of fp16 safetensors):

* text encoder: the demo CLIP's text tower (:data:`visadapt.utils.worlds.models.DEMO_CLIP_DIR`) converted to a
  transformers ``CLIPTextModel`` (same weights, same outputs) and kept frozen; its tokenizer is CLIP's BPE with a
  context of 20 tokens, padded with token 0 as open_clip pads;
* VAE: an ``AutoencoderKL`` with factor 4 (64×64 canvases → 16×16×4 latents), trained here first;
* UNet: a ``UNet2DConditionModel`` with cross-attention at 16×16 and 8×8, so a box of half the canvas covers whole
  cells at both levels; trained second, on the VAE's latents, with the noise-prediction loss;
* scheduler: DPM-Solver with SD-1.x's noise schedule (as the tiny random pipelines).

Training images are canvases of :func:`visadapt.utils.worlds.shapes.sample_canvas` (one or two seen shapes, solid
colours, free positions) captioned "a red star" / "a red star and a blue circle". The held-out shapes never appear:
they are the concepts a user teaches the model with ``visadapt concept train``. At the end the script reloads the
folder and prints how often the demo CLIP recognises the shape and the colour of samples for "a <colour> <shape>"
(:func:`visadapt.utils.worlds.judge.recognition`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from visadapt.utils import replace_dir
from visadapt.utils.worlds import shapes as world
from visadapt.utils.worlds.judge import recognition
from visadapt.utils.worlds.models import DEMO_CLIP_DIR, WORLD_MODEL_DIR, load_world_model

CONTEXT_LENGTH = 20  # the demo CLIP's positions
LATENT_SIZE = world.CANVAS_SIZE // 4


# -- components ------------------------------------------------------------------------------------------------

def tokenizer():
    """CLIP's BPE tokenizer (built offline from open_clip's merges), 20 tokens, padded with id 0 like open_clip."""
    from visadapt.diffusion.tiny import clip_tokenizer

    tok = clip_tokenizer(pad_token="!")  # "!" is token 0, open_clip's padding
    tok.model_max_length = CONTEXT_LENGTH
    return tok


def text_encoder_from_demo_clip(clip_dir: Path = DEMO_CLIP_DIR):
    """The demo CLIP's text tower as a transformers ``CLIPTextModel`` (fp32; ``last_hidden_state`` equals open_clip's
    ``ln_final`` output token by token)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    state = {k: v.float() for k, v in load_file(str(Path(clip_dir) / "open_clip_model.safetensors")).items()}
    width, tok = cfg["width"], tokenizer()
    config = CLIPTextConfig(vocab_size=cfg["vocab_size"], hidden_size=width, intermediate_size=4 * width,
                            num_attention_heads=cfg["heads"], num_hidden_layers=cfg["layers"],
                            max_position_embeddings=cfg["context_length"], hidden_act="gelu",
                            projection_dim=width, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    model = CLIPTextModel(config)
    new = {"embeddings.token_embedding.weight": state["token_embedding.weight"],
           "embeddings.position_embedding.weight": state["positional_embedding"],
           "final_layer_norm.weight": state["ln_final.weight"],
           "final_layer_norm.bias": state["ln_final.bias"]}
    for i in range(cfg["layers"]):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for part, (w, b) in zip("qkv", zip(state[src + "attn.in_proj_weight"].chunk(3),
                                           state[src + "attn.in_proj_bias"].chunk(3))):
            new[f"{dst}self_attn.{part}_proj.weight"], new[f"{dst}self_attn.{part}_proj.bias"] = w, b
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            new[f"{dst}{b}.weight"], new[f"{dst}{b}.bias"] = state[f"{src}{a}.weight"], state[f"{src}{a}.bias"]
    tower = getattr(model, "text_model", model)  # transformers 4 nests the tower under ``text_model``; 5 does not
    missing, unexpected = tower.load_state_dict(new, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"demo CLIP conversion: missing {missing}, unexpected {unexpected}")
    return model.eval().requires_grad_(False)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=16,
                         sample_size=world.CANVAS_SIZE, mid_block_add_attention=False)


def build_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=16)


def initial_models(init: Optional[Path], cross_attention_dim: int):
    """(vae, unet): random (``init`` None) or, to continue a pretraining, the fp32 weights of a world model folder."""
    if init is None:
        return build_vae(), build_unet(cross_attention_dim)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not (Path(init) / "model_index.json").is_file():
        raise FileNotFoundError(f"--init {init}: not a world model folder (no model_index.json).")
    vae = AutoencoderKL.from_pretrained(str(init), subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(str(init), subfolder="unet", torch_dtype=torch.float32)
    if unet.config.cross_attention_dim != cross_attention_dim:
        raise ValueError(f"--init {init}: its UNet attends to width {unet.config.cross_attention_dim}, the demo CLIP's "
                         f"text tower gives {cross_attention_dim}.")
    return vae, unet


def build_scheduler():
    from visadapt.diffusion.tiny import _scheduler

    return _scheduler()


# -- data ------------------------------------------------------------------------------------------------------

def canvases(rng: np.random.Generator, n: int, p_two: float = 0.5) -> tuple[torch.Tensor, list[list]]:
    """``n`` canvases: ``(n, 3, 64, 64)`` in [-1, 1] and each canvas's objects."""
    objects = [world.sample_canvas(rng, 2 if rng.random() < p_two else 1) for _ in range(n)]
    images = np.stack([world.render_canvas_array(o, rng) for o in objects])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, objects


def foreground(images: torch.Tensor, threshold: float = 40 / 127.5) -> torch.Tensor:
    """``(N, 1, H, W)`` 1.0 where a pixel of ``images`` (``(N, 3, H, W)`` in [-1, 1]) stands out from the median of its
    image's border (the background), else 0.0."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=-1)
    background = border.median(dim=-1).values[:, :, None, None]
    return ((images - background).abs().amax(dim=1, keepdim=True) > threshold).float()


def log(message: str, start: float) -> None:
    print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)


# -- training --------------------------------------------------------------------------------------------------

def budgeted_steps(name: str, steps: int, minutes: Optional[float], start: float) -> Iterator[tuple[int, float]]:
    """``(step, done)`` until ``steps`` steps or ``minutes`` have passed, whichever comes first; ``done`` in [0, 1) is
    the larger of the step fraction and the time fraction, so on a slow (shared) machine a stage still ends its
    cosine decay within its time budget."""
    began = time.perf_counter()
    for step in range(steps):
        done = max(step / steps, (time.perf_counter() - began) / (60 * minutes) if minutes else 0.0)
        if done >= 1:
            log(f"{name}: time budget of {minutes} min reached at step {step}", start)
            return
        yield step, done


def cosine_lr(opt: torch.optim.Optimizer, lr: float, done: float, warmup: Optional[float] = None) -> None:
    """Set ``opt``'s learning rate to ``lr`` times ``warmup`` (a warm-up factor, while warming up) or else times the
    cosine decay at fraction ``done``."""
    for group in opt.param_groups:
        group["lr"] = lr * (warmup if warmup is not None else 0.5 * (1 + math.cos(math.pi * done)))


def train_vae(vae, steps: int, batch_size: int, lr: float, rng: np.random.Generator, start: float,
              minutes: Optional[float] = None, kl_weight: float = 1e-4, foreground_weight: float = 5.0) -> None:
    """Reconstruction (squared error, ``foreground_weight`` times heavier on the shapes' pixels than on the noisy
    background, whose grain no latent can hold and which would otherwise dominate the loss) + a small KL term;
    random 32×32 crops first (4× cheaper; the VAE is convolutional), full canvases for the last fifth so the
    GroupNorm statistics match."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step, done in budgeted_steps("vae", steps, minutes, start):
        cosine_lr(opt, lr, done)
        images, _ = canvases(rng, batch_size)
        if done < 0.8:
            y, x = rng.integers(0, 33, size=2)
            images = images[:, :, y:y + 32, x:x + 32]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, images)
        weight = 1 + (foreground_weight - 1) * foreground(images)
        loss = (weight * (recon - images) ** 2).mean() + kl_weight * posterior.kl().mean() / posterior.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} mse {mse.item():.5f}", start)


@torch.no_grad()
def reconstruction_mse(vae, rng: np.random.Generator, n: int = 128) -> float:
    """Mean squared error (pixels in [-1, 1]) of the VAE's reconstruction of ``n`` fresh canvases (posterior mean)."""
    images, _ = canvases(rng, n)
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    return float(F.mse_loss(recon.clamp(-1, 1), images))


@torch.no_grad()
def latent_pool(vae, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[list]]:
    """Encode ``n`` fresh canvases once: latent means and stds ``(n, 4, 16, 16)`` (unscaled) and their objects."""
    means, stds, objects = [], [], []
    for chunk in range(0, n, 256):
        images, objs = canvases(rng, min(256, n - chunk))
        dist = vae.encode(images).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        objects += objs
    return torch.cat(means), torch.cat(stds), objects


@torch.no_grad()
def encode_text(text_encoder, tok, prompts: Sequence[str]) -> torch.Tensor:
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(unet, text_encoder, tok, pool: tuple, scale: float, steps: int, batch_size: int, lr: float,
               rng: np.random.Generator, start: float, minutes: Optional[float] = None, p_uncond: float = 0.1,
               snr_gamma: float = 5.0, ema_decay: float = 0.999, on_save: Optional[Callable] = None,
               save_minutes: float = 0.0):
    """Noise prediction (latents times ``scale``) with min-SNR-γ weighting and 10% empty captions (for
    classifier-free guidance); AdamW with a warm-up and a cosine decay over ``steps`` or ``minutes``, whichever ends
    first. Returns the EMA of the weights; ``on_save(ema)`` runs every ``save_minutes``."""
    from diffusers import DDPMScheduler

    means, stds, objects = pool
    noise_sched = DDPMScheduler.from_config(build_scheduler().config)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warmup, saved = 100, time.perf_counter()
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    unet.train()
    for step, done in budgeted_steps("unet", steps, minutes, start):
        cosine_lr(opt, lr, done, warmup=(step + 1) / warmup if step < warmup else None)
        idx = torch.from_numpy(rng.integers(0, len(means), batch_size))
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        prompts = ["" if rng.random() < p_uncond else world.canvas_caption(objects[i], rng) for i in idx.tolist()]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, encode_text(text_encoder, tok, prompts)).sample
        weight = snr[t].clamp(max=snr_gamma) / snr[t]
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}", start)
        if on_save is not None and time.perf_counter() - saved > 60 * save_minutes:
            on_save(ema)
            saved = time.perf_counter()
    return ema.eval()


def save(out: Path, unet, vae, text_encoder, tok) -> None:
    """Write a diffusers ``StableDiffusionPipeline`` folder, weights in fp16 safetensors."""
    from diffusers import StableDiffusionPipeline

    # Copies: the fp16 cast must not round the weights that go on training.
    pipe = StableDiffusionPipeline(vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(text_encoder), tokenizer=tok,
                                   unet=copy.deepcopy(unet), scheduler=build_scheduler(), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    with replace_dir(out) as stage:  # the whole folder at once: a reader never mixes two saves
        pipe.save_pretrained(stage, safe_serialization=True)
        write_slow_tokenizer(stage / "tokenizer")
        load_text_encoder_in_fp32(stage / "text_encoder")
        for part in ("unet", "vae"):  # a model continued with --init records its source folder: meaningless here
            config = json.loads((stage / part / "config.json").read_text())
            if config.pop("_name_or_path", None) is not None:
                (stage / part / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_text_encoder_in_fp32(folder: Path) -> None:
    """Record float32 as the text encoder's dtype. transformers 5 loads a model in the dtype its config names
    (``dtype="auto"``) while diffusers loads the UNet and VAE in float32, so a plain
    ``StableDiffusionPipeline.from_pretrained(folder)`` would mix fp16 and fp32 and fail; the fp16 weights are upcast
    on load instead."""
    config = json.loads((folder / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_slow_tokenizer(folder: Path) -> None:
    """Replace the 3.6 MB ``tokenizer.json`` by CLIP's classic ``vocab.json`` + ``merges.txt`` (1.4 MB), which
    ``CLIPTokenizer.from_pretrained`` reads in transformers 4 and 5 alike."""
    from visadapt.diffusion.tiny import _clip_bpe

    vocab, merges = _clip_bpe()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("backend", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer.json").unlink(missing_ok=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python pretrain/world_model.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WORLD_MODEL_DIR, help="output folder (a diffusers pipeline)")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-minutes", type=float, default=5.0, help="time budget of the VAE stage")
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-minutes", type=float, default=25.0,
                        help="time budget of the UNet stage (the machine is shared: steps per minute vary)")
    parser.add_argument("--pool", type=int, default=4096, help="canvases encoded once for the UNet stage")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="UNet learning rate")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this world model folder (its VAE and UNet) instead of random weights")
    parser.add_argument("--save-every", type=float, default=0.0,
                        help="minutes between saves of the UNet's EMA to --out during training (0: at the end only)")
    parser.add_argument("--eval-seeds", type=int, default=1, help="samples per (shape, colour) in the final check")
    # On the shared 2-core machine (load ~7) two threads that wait on each other ran a UNet forward 10-20x slower
    # than one thread.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)

    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / "model_index.json").is_file():
        parser.error(f"--out {args.out} holds files that are not a world model; it would be replaced. Choose a new "
                     "or empty folder.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    tok, text_encoder = tokenizer(), text_encoder_from_demo_clip()
    vae, unet = initial_models(args.init, text_encoder.config.hidden_size)
    if args.vae_steps > 0 and args.vae_minutes != 0:
        train_vae(vae, args.vae_steps, args.batch_size, args.vae_lr, rng, start, minutes=args.vae_minutes)
    vae.eval().requires_grad_(False)
    log(f"vae reconstruction mse {reconstruction_mse(vae, rng):.5f} (held-out canvases)", start)
    means, stds, objects = latent_pool(vae, args.pool, rng)
    scale = float(1 / means.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"latent pool {tuple(means.shape)}, scaling factor {scale:.4f}", start)
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters", start)

    def checkpoint(ema) -> None:
        save(args.out, ema, vae, text_encoder, tok)
        log(f"saved the EMA weights to {args.out}", start)

    unet = train_unet(unet, text_encoder, tok, (means, stds, objects), scale, args.unet_steps, args.batch_size, args.lr,
                      rng, start, minutes=args.unet_minutes,
                      on_save=checkpoint if args.save_every > 0 else None, save_minutes=args.save_every)
    save(args.out, unet, vae, text_encoder, tok)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6
    log(f"wrote {args.out} ({size:.2f} MB)", start)

    result = recognition(load_world_model(args.out), n_seeds=args.eval_seeds)
    log(json.dumps({k: v for k, v in result.items() if k != "images"}), start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
