"""The session loop end to end on the tiny demo tower: bit-exact resume inside and across sessions, the command
line (train, eval, report), the pipeline (sessions, add_class, save/load), and the demo (its seeds, mean ± std,
CoACT against naive fine-tuning)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from visadapt.cli import main
from visadapt.incremental.config import IncrementalConfig
from visadapt.incremental.demo import demo_data, run_demo
from visadapt.incremental.train import train
from visadapt.utils.cli import FLAGS

SMALL = dict(backbone="visadapt-demo-clip", setting="fscil", base_classes=3, way=2, sessions=3, shots=3,
             epochs_base=2, epochs_incremental=2, batch_size=6, lr=0.02, inc_lr_factor=0.5, classifier="cosine",
             checkpoint_every=2, ft_start_layer=3, ft_start_epoch=1, adapt_blocks=4, r=4, lora_alpha=4, seed=3)


@pytest.fixture(scope="module")
def data():
    return demo_data(n_train=6, n_test=3)


def _interrupt_at(n: int):
    calls = {"n": 0}

    def callback(step, record):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    return callback


def _weights(run):
    return {s: load_file(str(run / f"session_{s}" / "model.safetensors")) for s in range(3)}


def test_resume_inside_and_across_sessions_is_bit_exact(tmp_path, data):
    cfg = IncrementalConfig(**SMALL)
    full = train(cfg, tmp_path / "full", data=data)
    assert [len(s["new_classes"]) for s in full["sessions"]] == [3, 2, 2]
    assert [s["num_test"] for s in full["sessions"]] == [9, 15, 21]  # the test set grows with the classes seen
    # base session: 18 images / 6 = 3 steps an epoch, 6 steps; later sessions: 6 shots / 6 = 1 step an epoch, 2 steps
    for where, n, session in (("mid-session-0", 4, 0), ("mid-session-1", 7, 1), ("end-of-session-2", 10, 2)):
        run = tmp_path / where
        with pytest.raises(KeyboardInterrupt):
            train(cfg, run, data=data, callbacks=[_interrupt_at(n)])
        assert (run / f"session_{session}" / "checkpoint").is_dir()
        with pytest.raises(FileExistsError, match="--resume"):
            train(cfg, run, data=data)
        with pytest.raises(ValueError, match="other settings"):
            train(IncrementalConfig(**{**SMALL, "lr": 0.1}), run, resume=True, data=data)
        resumed = train(cfg, run, resume=True, data=data)
        assert [s["all"] for s in resumed["sessions"]] == [s["all"] for s in full["sessions"]]
        a, b = _weights(tmp_path / "full"), _weights(run)
        b["pipeline"] = load_file(str(run / "model.safetensors"))
        a["pipeline"] = load_file(str(tmp_path / "full" / "model.safetensors"))
        for s in a:
            assert a[s].keys() == b[s].keys()
            for name in a[s]:
                assert torch.equal(a[s][name], b[s][name]), (where, s, name)
    # a run that stopped after its last session but before its own results: resuming only writes them
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "unfinished")
    for name in ("results.json", "model.safetensors", "pipeline.json"):
        (tmp_path / "unfinished" / name).unlink()
    train(cfg, tmp_path / "unfinished", resume=True, data=data)
    for name, value in load_file(str(tmp_path / "full" / "model.safetensors")).items():
        assert torch.equal(load_file(str(tmp_path / "unfinished" / "model.safetensors"))[name], value), name
    # controlled fine-tuning trained block 3 and the teacher followed it by EMA, while block 0 stayed put
    w0 = _weights(tmp_path / "full")[0]
    assert any("resblocks.3" in k and k.startswith("teacher.") for k in w0)
    assert not any("resblocks.0." in k and "lora" not in k for k in w0)
    from visadapt.incremental.model import load_backbone

    pretrained = load_backbone(cfg).trunk.state_dict()["transformer.resblocks.3.attn.in_proj_weight"]
    teacher = w0["teacher.trunk.transformer.resblocks.3.attn.in_proj_weight"]
    student = w0["student.trunk.base_model.model.transformer.resblocks.3.attn.base_layer.in_proj_weight"]
    assert (teacher - pretrained).abs().max() > 0  # the EMA moved the teacher ...
    assert (teacher - pretrained).abs().max() < (student - pretrained).abs().max() / 50  # ... by about 1 − 0.999^4
    with pytest.raises(FileExistsError, match="finished run"):
        train(cfg, tmp_path / "full", resume=True, data=data)


def _write_folders(root, data):
    from pathlib import Path

    for split, source in (("train", data.train), ("test", data.test)):
        for i in range(len(source)):
            path = Path(root) / split / f"{source.labels[i]:02d}_{data.class_names[source.labels[i]]}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            source.load(i).save(path)


def test_command_line_and_pipeline(tmp_path, data, capsys):
    from visadapt.pipelines import IncrementalClassifierPipeline

    _write_folders(tmp_path / "shapes", data)
    run = tmp_path / "run"
    args = ["incremental", "train", "--dataset", "imagefolder", "--root", str(tmp_path / "shapes"), "--out", str(run)]
    for key, value in SMALL.items():
        if key not in ("checkpoint_every",):
            args += [FLAGS.get(key, f"--{key.replace('_', '-')}"), str(value)]
    assert main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert {"average_accuracy", "performance_drop", "base_forgetting", "harmonic_mean"} <= set(results)
    for name in ("sessions.png", "groups.png", "report.md", "pipeline.json", "index_list.txt"):
        assert (run / name).is_file(), name
    assert main(["incremental", "eval", str(run), "--session", "1", "--json", str(tmp_path / "s1.json")]) == 0
    scored = json.loads((tmp_path / "s1.json").read_text())
    assert scored["all"] == pytest.approx(results["sessions"][1]["all"])  # the pipeline scores as training did
    assert main(["incremental", "report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "sessions.png").is_file()
    assert main(["incremental", "train", "--dataset", "cifar100", "--out", str(tmp_path / "x")]) == 2
    assert "needs --root" in capsys.readouterr().err

    pipe = IncrementalClassifierPipeline.from_pretrained(run, session=0)
    assert len(pipe.class_names) == 3
    images = [data.test.load(i) for i in range(len(data.test)) if data.test.labels[i] in (5, 6)]
    out = pipe(images)
    assert out.probs.shape == (len(images), 3)
    index = pipe.add_class("new-shape", [data.train.load(i) for i in range(len(data.train))
                                         if data.train.labels[i] == 5])
    assert index == 3 and pipe(images).probs.shape == (len(images), 4)
    pipe.save_pretrained(tmp_path / "saved")
    again = IncrementalClassifierPipeline.from_pretrained(tmp_path / "saved")
    assert again.class_names == pipe.class_names
    torch.testing.assert_close(again(images).probs, pipe(images).probs)
    last = IncrementalClassifierPipeline.from_pretrained(run)
    assert len(last.class_names) == 7
    with pytest.raises(ValueError, match="already known"):
        pipe.add_class("new-shape", images[:1])


def test_run_wall_time_counts_each_session_once(tmp_path, data):
    # the run's wall time used to add every session's time twice (once in the run's clock, once as their sum)
    started = time.perf_counter()
    results = train(IncrementalConfig(**SMALL), tmp_path / "run", data=data)
    elapsed = time.perf_counter() - started
    sessions = sum(s["wall_time_s"] for s in results["sessions"])
    assert sessions <= results["wall_time_s"] <= elapsed


def test_demo_coact_beats_naive_fine_tuning(tmp_path):
    """Seed 1 of the demo (the README's table has seeds 1-3): CoACT average / last accuracy 53.7 / 36.3 %, base
    forgetting 31 points; naive fine-tuning 33.9 / 16.3 %, 71 points."""
    summary = run_demo(tmp_path, recipes=("coact", "finetune"), seeds=(1,))
    coact, naive = summary["coact"], summary["finetune"]
    assert coact["average_accuracy"] > naive["average_accuracy"] and coact["last_accuracy"] > naive["last_accuracy"]
    assert coact["base_forgetting"] < naive["base_forgetting"]
    assert np.mean(coact["base"][1:]) > np.mean(naive["base"][1:])


def test_demo_runs_three_seeds_and_reports_mean_and_std(tmp_path, capsys):
    # the prototypes recipe trains nothing, so three seeds of it take seconds
    summary = run_demo(tmp_path, recipes=("prototypes",))
    r = summary["prototypes"]
    assert r["seeds"] == [1, 2, 3] and sorted(r["per_seed"]) == ["1", "2", "3"]
    per_seed = [r["per_seed"][s]["last_accuracy"] for s in ("1", "2", "3")]
    assert len(set(per_seed)) > 1  # each seed draws its own images and shots
    assert r["last_accuracy"] == pytest.approx(np.mean(per_seed))
    assert r["last_accuracy_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert all((tmp_path / "prototypes" / f"seed_{s}" / "results.json").is_file() for s in (1, 2, 3))
    report = (tmp_path / "report.md").read_text()
    assert f"{r['last_accuracy']:.1f} ± {r['last_accuracy_std']:.1f}" in report
    assert (tmp_path / "sessions.png").is_file() and (tmp_path / "comparison.json").is_file()
    # a typed --seed N: that seed only, its images and shots the same as in the three-seed run
    one = run_demo(tmp_path / "one", recipes=("prototypes",), overrides={"seed": 2})["prototypes"]
    assert one["seeds"] == [2] and one["last_accuracy_std"] == 0.0
    assert one["last_accuracy"] == r["per_seed"]["2"]["last_accuracy"]
    assert "Seed 2: one seed" in (tmp_path / "one" / "report.md").read_text()
    assert "±" not in (tmp_path / "one" / "report.md").read_text()  # no spread to show for one seed


def _momentum_at_session_edges(monkeypatch):
    """{(session, "start" | "end"): [momentum buffers]} of every session's SGD, recorded as the sessions run."""
    from visadapt.incremental.train import SessionTrainer

    seen: dict = {}

    def buffers(trainer):
        sgd = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it once prepared
        return [sgd.state[p]["momentum_buffer"].clone() for p in sgd.param_groups[0]["params"]
                if "momentum_buffer" in sgd.state[p]]

    start, evaluate = SessionTrainer.before_training, SessionTrainer.evaluate
    monkeypatch.setattr(SessionTrainer, "before_training",
                        lambda self, state: (seen.__setitem__((self.session, "start"), buffers(self)),
                                             start(self, state))[1])
    monkeypatch.setattr(SessionTrainer, "evaluate",
                        lambda self, state: (seen.__setitem__((self.session, "end"), buffers(self)),
                                             evaluate(self, state))[1])
    return seen


def test_session_curves_name_the_recipe(tmp_path, data, monkeypatch):
    """The demo writes coact, finetune and prototypes runs side by side: each curve says which it is."""
    from visadapt.utils import figures

    titles = []
    monkeypatch.setattr(figures, "plot_training_curve", lambda history, path, title="", **kw: titles.append(title))
    train(IncrementalConfig(**{**SMALL, "epochs_base": 1, "recipe": "finetune"}), tmp_path / "run", data=data,
          stop_after=0)
    assert titles == ["finetune session 0"]


def test_shared_incremental_optimizer_carries_momentum_into_the_next_session(tmp_path, data, monkeypatch):
    # official rule: after session 0 one SGD serves every later session, so session 2 starts with the momentum
    # session 1 ended with; a fresh SGD per session starts each session from none
    seen = _momentum_at_session_edges(monkeypatch)
    fresh = train(IncrementalConfig(**SMALL), tmp_path / "fresh", data=data)
    assert seen[(1, "start")] == [] and seen[(2, "start")] == [] and seen[(1, "end")]
    seen.clear()
    shared_cfg = IncrementalConfig(**SMALL, shared_inc_optimizer=True)
    shared = train(shared_cfg, tmp_path / "shared", data=data)
    assert seen[(1, "start")] == [] and len(seen[(2, "start")]) == len(seen[(1, "end")]) > 0
    for got, want in zip(seen[(2, "start")], seen[(1, "end")]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert shared["sessions"][1]["all"] == fresh["sessions"][1]["all"]  # session 1 starts from none either way
    w_fresh, w_shared = _weights(tmp_path / "fresh"), _weights(tmp_path / "shared")
    assert all(torch.equal(w_fresh[1][k], w_shared[1][k]) for k in w_fresh[1])
    assert not all(torch.equal(w_fresh[2][k], w_shared[2][k]) for k in w_fresh[2])
    # stopped between sessions 1 and 2, the resumed run reloads the saved momentum: the same session 2
    run = tmp_path / "stopped"
    train(shared_cfg, run, data=data, stop_after=1)
    train(shared_cfg, run, resume=True, data=data)
    assert all(torch.equal(w_shared[2][k], _weights(run)[2][k]) for k in w_shared[2])
