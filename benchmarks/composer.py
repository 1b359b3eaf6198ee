"""Time and peak memory of LoRA-Composer sampling against plain multi-adapter sampling, for 1–4 concepts.

Modes, all on the same pipeline and the same n LoRA files (random, rank 4, on the UNet's and text encoder's
attention projections):

* ``set_adapters``: diffusers' multi-LoRA sampling, ``pipe.set_adapters(names, [1.0] * n)``: every LoRA everywhere;
* ``inject``: LoRA-Composer with region injection and concept isolation only (no latent optimisation, no re-init);
* ``compose``: LoRA-Composer with every part on (the official defaults: refinement on steps 0..25, re-init).

Each (mode, n) runs in its own child process: build the pipeline, load the LoRAs, one untimed 1-step call, then
``--repeats`` timed calls of ``--steps`` steps (median reported). ``peak MiB`` is the peak during the timed calls
minus the memory after loading (CUDA: ``max_memory_allocated``; CPU: peak RSS). Ratios are against ``set_adapters``
with the same n, measured in this invocation.

    python benchmarks/composer.py                                  # CPU: random SD-1.5-layout UNet, 256 px
    python benchmarks/composer.py --device cuda --model stable-diffusion-v1-5/stable-diffusion-v1-5 --size 512 \\
        --steps 50 --dtype fp16                                    # the paper's setting (needs the weights locally)
    python benchmarks/composer.py --model tiny --steps 2 --concepts 1,2   # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from visadapt.utils.measure import MiB, PeakMemory, answer_worker, device_name, run_child

RESULT_MARKER = "COMPOSER_BENCH_RESULT "
MODES = ("set_adapters", "inject", "compose")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def small_sd_pipeline():
    """SD-1.5's UNet layout (4 levels, cross-attention in the first three, 2 layers per block; VAE factor 8) with
    narrow random weights, so that the H/32 loss layers and their cost relative to the UNet are as in SD."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from visadapt.diffusion.tiny import tiny_pipeline
    from visadapt.pipelines import LoRAComposerPipeline

    tiny = tiny_pipeline("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32)
    pipe = LoRAComposerPipeline(**{**tiny.components, "unet": unet, "vae": vae})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(args: argparse.Namespace):
    from visadapt.diffusion.tiny import tiny_pipeline
    from visadapt.pipelines import LoRAComposerPipeline, LoRAComposerXLPipeline

    if args.model == "tiny":
        pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    elif args.model == "small":
        pipe = small_sd_pipeline()
    else:
        from diffusers import DiffusionPipeline

        base = DiffusionPipeline.from_pretrained(args.model, torch_dtype=DTYPES[args.dtype],
                                                 local_files_only=Path(args.model).exists())
        cls = LoRAComposerXLPipeline if hasattr(base, "text_encoder_2") else LoRAComposerPipeline
        pipe = cls.from_pipe(base)
        pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(args.device)
    return pipe if args.dtype == "fp32" else pipe.to(dtype=DTYPES[args.dtype])


def concepts_for(files: list[Path]):
    from visadapt.diffusion import Concept

    n = len(files)
    return [Concept(lora=f, prompt=f"a photo of a thing{i}", box=[i / n, 0.1, (i + 1) / n, 0.9], tokens=[f"thing{i}"])
            for i, f in enumerate(files)]


def run_worker(args: argparse.Namespace, mode: str, n: int) -> dict[str, Any]:
    from visadapt.diffusion import ComposerConfig
    from visadapt.diffusion.tiny import save_random_lora

    device = torch.device(args.device)
    pipe = build_pipeline(args)
    folder = Path(tempfile.mkdtemp(prefix="composer-bench-"))
    files = [save_random_lora(pipe, folder / f"c{i}.safetensors", seed=i + 1) for i in range(n)]
    concepts = concepts_for(files)
    call: dict[str, Any] = dict(prompt="a photo of things side by side", height=args.size, width=args.size,
                                output_type="latent")
    if mode == "set_adapters":
        names = pipe.load_concepts(concepts)
        pipe.set_adapters(names, [1.0] * n)
    else:
        call["concepts"] = concepts
        call["composer"] = ComposerConfig() if mode == "compose" else ComposerConfig(
            latent_optimization=False, latent_reinit=False)

    def sample(steps: int) -> float:
        generator = torch.Generator(device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        pipe(num_inference_steps=steps, generator=generator, **call)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    sample(1)  # warm-up: LoRA loading, allocator, first-call caches
    memory = PeakMemory(device)
    seconds = statistics.median(sample(args.steps) for _ in range(args.repeats))
    refined = len(getattr(pipe, "composition_log", {}).get("losses", [])) if mode == "compose" else 0
    return {"mode": mode, "concepts": n, "seconds": seconds, "peak_mib": (memory.peak() - memory.baseline) / MiB,
            "refined_steps": refined, "peak_reset": memory.reset}


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'concepts':>8} {'mode':<13} {'seconds':>9} {'time ratio':>11} {'peak MiB':>10} {'mem ratio':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['concepts']:>8} {row['mode']:<13} {row['seconds']:>9.2f} {row['time_ratio']:>11.2f} "
              f"{row['peak_mib']:>10.1f} {row['mem_ratio']:>10.2f}"
              + (f"   ({row['refined_steps']} refined steps)" if row["mode"] == "compose" else ""))
    print("\nRatios: each mode against set_adapters with the same number of concepts, in this invocation.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="small", help="'tiny', 'small' (random SD-1.5 layout) or a hub id / folder")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 CUDA, 256 CPU, 32 tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50 on CUDA, 10 on CPU)")
    p.add_argument("--concepts", default="1,2,3,4", help="comma-separated concept counts")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration; the median is reported")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.size = args.size or (32 if args.model == "tiny" else 512 if cuda else 256)
    args.steps = args.steps or (50 if cuda else 10)
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.counts = [int(c) for c in args.concepts.split(",") if c.strip()]
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.mode_list) - set(MODES) or "set_adapters" not in args.mode_list:
        p.error(f"--modes must include set_adapters and be a subset of {','.join(MODES)}")
    return args


def main() -> None:
    args = parse_args()
    if answer_worker(args.worker, RESULT_MARKER, lambda mode, n: run_worker(args, mode, int(n))):
        return
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"device: {device_name(args.device)} | torch {torch.__version__} | model {args.model} | {args.size}px | "
          f"{args.steps} steps | {args.dtype} | median of {args.repeats}", flush=True)
    rows = []
    for n in args.counts:
        group = [run_child(__file__, RESULT_MARKER, mode, str(n)) for mode in args.mode_list]
        reference = next(r for r in group if r["mode"] == "set_adapters")
        for row in group:
            row["time_ratio"] = row["seconds"] / reference["seconds"]
            row["mem_ratio"] = row["peak_mib"] / reference["peak_mib"] if reference["peak_mib"] > 0 else float("nan")
        rows += group
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"command": shlex.join(sys.orig_argv), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
