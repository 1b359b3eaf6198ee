"""Measurement helpers of the benchmark scripts (benchmarks/): peak memory per device, device names, worker processes.

Each benchmark runs every configuration in a fresh child process (the script re-invokes itself with ``--worker``
and prints one JSON line behind a marker), so every configuration starts from a clean allocator and its peak memory
is its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

MiB = 2 ** 20


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (what ru_maxrss reports) to the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Baseline now, peak later: ``torch.cuda`` allocator statistics on CUDA, the process's RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.synchronize(device)
            self.baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.reset = True
        else:
            self.baseline = current_rss()
            self.reset = reset_peak_rss()

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


class BlockCalls:
    """Counts, while active, how often each named module's forward starts and how often a backward pass reaches
    its input: the work a change saves shows up as counts, which noisy shared cores do not blur.

    ``forward[name]``: calls entered (a forward cut short inside the module still counts; recomputations of
    gradient-checkpointed pieces inside it do not). ``backward[name]``: backward passes that computed the gradient
    of the module's input hidden states (its first positional argument or ``hidden_states=``), i.e. went through it.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module]) -> None:
        self.modules = dict(modules)
        self.forward: Counter = Counter()
        self.backward: Counter = Counter()
        self._handles: list = []

    @classmethod
    def unet_blocks(cls, unet: torch.nn.Module) -> "BlockCalls":
        """A diffusers UNet's blocks: ``down_blocks.i``, ``mid_block``, ``up_blocks.i``."""
        blocks = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
        if getattr(unet, "mid_block", None) is not None:
            blocks["mid_block"] = unet.mid_block
        blocks.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
        return cls(blocks)

    def __enter__(self) -> "BlockCalls":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def count(grad):
            self.backward[name] += 1

        def hook(module, args, kwargs):
            self.forward[name] += 1
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(count)
        return hook

    def totals(self) -> tuple[int, int]:
        """(forward calls, backward passes) summed over the modules."""
        return sum(self.forward.values()), sum(self.backward.values())


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    cores = len(os.sched_getaffinity(0))
    return f"{models[0] if models else 'unknown CPU'} ({cores} cores usable, {torch.get_num_threads()} torch threads)"


def answer_worker(worker: Optional[Sequence[str]], marker: str, measure: Callable[..., dict]) -> bool:
    """In a child started by :func:`run_child` (``worker``: its ``--worker`` values), print ``measure(*worker)``'s
    row after ``marker`` and return True; in the parent (no ``worker``) return False."""
    if not worker:
        return False
    print(marker + json.dumps(measure(*worker)), flush=True)
    return True


def run_child(script: str, marker: str, *worker_args: str) -> dict[str, Any]:
    """Run ``script`` again in a child with this invocation's flags plus ``--worker …``; return its JSON row."""
    cmd = [sys.executable, str(Path(script).resolve()), *sys.argv[1:], "--worker", *worker_args]
    child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if child.returncode != 0:
        hint = " (killed: out of memory?)" if child.returncode == -9 else ""
        sys.exit(f"{' '.join(worker_args)}: worker exited with status {child.returncode}{hint}; its stderr is above.")
    lines = [line for line in child.stdout.splitlines() if line.startswith(marker)]
    return json.loads(lines[-1][len(marker):])
