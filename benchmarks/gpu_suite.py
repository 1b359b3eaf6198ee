"""One prepared GPU run: the CUDA tests and the GPU numbers docs/benchmarks.md still lacks, in at most 8 minutes.

When a GPU is lent: ``python benchmarks/gpu_suite.py --out runs/gpu_results/`` then paste gpu_results.md into
docs/benchmarks.md.

Parts, in this order, each with its own time cap (``--cap NAME=SECONDS``; ``--budget``, 470 s, bounds them all):

  tests     120 s  pytest on the test files with CUDA cases (every tests/test_*.py that asks
                   ``torch.cuda.is_available()``) with ``-k "not cpu"``: the CUDA and bf16 cases and the Triton
                   kernels on the GPU; passed / failed / skipped counts and the failing test ids
  kernels    75 s  benchmarks/kernel_ops.py at d 1024, r 16, 16k tokens, bf16 activations: fused LoRA ÷ base linear,
                   ÷ peft eager, the fused-s column (shrink inside the GEMM), routed 4 adapters ÷ single LoRA
  composer  110 s  benchmarks/composer.py --preset paper on its random SD-1.5-layout UNet, 512 px, 50 steps, fp16,
                   3 concepts: time, peak memory and UNet block calls of plain SD, set_adapters, injection, the full
                   LoRA-Composer, the same before the refinement's cost levers, and with its bf16 refinement pass
  tracking   40 s  benchmarks/tracking.py: the merged LoRAT B-224 tracker (DINOv2 ViT-B/14, bf16) vs the plain timm
                   ViT on the same tokens, frames/s at batch 1
  fewshot    60 s  benchmarks/fewshot_step.py: one CLIP-LoRA step on ViT-B/16, 1000 classes, batch 32, fp16: peak
                   memory (and time) of lora vs block-lora
  easyref    75 s  benchmarks/easyref.py on small random SDXL + Qwen2-VL weights, 1024 px, 30 steps, bf16: MLLM
                   encode and diffusion time with 1, 4 and 16 references, and plain SDXL

Every measurement is one subprocess: pytest, or a benchmark script's ``--worker`` entry (the per-configuration
process its own parent spawns, which prints one JSON row behind the script's marker), so the suite reads structured
rows and computes the ratios itself. A subprocess that hangs, crashes or runs out of memory is killed at its part's
deadline and recorded (status failed / timeout) while the other parts go on; the results are rewritten atomically
after every part, so an interrupted run still leaves what it finished. Out (``--out``, default runs/gpu_results,
which git ignores): gpu_results.json (environment, and per part: status, wall time, commands, rows, ratios),
gpu_results.md (one table per part, ready to paste) and logs/ (each subprocess's stdout and stderr).

``--dry-run``: every part's code path on the CPU with tiny models, one or two steps and one or two workers per script,
two parts side by side (one torch thread per process): about 50 CPU-seconds, 76 s on a busy 2-core machine; its
numbers mean nothing (tests/test_gpu_suite.py runs it).
Without a CUDA GPU and without ``--dry-run`` it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import psutil  # (a dependency of accelerate and peft)

ROOT = Path(__file__).resolve().parent.parent
JSON_NAME, MD_NAME = "gpu_results.json", "gpu_results.md"
TESTS_K = "not cpu"  # the [cpu] cases run in every CPU CI run already
DRY_TESTS_K = "cuda or routed_lora_with_no_tokens"  # skips on CPU, plus one fast eager test that passes
DASH = "—"


@dataclass
class Run:
    """One subprocess of a part; ``parse`` turns its stdout into the run's row (raises when there is none)."""

    key: str
    cmd: list[str]
    parse: Callable[[str], dict[str, Any]]


@dataclass
class Plan:
    setting: str  # what is measured, in words (the markdown section's first line)
    runs: list[Run]


