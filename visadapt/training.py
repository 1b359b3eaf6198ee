"""The one training loop every task shares: :class:`Trainer`, on accelerate.

A task trainer subclasses :class:`Trainer` and writes only its own math: :meth:`Trainer.setup` (data, model,
optimizer, schedule), :meth:`Trainer.compute_loss` (one batch), :meth:`Trainer.evaluate` (the results) and
:meth:`Trainer.write_outputs` (its files). The loop owns the rest, the same way in every task:

- ``accelerator.prepare``, ``accelerator.accumulate`` (gradient accumulation, no DDP sync on micro-batches),
  autocast / ``--precision``, gradient clipping;
- DeepSpeed ZeRO when launched with an accelerate DeepSpeed config (``accelerate launch --config_file ...``):
  model, optimizer and loader prepared in one call, the engine stepping, accumulating and clipping (its
  ``gradient_accumulation_steps`` and ``gradient_clipping`` must match ``--grad-accum`` / ``--grad-clip``, or be
  ``auto``), and checkpoints to which every rank writes its shard;
- batches that are a function of (seed, step) (:class:`ShotBatches`), so a resumed run sees the same batches; on
  several processes each batch is split into one share per process, so every step runs on every process (an
  uneven share's loss is weighted to the batch mean);
- a tqdm bar, the loss / learning-rate history, per-step callbacks;
- a NaN / inf guard: a non-finite loss or weight stops the run with the step and the cause
  (:class:`~visadapt.utils.TrainingDiverged`), and no result is written;
- the run folder: ``run_config.json`` (the whole config), periodic and Ctrl-C checkpoints written atomically as one
  folder (weights, optimizer, schedule, RNG and history; ``resume=True`` continues bit-exactly; under DeepSpeed
  the folder also holds the engine's checkpoint, with each rank's optimizer shard, and each rank's RNG), then
  ``results.json``, ``training_curve.png`` and ``report.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    broadcast_object_list,
    is_compiled_module,
    set_seed,
)
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from visadapt.run_config import RunConfig
from visadapt.utils import (
    TrainingDiverged,
    load_safetensors,
    recover_dir,
    replace_dir,
    save_json_atomic,
    write_text_atomic,
)
from visadapt.utils.cli import check_ranges
from visadapt.version import __version__

StepCallback = Callable[[int, dict], None]
RUN_CONFIG = "run_config.json"
#: where, inside a checkpoint folder, the DeepSpeed engine writes its checkpoint (its tag: one sub-folder)
ENGINE_DIR, ENGINE_TAG = "deepspeed", "engine"


class ShotBatches(Sampler):
    """Batches of ``(index, augmentation seed)`` for steps ``start .. total-1``.

    Epoch e visits the items in a permutation drawn from (seed, e); an epoch's last batch may be short (CLIP-LoRA
    keeps partial batches). Everything is a function of (seed, step), so a resumed run sees the same batches.
    With ``drop_singleton`` an epoch's last batch is dropped when it would hold one item (BatchNorm cannot train
    on one sample); :meth:`batches_per_epoch` counts what remains.

    On ``num_processes`` > 1 each step's batch is yielded as that many consecutive shares (contiguous slices, the
    first ones one item larger when the batch does not split evenly), which accelerate deals out one per process
    without re-cutting them. The batches are those of one process, whatever the number of processes; a share's
    loss is weighted by :meth:`share_weight` so that the processes' mean is the mean over the whole batch.
    """

    #: what accelerate reads: None, so that it hands each process its share as it comes (a batch size would make it
    #: cut the batches itself and skip an epoch's short one)
    batch_size = None

    def __init__(self, n_items: int, batch_size: int, total: int, seed: int, start: int = 0,
                 drop_singleton: bool = False, num_processes: int = 1) -> None:
        self.n_items, self.size, self.total, self.seed, self.start = n_items, batch_size, total, seed, start
        self.drop_singleton, self.num_processes = drop_singleton, num_processes
        self.per_epoch = self.batches_per_epoch(n_items, batch_size, drop_singleton)
        check_shares(n_items, batch_size, num_processes, drop_singleton)

    @staticmethod
    def batches_per_epoch(n_items: int, batch_size: int, drop_singleton: bool = False) -> int:
        full, rest = divmod(n_items, batch_size)
        return full + (rest > (1 if drop_singleton else 0))

    def __len__(self) -> int:
        return (self.total - self.start) * self.num_processes

    def batch_len(self, step: int) -> int:
        """How many items step ``step``'s batch holds (an epoch's last one may be short)."""
        return min(self.size, self.n_items - step % self.per_epoch * self.size)

    def share_weight(self, step: int, process_index: int) -> float:
        """The factor on process ``process_index``'s mean loss of step ``step`` that makes the processes' mean
        (DDP's and DeepSpeed's gradient average) the mean over the whole batch: share size x processes / batch
        size; 1.0 where the batch splits evenly."""
        share = _share_sizes(self.batch_len(step), self.num_processes)[process_index]
        return share * self.num_processes / self.batch_len(step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, epoch = 0, 0
        while True:
            order = torch.randperm(self.n_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            for begin in range(0, self.per_epoch * self.size, self.size):
                if step >= self.total:
                    return
                if step >= self.start:
                    batch = [(int(i), hash((self.seed, step, j)) & (2**62 - 1))
                             for j, i in enumerate(order[begin:begin + self.size])]
                    yield from _split(batch, self.num_processes)
                step += 1
            epoch += 1


def _share_sizes(n: int, parts: int) -> list[int]:
    """``n`` items over ``parts`` processes as evenly as possible, the first ones one larger."""
    return [n // parts + (k < n % parts) for k in range(parts)]


def _split(batch: list, parts: int) -> Iterator[list]:
    begin = 0
    for size in _share_sizes(len(batch), parts):
        yield batch[begin:begin + size]
        begin += size


def check_shares(n_items: int, batch_size: int, num_processes: int, drop_singleton: bool = False) -> None:
    """Refuse batches that the processes cannot share: a ``batch_size`` that is not a multiple of ``num_processes``,
    or an epoch's short last batch that would leave a process no item (or one, with ``drop_singleton``: BatchNorm
    needs two). The message names a ``--batch-size`` that works. Other uneven last batches are weighted
    (:meth:`ShotBatches.share_weight`); padding or dropping items instead would change what the run trains on."""
    if num_processes == 1 or _shareable(n_items, batch_size, num_processes, drop_singleton):
        return
    least = 2 if drop_singleton else 1
    if batch_size % num_processes or batch_size // num_processes < least:
        what = f"--batch-size {batch_size} does not split into {num_processes} equal shares of {least}+ items"
    else:
        what = (f"{n_items} items in batches of {batch_size} end each epoch with a batch of {n_items % batch_size}, "
                f"too few for {num_processes} processes to take {least}+ each")
    fits = [b for b in range(num_processes, max(n_items, batch_size) + num_processes, num_processes)
            if _shareable(n_items, b, num_processes, drop_singleton)]
    fix = (f"pass --batch-size {min(fits, key=lambda b: (abs(b - batch_size), b))}" if fits else
           f"{n_items} items are too few for {num_processes} processes")
    raise ValueError(f"{what}: {fix}, or launch fewer processes (accelerate launch --num_processes).")


def _shareable(n_items: int, batch_size: int, num_processes: int, drop_singleton: bool) -> bool:
    """Full batches split evenly, and an epoch's short last batch (unless dropped) gives every process enough."""
    least, rest = 2 if drop_singleton else 1, n_items % batch_size
    dropped = rest <= (1 if drop_singleton else 0)
    return (batch_size % num_processes == 0 and batch_size // num_processes >= least
            and (dropped or rest >= least * num_processes))


