"""The shared Trainer on a toy task: run folder, resume under gradient accumulation, the NaN/inf guard, atomic
checkpoints (a kill between renames), refusing foreign folders, file modes, and the config-driven command line."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import Dataset

from visadapt.run_config import RunConfig, recipe_default
from visadapt.training import ShotBatches, Trainer
from visadapt.utils import TrainingDiverged, io
from visadapt.utils.cli import HelpFormatter, add_config_arguments, config_from_args, option, typed_by_user


class Blobs(Dataset):
    """Two Gaussian blobs; items are fetched as (index, augmentation seed) like every visadapt training set."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.cat([torch.randn(20, 4, generator=g) + 2, torch.randn(19, 4, generator=g) - 2])
        self.y = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(19, dtype=torch.long)])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):
        i, aug = index
        noise = torch.randn(4, generator=torch.Generator().manual_seed(aug)) * 0.1
        return self.x[i] + noise, self.y[i]


@dataclass
class ToyConfig(RunConfig):
    seed: int = recipe_default("seed", 0)
    batch_size: int = recipe_default("batch_size", 8)
    lr: float = option(0.1, "learning rate")
    steps: int = option(12, "steps")
    nan_at: Optional[int] = option(None, "return a NaN loss at this step (a test switch)")
    tags: Sequence[str] = option(("a", "b"), "a list")
    dropout: bool = option(True, "dropout in the toy model")


class ToyTrainer(Trainer):
    def setup(self) -> None:
        layers = [torch.nn.Linear(4, 8), torch.nn.ReLU()]
        layers += [torch.nn.Dropout(0.3)] if self.cfg.dropout else []
        self.model = torch.nn.Sequential(*layers, torch.nn.Linear(8, 2))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=5, gamma=0.5)
        self.train_set, self.total_steps = Blobs(), self.cfg.steps
        self.calls = 0

    def compute_loss(self, batch) -> torch.Tensor:
        self.calls += 1
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        return loss * float("nan") if self.cfg.nan_at == self.calls else loss

    def evaluate(self, state: dict) -> dict:
        data = Blobs()
        with torch.no_grad():
            self.model.eval()
            accuracy = (self.model(data.x).argmax(-1) == data.y).float().mean().item()
        return {"accuracy": accuracy}

    def write_outputs(self, results: dict, state: dict) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.unwrapped_model().state_dict().items()},
                  self.out / "model.safetensors")