@dataclass
class Part:
    name: str
    title: str
    cap_s: float
    plan: Callable[[bool], Plan]  # dry_run -> the subprocesses to run
    numbers: Callable[[dict[str, dict]], dict[str, Any]]  # rows by run key -> the part's numbers (with ratios)
    table: Callable[[dict[str, Any]], list[str]]  # numbers -> markdown lines


# ----------------------------------------------------------------------------------------------------------------
# helpers


def ratio(a: Any, b: Any) -> float | None:
    """a / b for measured, finite, positive b; None otherwise (a missing row, NaN memory on CPU)."""
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b))
    return a / b if ok and b > 0 else None


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return format(value, spec) if isinstance(value, float) else str(value)


def md_row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [md_row(*header), "|" + "---|" * len(header), *(md_row(*r) for r in rows)]


def finite(obj: Any) -> Any:
    """NaN / inf -> None, so that the JSON file is standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, then rename: a reader (or a killed run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@functools.cache
def marker_of(script: str) -> str:
    """The prefix of a benchmark worker's JSON line, read from the script (importing it would load torch et al.)."""
    for node in ast.parse((ROOT / "benchmarks" / script).read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id in ("MARKER", "RESULT_MARKER") for t in node.targets)):
            return node.value.value
    raise LookupError(f"benchmarks/{script} defines no MARKER / RESULT_MARKER")


def json_row(marker: str, stdout: str) -> dict[str, Any]:
    rows = [line[len(marker):] for line in stdout.splitlines() if line.startswith(marker)]
    if not rows:
        raise ValueError(f"no result line ({marker.strip()!r}) in the worker's output")
    return json.loads(rows[-1])


def worker(key: str, script: str, flags: list[str], *worker_args: str) -> Run:
    """``script``'s worker for one configuration: the command its own parent would run (flags + --worker ...)."""
    cmd = [sys.executable, f"benchmarks/{script}", *flags, "--worker", *worker_args]
    return Run(key, cmd, functools.partial(json_row, marker_of(script)))


# The dry run keeps one or two workers per script: each costs about 10 s of imports on 2 cores.


# ----------------------------------------------------------------------------------------------------------------
# 1. the CUDA / bf16 tests

_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")
_COUNTS = ("passed", "failed", "skipped", "errors", "deselected", "xfailed", "xpassed")


def cuda_test_files() -> list[str]:
    """The test files with CUDA cases: those that ask torch whether CUDA is there (their skipif conditions)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if p.name != "test_gpu_suite.py" and "cuda.is_available()" in p.read_text())


def pytest_counts(stdout: str) -> dict[str, Any]:
    """Counts from pytest's final summary line; if it was killed before printing one, from the ``-v`` lines."""
    lines = stdout.splitlines()
    outcomes = [m.groups() for m in map(_OUTCOME.match, lines) if m]
    summary = [line for line in lines if line.startswith("=") and " in " in line and _COUNT.search(line)]
    counts: dict[str, Any] = dict.fromkeys(_COUNTS, 0)
    if summary:
        for n, word in _COUNT.findall(summary[-1]):
            counts["errors" if word.startswith("error") else word] = int(n)
    elif outcomes:
        names = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors",
                 "XFAIL": "xfailed", "XPASS": "xpassed"}
        for _, outcome in outcomes:
            counts[names[outcome]] += 1
    else:
        raise ValueError("pytest reported no results")
    counts["complete"] = bool(summary)
    counts["failing"] = [name for name, outcome in outcomes if outcome in ("FAILED", "ERROR")]
    return counts


def tests_plan(dry: bool) -> Plan:
    files, k = cuda_test_files(), DRY_TESTS_K if dry else TESTS_K
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", k, *files]
    return Plan(f"`pytest -k \"{k}\"` on {', '.join(f'`{f}`' for f in files)}", [Run("pytest", cmd, pytest_counts)])


def tests_numbers(rows: dict[str, dict]) -> dict[str, Any]:
    return rows.get("pytest", {})