def mixed_precision(precision: str) -> str:
    """accelerate's ``mixed_precision`` for a ``--precision`` value (auto: fp16 on CUDA, none on CPU)."""
    if precision == "auto":
        return "fp16" if torch.cuda.is_available() else "no"
    if precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, no, fp16 or bf16, got {precision!r}.")
    return precision


def check_run_dir(out: Path, resume: bool, config: dict, resume_free: set[str] | frozenset[str]) -> None:
    """Refuse to overwrite a run, to write into a folder that is not a run, to resume what cannot be resumed, or to
    resume with other settings. ``config`` is the new run's settings as JSON; keys in ``resume_free`` may change."""
    recover_dir(out / "checkpoint")
    started = (out / "checkpoint").exists() or (out / "results.json").exists()
    if started and not resume:
        raise FileExistsError(f"{out} already holds a run. Pass --resume to continue it, or choose a new --out.")
    if not started and out.is_dir() and not (out / RUN_CONFIG).exists() and _user_files(out):
        raise FileExistsError(f"{out} holds files that are not a visadapt run ({', '.join(_user_files(out)[:3])}"
                              "…); choose a new or empty --out.")
    if resume and (out / "results.json").exists() and not (out / "checkpoint").exists():
        raise FileExistsError(f"{out} holds a finished run (results.json); there is nothing to resume.")
    if resume and not started:
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint to resume from.")
    if resume:
        saved = json.loads((out / RUN_CONFIG).read_text())
        changed = sorted(k for k in config if k not in resume_free and saved.get(k) != config[k])
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} → {config[k]!r}" for k in changed)
            raise ValueError(f"--resume: {out} was started with other settings ({diff}). Resume with the same "
                             "settings, or start a new run in another --out.")


