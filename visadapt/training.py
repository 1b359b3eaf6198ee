"""What every task trainer shares: seeded resumable batches, the precision switch, the run folder's resume checks and
the atomic checkpoint (model tensors, optimizer state and RNG states in safetensors, the rest in JSON).

A task trainer (``visadapt.fewshot.train``, ``visadapt.hyperspectral.train``) builds its model, data and loop on
accelerate and calls these, so ``--resume`` behaves the same in every task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from safetensors.torch import load_file, save_file
from torch.utils.data import Sampler

from visadapt._io import staged_dir


class ShotBatches(Sampler):
    """Batches of ``(index, augmentation seed)`` for steps ``start .. total-1``.

    Epoch e visits the items in a permutation drawn from (seed, e); an epoch's last batch may be short (CLIP-LoRA
    keeps partial batches). Everything is a function of (seed, step), so a resumed run sees the same batches.
    """

    def __init__(self, n_items: int, batch_size: int, total: int, seed: int, start: int = 0) -> None:
        self.n_items, self.batch_size, self.total, self.seed, self.start = n_items, batch_size, total, seed, start

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, epoch = 0, 0
        while True:
            order = torch.randperm(self.n_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            for begin in range(0, self.n_items, self.batch_size):
                if step >= self.total:
                    return
                if step >= self.start:
                    yield [(int(i), hash((self.seed, step, j)) & (2**62 - 1))
                           for j, i in enumerate(order[begin:begin + self.batch_size])]
                step += 1
            epoch += 1


def mixed_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for a ``--precision`` value (auto: fp16 on CUDA, none on CPU)."""
    if precision == "auto":
        return "fp16" if torch.cuda.is_available() else "no"
    if precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, no, fp16 or bf16, got {precision!r}.")
    return precision


def make_accelerator(precision: str) -> Accelerator:
    """The trainers' accelerator: ``split_batches`` keeps the global batch size whatever the process count."""
    return Accelerator(mixed_precision=mixed_precision(precision),
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def check_run_dir(out: Path, resume: bool, config: dict, resume_free: set[str]) -> None:
    """Refuse to overwrite a run, to resume what cannot be resumed, or to resume with other settings.

    ``config`` is the new run's settings as JSON; keys in ``resume_free`` may change between sessions.
    """
    started = (out / "checkpoint").exists() or (out / "results.json").exists()
    if started and not resume:
        raise FileExistsError(f"{out} already holds a run. Pass --resume to continue it, or choose a new --out.")
    if resume and (out / "results.json").exists() and not (out / "checkpoint").exists():
        raise FileExistsError(f"{out} holds a finished run (results.json); there is nothing to resume.")
    if resume and not started:
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint to resume from.")
    if resume:
        saved = json.loads((out / "run_config.json").read_text())
        changed = sorted(k for k in config if k not in resume_free and saved.get(k) != config[k])
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} → {config[k]!r}" for k in changed)
            raise ValueError(f"--resume: {out} was started with other settings ({diff}). Resume with the same "
                             "settings, or start a new run in another --out.")


def save_checkpoint(accelerator, folder: Path, model_tensors: dict[str, torch.Tensor], optimizer,
                    meta: dict) -> None:
    """Write the checkpoint atomically from the main process: ``state.safetensors`` + ``state.json``."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    opt_state = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()}
    tensors.update({f"model.{name}": t.detach() for name, t in model_tensors.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with staged_dir(folder) as stage:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, stage / "state.safetensors")
        (stage / "state.json").write_text(json.dumps({**meta, "param_groups": opt_state["param_groups"]}))


def load_checkpoint(folder: Path, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore the optimizer; return the meta (with ``rng`` tensors) and the model tensors by name."""
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    opt_state: dict = {"state": {}, "param_groups": meta.pop("param_groups")}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    meta["rng"] = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return meta, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def restore_rng(state: dict) -> None:
    """Put back the RNG states a checkpoint saved (popped from ``state``), right before the resumed steps run."""
    rng = state.pop("rng", {})
    if "rng.cpu" in rng:
        torch.set_rng_state(rng["rng.cpu"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])
