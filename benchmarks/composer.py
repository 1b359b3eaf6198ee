"""Time, peak memory and UNet block calls of LoRA-Composer sampling against plain SD sampling, for 1–4 concepts.

Modes, all on the same pipeline and the same n LoRA files (random, rank 4, on the UNet's and text encoder's
attention projections):

* ``plain``: the pipeline with no LoRA loaded and no concepts (plain SD sampling): every ratio is against it;
* ``set_adapters``: diffusers' multi-LoRA sampling, ``pipe.set_adapters(names, [1.0] * n)``: every LoRA everywhere;
* ``inject``: LoRA-Composer with region injection and concept isolation only (no latent optimisation, no re-init);
* ``compose``: LoRA-Composer with every part on (official defaults: refinement on steps 0..25 with early stop,
  re-init) and the refinement's cost levers at their defaults (``ComposerConfig``);
* with ``--levers``, ``compose`` once per lever with that lever switched from its default, and ``compose_before``
  with every lever that keeps the result off (the refinement as it was before the levers):
  ``compose_no_exit`` (``refine_early_exit=False``), ``compose_no_reuse`` (``reuse_constants=False``),
  ``compose_bf16`` (``refine_autocast="bf16"``), ``compose_no_ckpt`` (``gradient_checkpointing=False``);
* ``compose_no_stop`` (only through ``--modes``): ``compose`` without the early stop, every step to 25 refined: the
  most the paper's setting can cost, whatever the loss does.

Each (mode, n) runs in its own child process: build the pipeline, load the LoRAs, one untimed 1-step call, then
``--repeats`` timed calls of ``--steps`` steps (median reported). ``peak MiB`` is the peak during the timed calls
minus the memory after loading (CUDA: ``max_memory_allocated``; CPU: peak RSS). ``fwd/step`` and ``bwd/step``:
UNet block calls (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) per sampling step, forward calls and backward
passes through a block (``visadapt.utils.measure.BlockCalls``): work a lever saves shows there even on noisy cores.
``Δloss`` is the largest relative difference of a compose row's refinement losses from ``compose``'s (same
seed): 0 for a lever that keeps the result. Ratios are against ``plain`` (and ``set_adapters``) with the same
settings, measured in this invocation.

    python benchmarks/composer.py --preset paper --levers          # the paper's setting: 3 concepts, 50 steps
                                                                   # (CPU: random SD-1.5-layout UNet at 256 px)
    python benchmarks/composer.py                                  # CPU: 1-4 concepts, 10 steps, 256 px
    python benchmarks/composer.py --device cuda --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --preset paper --dtype fp16                                # real SD-1.5 at 512 px (needs the weights locally)
    python benchmarks/composer.py --model tiny --steps 2 --concepts 1,2   # smoke run, well under a minute
    python benchmarks/composer.py --preset paper --interleave --repeats 2 \\
        --modes plain,set_adapters,inject,compose,compose_no_stop         # the goal's ratios, robust to load drift

``--interleave`` runs the modes in one process, round-robin (see :func:`run_interleaved`): on shared cores whose
load drifts over minutes, separate processes measured one after another can differ by ±25 % for the same work.
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
from typing import Any, Optional

import torch

from visadapt.utils.measure import BlockCalls, MiB, PeakMemory, answer_worker, device_name, run_child

RESULT_MARKER = "COMPOSER_BENCH_RESULT "
# mode → ComposerConfig arguments (None: no composition)
MODES: dict[str, Optional[dict[str, Any]]] = {
    "plain": None,
    "set_adapters": None,
    "inject": dict(latent_optimization=False, latent_reinit=False),
    "compose": {},
}
LEVER_MODES: dict[str, dict[str, Any]] = {
    "compose_before": dict(refine_early_exit=False, reuse_constants=False),
    "compose_no_exit": dict(refine_early_exit=False),
    "compose_no_reuse": dict(reuse_constants=False),
    "compose_bf16": dict(refine_autocast="bf16"),
    "compose_no_ckpt": dict(gradient_checkpointing=False),
}
# Not a lever: the refinement on every step to 25 (no early stop), the upper bound of the paper setting's cost.
EXTRA_MODES: dict[str, dict[str, Any]] = {"compose_no_stop": dict(early_stop_from=10 ** 9)}
ALL_MODES = {**MODES, **LEVER_MODES, **EXTRA_MODES}
PRESETS = {"paper": dict(steps=50, concepts="3")}  # LoRA-Composer's setting; refinement to step 25, early stop
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def small_sd_pipeline():
    """SD-1.5's UNet layout (4 levels, cross-attention in the first three, 2 layers per block; VAE factor 8) with
    narrow random weights, so that the H/32 loss layers and their cost relative to the UNet are as in SD."""
    from diffusers import AutoencoderKL

    from visadapt.diffusion.tiny import sd15_layout_unet, tiny_pipeline
    from visadapt.pipelines import LoRAComposerPipeline

    tiny = tiny_pipeline("sd")
    unet = sd15_layout_unet((64, 128, 256, 256), layers_per_block=2)
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
    call: dict[str, Any] = dict(prompt="a photo of things side by side", height=args.size, width=args.size,
                                output_type="latent")
    if mode != "plain":
        folder = Path(tempfile.mkdtemp(prefix="composer-bench-"))
        files = [save_random_lora(pipe, folder / f"c{i}.safetensors", seed=i + 1) for i in range(n)]
        concepts = concepts_for(files)
        if mode == "set_adapters":
            names = pipe.load_concepts(concepts)
            pipe.set_adapters(names, [1.0] * n)
        else:
            call["concepts"] = concepts
            call["composer"] = ComposerConfig(**ALL_MODES[mode])

    def sample(steps: int) -> tuple[float, torch.Tensor]:
        generator = torch.Generator(device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = pipe(num_inference_steps=steps, generator=generator, **call).images
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    sample(1)  # warm-up: LoRA loading, allocator, first-call caches
    memory = PeakMemory(device)
    with BlockCalls.unet_blocks(pipe.unet) as calls:
        timed = [sample(args.steps) for _ in range(args.repeats)]
    forward, backward = calls.totals()
    per_step = args.steps * args.repeats
    losses = list(getattr(pipe, "composition_log", {}).get("losses", [])) if "concepts" in call else []
    return {"mode": mode, "concepts": 0 if mode == "plain" else n,
            "seconds": statistics.median(t for t, _ in timed),
            "peak_mib": (memory.peak() - memory.baseline) / MiB, "peak_reset": memory.reset,
            "refined_steps": len(losses), "losses": losses,
            "fwd_per_step": forward / per_step, "bwd_per_step": backward / per_step,
            "latent_abs_mean": float(timed[-1][1].float().abs().mean())}


def run_interleaved(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Every mode in this one process, round-robin over ``--repeats`` rounds, so that load drift on shared cores
    hits every mode alike; ratios are per round (against that round's plain call), then the median. Also the time
    spent in the refinement (re-init and refinement passes with their backward), per mode."""
    from visadapt.diffusion import ComposerConfig
    from visadapt.diffusion.tiny import save_random_lora

    device = torch.device(args.device)
    plain_pipe, adapters_pipe, compose_pipe = build_pipeline(args), build_pipeline(args), build_pipeline(args)
    folder = Path(tempfile.mkdtemp(prefix="composer-bench-"))
    files = [save_random_lora(compose_pipe, folder / f"c{i}.safetensors", seed=i + 1) for i in range(n)]
    concepts = concepts_for(files)
    adapters_pipe.set_adapters(adapters_pipe.load_concepts(concepts), [1.0] * n)
    refine_seconds = [0.0]
    for hook in ("_reinit", "_refine"):
        original = getattr(compose_pipe, hook)

        def timed(*a, _original=original, **kw):
            start = time.perf_counter()
            try:
                return _original(*a, **kw)
            finally:
                refine_seconds[0] += time.perf_counter() - start
        setattr(compose_pipe, hook, timed)

    def sample(mode: str, steps: int) -> dict[str, Any]:
        call: dict[str, Any] = dict(prompt="a photo of things side by side", height=args.size, width=args.size,
                                    output_type="latent", num_inference_steps=steps,
                                    generator=torch.Generator(device).manual_seed(0))
        pipe = plain_pipe if mode == "plain" else adapters_pipe if mode == "set_adapters" else compose_pipe
        if pipe is compose_pipe:
            call.update(concepts=concepts, composer=ComposerConfig(**ALL_MODES[mode]))
        refine_seconds[0] = 0.0
        with BlockCalls.unet_blocks(pipe.unet) as calls:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            out = pipe(**call).images
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        forward, backward = calls.totals()
        losses = list(pipe.composition_log.get("losses", [])) if pipe is compose_pipe else []
        return {"seconds": seconds, "refine_seconds": refine_seconds[0] if pipe is compose_pipe else 0.0,
                "fwd_per_step": forward / steps, "bwd_per_step": backward / steps, "losses": losses,
                "latent_abs_mean": float(out.float().abs().mean())}

    for mode in args.mode_list:
        sample(mode, 1)  # warm-up
    rounds = [{mode: sample(mode, args.steps) for mode in args.mode_list} for _ in range(args.repeats)]
    rows = []
    for mode in args.mode_list:
        runs = [r[mode] for r in rounds]
        row = {**runs[-1], "mode": mode, "concepts": 0 if mode == "plain" else n, "peak_mib": float("nan"),
               "seconds": statistics.median(r["seconds"] for r in runs),
               "refine_seconds": statistics.median(r["refine_seconds"] for r in runs),
               "refined_steps": len(runs[-1]["losses"]),
               "paired_vs_plain": statistics.median(r[mode]["seconds"] / r["plain"]["seconds"] for r in rounds)
               if "plain" in args.mode_list else float("nan"),
               "round_seconds": [r["seconds"] for r in runs]}
        rows.append(row)
    return {"rows": rows}


