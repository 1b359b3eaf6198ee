"""Seconds per image and peak memory of EasyRef sampling against plain SDXL, for 1, 4 and 16 reference images.

EasyRef's cost has two parts, timed apart:

* ``encode``: the multimodal LLM reads the references and the prompt (the conditional tokens) and one black image
  with an empty prompt (the unconditional tokens); it grows with the number of references (each adds its visual
  tokens to the MLLM's sequence);
* ``diffusion``: the SDXL sampling loop with the 64 EasyRef tokens in every cross-attention layer (decoupled
  attention) and the rank-128 UNet LoRA, then the VAE decode; it must not depend on the number of references,
  because the UNet always sees 64 tokens.

``sdxl`` is the same pipeline without EasyRef. The EasyRef tokens reach the UNet the way diffusers feeds IP-Adapter
tokens (``ip_adapter_image_embeds``), so both modes run the same stock ``StableDiffusionXLPipeline`` call. Each
(mode, references) runs in its own child process: build, one untimed call, then ``--repeats`` timed calls (median).
``peak MiB`` is the peak during the timed calls minus the memory after loading (CUDA: ``max_memory_allocated``; CPU:
peak RSS). Ratios are against ``sdxl``, measured in this invocation.

    python benchmarks/easyref.py                                     # CPU: small random SDXL + Qwen2-VL layouts
    python benchmarks/easyref.py --device cuda --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --mllm Qwen/Qwen2-VL-2B-Instruct --size 1024 --steps 30 --dtype bf16    # the released setting
    python benchmarks/easyref.py --model tiny --refs 1,4 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from visadapt.utils.measure import MiB, PeakMemory, answer_worker, device_name, run_child

RESULT_MARKER = "EASYREF_BENCH_RESULT "
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "a photo of the subject in a garden"


def small_sdxl():
    """SDXL's UNet layout (3 levels, no attention in the first, 2 and more transformer layers deeper, text-time
    conditioning) with narrow random weights; the tiny pipeline's text encoders and VAE."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from visadapt.diffusion.tiny import tiny_pipeline

    tiny = tiny_pipeline("sdxl")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        norm_num_groups=32)
    pipe = StableDiffusionXLPipeline(**{**tiny.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(args: argparse.Namespace):
    """(SDXL pipeline, (Qwen2-VL, processor)) for ``--model`` / ``--mllm``."""
    from visadapt.diffusion.easyref.tiny_mllm import tiny_qwen2vl
    from visadapt.diffusion.tiny import tiny_pipeline

    if args.model in ("tiny", "small"):
        pipe = tiny_pipeline("sdxl") if args.model == "tiny" else small_sdxl()
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=DTYPES[args.dtype])
        pipe.set_progress_bar_config(disable=True)
    if args.mllm in ("tiny", "small"):
        mllm = tiny_qwen2vl(**({} if args.mllm == "tiny" else {"hidden_size": 64, "layers": 4, "image_size": 112}))
    else:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        mllm = (Qwen2VLForConditionalGeneration.from_pretrained(args.mllm, dtype=DTYPES[args.dtype]),
                AutoProcessor.from_pretrained(args.mllm))
    return to_device(pipe, args), mllm


def to_device(module, args: argparse.Namespace):
    """Onto ``--device``; cast only when ``--dtype`` is not fp32 (diffusers warns on a no-op cast)."""
    module = module.to(args.device)
    return module if args.dtype == "fp32" else module.to(dtype=DTYPES[args.dtype])


def references(n: int, size: int) -> list:
    """``n`` distinct random images (the content does not change the cost; the size does)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(args: argparse.Namespace, mode: str, n: int) -> dict[str, Any]:
    from visadapt.diffusion.easyref.data import black_image
    from visadapt.diffusion.easyref.encoder import EasyRefEncoder
    from visadapt.diffusion.easyref.unet import install_easyref

    device = torch.device(args.device)
    pipe, (mllm, processor) = build(args)
    call: dict[str, Any] = dict(prompt=PROMPT, height=args.size, width=args.size, guidance_scale=5.0)
    encoder = None
    if mode == "easyref":
        encoder = to_device(EasyRefEncoder(mllm, processor, pipe.unet.config.cross_attention_dim), args)
        install_easyref(pipe.unet, r=args.rank)
        to_device(pipe.unet, args)
    refs = references(n, args.ref_size)

    @torch.no_grad()
    def encode() -> Any:
        cond = encoder.encode([refs], [PROMPT])
        uncond = encoder.encode([[black_image()]], [""])
        return [torch.cat([uncond, cond])[:, None]]  # (2, 1, 64, D): negative first, as the pipeline splits it

    def timed(fn) -> tuple[float, Any]:
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        return time.perf_counter() - start, out

    def sample(steps: int) -> tuple[float, float]:
        encode_s, embeds = timed(encode) if encoder is not None else (0.0, None)
        extra = {"ip_adapter_image_embeds": embeds} if embeds is not None else {}
        diffusion_s, _ = timed(lambda: pipe(num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0),
                                            **call, **extra))
        return encode_s, diffusion_s

    sample(1)  # warm-up: allocator, first-call caches
    memory = PeakMemory(device)
    runs = [sample(args.steps) for _ in range(args.repeats)]
    encode_s, diffusion_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    return {"mode": mode, "refs": n, "encode_s": encode_s, "diffusion_s": diffusion_s,
            "seconds": statistics.median(r[0] + r[1] for r in runs),
            "peak_mib": (memory.peak() - memory.baseline) / MiB, "peak_reset": memory.reset}


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'mode':<8} {'refs':>4} {'encode s':>9} {'diffusion s':>12} {'s/image':>8} {'diffusion ratio':>16} "
              f"{'time ratio':>11} {'peak MiB':>9} {'mem ratio':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        refs = "-" if row["mode"] == "sdxl" else str(row["refs"])
        print(f"{row['mode']:<8} {refs:>4} {row['encode_s']:>9.3f} {row['diffusion_s']:>12.3f} {row['seconds']:>8.3f} "
              f"{row['diffusion_ratio']:>16.2f} {row['time_ratio']:>11.2f} {row['peak_mib']:>9.1f} "
              f"{row['mem_ratio']:>10.2f}")
    print("\nRatios against plain SDXL (same size, steps and dtype) in this invocation; 'diffusion' is the sampling "
          "loop and the VAE decode, 'encode' the MLLM (conditional + unconditional).")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="small", help="'tiny', 'small' (random SDXL layout) or an SDXL hub id / folder")
    p.add_argument("--mllm", default=None, help="'tiny', 'small' (random Qwen2-VL) or a Qwen2-VL hub id / folder "
                                                "(default: small with a random SDXL, else Qwen/Qwen2-VL-2B-Instruct)")
    p.add_argument("--size", type=int, default=None, help="image side (default 1024 on CUDA, 128 CPU, 32 tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30 on CUDA, 10 on CPU)")
    p.add_argument("--refs", default="1,4,16", help="comma-separated reference counts")
    p.add_argument("--ref-size", type=int, default=336, help="reference image side in pixels")
    p.add_argument("--rank", type=int, default=128, help="rank of the EasyRef UNet LoRA")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration; the median is reported")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    random_unet = args.model in ("tiny", "small")
    args.mllm = args.mllm or (args.model if random_unet else "Qwen/Qwen2-VL-2B-Instruct")
    args.size = args.size or (32 if args.model == "tiny" else 1024 if cuda else 128)
    args.steps = args.steps or (30 if cuda else 10)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.counts = [int(c) for c in args.refs.split(",") if c.strip()]
    return args


def main() -> None:
    args = parse_args()
    if answer_worker(args.worker, RESULT_MARKER, lambda mode, n: run_worker(args, mode, int(n))):
        return
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"device: {device_name(args.device)} | torch {torch.__version__} | model {args.model} | mllm {args.mllm} | "
          f"{args.size}px | {args.steps} steps | {args.dtype} | refs {args.ref_size}px | LoRA r{args.rank} | "
          f"median of {args.repeats}", flush=True)
    base = run_child(__file__, RESULT_MARKER, "sdxl", "0")
    rows = [base] + [run_child(__file__, RESULT_MARKER, "easyref", str(n)) for n in args.counts]
    for row in rows:
        row["diffusion_ratio"] = row["diffusion_s"] / base["diffusion_s"]
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["mem_ratio"] = row["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"command": shlex.join(sys.orig_argv), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
