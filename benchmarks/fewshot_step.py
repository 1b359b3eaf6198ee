"""Time and memory of one CLIP-LoRA few-shot training step for LoRA, Block-LoRA and Comp-LoRA, side by side.

What it measures (CLIP-LoRA's protocol, arXiv 2405.18541; Block-LoRA's cost claim, arXiv 2501.16720): the
ImageNet-sized training step of CLIP-LoRA, in which

1. the adapted text tower re-encodes all C prompts "a photo of a class {i}." *with gradients* (C = 1000 by default),
2. the adapted image tower encodes a batch of random 224×224 images (32 by default),
3. logits = 100 · cos(image, text), cross-entropy against random labels, backward (with a GradScaler under fp16),
4. an AdamW step (lr 2e-4, weight decay 1e-2) on the adapter weights.

The model is an open_clip CLIP of the chosen architecture (ViT-B-16 by default) with RANDOM weights: nothing is
downloaded, and time and memory do not depend on the weight values. Adapters come from
``peft.get_peft_model(clip, adapter_config(method))`` with the defaults of ``visadapt.fewshot.model``: rank 2, alpha 1,
dropout 0.25, on q, k and v of every attention block of both towers.

Every method runs in a fresh child process (the script re-invokes itself with ``--worker METHOD`` and reads back one
JSON line), so each starts from the same clean allocator and its peak memory is its own. Within a child: build the
model and adapter, make the inputs, record the baseline memory, run ``--warmup`` untimed steps and ``--steps`` timed
steps, report the median step time and the peak memory over all of them.

Reading the table: one row per method; ``trainable`` is its adapter's parameter count, ``step s`` the median wall time
of the timed steps (CUDA synchronised around each), ``time/lora`` its ratio, then the memory columns:
- ``step peak MiB``: peak minus the baseline taken after the model, adapter and inputs were built: the activations,
  gradients and optimizer state of the training step. This is the number the methods differ in; ``mem/lora`` is its
  ratio. On CUDA it comes from ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus
  ``torch.cuda.memory_allocated``; on CPU from the child's ``ru_maxrss`` minus its RSS (the peak-RSS mark is reset
  at the baseline through ``/proc/self/clear_refs``, so model building does not count).
- ``abs peak MiB``: the peak itself. On CUDA, all tensors allocated by the process (weights included; the figure to hold
  against the "fits a 24 GB GPU" claim of Block-LoRA, §3.5/§7.4, with ``--precision fp16``). On CPU, the child's
  whole resident set during the steps (weights, Python and the torch libraries included).

Ratios are computed only from numbers measured in the same invocation, against ``lora`` (or the first method when
``lora`` is not among ``--methods``).

Running it:

    python benchmarks/fewshot_step.py --device cuda                      # fp16 autocast, warmup 3, 10 timed steps
    python benchmarks/fewshot_step.py --device cuda --precision bf16 --text-checkpointing
    python benchmarks/fewshot_step.py --device cpu --classes 50 --steps 1 --warmup 1   # quick CPU check
    python benchmarks/fewshot_step.py --tiny --classes 20 --steps 2 --warmup 1         # smoke test, ~1 min on 2 cores

On CPU the full default (C = 1000, batch 32, fp32, warmup 1 + 3 timed steps, three methods) is impractical. Measured
on a shared 2-core AMD EPYC with torch 2.14 (lora, ViT-B/16, fp32): one step takes 14 s at C = 8, batch 4 (838 MiB step
peak) and 25 s at C = 64, batch 4 (2,193 MiB), i.e. about 0.2 s and 24 MiB per prompt, 3 s and 160 MiB per image.
Extrapolated to C = 1000, batch 32 that is about 5 minutes and 29 GiB per step (30 GiB absolute), so the whole run takes
about an hour and each worker needs more RAM than a 23 GiB machine has. ``--text-checkpointing`` cut the step peak at
C = 64, batch 4 from 2,193 to 1,251 MiB (+18 % time); at full size that is an estimated 15 GiB and 6 minutes per step.
Use reduced ``--classes`` and ``--batch`` for CPU checks, and a GPU for the real comparison.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

import open_clip
import peft
import torch
import torch.nn as nn
import torch.nn.functional as F

from visadapt.fewshot.evaluate import ClipClassifier
from visadapt.fewshot.model import METHODS, adapter_config, prompts
from visadapt.utils.measure import MiB, PeakMemory, device_name, run_child
from visadapt.utils.modules import trainable_parameters

RESULT_MARKER = "FEWSHOT_STEP_RESULT "  # prefix of the worker's JSON line on stdout
LR, WEIGHT_DECAY = 2e-4, 1e-2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_BASE = "ViT-B-32"  # --tiny: this architecture's layout, shrunk
TINY_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 32, "width": 128, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


# --------------------------------------------------------------------------------------------------- worker side
def build_model(args: argparse.Namespace, method: str) -> tuple[nn.Module, Callable]:
    """Random-weight CLIP with ``method``'s adapter, in train mode, and the matching tokenizer."""
    torch.manual_seed(0)
    name = TINY_BASE if args.tiny else args.model
    clip = open_clip.create_model(name, pretrained=None, **(TINY_CFG if args.tiny else {}))
    clip = peft.get_peft_model(clip, adapter_config(method))
    if args.text_checkpointing:
        clip.get_base_model().transformer.grad_checkpointing = True  # the text tower only
    return clip.to(args.device).train(), open_clip.get_tokenizer(name)