def tests_table(n: dict[str, Any]) -> list[str]:
    if not n:
        return []
    lines = md_table(["passed", "failed", "errors", "skipped", "deselected", "complete run"],
                     [[n["passed"], n["failed"], n["errors"], n["skipped"], n["deselected"],
                       "yes" if n["complete"] else "no (killed; counted from the lines it printed)"]])
    if n["failing"]:
        lines += ["", "Failing: " + ", ".join(f"`{name}`" for name in n["failing"][:30])
                  + (f" and {len(n['failing']) - 30} more" if len(n["failing"]) > 30 else "")]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# 2. the fused kernels at the target point


def kernels_plan(dry: bool) -> Plan:
    # --worker: kernel_ops.py has no --json; its worker prints the configuration's timings as one JSON row.
    # --no-compile: the compiled-peft column needs an inductor build that would not fit the cap.
    d, r, tokens = ("64", "8", "512") if dry else ("1024", "16", "16384")
    flags = (["--device", "cpu", "--dtype", "fp32", "--reps", "3", "--warmup", "1"] if dry
             else ["--device", "cuda", "--dtype", "bf16", "--reps", "50", "--warmup", "10"])
    flags += ["--n-blocks", "4", "--no-compile"]
    run = worker(f"d{d}-r{r}-t{tokens}", "kernel_ops.py", flags, d, r, tokens)
    where = "eager ops on CPU" if dry else "bf16 activations, fp32 adapters, CUDA events, L2 flushed, median of 50"
    return Plan(f"one adapted linear, forward + backward, d {d}, r {r}, {tokens} tokens, {where}", [run])


def kernels_numbers(rows: dict[str, dict]) -> dict[str, Any]:
    if not rows:
        return {}
    row = next(iter(rows.values()))
    ms = row["ms"]
    ratios = {"fused/base": ratio(ms.get("fused"), ms.get("base")),
              "fused-s/base": ratio(ms.get("fused-s"), ms.get("base")),
              "fused/peft": ratio(ms.get("fused"), ms.get("peft")),
              "fused/addmm": ratio(ms.get("fused"), ms.get("addmm")),
              "routed4/fused": ratio(ms.get("routed"), ms.get("fused")),
              "block/fused": ratio(ms.get("block"), ms.get("fused"))}
    return {**row, "ratios": ratios}


def kernels_table(n: dict[str, Any]) -> list[str]:
    if not n:
        return []
    ms, q, mem = n["ms"], n["ratios"], n["mem"]
    header = ["d", "r", "tokens", "base ms", "fused ms", "fused/base", "fused-s ms", "fused-s/base", "peft ms",
              "fused/peft", "addmm ms", "routed4 ms", "routed4/fused", "block/fused", "peak MiB fused / peft",
              "max abs diff vs peft", "Triton launches"]
    cells = [n["d"], n["r"], n["tokens"], fmt(ms.get("base"), ".3f"), fmt(ms.get("fused"), ".3f"),
             fmt(q["fused/base"]), fmt(ms.get("fused-s"), ".3f"), fmt(q["fused-s/base"]), fmt(ms.get("peft"), ".3f"),
             fmt(q["fused/peft"]), fmt(ms.get("addmm"), ".3f"), fmt(ms.get("routed"), ".3f"), fmt(q["routed4/fused"]),
             fmt(q["block/fused"]), f"{fmt(mem.get('fused'), '.0f')} / {fmt(mem.get('peft'), '.0f')}",
             fmt(n.get("err"), ".2g"), n.get("triton_launches", DASH)]
    return md_table(header, [cells]) + [
        "", "fused-s: the experimental shrink-in-the-GEMM fusion; routed4: base linear + `routed_lora` with 4 "
            "adapters on 4 contiguous token regions. Targets: fused/base ≤ 1.15, routed4/fused ≤ 1.2, fused/peft < 1."]


# ----------------------------------------------------------------------------------------------------------------
# 3. LoRA-Composer on an SD-1.5-layout UNet


