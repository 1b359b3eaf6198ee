"""The shared Trainer under DeepSpeed ZeRO-2: two CPU processes (``accelerate launch --use_deepspeed``, DeepSpeed's
CPU accelerator, gloo) train the toy task of tests/test_training.py through tests/zero_worker.py. The loss goes
down, every rank writes its shard of the checkpoint, an interrupted run resumed from it ends with the same weights as
an uninterrupted one, and the run matches one process without DeepSpeed; EasyRef's stage 2 trains under ZeRO-2 in
bf16. Launch settings that would train differently from the run's own are refused (in-process, no launch). Each
launch takes 15-25 s on two CPU cores. Plain DDP (no DeepSpeed) takes every step across the epochs' short batches,
which the processes share unevenly, and resumes exactly."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pytest
import torch
from safetensors.torch import load_file

from visadapt.training import ShotBatches, Trainer, _fill_deepspeed

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


# ZeRO-2 on 2 processes, fp32, accumulation in pairs (as the runs' --grad-accum 2)
ZERO2 = ["--use_deepspeed", "--zero_stage", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--gradient_accumulation_steps", "2"]


# plain DDP on 2 processes: accelerate's multi-GPU launcher (torchrun), kept on the CPU (gloo) by ACCELERATE_USE_CPU
# (its --cpu flag would start one process)
DDP = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ON_CPU = {"ACCELERATE_USE_CPU": "true"}


def _launch(out: Path, *args: str, launch: Sequence[str] = ZERO2, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """accelerate launch of the worker on 2 CPU processes (one torch thread each); returns the process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
               "--main_process_port", str(_free_port()), str(TESTS / "zero_worker.py"), str(out), *args]
    # The worker imports the toy task from tests/ by name: that folder goes on PYTHONPATH, since a script's own folder
    # is not on sys.path under PYTHONSAFEPATH=1 (or python -P).
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
           **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-6000:]


def test_two_processes_take_every_step_and_resume_exactly_across_short_batches(tmp_path):
    """Plain DDP, all 39 blobs in batches of 8: each epoch ends with a batch of 7, which the processes share 4 + 3
    (accelerate's split_batches skipped it: 10 steps of 12). One launch runs straight, cut at step 7 and resumed
    (tests/zero_worker.py --shots); about 12 s on 2 CPU cores."""
    from test_training import ToyConfig, ToyTrainer

    _ok(_launch(tmp_path, "--shots", "7", "--steps", "12", "--checkpoint-every", "3", "--no-dropout", launch=DDP,
                env=ON_CPU))
    ranks = [json.loads((tmp_path / f"shots-{rank}.json").read_text()) for rank in range(2)]
    one = [len(batch) for batch in ShotBatches(39, 8, total=12, seed=0)]
    assert one.count(7) == 2
    for rank in ranks:  # every process counts every step, in each of the three runs
        assert rank["num_processes"] == 2 and rank["straight"]["steps"] == list(range(1, 13))
        assert rank["cut"]["steps"] == list(range(1, 8)) and rank["cut-resumed"]["steps"] == list(range(8, 13))
        assert rank["cut"]["shares"] + rank["cut-resumed"]["shares"] == rank["straight"]["shares"]
    assert [a + b for a, b in zip(ranks[0]["straight"]["shares"], ranks[1]["straight"]["shares"])] == one
    straight, cut = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "cut"))
    assert all(torch.equal(straight[k], cut[k]) for k in straight)
    # The batches of one process, and their mean: the short batch's shares are weighted 8/7 and 6/7.
    ToyTrainer(ToyConfig(steps=12, precision="no", checkpoint_every=3, dropout=False), tmp_path / "one").run()
    alone = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert all(torch.allclose(straight[k], alone[k], rtol=0, atol=1e-6) for k in alone)


@needs_deepspeed
@pytest.mark.slow
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
@pytest.mark.slow
def test_zero2_matches_one_process_without_deepspeed(tmp_path):
    """Accumulation, clipping (a clip that bites) and the schedule as in a plain run: 2 ranks x 4 = one batch of 8,
    and each epoch's last batch of 7 shared 4 + 3 (weighted 8/7 and 6/7)."""
    from test_training import ToyConfig, ToyTrainer

    _ok(_launch(tmp_path / "zero", *RUN[:2], "--grad-clip", "0.05", *RUN[4:], "--no-dropout"))
    cfg = ToyConfig(grad_accum=2, grad_clip=0.05, checkpoint_every=4, steps=16, precision="no", dropout=False)
    ToyTrainer(cfg, tmp_path / "plain").run()
    ToyTrainer(dataclasses.replace(cfg, grad_clip=None), tmp_path / "unclipped").run()
    zero, plain, unclipped = (load_file(str(tmp_path / run / "model.safetensors"))
                              for run in ("zero", "plain", "unclipped"))
    # Not bit-exact: the mean over 8 examples is summed in another order (two halves, then an all-reduce); measured
    # differences are below 1e-7.
    assert all(torch.allclose(zero[k], plain[k], rtol=0, atol=1e-6) for k in zero)
    assert not all(torch.allclose(zero[k], unclipped[k], rtol=0, atol=1e-3) for k in zero)