def loss_difference(row: dict[str, Any], reference: Optional[dict[str, Any]]) -> Optional[float]:
    """Largest relative difference of ``row``'s refinement losses from ``reference``'s, over the steps both refined."""
    if not reference or not row.get("losses") or not reference.get("losses"):
        return None
    pairs = list(zip(row["losses"], reference["losses"]))
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)


def add_ratios(group: list[dict[str, Any]]) -> None:
    """Ratios against the group's plain and set_adapters rows, Δloss against its compose row, in place."""
    by_mode = {row["mode"]: row for row in group}
    plain, adapters, compose = by_mode.get("plain"), by_mode.get("set_adapters"), by_mode.get("compose")
    for row in group:
        row["time_vs_plain"] = row["seconds"] / plain["seconds"] if plain else float("nan")
        row["time_vs_set_adapters"] = row["seconds"] / adapters["seconds"] if adapters else float("nan")
        row["mem_vs_set_adapters"] = (row["peak_mib"] / adapters["peak_mib"]
                                      if adapters and adapters["peak_mib"] > 0 else float("nan"))
        row["loss_diff"] = loss_difference(row, compose)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'concepts':>8} {'mode':<17} {'seconds':>9} {'× plain':>8} {'× set_ad':>9} {'fwd/step':>9} "
              f"{'bwd/step':>9} {'refined':>8} {'Δloss':>9} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        diff = row.get("loss_diff")
        print(f"{row['concepts']:>8} {row['mode']:<17} {row['seconds']:>9.2f} {row['time_vs_plain']:>8.2f} "
              f"{row['time_vs_set_adapters']:>9.2f} {row['fwd_per_step']:>9.2f} {row['bwd_per_step']:>9.2f} "
              f"{row['refined_steps']:>8} {'—' if diff is None else f'{diff:.1e}':>9} {row['peak_mib']:>9.1f}")
    print("\nRatios: each mode against plain SD sampling (and set_adapters) with the same settings, in this "
          "invocation.\nfwd/step, bwd/step: UNet block forward calls and backward passes per sampling step; Δloss: "
          "largest relative difference of the refinement losses from compose's.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="small", help="'tiny', 'small' (random SD-1.5 layout) or a hub id / folder")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="'paper': 3 concepts, 50 steps (refinement to step 25 with early stop, the defaults)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 CUDA, 256 CPU, 32 tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50 on CUDA, 10 on CPU)")
    p.add_argument("--concepts", default=None, help="comma-separated concept counts (default 1,2,3,4)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration; the median is reported")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(ALL_MODES)} (default "
                   f"{','.join(MODES)}, plus the lever modes with --levers)")
    p.add_argument("--levers", action="store_true", help="also run compose with each cost lever switched")
    p.add_argument("--interleave", action="store_true",
                   help="run every mode in one process, round-robin over --repeats rounds (robust to load drift); "
                        "one concept count; adds the refinement's own time")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    preset = PRESETS.get(args.preset, {})
    cuda = args.device.startswith("cuda")
    args.size = args.size or (32 if args.model == "tiny" else 512 if cuda else 256)
    args.steps = args.steps or preset.get("steps") or (50 if cuda else 10)
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.counts = [int(c) for c in (args.concepts or preset.get("concepts") or "1,2,3,4").split(",") if c.strip()]
    modes = args.modes.split(",") if args.modes else [*MODES, *(LEVER_MODES if args.levers else ())]
    args.mode_list = [m.strip() for m in modes if m.strip()]
    unknown = sorted(set(args.mode_list) - set(ALL_MODES))
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}: choose from {','.join(ALL_MODES)}")
    if args.worker is None and "plain" not in args.mode_list:
        p.error("--modes must include plain: every ratio is against it")
    return args


