"""The few-shot trainer, GLAD, the CLI and the pipeline, on a tiny random CLIP and colour-coded image folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from visadapt.fewshot.glad import GladConfig, glad_backward
from visadapt.fewshot.train import TrainConfig, train
from visadapt.pipelines import FewShotCLIPPipeline
from visadapt.training import ShotBatches

CLIP_CFG = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2))
COLOURS = {"red": 0, "green": 1, "blue": 2}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A random tiny CLIP as an open_clip ``local-dir:`` model (config + safetensors)."""
    import open_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **CLIP_CFG)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": CLIP_CFG, "preprocess_cfg": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return f"local-dir:{folder}"


def write_colour_folder(root: Path, n_train: int = 8, n_test: int = 4, seed: int = 0) -> Path:
    """root/{train,test}/<colour>/*.png: noise images tinted by their class colour."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, channel in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
                pixels[..., channel] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def colours(tmp_path_factory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("colours"))


def config(tiny_clip: str, root: Path, **overrides) -> TrainConfig:
    base = dict(dataset="imagefolder", root=str(root), model=tiny_clip, pretrained=None, shots=4, iters=8,
                lr=5e-3, batch_size=5, method="block-lora", n_blocks=4)
    return TrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------- batches
def test_shot_batches_cover_epochs_and_resume_in_place():
    full = list(ShotBatches(n_items=7, batch_size=3, total=8, seed=1))
    assert [len(b) for b in full] == [3, 3, 1] * 2 + [3, 3]  # partial last batch per epoch, as CLIP-LoRA
    assert sorted(i for b in full[:3] for i, _ in b) == list(range(7))  # one epoch visits every shot once
    assert full[:3] != full[3:6]  # a new permutation each epoch
    assert list(ShotBatches(7, 3, 8, seed=1, start=5)) == full[5:]
    assert list(ShotBatches(7, 3, 8, seed=2)) != full


# ------------------------------------------------------------------------------------------------- resume
def test_interrupted_run_resumes_to_the_same_adapter(tiny_clip, colours, tmp_path):
    cfg = config(tiny_clip, colours, checkpoint_every=3)  # dropout 0.25: the RNG must resume exactly too
    train(cfg, tmp_path / "straight")

    def crash(step, record):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", callbacks=[crash])
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").exists()
    assert not (tmp_path / "resumed" / "results.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "resumed")
    with pytest.raises(ValueError, match="lr"):
        train(config(tiny_clip, colours, checkpoint_every=3, lr=1e-3), tmp_path / "resumed", resume=True)
    train(cfg, tmp_path / "resumed", resume=True)

    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k or "factors" in k)
    assert not (tmp_path / "resumed" / "checkpoint").exists()  # removed once the run is complete


# ------------------------------------------------------------------------------------------------- GLAD
class _Quadratic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def loss(self) -> torch.Tensor:
        return (self.w ** 4).sum() + self.w.prod()


def _grad_at(weights: torch.Tensor) -> torch.Tensor:
    w = weights.clone().requires_grad_(True)
    ((w ** 4).sum() + w.prod()).backward()
    return w.grad


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_glad_interpolates_plain_and_sam_gradients(alpha):
    model = _Quadratic()
    w0 = model.w.detach().clone()
    g = _grad_at(w0)
    g_sam = _grad_at(w0 + 0.1 * g / g.norm())
    loss = glad_backward([model.w], lambda: (lambda l: (l.backward(), l.detach())[1])(model.loss()),
                         GladConfig(rho=0.1, alpha=alpha))
    assert torch.equal(model.w.detach(), w0)  # weights restored exactly after the SAM pass
    torch.testing.assert_close(model.w.grad, (1 - alpha) * g + alpha * g_sam)
    assert loss.item() == pytest.approx(model.loss().item())


def test_glad_project_rule_removes_the_conflicting_component():
    model = _Quadratic()
    w0 = model.w.detach().clone()
    g = _grad_at(w0)
    g_sam = _grad_at(w0 + 2.0 * g / g.norm())  # a large radius makes the two gradients conflict
    glad_backward([model.w], lambda: (model.loss().backward(), torch.tensor(0.0))[1],
                  GladConfig(rho=2.0, rule="project"))
    if torch.dot(g, g_sam) >= 0:
        expected = g_sam
    else:
        expected = g - torch.dot(g, g_sam) / g_sam.dot(g_sam) * g_sam
        assert abs(torch.dot(model.w.grad, g_sam)) < 1e-4  # what is left is orthogonal to the SAM gradient
    torch.testing.assert_close(model.w.grad, expected)


def test_glad_config_rejects_bad_values():
    with pytest.raises(ValueError, match="alpha"):
        GladConfig(alpha=1.5)
    with pytest.raises(ValueError, match="rho"):
        GladConfig(rho=0)


def test_glad_training_differs_from_plain_and_learns(tiny_clip, colours, tmp_path):
    plain = train(config(tiny_clip, colours, lora_dropout=0.0), tmp_path / "plain")
    glad = train(config(tiny_clip, colours, lora_dropout=0.0, glad=True, glad_alpha=1.0, glad_rho=0.5),
                 tmp_path / "glad")
    assert glad["method"] == "block-lora+glad"
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "glad" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    assert glad["top1"] >= 0 and plain["top1"] >= 0


# ------------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", ["lora", "block-lora", "comp-lora"])
def test_every_method_learns_the_colour_task(method, tiny_clip, colours, tmp_path):
    results = train(config(tiny_clip, colours, method=method, iters=40, lr=1e-2, lora_dropout=0.0), tmp_path / method)
    assert results["top1"] > results["zeroshot_top1"] + 20, results
    # q, k, v of 2 blocks per tower: 6 matrices of 64×64 (vision) and 6 of 32×32 (text), rank 2;
    # Block-LoRA (n=4) has r·(d_in/4 + d_out) per matrix.
    expected = {"lora": 6 * 2 * (64 + 64) + 6 * 2 * (32 + 32), "block-lora": 6 * 2 * (16 + 64) + 6 * 2 * (8 + 32)}
    expected["comp-lora"] = expected["lora"]
    assert results["trainable_params"] == expected[method]


def test_peft_config_file_runs_any_peft_method(tiny_clip, colours, tmp_path):
    file = tmp_path / "dora.json"
    file.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "use_dora": True,
                                "target_modules": ["c_fc", "c_proj"]}))
    results = train(config(tiny_clip, colours, peft_config=str(file), iters=4), tmp_path / "run")
    assert results["method"] == "peft:dora"
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"]
    assert not (tmp_path / "run" / "lora").exists()  # only visadapt methods are exported


def test_peft_config_without_targets_is_a_clear_error(tiny_clip, colours, tmp_path):
    file = tmp_path / "vera.json"
    file.write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    with pytest.raises(ValueError, match="target_modules"):
        train(config(tiny_clip, colours, peft_config=str(file)), tmp_path / "run")


# ------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def trained_run(tiny_clip, colours, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "run"
    results = train(config(tiny_clip, colours, iters=30, lr=1e-2, lora_dropout=0.0,
                           eval_zeroshot_on=[str(colours)]), out)
    return out, results


def test_run_folder_holds_every_output(trained_run, colours):
    out, results = trained_run
    for name in ("results.json", "pipeline.json", "fewshot_split.json", "run_config.json", "training_curve.png",
                 "report.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "lora/adapter_config.json", "lora/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    for key in ("top1", "zeroshot_top1", "dataset", "shots", "seed", "method", "trainable_params", "wall_time_s"):
        assert key in saved
    forgetting = saved["zeroshot_on"][colours.name]
    assert forgetting["before"] == pytest.approx(saved["zeroshot_top1"])  # same images, same unadapted model
    assert forgetting["after"] == pytest.approx(saved["top1"])
    shots = json.loads((out / "fewshot_split.json").read_text())
    assert len(shots["train"]) == 4 * 3 and (out / "training_curve.png").stat().st_size > 1000
    assert "| zero-shot |" in (out / "report.md").read_text()


def test_pipeline_classifies_and_round_trips(trained_run, colours, tmp_path):
    out, results = trained_run
    pipe = FewShotCLIPPipeline.from_pretrained(out)
    from visadapt.fewshot.data import load_split

    split = load_split("imagefolder", colours)
    assert pipe.evaluate(split.test) == pytest.approx(results["top1"])
    images = [Image.open(item.path) for item in split.test[:6]]
    pred = pipe(images)
    assert pred.probs.shape == (6, 3) and torch.allclose(pred.probs.sum(-1), torch.ones(6))
    assert pred.labels == [pipe.classnames[i] for i in pred.probs.argmax(-1)]
    tensors = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) / 255 for im in images])
    torch.testing.assert_close(pipe(tensors).probs, pred.probs, atol=2e-3, rtol=0)  # same pixels either way
    pipe.save_pretrained(tmp_path / "saved")
    again = FewShotCLIPPipeline.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again(images).probs, pred.probs)
    assert isinstance(again.clip, peft.PeftModel)


def test_pipeline_rejects_bad_inputs(trained_run, tmp_path):
    pipe = FewShotCLIPPipeline.from_pretrained(trained_run[0])
    with pytest.raises(ValueError, match="float"):
        pipe(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        pipe(torch.zeros(2, 32, 32))
    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        FewShotCLIPPipeline.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------- CLI
def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "visadapt.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cli_train_eval_zeroshot_report(tiny_clip, colours, tmp_path):
    common = ["--dataset", "imagefolder", "--root", str(colours), "--model", tiny_clip, "--pretrained", "none"]
    for seed in (1, 2):
        proc = _cli("fewshot", "train", *common, "--shots", "2", "--iters", "4", "--seed", str(seed),
                    "--method", "comp-lora", "--comp-k", "3", "--workers", "0", "--out", str(tmp_path / f"s{seed}"))
        assert "2-shot top-1" in proc.stdout
    assert "top-1" in _cli("fewshot", "eval", str(tmp_path / "s1")).stdout
    assert "zero-shot top-1" in _cli("fewshot", "zeroshot", *common).stdout
    _cli("fewshot", "report", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "report"))
    report = (tmp_path / "report" / "report.md").read_text()
    assert "comp-lora" in report and "(2 seeds)" in report  # two seeds averaged in one cell
    assert (tmp_path / "report" / "accuracy_vs_shots.png").stat().st_size > 1000


def test_cli_wrong_root_gives_one_clear_error(tmp_path):
    (tmp_path / "OxfordPets" / "images").mkdir(parents=True)
    proc = _cli("fewshot", "train", "--dataset", "oxford_pets", "--root", str(tmp_path), "--out",
                str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "split_zhou_OxfordPets.json" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started