@needs_deepspeed
@pytest.mark.slow
def test_easyref_stage2_trains_under_zero2_in_bf16(tmp_path):
    """EasyRef's stage 2 (the whole MLLM and a UNet LoRA train) as the official runs, through the shipped accelerate
    config: ZeRO-2, bf16 (the engine holds the weights in bf16, fp32 masters in its optimizer shards)."""
    from visadapt.diffusion.easyref.data import write_demo_groups

    data = write_demo_groups(tmp_path / "groups", n_groups=1, per_group=4, size=32)  # 4 images: even batches of 2
    out = tmp_path / "run"
    config = TESTS.parent / "configs" / "accelerate_easyref_zero2.yaml"
    _ok(_launch(out, "--easyref", str(data), "--steps", "4", "--grad-accum", "2", "--precision", "bf16",
                launch=["--config_file", str(config)]))
    r = json.loads((out / "zero.json").read_text())
    assert (r["engine"], r["zero_stage"], r["optimizer_steps"], r["steps"], r["precision"]) == (
        "DeepSpeedEngine", 2, 2, 4, "bf16")
    assert all(map(math.isfinite, [*r["losses"], r["eval_loss_before"], r["eval_loss_after"]]))
    adapter = load_file(str(out / "easyref.safetensors"))
    assert any(k.startswith("encoder.mllm.") for k in adapter) and any(".lora_A." in k for k in adapter)
    assert (out / "official" / "model.safetensors").is_file() and not (out / "checkpoint").exists()


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


def _launched(zero_stage: int, ds_config: dict, **cfg) -> SimpleNamespace:
    """What Trainer._check_launch reads of a trainer launched under DeepSpeed on 2 processes."""
    from test_training import ToyConfig

    plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config=ds_config)
    acc = SimpleNamespace(gradient_accumulation_steps=cfg.get("grad_accum", 1), num_processes=2,
                          state=SimpleNamespace(deepspeed_plugin=plugin))
    return SimpleNamespace(accelerator=acc, cfg=ToyConfig(**cfg), grad_accum=cfg.get("grad_accum", 1), deepspeed=True)


def test_a_deepspeed_launch_takes_the_runs_settings_and_refuses_zero3():
    config = {"gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto"}
    Trainer._check_launch(_launched(2, config, grad_accum=2, grad_clip=0.5, batch_size=8))
    assert config == {"gradient_accumulation_steps": 2, "gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ValueError, match="ZeRO stage 3.*set zero_stage: 2"):
        Trainer._check_launch(_launched(3, {}))


def test_an_accelerate_config_with_other_accumulation_is_refused(tmp_path, monkeypatch):
    """accelerate launch --gradient_accumulation_steps (or the config file's) overrides the run's silently: refuse."""
    from test_training import ToyConfig, ToyTrainer

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(ValueError, match="gradient_accumulation_steps: 4, but this run's --grad-accum is 2"):
        ToyTrainer(ToyConfig(grad_accum=2), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_is_resumed_only_the_way_it_was_written(tmp_path):
    """A DeepSpeed checkpoint (its engine folder) cannot resume without DeepSpeed, nor a plain one with it."""
    from test_training import ToyConfig, ToyTrainer

    def stop(step, record):
        if step == 4:
            raise KeyboardInterrupt

    cfg = ToyConfig(checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        ToyTrainer(cfg, tmp_path / "run", callbacks=[stop]).run()
    (tmp_path / "run" / "checkpoint" / "deepspeed").mkdir()
    with pytest.raises(ValueError, match="written by a run with DeepSpeed; resume it with DeepSpeed"):
        ToyTrainer(cfg, tmp_path / "run", resume=True).run()



def test_a_deepspeed_launch_without_deepspeed_names_the_install(monkeypatch):
    from visadapt.training import _process_group

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for name in ("deepspeed", "deepspeed.accelerator"):  # as if not installed, whatever was imported before
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install \"visadapt\[deepspeed\]\""):
        _process_group()
