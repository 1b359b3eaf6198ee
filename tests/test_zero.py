"""The shared Trainer under DeepSpeed ZeRO-2: two CPU processes (``accelerate launch --use_deepspeed``, DeepSpeed's
CPU accelerator, gloo) train the toy task of tests/test_training.py through tests/zero_worker.py. The loss goes
down, every rank writes its shard of the checkpoint, an interrupted run resumed from it ends with the same weights as
an uninterrupted one, and the run matches one process without DeepSpeed. Launch settings that would train
differently from the run's own are refused (in-process, no launch)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visadapt.training import _fill_deepspeed

TESTS = Path(__file__).parent
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
# --grad-accum 2 with a checkpoint every 4 steps: the cut at step 9 falls inside an accumulation, so the resumed run
# starts from the step-8 checkpoint.
RUN = ["--grad-accum", "2", "--grad-clip", "1.0", "--checkpoint-every", "4", "--steps", "16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *args: str, accum: int = 2) -> subprocess.CompletedProcess:
    """accelerate launch of the worker on 2 processes under ZeRO-2 (one torch thread each); returns the process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--gradient_accumulation_steps", str(accum), "--main_process_port", str(_free_port()),
               str(TESTS / "zero_worker.py"), str(out), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-6000:]


@needs_deepspeed
def test_zero2_trains_checkpoints_every_shard_and_resumes_exactly(tmp_path):
    _ok(_launch(tmp_path / "straight", *RUN))
    straight = json.loads((tmp_path / "straight" / "zero.json").read_text())
    assert (straight["engine"], straight["zero_stage"], straight["num_processes"]) == ("DeepSpeedEngine", 2, 2)
    assert straight["optimizer_steps"] == 8  # 16 micro-batches, accumulated in pairs by the engine
    losses = straight["losses"]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.6 * sum(losses[:4]) and straight["accuracy"] > 0.9

    cut = tmp_path / "cut"
    proc = _launch(cut, *RUN, "--stop-at", "9")
    assert proc.returncode != 0 and "checkpoint" in proc.stdout + proc.stderr
    ckpt = cut / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 8
    engine = sorted(p.name for p in (ckpt / "deepspeed" / "engine").iterdir())
    assert engine == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (ckpt / "rng-0.safetensors").is_file() and (ckpt / "rng-1.safetensors").is_file()
    assert not list(cut.glob(".checkpoint*"))  # the staging folder was renamed into place, nothing left beside

    _ok(_launch(cut, *RUN, "--resume"))
    resumed = json.loads((cut / "zero.json").read_text())
    assert resumed["losses"] == losses[8:] and resumed["optimizer_steps"] == 8
    # Exact: the same processes, the same gloo reductions in the same order, dropout from each rank's restored RNG.
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()


@needs_deepspeed
def test_zero2_matches_one_process_without_deepspeed(tmp_path):
    """Accumulation, clipping (a clip that bites) and the schedule as in a plain run: 2 ranks x 4 = one batch of 8."""
    from test_training import ToyConfig
    from zero_worker import ZeroToyTrainer

    _ok(_launch(tmp_path / "zero", *RUN[:2], "--grad-clip", "0.05", *RUN[4:], "--no-dropout"))
    cfg = ToyConfig(grad_accum=2, grad_clip=0.05, checkpoint_every=4, steps=16, precision="no", dropout=False)
    ZeroToyTrainer(cfg, tmp_path / "plain").run()
    ZeroToyTrainer(dataclasses.replace(cfg, grad_clip=None), tmp_path / "unclipped").run()
    zero, plain, unclipped = (load_file(str(tmp_path / run / "model.safetensors"))
                              for run in ("zero", "plain", "unclipped"))
    # Not bit-exact: the mean over 8 examples is summed in another order (two halves, then an all-reduce); measured
    # differences are below 1e-7.
    assert all(torch.allclose(zero[k], plain[k], rtol=0, atol=1e-6) for k in zero)
    assert not all(torch.allclose(zero[k], unclipped[k], rtol=0, atol=1e-3) for k in zero)


def test_deepspeed_settings_that_differ_from_the_run_are_refused():
    config = {"gradient_accumulation_steps": "auto", "gradient_clipping": 1.0}
    _fill_deepspeed(config, "gradient_accumulation_steps", 4, "--grad-accum")
    _fill_deepspeed(config, "gradient_clipping", 1.0, "--grad-clip")
    _fill_deepspeed(config, "train_micro_batch_size_per_gpu", 2, "--batch-size / processes")
    assert config == {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 2}
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps: 4, but this run's --grad-accum is 2.*"
                                         r"Set gradient_accumulation_steps to 2 or auto"):
        _fill_deepspeed(config, "gradient_accumulation_steps", 2, "--grad-accum")
    with pytest.raises(ValueError, match="gradient_clipping: 1.0, but this run's --grad-clip is 0.0"):
        _fill_deepspeed(config, "gradient_clipping", 0.0, "--grad-clip")


def test_an_accelerate_config_with_other_accumulation_is_refused(tmp_path, monkeypatch):
    """accelerate launch --gradient_accumulation_steps (or the config file's) overrides the run's silently: refuse."""
    from test_training import ToyConfig, ToyTrainer

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ValueError, match="gradient_accumulation_steps: 4, but this run's --grad-accum is 2"):
        ToyTrainer(ToyConfig(grad_accum=2), tmp_path / "run")
    assert not (tmp_path / "run").exists()
