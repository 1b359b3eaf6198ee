"""The numbers of README.md's demo passages, measured: rerun the demos, then rewrite or check those passages.

    python benchmarks/readme_demos.py --check                   # rerun every demo; exit 1 with a diff if a number moved
    python benchmarks/readme_demos.py --write                   # rerun every demo and rewrite its passage
    python benchmarks/readme_demos.py --check --only hsi,incremental --runs runs/readme   # keep the run folders

Each passage sits between ``<!-- demo:NAME -->`` and ``<!-- /demo:NAME -->`` in README.md; the prose around it,
times included (they follow the machine's load), is written by hand. Each demo runs as its README command
(``visadapt <task> train --demo``) in a fresh interpreter, on the CPU with ``--threads`` threads (2, as the README
was measured), and its passage ends with the date, CPU and versions of the run. ``--check`` compares everything but
that provenance, and its diff shows both, so a newer dependency or another CPU shows as the numbers it moves.

A demo is deterministic for one CPU, thread count and set of versions, not across them: the kernels of another
instruction set (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512) or thread count round differently, and
hundreds of training steps can carry that into the scores. The tracking scores move so; the few-shot and
hyperspectral ones were the same on an AMD EPYC and an Intel Xeon, on 1 and 2 threads. The incremental demo (the
pattern world, three seeds) was measured on the Intel Xeon only, where its nine runs score the same on 1 and 2
threads.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Optional

README = Path(__file__).resolve().parents[1] / "README.md"
# What the provenance names: the packages on the demos' code paths, as pip spells them, and how the README says them.
PACKAGES = {"torch": "torch", "timm": "timm", "peft": "peft", "transformers": "transformers", "diffusers": "diffusers",
            "open_clip_torch": "open_clip", "accelerate": "accelerate", "numpy": "numpy", "pillow": "Pillow"}
PROVENANCE = "(measured "  # the last part of every passage: the line that starts with this, to the end
WIDTH = 120  # the README's line length


@dataclass(frozen=True)
class Demo:
    """How to run one demo (its ``visadapt`` commands, each ``--out`` a sub-folder) and render its passage."""

    commands: dict[str, list[str]]  # sub-folder: arguments after ``visadapt``
    render: Callable[[dict[str, Path]], str]  # run folders -> the passage without its provenance
    block: bool  # a table on lines of its own (True) or words inside a paragraph (False)
    result: str = "results.json"  # what a finished run folder holds


def _results(run: Path, name: str = "results.json") -> dict:
    return json.loads((run / name).read_text())


def pct(x: float) -> str:
    """A percentage to one decimal: what the CLIs print (two decimals) rounded half up, as a reader rounds it."""
    return str(Decimal(f"{x:.2f}").quantize(Decimal("0.1"), ROUND_HALF_UP))


def _fewshot(runs: dict[str, Path]) -> str:
    lora, comp = _results(runs["lora"]), _results(runs["comp-lora"])
    shapes, colours = lora["zeroshot_on"]["shapes"], lora["zeroshot_on"]["colours"]
    comp_shapes, comp_colours = comp["zeroshot_on"]["shapes"], comp["zeroshot_on"]["colours"]
    return (f"{pct(lora['zeroshot_top1'])} % zero-shot → {pct(lora['top1'])} % few-shot top-1 on the held-out shapes, "
            f"and the seen-shape and colour zero-shot accuracy falling from {pct(shapes['before'])} % and "
            f"{pct(colours['before'])} % to {pct(shapes['after'])} % and {pct(colours['after'])} %; "
            f"`--method comp-lora` gives {pct(comp['top1'])} % few-shot with {pct(comp_shapes['after'])} % and "
            f"{pct(comp_colours['after'])} % kept")


def _hsi(runs: dict[str, Path]) -> str:
    r = _results(runs["run"])
    return f"OA {pct(r['OA'])} %, AA {pct(r['AA'])} %, κ {pct(r['kappa'])}"


def _incremental(runs: dict[str, Path]) -> str:
    summary = _results(runs["run"], "comparison.json")
    names = {"coact": "CoACT", "finetune": "naive LoRA fine-tuning", "prototypes": "prototypes only (frozen)"}

    def pm(mean: float, std: float) -> str:
        return f"{pct(mean)} ± {pct(std)}"

    seeds = ", ".join(map(str, summary["coact"]["seeds"]))
    rows = [f"| recipe (seeds {seeds}: mean ± std) | session 0 | last session | average | base forgetting (points) |",
            "|---|---|---|---|---|"]
    for recipe, name in names.items():
        r = summary[recipe]
        rows.append(f"| {name} | {pm(r['all'][0], r['all_std'][0])} % | "
                    f"{pm(r['last_accuracy'], r['last_accuracy_std'])} % | "
                    f"{pm(r['average_accuracy'], r['average_accuracy_std'])} % | "
                    f"{pm(r['base_forgetting'], r['base_forgetting_std'])} |")
    return "\n".join(rows)


def _tracking(runs: dict[str, Path]) -> str:
    r = _results(runs["run"])
    columns = ("ao", "sr50", "sr75", "auc", "precision", "norm_precision")
    rows = [f"| run (held-out: {r['sequences']} sequences, {r['frames']} frames) | AO | SR0.5 | SR0.75 | success AUC "
            "| precision (20 px) | norm. precision |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, key in (("LoRAT on the demo ViT (`--demo` defaults)", "tracker"), ("static box", "static box")):
        # as `track train` prints its table (visadapt.tracking.train.score_table), to one decimal
        rows.append(f"| {name} | " + " | ".join(f"{100 * r[key][c]:.1f}" for c in columns) + " |")
    return "\n".join(rows)


DEMOS = {
    "fewshot": Demo({"lora": ["fewshot", "train", "--demo"],
                     "comp-lora": ["fewshot", "train", "--demo", "--method", "comp-lora"]}, _fewshot, block=False),
    "hsi": Demo({"run": ["hsi", "train", "--demo"]}, _hsi, block=False),
    "incremental": Demo({"run": ["incremental", "train", "--demo"]}, _incremental, block=True,
                        result="comparison.json"),
    "tracking": Demo({"run": ["track", "train", "--demo"]}, _tracking, block=True),
}


def cpu_name() -> str:
    """The CPU model (Linux), without trademark signs, and the instruction set torch's kernels use on it."""
    import torch

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    name = re.sub(r"\((R|TM)\)", "", names[0] if names else "unknown CPU").replace("  ", " ")
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def provenance(threads: int, today: Optional[datetime.date] = None) -> str:
    def pkg(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "absent"

    versions = ", ".join(f"{name} {pkg(dist)}" for dist, name in PACKAGES.items())
    threads_used = f"{threads} thread{'s' * (threads != 1)}"
    return f"{PROVENANCE}{today or datetime.date.today()} on {cpu_name()}, {threads_used}: {versions})."


def run_demo(name: str, out: Path, threads: int, reuse: bool = False) -> dict[str, Path]:
    """Run ``name``'s commands, each in a fresh interpreter with its log in ``<run>.log``; returns the run folders.
    With ``reuse``, runs whose folder already holds results are kept as they are."""
    # the README's numbers are CPU numbers: a GPU would train the same demo to other scores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    runs = {}
    for sub, args in DEMOS[name].commands.items():
        run = runs[sub] = out / name / sub
        if reuse and (run / DEMOS[name].result).is_file():
            continue
        if run.exists():  # a demo would resume or refuse it; nothing here deletes a user's folder
            raise FileExistsError(f"{run} exists: pass --reuse to render its results, or remove it.")
        run.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "visadapt.cli", *args, "--out", str(run)]
        with open(run.parent / f"{sub}.log", "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
        if done.returncode != 0:
            tail = (run.parent / f"{sub}.log").read_text()[-3000:]
            raise RuntimeError(f"`visadapt {' '.join(args)}` exited with {done.returncode}:\n{tail}")
    return runs


def wrap(text: str) -> str:
    # never at a hyphen: a line break inside `--method comp-lora` or zero-shot would render as a space
    return textwrap.fill(text, WIDTH, break_on_hyphens=False, break_long_words=False)


def render(name: str, runs: dict[str, Path], stamp: str) -> str:
    """The text between the markers: the passage and its provenance, wrapped as the README is."""
    body = DEMOS[name].render(runs)
    if DEMOS[name].block:
        return f"\n{body}\n\n{wrap(stamp)}\n"
    return f"\n{wrap(body)}\n{wrap(stamp)}"


def region(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- demo:{name} -->)(.*?)(<!-- /demo:{name} -->)", re.S)


def read_region(text: str, name: str) -> str:
    found = region(name).findall(text)
    if len(found) != 1:
        raise ValueError(f"README.md must mark the {name} demo's passage once with <!-- demo:{name} --> … "
                         f"<!-- /demo:{name} --> (found {len(found)}).")
    return found[0][1]


def numbers(passage: str) -> str:
    """What ``--check`` compares: the passage without its provenance, whitespace as one space."""
    lines = passage.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith(PROVENANCE)), len(lines))
    return " ".join(" ".join(lines[:start]).split())