def composer_plan(dry: bool) -> Plan:
    n = "1" if dry else "3"
    flags = (["--device", "cpu", "--model", "tiny", "--steps", "2", "--repeats", "1"] if dry
             else ["--device", "cuda", "--model", "small", "--preset", "paper", "--size", "512", "--dtype", "fp16",
                   "--repeats", "2"])
    modes = ["compose"] if dry else ["set_adapters", "inject", "compose", "compose_before", "compose_bf16"]
    runs = [worker("plain", "composer.py", flags, "plain", "0")]
    runs += [worker(mode, "composer.py", flags, mode, n) for mode in modes]
    setting = ("tiny SD pipeline on CPU, 32 px, 2 steps" if dry
               else "random SD-1.5-layout UNet (`--model small --preset paper`), 512 px, 50 steps (refinement to "
               "step 25 with early stop), fp16, median of 2")
    return Plan(f"{setting}, {n} concept(s); peak = allocator peak during sampling minus memory after loading", runs)


def composer_numbers(rows: dict[str, dict]) -> dict[str, Any]:
    plain, ref = rows.get("plain", {}), rows.get("set_adapters", {})
    compose_losses = rows.get("compose", {}).get("losses") or []
    out = {}
    for key, row in rows.items():
        pairs = list(zip(row.get("losses") or [], compose_losses))
        out[key] = {**row, "mode": key, "time_vs_plain": ratio(row["seconds"], plain.get("seconds")),
                    "time_vs_set_adapters": ratio(row["seconds"], ref.get("seconds")),
                    "mem_vs_set_adapters": ratio(row["peak_mib"], ref.get("peak_mib")),
                    "loss_diff": max((abs(a - b) / max(abs(b), 1e-12) for a, b in pairs), default=None)}
    return out


def composer_table(n: dict[str, Any]) -> list[str]:
    rows = [[key, r["concepts"], fmt(r["seconds"], ".3f"), fmt(r["time_vs_plain"]), fmt(r["time_vs_set_adapters"]),
             fmt(r["peak_mib"], ".1f"), fmt(r["mem_vs_set_adapters"]), fmt(r.get("fwd_per_step")),
             fmt(r.get("bwd_per_step")), r.get("refined_steps", DASH), fmt(r.get("loss_diff"), ".1e")]
            for key, r in n.items()]
    return md_table(["mode", "concepts", "s / image", "× plain", "× set_adapters", "peak MiB", "mem × set_adapters",
                     "block fwd / step", "block bwd / step", "refined steps", "Δloss vs compose"], rows) if rows else []


# ----------------------------------------------------------------------------------------------------------------
# 4. LoRAT tracking speed

TRACK_LABELS = {"plain": "plain timm ViT", "merged": "merged tracker", "unmerged": "unmerged tracker",
                "track": "Tracker.track (640×480 frame)"}


def tracking_plan(dry: bool) -> Plan:
    flags = (["--variant", "B-224", "--backbone", "S", "--device", "cpu", "--iters", "2", "--warmup", "1"] if dry
             else ["--variant", "B-224", "--backbone", "variant", "--device", "cuda", "--dtype", "bf16",
                   "--iters", "100", "--warmup", "10"])
    setting = ("B-224 crops on a ViT-S/14, CPU fp32, 2 forwards" if dry
               else "B-224 (its DINOv2 ViT-B/14 backbone), random weights, bf16, batch 1, median of 100 forwards")
    return Plan(f"{setting}, models taking turns", [worker("inference", "tracking.py", flags, "inference")])


def tracking_numbers(rows: dict[str, dict]) -> dict[str, Any]:
    times = rows.get("inference")
    if not times:
        return {}
    plain = times["plain"]
    models = {name: {"median_ms": t["median"] * 1e3, "fastest_ms": t["min"] * 1e3,
                     "frames_per_s": ratio(1.0, t["median"]), "vs_plain": ratio(t["median"], plain["median"]),
                     "fastest_vs_plain": ratio(t["min"], plain["min"])} for name, t in times.items()}
    return {"models": models, "merged/plain": models["merged"]["vs_plain"],
            "unmerged/merged": ratio(times["unmerged"]["median"], times["merged"]["median"])}