def run_worker(args: argparse.Namespace, method: str) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    clip, tokenizer = build_model(args, method)
    classifier = ClipClassifier(clip)
    params = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    generator = torch.Generator().manual_seed(1)
    tokens = tokenizer(prompts([f"class {i}" for i in range(args.classes)])).to(device)
    size = clip.get_base_model().visual.image_size
    images = torch.randn(args.batch, 3, *size, generator=generator).to(device)
    labels = torch.randint(args.classes, (args.batch,), generator=generator).to(device)

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=DTYPES[args.precision], enabled=args.precision != "fp32")

    def step() -> float:
        with autocast():
            logits = classifier(images, tokens=tokens)
        loss = F.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    gc.collect()
    memory = PeakMemory(device)
    baseline = memory.baseline

    times, loss = [], float("nan")
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)

    peak = memory.peak()
    return {"method": method, "trainable_params": trainable_parameters(clip), "step_times_s": times,
            "median_step_s": statistics.median(times), "baseline_mib": baseline / MiB,
            "step_peak_mib": (peak - baseline) / MiB, "abs_peak_mib": peak / MiB, "peak_reset": memory.reset,
            "last_loss": loss}


# --------------------------------------------------------------------------------------------------- parent side
def measure(method: str) -> dict[str, Any]:
    """Run ``method`` in a fresh child process with this invocation's flags and return its result row."""
    return run_child(__file__, RESULT_MARKER, method)


def add_ratios(rows: list[dict[str, Any]], reference: str) -> None:
    ref = next(row for row in rows if row["method"] == reference)
    for row in rows:
        row["time_ratio"] = row["median_step_s"] / ref["median_step_s"]
        row["mem_ratio"] = row["step_peak_mib"] / ref["step_peak_mib"]


def print_table(rows: list[dict[str, Any]], reference: str, cuda: bool) -> None:
    header = (f"{'method':<10} {'trainable':>10} {'step s':>9} {'time/' + reference:>15} {'step peak MiB':>14} "
              f"{'mem/' + reference:>14} {'abs peak MiB':>13}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['method']:<10} {row['trainable_params']:>10,} {row['median_step_s']:>9.3f} "
              f"{row['time_ratio']:>15.3f} {row['step_peak_mib']:>14.1f} {row['mem_ratio']:>14.3f} "
              f"{row['abs_peak_mib']:>13.1f}")
    print()
    print("step s: median wall time of the timed steps (text re-encoding of all prompts + image batch + backward "
          "+ AdamW).")
    if cuda:
        print("step peak MiB: torch.cuda.max_memory_allocated during the steps minus memory_allocated after model, "
              "adapter and inputs were built (activations + grads + optimizer state).")
        print("abs peak MiB: torch.cuda.max_memory_allocated during the steps, weights included.")
    else:
        print("step peak MiB: the worker's peak RSS (ru_maxrss) during the steps minus its RSS after model, adapter "
              "and inputs were built (activations + grads + optimizer state).")
        print("abs peak MiB: the worker's peak RSS during the steps (weights, Python and torch libraries included).")
        if not all(row["peak_reset"] for row in rows):
            print("note: /proc/self/clear_refs was not writable, so peaks may include transients of model building.")
    print(f"Ratios are against {reference}, measured in this invocation; each method ran in its own process.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--classes", type=int, default=1000, help="number of class prompts re-encoded per step")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture, built with random weights")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--precision", choices=tuple(DTYPES), default=None,
                   help="autocast dtype (default: fp16 on CUDA, fp32 on CPU); fp16 uses a GradScaler")
    p.add_argument("--text-checkpointing", action="store_true",
                   help="gradient checkpointing in the text tower's blocks")
    p.add_argument("--tiny", action="store_true",
                   help=f"a tiny CLIP in {TINY_BASE}'s layout (width 128/64, 2 layers per tower, 64 px) for smoke "
                        "tests; --model is ignored")
    p.add_argument("--json", type=Path, default=None, help="also write the configuration and rows to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: measure one method, print JSON
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.steps = args.steps if args.steps is not None else (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.precision = args.precision or ("fp16" if cuda else "fp32")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown or not args.methods:
        p.error(f"--methods must be a non-empty subset of {','.join(METHODS)}, got {args.methods}")
    if args.steps < 1 or args.warmup < 0 or args.classes < 1 or args.batch < 1:
        p.error("--steps, --classes and --batch must be at least 1, --warmup at least 0")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(RESULT_MARKER + json.dumps(run_worker(args, args.worker)), flush=True)
        return

    cuda = args.device.startswith("cuda")
    model = f"tiny {TINY_BASE}-layout CLIP" if args.tiny else args.model
    config = {"command": shlex.join(sys.orig_argv), "device": device_name(args.device), "torch": torch.__version__,
              "model": f"{model} (random weights)", "classes": args.classes, "batch": args.batch,
              "precision": args.precision, "text_checkpointing": args.text_checkpointing,
              "warmup": args.warmup, "steps": args.steps}
    print(f"command: {config['command']}")
    print(f"device: {config['device']} | torch {config['torch']} | {config['model']} | classes {args.classes} | "
          f"batch {args.batch} | precision {args.precision} | text checkpointing "
          f"{'on' if args.text_checkpointing else 'off'} | warmup {args.warmup}, timed steps {args.steps}",
          flush=True)

    rows = [measure(method) for method in args.methods]
    reference = "lora" if "lora" in args.methods else args.methods[0]
    add_ratios(rows, reference)
    print()
    print_table(rows, reference, cuda)
    if args.json:
        args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