def diff(name: str, old: str, new: str) -> str:
    """A unified diff of a passage (README.md against this run) when its numbers differ, else ''."""
    if numbers(old) == numbers(new):
        return ""
    old_lines, new_lines = ([line + "\n" for line in p.strip().splitlines()] for p in (old, new))
    return "".join(difflib.unified_diff(old_lines, new_lines,
                                        f"README.md <!-- demo:{name} -->", f"this run of the {name} demo"))


def replace(text: str, name: str, passage: str) -> str:
    read_region(text, name)  # exactly one region
    return region(name).sub(lambda m: m.group(1) + passage + m.group(3), text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the passages in README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff if a passage's numbers differ")
    parser.add_argument("--only", default=",".join(DEMOS), help=f"comma-separated demos (default: {','.join(DEMOS)})")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each demo (default 2, as measured)")
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="render the finished runs found in --runs (of this environment) instead of rerunning them")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(DEMOS))
    if unknown or (args.reuse and not args.runs):
        parser.error(f"unknown demos {unknown}; choose from {', '.join(DEMOS)}" if unknown else "--reuse needs --runs")

    text = args.readme.read_text()
    for name in names:
        read_region(text, name)  # fail before minutes of demos
    stamp = provenance(args.threads)
    passages = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = (args.runs or Path(scratch)).resolve()
        for name in names:
            started = time.perf_counter()
            passages[name] = render(name, run_demo(name, out, args.threads, args.reuse), stamp)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    text = args.readme.read_text()  # again: others may have edited the README while the demos ran
    if args.write:
        for name, passage in passages.items():
            text = replace(text, name, passage)
        args.readme.write_text(text)
        print(f"wrote {', '.join(names)} into {args.readme}")
        return 0
    failed = [name for name in names if diff(name, read_region(text, name), passages[name])]
    for name in failed:
        print(diff(name, read_region(text, name), passages[name]))
    if failed:
        print(f"README.md's {', '.join(failed)} numbers differ from this run: if the change is meant, rewrite them "
              f"with python benchmarks/readme_demos.py --write --only {','.join(failed)}")
        return 1
    print(f"README.md's {', '.join(names)} numbers are what the demos print.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