def tracking_table(n: dict[str, Any]) -> list[str]:
    if not n:
        return []
    rows = [[TRACK_LABELS.get(name, name), fmt(m["median_ms"]), fmt(m["frames_per_s"], ".1f"),
             fmt(m["vs_plain"], ".3f"), fmt(m["fastest_ms"]), fmt(m["fastest_vs_plain"], ".3f")]
            for name, m in n["models"].items()]
    return md_table(["model", "median ms", "frames/s", "× plain", "fastest ms", "fastest × plain"], rows) + [
        "", f"merged / plain = {fmt(n['merged/plain'], '.3f')} (goal ≤ 1.05); unmerged / merged = "
            f"{fmt(n['unmerged/merged'], '.3f')}"]


# ----------------------------------------------------------------------------------------------------------------
# 5. few-shot step memory


def fewshot_plan(dry: bool) -> Plan:
    flags = (["--device", "cpu", "--tiny", "--classes", "4", "--batch", "2", "--steps", "1", "--warmup", "0"] if dry
             else ["--device", "cuda", "--model", "ViT-B-16", "--classes", "1000", "--batch", "32",
                   "--precision", "fp16", "--steps", "10", "--warmup", "3"])
    setting = ("tiny CLIP on CPU, 4 classes, batch 2, 1 step" if dry
               else "ViT-B/16 CLIP, random weights, 1000 classes, batch 32, fp16 autocast + GradScaler, "
                    "median of 10 steps after 3")
    methods = ["block-lora"] if dry else ["lora", "block-lora"]
    return Plan(setting, [worker(m, "fewshot_step.py", flags, m) for m in methods])


def fewshot_numbers(rows: dict[str, dict]) -> dict[str, Any]:
    ref = rows.get("lora", {})
    return {key: {**row, "time_vs_lora": ratio(row["median_step_s"], ref.get("median_step_s")),
                  "mem_vs_lora": ratio(row["step_peak_mib"], ref.get("step_peak_mib"))} for key, row in rows.items()}


def fewshot_table(n: dict[str, Any]) -> list[str]:
    rows = [[key, f"{r['trainable_params']:,}", fmt(r["median_step_s"], ".3f"), fmt(r["time_vs_lora"], ".3f"),
             fmt(r["step_peak_mib"], ".0f"), fmt(r["mem_vs_lora"], ".3f"), fmt(r["abs_peak_mib"], ".0f")]
            for key, r in n.items()]
    return md_table(["method", "trainable", "step s", "time / lora", "step peak MiB", "mem / lora", "abs peak MiB"],
                    rows) if rows else []


# ----------------------------------------------------------------------------------------------------------------
# 6. EasyRef sampling cost


def easyref_plan(dry: bool) -> Plan:
    refs = ["1"] if dry else ["1", "4", "16"]
    flags = (["--device", "cpu", "--model", "tiny", "--steps", "1", "--repeats", "1", "--ref-size", "32"] if dry
             else ["--device", "cuda", "--model", "small", "--mllm", "small", "--size", "1024", "--steps", "30",
                   "--dtype", "bf16", "--ref-size", "336", "--repeats", "1"])
    runs = [worker(f"easyref-{n}", "easyref.py", flags, "easyref", n) for n in refs]
    if not dry:
        runs.append(worker("sdxl", "easyref.py", flags, "sdxl", "0"))  # last: the requested rows come first
    setting = ("tiny SDXL + Qwen2-VL on CPU, 32 px, 1 step" if dry
               else "small random SDXL-layout UNet + small random Qwen2-VL, 1024 px, 30 steps, bf16, "
                    "336 px references")
    return Plan(f"{setting}; diffusion = sampling loop + VAE decode", runs)