def _user_files(out: Path) -> list[str]:
    """What a folder holds besides what a run writes before its first checkpoint (demo data, split files)."""
    ours = {"data", "fewshot_split.json", "split.json"}
    return sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))


def save_checkpoint(folder: Path, model_tensors: dict[str, torch.Tensor], optimizer, meta: dict) -> None:
    """Write ``state.safetensors`` (model, optimizer and RNG tensors) + ``state.json`` as one folder that replaces
    the previous checkpoint in a single rename, so a reader never mixes the files of two steps."""
    with replace_dir(folder) as stage:
        _write_state(stage, model_tensors, optimizer, meta)


def save_sharded_checkpoint(folder: Path, engine, model_tensors: dict[str, torch.Tensor], meta: dict,
                            accelerator: Accelerator) -> None:
    """The checkpoint of a DeepSpeed run, called on every rank: as :func:`save_checkpoint` (one folder, one rename,
    by the main process), but the optimizer is the engine's checkpoint in ``deepspeed/`` (each rank writes its ZeRO
    shard; frozen weights are left out) and each rank writes its RNG state to ``rng-<rank>.safetensors``. The
    trainable weights are in both the engine's files and ``state.safetensors``, which keeps what
    :meth:`Trainer.checkpoint_tensors` chooses (buffers, EMA copies) as without DeepSpeed."""
    main = accelerator.is_main_process
    with replace_dir(folder) if main else nullcontext() as stage:
        stage = Path(broadcast_object_list([str(stage) if main else None])[0])  # one folder on a shared disk
        engine.save_checkpoint(stage / ENGINE_DIR, tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
        save_file(_rng_state(), stage / f"rng-{accelerator.process_index}.safetensors")
        if main:
            _write_state(stage, model_tensors, None, {**meta, "num_processes": accelerator.num_processes})
        accelerator.wait_for_everyone()  # every rank's files are written before the main process renames the folder


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    return rng


def _write_state(stage: Path, model_tensors: dict[str, torch.Tensor], optimizer, meta: dict) -> None:
    """``state.safetensors`` and ``state.json`` into ``stage``; the optimizer's state too unless it is None."""
    tensors = {f"model.{name}": t.detach() for name, t in model_tensors.items()}
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        tensors.update({f"optimizer.{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()})
        meta = {**meta, "param_groups": opt_state["param_groups"]}
    tensors.update(_rng_state())
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, stage / "state.safetensors")
    (stage / "state.json").write_text(json.dumps(meta))


def load_checkpoint(folder: Path, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore the optimizer (unless it is None: a DeepSpeed engine restores its own); return the meta (with
    ``rng`` tensors) and the model tensors by name."""
    meta = json.loads((folder / "state.json").read_text())
    sharded = (folder / ENGINE_DIR).is_dir()
    if sharded != (optimizer is None):
        how = "with" if sharded else "without"
        raise ValueError(f"--resume: the checkpoint in {folder} was written by a run {how} DeepSpeed; resume it "
                         f"{how} DeepSpeed (the same accelerate launch as the interrupted run).")
    tensors = load_safetensors(folder / "state.safetensors")
    if optimizer is not None:
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


def check_finite(named_tensors: Any, step: int) -> None:
    """Raise :class:`TrainingDiverged` naming the first tensor holding a NaN or inf."""
    for name, tensor in named_tensors:
        if not torch.isfinite(tensor).all():
            kind = "NaN" if torch.isnan(tensor).any() else "inf"
            raise TrainingDiverged(f"Training diverged at step {step}: weight {name} holds {kind}. Nothing was "
                                   "written; lower the learning rate (--lr) and start again.")


def _process_group() -> list[InitProcessGroupKwargs]:
    """The communication backend of a DeepSpeed launch on a machine without GPUs (DeepSpeed's CPU accelerator, e.g.
    the tests): accelerate names none there, and each process would then take itself for the only one."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return []
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError as error:
        raise ImportError('This run was launched with DeepSpeed, which is not installed: pip install "visadapt['
                          'deepspeed]" (or pip install -e ".[deepspeed]" in a clone).') from error

    if get_accelerator().device_name() != "cpu":
        return []
    return [InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name())]


def _fill_deepspeed(ds_config: dict, key: str, value: float, flag: str) -> None:
    """Set a top-level DeepSpeed setting that is ``auto`` or absent to the run's value; refuse one that differs."""
    current = ds_config.get(key, "auto")
    if current == "auto":
        ds_config[key] = value
    elif float(current) != float(value):
        raise ValueError(f"The DeepSpeed config sets {key}: {current}, but this run's {flag} is {value}, so DeepSpeed "
                         f"would train differently from what the run records. Set {key} to {value} or auto in the "
                         f"accelerate config file (deepspeed_config) or the DeepSpeed JSON it names.")


class Trainer:
    """One training run into ``out_dir``, on accelerate. Subclass it and fill in the hooks below.

    The config is a :class:`~visadapt.run_config.RunConfig` (``seed``, ``batch_size``, ``grad_accum``,
    ``grad_clip``, ``precision``, ``checkpoint_every``, ``workers``) extended by the task's fields; its
    ``to_json()`` is what ``run_config.json`` records and what ``--resume`` compares (but ``resume_free``).
    A step is one batch (one micro-batch under gradient accumulation).

    Launched with an accelerate DeepSpeed config, the run trains under DeepSpeed (``self.deepspeed``, decided once
    here); ``self.model`` is then the DeepSpeed engine and ``self.optimizer`` accelerate's wrapper of its optimizer.
    Under DeepSpeed bf16/fp16 the engine holds the model's weights in that dtype and accelerate's autocast does
    nothing, so ``compute_loss`` feeds the model inputs of its weights' dtype (as the official scripts cast them).
    """

    #: config fields that may change between an interrupted run and its resumption
    resume_free: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "workers", "eval_batch_size",
                                                       "precision"})
    #: what the tqdm bar and the messages call a step
    step_unit: ClassVar[str] = "step"
    #: drop an epoch's last batch when it holds a single item (models with BatchNorm)
    drop_singleton_batches: ClassVar[bool] = False

    # Set by setup(): the module to train (prepared by accelerate), its optimizer, a per-step schedule with
    # ``state_dict``/``load_state_dict``/``get_last_lr``, the training set (indexed by (index, augmentation seed)
    # when ``collate_fn``'s dataset wants it) and the number of steps.
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_set: Dataset
    total_steps: int
    collate_fn: Optional[Callable] = None
    #: the training batches (set by the loop) and the factor on this process's loss of the current step
    batches: ShotBatches
    share_weight: float = 1.0

    def __init__(self, config: RunConfig, out_dir: str | Path, resume: bool = False,
                 callbacks: Sequence[StepCallback] = ()) -> None:
        self.cfg, self.out, self.resume, self.callbacks = config, Path(out_dir), resume, list(callbacks)
        check_ranges(config)  # again: a config's fields may have been set since it was built
        self.grad_accum = int(config.grad_accum)
        self.validate()
        check_run_dir(self.out, resume, config.to_json(), self.resume_free)
        self.accelerator = Accelerator(mixed_precision=mixed_precision(config.precision),
                                       gradient_accumulation_steps=self.grad_accum,
                                       # ShotBatches yields each process's share of a batch (split_batches would
                                       # skip an epoch's short batch)
                                       dataloader_config=DataLoaderConfiguration(split_batches=False),
                                       kwargs_handlers=_process_group())
        self.deepspeed = self.accelerator.state.deepspeed_plugin is not None
        self._check_launch()
        self.ckpt = self.out / "checkpoint"

    def _check_launch(self) -> None:
        """The accelerate config (or a DeepSpeed config file) must not train with other accumulation or clipping
        than the run's; ``auto`` entries of a DeepSpeed config take the run's values."""
        acc = self.accelerator
        if acc.gradient_accumulation_steps != self.grad_accum:  # ACCELERATE_GRADIENT_ACCUMULATION_STEPS wins
            raise ValueError(f"The accelerate config sets gradient_accumulation_steps: "
                             f"{acc.gradient_accumulation_steps}, but this run's --grad-accum is {self.grad_accum}. "
                             f"Set it to {self.grad_accum} in the accelerate config (or pass --grad-accum "
                             f"{acc.gradient_accumulation_steps}).")
        if self.deepspeed:
            plugin = acc.state.deepspeed_plugin
            if plugin.zero_stage not in (0, 1, 2):
                raise ValueError(f"DeepSpeed ZeRO stage {plugin.zero_stage}: visadapt's trainers run ZeRO stages 1 "
                                 "and 2 (stage 3 partitions the weights, which checkpoints and evaluation read whole); "
                                 "set zero_stage: 2 in the accelerate config.")
            ds = plugin.deepspeed_config
            clip = float(self.cfg.grad_clip or 0.0)  # DeepSpeed: 0 is no clipping
            _fill_deepspeed(ds, "gradient_accumulation_steps", self.grad_accum, "--grad-accum")
            _fill_deepspeed(ds, "gradient_clipping", clip, "--grad-clip")
            # each process trains on its share of a --batch-size batch (the loader has no batch_size)
            _fill_deepspeed(ds, "train_micro_batch_size_per_gpu", self.cfg.batch_size // acc.num_processes,
                            "--batch-size / processes")

    # --------------------------------------------------------------------------------------- what a task writes
    def validate(self) -> None:
        """Reject a config that cannot run, before anything is written (``ValueError`` naming the fix)."""

    def setup(self) -> None:
        """Load the data, build the model; set ``model``, ``optimizer``, ``scheduler``, ``train_set`` and
        ``total_steps``. Runs after the seed is set, before anything is written to the run folder."""
        raise NotImplementedError

    def save_inputs(self) -> None:
        """Write what defines the run besides its config (e.g. the few-shot draw), on the main process."""

    def before_training(self, state: dict) -> None:
        """Runs once the model is prepared; may add entries to ``state`` (saved with every checkpoint)."""

    def compute_loss(self, batch) -> torch.Tensor:
        """The training loss of one batch (under autocast): a mean over its items, which on several processes is
        this process's share (:meth:`ShotBatches.share_weight` weights an uneven one)."""
        raise NotImplementedError

    def backward(self, batch) -> torch.Tensor:
        """Loss and backward of one batch; returns the detached loss. Override for multi-pass rules (SAM, GLAD),
        calling this one for each pass (it weights the loss of an uneven share by :attr:`share_weight`)."""
        with self.accelerator.autocast():
            loss = self.compute_loss(batch)
        if self.share_weight != 1.0:  # this process's share of a batch the processes share unevenly
            loss = loss * self.share_weight
        self.accelerator.backward(loss)
        return loss.detach()

    def unwrapped_model(self) -> nn.Module:
        """The model without accelerate's wrappers (DDP, DeepSpeed's engine, torch.compile). accelerate's
        ``unwrap_model`` imports deepspeed whenever it is installed (about 1 s and a log line), so it is called only
        when something did wrap the model."""
        acc = self.accelerator
        if self.deepspeed or acc.distributed_type != DistributedType.NO or is_compiled_module(self.model):
            return acc.unwrap_model(self.model)
        return self.model

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: its trainable parameters (override to keep buffers too)."""
        model = self.unwrapped_model()
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        named = dict(self.unwrapped_model().named_parameters())
        unknown = sorted(set(tensors) - set(named))
        if unknown:
            raise ValueError(f"The checkpoint in {self.ckpt} does not fit this model (unknown {unknown[:3]}).")
        with torch.no_grad():
            for name, value in tensors.items():
                named[name].copy_(value)

    def evaluate(self, state: dict) -> dict:
        """Score the trained model; returns the task's results (the trainer adds timings and the environment)."""
        raise NotImplementedError

    def write_outputs(self, results: dict, state: dict) -> None:
        """Write the task's files (model or adapter through its pipeline, figures), on the main process."""

    def report(self, results: dict) -> str:
        """``report.md``'s Markdown."""
        return f"# Run\n\n```json\n{json.dumps(results, indent=1)}\n```\n\n![training curve](training_curve.png)\n"

    def curve_title(self) -> str:
        return ""

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        self._started = time.perf_counter()
        set_seed(cfg.seed)
        self.setup()
        check_shares(len(self.train_set), cfg.batch_size, acc.num_processes, self.drop_singleton_batches)
        if 0 < self.total_steps < self.grad_accum:  # it ran to the end and exited 0 with the initial weights
            raise ValueError(f"--grad-accum {self.grad_accum} is more than the run's {self.total_steps} micro-batches, "
                             "so no optimizer step would run; lower --grad-accum or train longer.")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json_atomic(cfg.to_json(), self.out / RUN_CONFIG)
            self.save_inputs()
        state = self._restore() if self.resume else {"step": 0, "history": []}
        if self.deepspeed:  # ZeRO partitions the optimizer over the model's parameters: one call builds the engine
            self.model, self.optimizer, loader = acc.prepare(self.model, self.optimizer, self._loader(state))
            if self.resume:
                self._restore_engine()
            self.before_training(state)
        else:
            self.model = acc.prepare(self.model)
            self.before_training(state)
            self.optimizer, loader = acc.prepare(self.optimizer, self._loader(state))
        self._fit(loader, state)
        check_finite(self.checkpoint_tensors().items(), state["step"])
        results = self.evaluate(state)
        results.update(self._run_facts(state))
        if acc.is_main_process:
            self._finish(results, state)
        acc.wait_for_everyone()
        return results

    def _loader(self, state: dict) -> DataLoader:
        """The training batches from step ``state["step"]`` on (each process's share of them once prepared)."""
        cfg = self.cfg
        self.batches = ShotBatches(len(self.train_set), cfg.batch_size, self.total_steps, cfg.seed,
                                   start=state["step"], drop_singleton=self.drop_singleton_batches,
                                   num_processes=self.accelerator.num_processes)
        # Its own generator keeps the loader off the global RNG, which drives dropout and must resume exactly.
        return DataLoader(self.train_set, batch_sampler=self.batches, collate_fn=self.collate_fn,
                          num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed))

    def _fit(self, loader, state: dict) -> None:
        cfg, acc = self.cfg, self.accelerator
        every = cfg.checkpoint_every or max(self.grad_accum, self.total_steps // 10)
        clip = cfg.grad_clip
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        step, tick = state["step"], time.perf_counter()
        restore_rng(state)
        bar = tqdm(total=self.total_steps, initial=step, desc=f"train {self.curve_title()}".strip(),
                   unit=self.step_unit, disable=not acc.is_main_process, dynamic_ncols=True)
        try:
            for batch in loader:
                self.share_weight = self.batches.share_weight(step, acc.process_index)
                # Under DeepSpeed, accelerator.backward accumulates, clips and steps through the engine, and the
                # optimizer's step and zero_grad do nothing.
                with acc.accumulate(self.model):
                    loss = self.backward(batch)
                    if clip and acc.sync_gradients:
                        acc.clip_grad_norm_(params, clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                lr = self.scheduler.get_last_lr()[0]
                with warnings.catch_warnings():  # the schedule counts micro-batches, so it may step first
                    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
                    self.scheduler.step()
                step += 1
                record = {"step": step, "loss": acc.reduce(loss, "mean").item(), "lr": lr, **self.step_facts(step)}
                if not math.isfinite(record["loss"]):
                    raise TrainingDiverged(f"Training diverged at step {step}: the loss is {record['loss']}. Nothing "
                                           "was written; lower the learning rate (--lr) and start again.")
                state["history"].append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                for callback in self.callbacks:
                    callback(step, record)
                if step % every == 0 and step % self.grad_accum == 0 and step < self.total_steps:
                    self._save_checkpoint(state, step, tick)
        except KeyboardInterrupt:
            if step % self.grad_accum == 0:
                self._save_checkpoint(state, step, tick)
                acc.print(f"\nInterrupted at {self.step_unit} {step}/{self.total_steps}; checkpoint saved. "
                          "Continue with the same command plus --resume.")
            else:
                acc.print(f"\nInterrupted inside a gradient accumulation at {self.step_unit} {step}/"
                          f"{self.total_steps}; --resume continues from the last checkpoint.")
            raise
        finally:
            bar.close()
        state["step"] = step
        state["train_time_s"] = state.get("train_time_s", 0.0) + time.perf_counter() - tick

    def step_facts(self, step: int) -> dict:
        """Extra entries of a step's history record (e.g. the epoch)."""
        return {}

    # ------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, state: dict, step: int, tick: float) -> None:
        tensors = self.checkpoint_tensors()
        check_finite(tensors.items(), step)
        meta = {**state, "step": step, "scheduler": self.scheduler.state_dict(),
                "train_time_s": state.get("train_time_s", 0.0) + time.perf_counter() - tick,
                # Times of earlier sessions carry over, so a resumed run reports its whole cost.
                "wall_time_s": state.get("wall_time_s", 0.0) + time.perf_counter() - self._started}
        self.accelerator.wait_for_everyone()
        if self.deepspeed:
            save_sharded_checkpoint(self.ckpt, self.model, tensors, meta, self.accelerator)
        elif self.accelerator.is_main_process:
            save_checkpoint(self.ckpt, tensors, self.optimizer, meta)

    def _restore(self) -> dict:
        """Load a checkpoint into the unprepared model, optimizer and schedule (the DeepSpeed engine's state is
        loaded once it exists: :meth:`_restore_engine`)."""
        meta, tensors = load_checkpoint(self.ckpt, None if self.deepspeed else self.optimizer)
        if self.deepspeed:
            acc = self.accelerator
            if meta["num_processes"] != acc.num_processes:
                raise ValueError(f"--resume: {self.ckpt} holds the ZeRO shards of {meta['num_processes']} processes; "
                                 f"resume with as many (accelerate launch --num_processes {meta['num_processes']}).")
            meta["rng"] = load_safetensors(self.ckpt / f"rng-{acc.process_index}.safetensors")
        self.load_checkpoint_tensors(tensors)
        self.scheduler.load_state_dict(meta.pop("scheduler"))
        return meta

    def _restore_engine(self) -> None:
        """The DeepSpeed engine's weights and this rank's optimizer shard (the schedule is ours, not the engine's)."""
        path, _ = self.model.load_checkpoint(self.ckpt / ENGINE_DIR, tag=ENGINE_TAG, load_lr_scheduler_states=False,
                                             load_module_strict=False)  # frozen weights were not saved
        if path is None:
            raise FileNotFoundError(f"--resume: no DeepSpeed checkpoint in {self.ckpt / ENGINE_DIR}.")

    # ----------------------------------------------------------------------------------------------- outputs
    def _run_facts(self, state: dict) -> dict:
        acc = self.accelerator
        return {"train_wall_time_s": state.get("train_time_s", 0.0),
                "wall_time_s": state.get("wall_time_s", 0.0) + time.perf_counter() - self._started,
                "device": str(acc.device), "num_processes": acc.num_processes, "precision": acc.mixed_precision,
                "visadapt_version": __version__}

    def _finish(self, results: dict, state: dict) -> None:
        from visadapt.utils.figures import plot_training_curve

        self.write_outputs(results, state)
        plot_training_curve(state["history"], self.out / "training_curve.png", title=self.curve_title())
        save_json_atomic(results, self.out / "results.json")
        write_text_atomic(self.report(results), self.out / "report.md")
        shutil.rmtree(self.ckpt, ignore_errors=True)  # the run is complete: the checkpoint only served resumption