def main() -> None:
    args = parse_args()
    if answer_worker(args.worker, RESULT_MARKER, lambda mode, n: run_interleaved(args, int(n)) if mode == "interleave"
                     else run_worker(args, mode, int(n))):
        return
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"device: {device_name(args.device)} | torch {torch.__version__} | model {args.model} | {args.size}px | "
          f"{args.steps} steps | {args.dtype} | median of {args.repeats}", flush=True)
    if args.interleave:
        rows = run_child(__file__, RESULT_MARKER, "interleave", str(args.counts[0]))["rows"]
        add_ratios(rows)
        print()
        print_table(rows)
        print("\nInterleaved: one process, median over rounds; paired × plain (median of per-round ratios) and "
              "refine s (time in the re-init and refinement passes):")
        for row in rows:
            print(f"  {row['mode']:<17} paired × plain {row['paired_vs_plain']:.2f}   refine s "
                  f"{row['refine_seconds']:.2f}   rounds {', '.join(f'{t:.1f}' for t in row['round_seconds'])}")
    else:
        rows = run_separately(args)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"command": shlex.join(sys.orig_argv), "rows": rows}, indent=2) + "\n")
        tmp.replace(args.json)


def run_separately(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each (mode, concepts) in its own child process."""
    rows = []
    plain = run_child(__file__, RESULT_MARKER, "plain", "0") if "plain" in args.mode_list else None
    for n in args.counts:
        group = [run_child(__file__, RESULT_MARKER, mode, str(n)) for mode in args.mode_list if mode != "plain"]
        add_ratios([dict(plain), *group] if plain else group)
        rows += group
    if plain:
        add_ratios([plain])
        rows.insert(0, plain)
    print()
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