def easyref_numbers(rows: dict[str, dict]) -> dict[str, Any]:
    base = rows.get("sdxl", {})
    return {key: {**row, "diffusion_vs_sdxl": ratio(row["diffusion_s"], base.get("diffusion_s")),
                  "time_vs_sdxl": ratio(row["seconds"], base.get("seconds"))} for key, row in rows.items()}


def easyref_table(n: dict[str, Any]) -> list[str]:
    rows = [[r["mode"], DASH if r["mode"] == "sdxl" else r["refs"], fmt(r["encode_s"], ".3f"),
             fmt(r["diffusion_s"], ".3f"), fmt(r["seconds"], ".3f"), fmt(r["diffusion_vs_sdxl"]),
             fmt(r["time_vs_sdxl"]), fmt(r["peak_mib"], ".0f")] for r in n.values()]
    return md_table(["mode", "refs", "encode s", "diffusion s", "s / image", "diffusion × sdxl", "× sdxl",
                     "peak MiB"], rows) if rows else []


# ----------------------------------------------------------------------------------------------------------------
# the registry: (sum of caps) ≤ 8 min

PARTS = [
    Part("tests", "CUDA / bf16 tests", 120, tests_plan, tests_numbers, tests_table),
    Part("kernels", "Fused adapter kernels at the target point", 75, kernels_plan, kernels_numbers, kernels_table),
    Part("composer", "LoRA-Composer sampling, SD-1.5 layout", 110, composer_plan, composer_numbers, composer_table),
    Part("tracking", "LoRAT B-224 inference speed", 40, tracking_plan, tracking_numbers, tracking_table),
    Part("fewshot", "Few-shot step memory, ViT-B/16", 60, fewshot_plan, fewshot_numbers, fewshot_table),
    Part("easyref", "EasyRef encode and diffusion time", 75, easyref_plan, easyref_numbers, easyref_table),
]