def _weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_a_run_writes_its_folder_and_learns(tmp_path):
    results = ToyTrainer(ToyConfig(), tmp_path / "run").run()
    run = tmp_path / "run"
    assert results["accuracy"] > 0.9
    for name in ("run_config.json", "results.json", "training_curve.png", "report.md", "model.safetensors"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoint").exists()
    assert json.loads((run / "run_config.json").read_text()) == ToyConfig().to_json()
    assert {"wall_time_s", "device", "precision", "visadapt_version"} <= set(results)


@pytest.mark.parametrize("accum", [1, 3])
def test_resume_is_bit_exact_under_gradient_accumulation(tmp_path, accum):
    cfg = ToyConfig(grad_accum=accum, steps=24, checkpoint_every=3 * accum, grad_clip=1.0)
    ToyTrainer(cfg, tmp_path / "straight").run()

    def stop(step, record):
        if step == 2 * 3 * accum + 1:  # inside an accumulation when accum > 1: resumes from the last checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ToyTrainer(cfg, tmp_path / "cut", callbacks=[stop]).run()
    assert (tmp_path / "cut" / "checkpoint" / "state.json").is_file()
    ToyTrainer(cfg, tmp_path / "cut", resume=True).run()
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_steps_the_optimizer_once_per_group(tmp_path):
    steps = []
    trainer = ToyTrainer(ToyConfig(grad_accum=4, steps=10, dropout=False), tmp_path / "run")
    original = torch.optim.SGD.step

    def counting(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = counting
    try:
        trainer.run()
    finally:
        torch.optim.SGD.step = original
    assert len(steps) == 3  # micro-batches 4, 8 and the last, partial group (10)


def test_a_nan_loss_stops_with_the_step_and_writes_no_results(tmp_path):
    with pytest.raises(TrainingDiverged, match="step 5: the loss is nan"):
        ToyTrainer(ToyConfig(nan_at=5), tmp_path / "run").run()
    assert not (tmp_path / "run" / "results.json").exists()


def test_non_finite_weights_stop_at_the_checkpoint_naming_the_tensor(tmp_path):
    trainer = ToyTrainer(ToyConfig(checkpoint_every=4), tmp_path / "run")

    def poison(step, record):  # callbacks run before the step's checkpoint
        if step == 4:
            with torch.no_grad():
                trainer.unwrapped_model()[0].weight[0, 0] = float("inf")

    trainer.callbacks.append(poison)
    with pytest.raises(TrainingDiverged, match=r"step 4: weight 0\.weight holds inf"):
        trainer.run()
    assert not (tmp_path / "run" / "results.json").exists()


class Killed(BaseException):
    """The process dying: nothing of the trainer's own handling runs."""


def test_checkpoint_survives_a_kill_between_its_renames(tmp_path, monkeypatch):
    cfg = ToyConfig(checkpoint_every=3, steps=12)
    ToyTrainer(cfg, tmp_path / "straight").run()
    real_replace, calls = os.replace, []

    def killed(src, dst):
        calls.append(dst)
        if Path(dst).name == "checkpoint" and len([c for c in calls if Path(c).name == "checkpoint"]) == 2:
            raise Killed  # the process dies after the old checkpoint was moved aside
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", killed)
    with pytest.raises(Killed):
        ToyTrainer(cfg, tmp_path / "cut").run()
    monkeypatch.setattr(io.os, "replace", real_replace)
    run = tmp_path / "cut"
    assert not (run / "checkpoint").exists() and (run / ".checkpoint.old" / "state.json").is_file()
    ToyTrainer(cfg, run, resume=True).run()  # the step-3 checkpoint is put back, whole
    a, b = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_settings_are_refused_before_anything_is_written(tmp_path, lr):
    with pytest.raises(ValueError, match="--lr .*must be a finite number"):
        ToyTrainer(ToyConfig(lr=lr), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_more_accumulation_than_steps_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="--grad-accum 100 is more than the run's 12 micro-batches"):
        ToyTrainer(ToyConfig(grad_accum=100, steps=12), tmp_path / "run").run()
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FileExistsError, match="not a visadapt run.*holiday.jpg"):
        ToyTrainer(ToyConfig(), tmp_path / "photos")
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["holiday.jpg"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.save_json_atomic({"a": 1}, tmp_path / "r.json")
        io.write_text_atomic("x", tmp_path / "r.md")
        with io.staged_dir(tmp_path / "folder") as stage:
            (stage / "w.bin").write_bytes(b"1")
        with io.replace_dir(tmp_path / "ckpt") as stage:
            (stage / "s.json").write_text("{}")
    finally:
        os.umask(old)
    for path in ("r.json", "r.md", "folder/w.bin", "ckpt/s.json"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == mode, path
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o777 & ~umask


def test_shot_batches_can_drop_a_last_batch_of_one():
    assert ShotBatches.batches_per_epoch(33, 16) == 3 and ShotBatches.batches_per_epoch(33, 16, True) == 2
    batches = list(ShotBatches(33, 16, total=4, seed=0, drop_singleton=True))
    assert [len(b) for b in batches] == [16, 16, 16, 16]
    assert list(ShotBatches(34, 16, total=3, seed=0, drop_singleton=True))[2].__len__() == 2


def test_shot_batches_share_each_batch_over_the_processes():
    """Two processes: each batch of one process comes as two shares in turn (accelerate deals them out), the short
    last batch of an epoch too, and the shares' weighted mean is the batch's mean."""
    one = list(ShotBatches(39, 8, total=12, seed=0))
    shares = list(ShotBatches(39, 8, total=12, seed=0, num_processes=2))
    assert len(shares) == len(ShotBatches(39, 8, total=12, seed=0, num_processes=2)) == 24
    assert [a + b for a, b in zip(shares[::2], shares[1::2])] == one
    assert [len(b) for b in shares[8:10]] == [4, 3]  # step 4: the epoch's last batch, of 7
    resumed = list(ShotBatches(39, 8, total=12, seed=0, start=4, num_processes=2))
    assert resumed == shares[8:]
    batches = ShotBatches(39, 8, total=12, seed=0, num_processes=2)
    assert [batches.batch_len(s) for s in range(12)] == [len(b) for b in one]
    assert batches.share_weight(3, 0) == batches.share_weight(3, 1) == 1.0
    assert (batches.share_weight(4, 0), batches.share_weight(4, 1)) == (8 / 7, 6 / 7)
    losses = torch.rand(7)  # per item; each process's loss is its share's mean
    weighted = (losses[:4].mean() * batches.share_weight(4, 0) + losses[4:].mean() * batches.share_weight(4, 1)) / 2
    assert torch.allclose(weighted, losses.mean())
    dropped = ShotBatches(33, 16, total=3, seed=0, drop_singleton=True, num_processes=2)
    assert [dropped.batch_len(s) for s in range(3)] == [16, 16, 16]


@pytest.mark.parametrize("n, batch, processes, drop, message", [
    (39, 7, 2, False, "--batch-size 7 does not split into 2 equal shares.*pass --batch-size 6"),
    (3, 2, 2, False, "3 items in batches of 2 end each epoch with a batch of 1, too few for 2 processes.*"
                     "pass --batch-size 4, or launch fewer processes"),
    (35, 16, 2, True, "batch of 3, too few for 2 processes to take 2\\+ each.*pass --batch-size 14"),
    (1, 2, 2, False, "1 items are too few for 2 processes"),
])
def test_batches_the_processes_cannot_share_are_refused_naming_a_batch_size(n, batch, processes, drop, message):
    with pytest.raises(ValueError, match=message):
        ShotBatches(n, batch, total=4, seed=0, drop_singleton=drop, num_processes=processes)
    ShotBatches(n, batch, total=4, seed=0, drop_singleton=drop)  # one process takes any batch
    ShotBatches(33, 16, total=4, seed=0, drop_singleton=True, num_processes=2)  # the batch of one is dropped


def test_a_run_refuses_batches_its_processes_cannot_share_before_writing(tmp_path, monkeypatch):
    from accelerate import Accelerator

    trainer = ToyTrainer(ToyConfig(batch_size=7), tmp_path / "run")
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))  # as if launched on 2 processes
    with pytest.raises(ValueError, match="--batch-size 7 does not split into 2 equal shares.*--batch-size 6"):
        trainer.run()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ config → CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_config_arguments(parser, ToyConfig)
    return parser


def test_flags_come_from_the_config_fields():
    args = _parser().parse_args(["--lr", "0.5", "--no-dropout", "--tags", "x,y", "z", "--checkpoint-every", "none"])
    cfg = config_from_args(ToyConfig, args)
    assert cfg == ToyConfig(lr=0.5, dropout=False, tags=["x", "y", "z"], checkpoint_every=None)
    assert typed_by_user(args, "lr") and not typed_by_user(args, "seed")
    with pytest.raises(SystemExit):
        _parser().parse_args(["--precision", "fp8"])


def test_config_file_fills_what_the_command_line_leaves(tmp_path):
    saved = tmp_path / "run_config.json"
    saved.write_text(json.dumps(ToyConfig(lr=0.01, steps=99, tags=["q"]).to_json()))
    cfg = config_from_args(ToyConfig, _parser().parse_args(["--config", str(saved), "--steps", "5"]))
    assert (cfg.lr, cfg.steps, list(cfg.tags)) == (0.01, 5, ["q"])
    saved.write_text(json.dumps({"lr": 0.1, "learning_rate": 3}))
    with pytest.raises(ValueError, match="learning_rate"):
        config_from_args(ToyConfig, _parser().parse_args(["--config", str(saved)]))


def _command_help(*names: str) -> str:
    from visadapt.cli import build_parser

    parser = build_parser()
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser.format_help()


def test_help_shows_each_default_once():
    text = " ".join(_parser().format_help().split())
    assert "learning rate (default: 0.1)" in text and "(default: a,b)" in text
    for command in (("fewshot", "train"), ("hsi", "train")):
        options = _command_help(*command).split("\n  --")
        assert len(options) > 30 and all(option.count("(default:") <= 1 for option in options), command
    fewshot = " ".join(_command_help("fewshot", "train").split())
    assert "labelled images per class (default: 16)" in fewshot and "LoRA rank (default: 2)" in fewshot
    assert "data-loading processes (default: 0)" in fewshot and "(default: None)" not in fewshot


def test_the_command_line_answers_help_without_torch():
    code = ("import sys, visadapt.cli as c; p = c.build_parser(); p.format_help();"
            "assert not {'torch', 'peft', 'open_clip', 'timm', 'gradio'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("first", [
    "visadapt, timm, peft",
    "visadapt, peft, timm",  # peft looks timm up (importlib.util.find_spec) without loading it
    "visadapt.adapters.layer",  # peft's first import comes from inside the adapters package
])
def test_import_visadapt_registers_the_timm_models_and_the_peft_methods(first):
    code = (f"import {first}; import timm, peft; from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as types;"
            "m = timm.create_model('lola_specvit_tiny', in_chans=5, img_size=7, num_classes=3);"
            "assert 'BLOCK_LORA' in types and 'COMP_LORA' in types")
    subprocess.run([sys.executable, "-c", code], check=True)