# ----------------------------------------------------------------------------------------------------------------
# running


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out, self.dry = args, args.out, args.dry_run
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # guards the results, the files and the set of running subprocesses
        self.live: set[subprocess.Popen] = set()
        self.stopping = False
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false"}
        self.env_note: dict[str, str] = {}
        if self.dry:  # CPU only, and one torch thread per process: two parts run side by side
            self.env_note = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            self.env.update(self.env_note)
        self.results: dict[str, Any] = {
            "suite": "benchmarks/gpu_suite.py", "command": shlex.join(sys.orig_argv), "dry_run": self.dry,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": args.budget,
            "child_env": self.env_note, "environment": environment(self.dry), "wall_s": None,
            "parts": {p.name: {"title": p.title, "status": "pending"} for p in PARTS}}

    def log(self, message: str) -> None:
        print(f"[gpu_suite {time.monotonic() - self.start:5.0f}s] {message}", flush=True)

    def run(self) -> None:
        chosen = [p for p in PARTS if p.name in self.args.parts]
        for p in PARTS:
            if p not in chosen:
                self.results["parts"][p.name].update(status="skipped", reason="not selected (--parts)")
        if self.dry:  # two side by side, the parts with the most subprocesses first (GPU timings never share)
            chosen.sort(key=lambda part: -len(part.plan(True).runs))
        with ThreadPoolExecutor(min(2, os.cpu_count() or 1) if self.dry else 1) as pool:
            try:
                for part, result in zip(chosen, pool.map(self.run_part, chosen)):
                    self.log(f"{part.name}: {result['status']} ({result['wall_s']:.0f} s)")
            except BaseException:  # Ctrl-C, SIGTERM: stop the running subprocesses, start no more
                with self.lock:
                    self.stopping = True
                    for proc in self.live:
                        kill_tree(proc.pid)
                raise
        self.results["wall_s"] = time.monotonic() - self.start
        self.write()

    def run_part(self, part: Part) -> dict[str, Any]:
        """The part's subprocesses in turn, each cut to what is left of the part's cap; never raises."""
        cap = self.args.caps.get(part.name, part.cap_s)
        start = time.monotonic()
        try:
            result = self._run_part(part, cap, start)
        except Exception as err:  # a bug in the suite itself: record it, the other parts go on
            result = {"title": part.title, "status": "failed", "cap_s": cap, "wall_s": time.monotonic() - start,
                      "reason": f"gpu_suite error: {type(err).__name__}: {err}"}
        with self.lock:
            self.results["parts"][part.name] = result
            self.write()
        return result

    def _run_part(self, part: Part, cap: float, start: float) -> dict[str, Any]:
        part_deadline = min(start + cap, self.deadline)
        plan = part.plan(self.dry)
        self.log(f"{part.name}: {part.title} — {len(plan.runs)} subprocess(es), cap {cap:.0f} s")
        runs: dict[str, dict] = {}
        for i, run in enumerate(plan.runs, 1):
            left = part_deadline - time.monotonic()
            if left < 1:
                runs[run.key] = {"status": "skipped", "reason": "no time left in the part's cap or the budget",
                                 "wall_s": 0.0, "command": display(run.cmd)}
                continue
            self.log(f"{part.name} [{i}/{len(plan.runs)}] {run.key} (≤ {left:.0f} s)")
            runs[run.key] = self.execute(part.name, run, left)
            self.log(f"{part.name} [{i}/{len(plan.runs)}] {run.key}: {runs[run.key]['status']} "
                     f"({runs[run.key]['wall_s']:.1f} s)")
        rows = {key: r["row"] for key, r in runs.items() if r.get("row") is not None}
        try:
            numbers = part.numbers(rows)
        except (KeyError, TypeError, ValueError) as err:  # a worker row without the expected fields
            numbers = {"error": f"{type(err).__name__}: {err}"}
        statuses = [r["status"] for r in runs.values()]
        status = next((s for s in ("timeout", "failed") if s in statuses),
                      "ok" if statuses and all(s == "ok" for s in statuses) else "skipped")
        if status == "ok" and "error" in numbers:
            status = "failed"
        return {"title": part.title, "status": status, "cap_s": cap, "wall_s": time.monotonic() - start,
                "setting": plan.setting, "commands": [display(run.cmd) for run in plan.runs], "runs": runs,
                "numbers": numbers}

    def execute(self, part: str, run: Run, timeout: float) -> dict[str, Any]:
        """Run one subprocess; past ``timeout`` kill it with everything it started. It stays in the suite's process
        group, so that whatever kills the group (a terminal's Ctrl-C, an outer timeout) kills it too."""
        start = time.monotonic()
        with self.lock:
            if self.stopping:
                return {"status": "skipped", "reason": "the suite was interrupted", "wall_s": 0.0,
                        "command": display(run.cmd)}
            proc = subprocess.Popen(run.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            self.live.add(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            stdout, stderr = proc.communicate()
            status = "timeout"
        finally:
            with self.lock:
                self.live.discard(proc)
        wall = time.monotonic() - start
        log = self.out / "logs" / f"{part}-{run.key}.log"
        log.write_text(f"$ {display(run.cmd)}\n# exit {proc.returncode}, {status}, {wall:.1f} s\n"
                       f"--- stdout\n{stdout}\n--- stderr\n{stderr}")
        result: dict[str, Any] = {"status": status, "returncode": proc.returncode, "wall_s": wall,
                                  "command": display(run.cmd), "log": str(log.relative_to(self.out))}
        try:
            result["row"] = run.parse(stdout)
        except (ValueError, KeyError) as err:
            result["status"] = "failed" if status == "ok" else status
            result["error"] = str(err)
        if status == "timeout":
            result["error"] = f"killed at the time cap, after {wall:.0f} s"
        elif status == "failed":  # the exception's last line says most (an OOM, an assertion of the benchmark)
            hint = " (killed: out of memory?)" if proc.returncode == -signal.SIGKILL else ""
            last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
            result["error"] = f"exit {proc.returncode}{hint}" + (f": {last[:300]}" if last else "")
            if self.stopping:
                result["error"] = "killed: the suite was interrupted"
        if result["status"] != "ok":
            result["stderr_tail"] = stderr[-3000:]
        return result

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / JSON_NAME, json.dumps(finite(self.results), indent=2, allow_nan=False) + "\n")
        write_atomic(self.out / MD_NAME, markdown(self.results))


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (pytest's subprocesses, compile workers), children first."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for proc in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def display(cmd: list[str]) -> str:
    """The command as typed in the repository root."""
    return shlex.join(["python" if cmd[0] == sys.executable else cmd[0], *cmd[1:]])


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def environment(dry: bool) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "triton": package_version("triton"), "git_commit": git_commit(),
                           "packages": {name: package_version(name) for name in
                                        ("diffusers", "transformers", "peft", "timm", "open_clip_torch")}}
    if dry:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), dry run"
    else:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1), gpus=torch.cuda.device_count(),
                   cudnn=torch.backends.cudnn.version())
    return env


def part_table(part: Part, numbers: dict[str, Any]) -> list[str]:
    if "error" in numbers:
        return [f"No numbers: the rows could not be read ({numbers['error']})."]
    try:
        return part.table(numbers) or ["No numbers."]
    except (KeyError, TypeError, ValueError) as err:  # a row without an expected field: the JSON still has it
        return [f"No table: {type(err).__name__}: {err}."]


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    commit = (env.get("git_commit") or "commit unknown")[:10]
    wall = f"{results['wall_s'] / 60:.1f} min in all" if results["wall_s"] else "run not finished"
    lines = [f"## GPU run (`benchmarks/gpu_suite.py`), {results['started'][:10]}", "",
             f"{env['device']} · torch {env['torch']} (CUDA {env.get('cuda') or DASH}) · triton "
             f"{env.get('triton') or DASH} · {commit} · {wall}", ""]
    if results["dry_run"]:
        lines += ["**Dry run: tiny models on the CPU; the numbers only show that every part ran.**", ""]
    for i, part in enumerate(PARTS, 1):
        res = results["parts"][part.name]
        wall = f", {res['wall_s']:.0f} s of {res['cap_s']:.0f}" if "wall_s" in res else ""
        lines += [f"### {i}. {part.title}: {res['status']}{wall}", ""]
        if "setting" not in res:
            lines += [res.get("reason", "not run"), ""]
            continue
        lines += [res["setting"] + ".", ""]
        lines += part_table(part, res["numbers"]) + [""]
        notes = [f"- `{key}`: {run['status']} ({run.get('error') or run.get('reason')}"
                 + (f"; log `{run['log']}`)" if "log" in run else ")")
                 for key, run in res["runs"].items() if run["status"] != "ok"]
        lines += [*notes, ""] if notes else []
        lines += ["```", *res["commands"], "```", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_results"),
                   help=f"folder for {JSON_NAME}, {MD_NAME} and logs/")
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny sizes (no GPU needed)")
    p.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma-separated subset, in any order")
    p.add_argument("--cap", action="append", default=[], metavar="NAME=SECONDS",
                   help="override one part's time cap (repeatable), e.g. --cap tests=200")
    p.add_argument("--budget", type=float, default=470.0,
                   help="seconds for all parts together (each is cut to what is left); with start-up and writing "
                        "the command stays under 8 min")
    args = p.parse_args(argv)
    names = {part.name for part in PARTS}
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    args.caps = {}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in names or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            p.error(f"--cap {item!r}: expected NAME=SECONDS with NAME in {', '.join(sorted(names))}")
        args.caps[name] = float(seconds)
    if unknown := set(args.parts) - names:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(sorted(names))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU on this machine, so nothing to run (--dry-run exercises it on the CPU).")
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwinds through Suite.run
    suite = Suite(args)
    suite.log(f"{suite.results['environment']['device']}; parts {', '.join(args.parts)}; budget {args.budget:.0f} s; "
              f"out {args.out}")
    suite.run()
    print()
    print(markdown(suite.results))
    suite.log(f"wrote {args.out / JSON_NAME} and {args.out / MD_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
