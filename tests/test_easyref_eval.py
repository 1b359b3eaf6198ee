"""EasyRef evaluation metrics (CLIP-I, CLIP-T, DINO-I) on known images, with small offline models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visadapt.diffusion.easyref.eval import clip_image_scores, clip_text_scores, dino_scores, load_clip, result_grid
from visadapt.utils.worlds.models import DEMO_CLIP_DIR
from visadapt.utils.worlds.shapes import Scene, render


@pytest.fixture(scope="module")
def clip():
    """The shipped demo CLIP (trained on the shapes world), loaded as open_clip loads any local model."""
    return load_clip(f"local-dir:{DEMO_CLIP_DIR}", pretrained="")


@pytest.fixture(scope="module")
def dino():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2, embed_dim=32,
                              num_heads=2, num_classes=0).eval()
    with torch.no_grad():  # timm's init keeps a fresh ViT's class token near-constant; unit-variance layers do not
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
        model.cls_token.normal_()
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):  # LayerScale
                param.fill_(1.0)
    transform = timm.data.create_transform(input_size=(3, 28, 28), mean=(0.485, 0.456, 0.406),
                                           std=(0.229, 0.224, 0.225), crop_pct=1.0)
    return model, transform


def shape(colour: str, kind: str, seed: int = 0) -> Image.Image:
    return render(Scene(kind, colour, "solid", "large"), np.random.default_rng(seed), 64)


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_identical_images_score_one_and_different_ones_less(clip, dino):
    a, b = shape("red", "circle"), noise(1)
    same_clip = clip_image_scores(clip[0], clip[1], [a, b], [a.copy(), b.copy()])
    same_dino = dino_scores(dino[0], dino[1], [a, b], [a.copy(), b.copy()])
    assert torch.allclose(same_clip, torch.ones(2), atol=1e-5) and torch.allclose(same_dino, torch.ones(2), atol=1e-5)
    other_clip = clip_image_scores(clip[0], clip[1], [a], [b])
    other_dino = dino_scores(dino[0], dino[1], [a], [b])
    assert other_clip.item() < 0.999 and other_dino.item() < 0.999
    assert -1 <= other_clip.item() <= 1 and -1 <= other_dino.item() <= 1


def test_clip_image_score_prefers_the_same_subject(clip):
    """A red circle drawn elsewhere is closer to a red circle than a blue square is (the demo CLIP knows shapes)."""
    target = shape("red", "circle", seed=0)
    same, other = shape("red", "circle", seed=5), shape("blue", "square", seed=5)
    scores = clip_image_scores(clip[0], clip[1], [same, other], [target, target])
    assert scores[0] > scores[1]


def test_clip_text_score_prefers_the_matching_prompt(clip):
    image = shape("red", "circle")
    scores = clip_text_scores(*clip, [image, image], ["a red circle", "a blue square"])
    assert scores[0] > scores[1]
    model, preprocess, tokenizer = clip
    with torch.no_grad():
        a = model.encode_image(preprocess(image)[None])
        b = model.encode_text(tokenizer(["a red circle"]))
    assert scores[0].item() == pytest.approx(torch.nn.functional.cosine_similarity(a, b).item(), abs=1e-5)


def test_scores_are_paired_and_lengths_checked(clip, dino):
    a, b, c = shape("red", "circle"), shape("green", "triangle"), noise(3)
    both = dino_scores(dino[0], dino[1], [a, b], [c, c])
    one = dino_scores(dino[0], dino[1], [b], [c])
    assert both[1].item() == pytest.approx(one.item(), abs=1e-5)
    with pytest.raises(ValueError, match="one target per image"):
        clip_image_scores(clip[0], clip[1], [a, b], [c])
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_text_scores(*clip, [a], ["x", "y"])


def test_result_grid_lays_out_refs_target_and_generated():
    red, green = Image.new("RGB", (20, 20), "red"), Image.new("RGB", (20, 20), "green")
    grid = result_grid([([red] * 6, green, [red, red]), ([red], green, [red, red])], cell=10, max_refs=4)
    assert grid.size == (9 * 10, 2 * 10)  # 4 refs, a gap, the target, a gap, 2 generated
    assert grid.getpixel((5 * 10 + 5, 5)) == (0, 128, 0)  # the target of row 0
    assert grid.getpixel((4 * 10 + 5, 5)) == (255, 255, 255)  # the gap


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A stage-2 run (adapter, LoRA rank 4, MLLM tuned) on the tiny stack, and its groups."""
    from visadapt.diffusion.easyref.config import EasyRefTrainConfig
    from visadapt.diffusion.easyref.data import write_demo_groups
    from visadapt.diffusion.easyref.train import train_easyref

    root = tmp_path_factory.mktemp("eval")
    data = write_demo_groups(root / "groups", n_groups=2, per_group=3, size=32)
    cfg = EasyRefTrainConfig(stage=2, data=str(data), model="tiny-sdxl", mllm="tiny", steps=2, lr=1e-3, r=4,
                             precision="no", batch_size=2, grad_accum=1, resolution=32)
    with pytest.warns(UserWarning, match="without --init starts from random"):
        train_easyref(cfg, root / "run")
    return data, root / "run"


def test_eval_writes_scores_per_group_and_a_grid(trained_run, clip, dino, tmp_path):
    import json

    from visadapt.diffusion.easyref.config import EasyRefEvalConfig
    from visadapt.diffusion.easyref.eval import evaluate_easyref

    data, run = trained_run
    cfg = EasyRefEvalConfig(data=str(data), adapter=str(run), model="tiny-sdxl", mllm="tiny", steps=2, size=32,
                            images_per_group=2)
    r = evaluate_easyref(cfg, tmp_path / "eval", clip=clip, dino=dino)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["metrics"] == r["metrics"] and len(r["groups"]) == 2
    for group in r["groups"]:
        assert group["target"] == "02.png" and group["references"] == 2
        assert all(-1 <= group[k] <= 1 for k in ("clip_i", "clip_t", "dino_i"))
    assert r["metrics"]["clip_i"] == pytest.approx(sum(g["clip_i"] for g in r["groups"]) / 2)
    assert Image.open(tmp_path / "eval" / "grid.png").size == (7 * 128, 2 * 128)  # 2 refs, gap, target, gap, 2


def test_eval_sampler_matches_the_easyref_pipeline(trained_run):
    """The evaluation's sampler (stock SDXL pipeline + encoder) and EasyRefPipeline give the same image."""
    from visadapt.diffusion.easyref.config import EasyRefEvalConfig
    from visadapt.diffusion.easyref.eval import EasyRefSampler, generate
    from visadapt.diffusion.easyref.train import load_mllm
    from visadapt.diffusion.tiny import tiny_pipeline
    from visadapt.pipelines import EasyRefPipeline

    data, run = trained_run
    cfg = EasyRefEvalConfig(data=str(data), adapter=str(run), model="tiny-sdxl", mllm="tiny", steps=2, size=32)
    refs = [Image.open(p).convert("RGB") for p in sorted((data / next(iter(sorted(p.name for p in data.iterdir()))))
                                                         .glob("0[01].png"))]
    ours = generate(EasyRefSampler.from_config(cfg), cfg, refs, "a red circle", seed=3)
    pipe = EasyRefPipeline.from_pipe(tiny_pipeline("sdxl"))
    pipe.load_easyref(run / "easyref.safetensors", mllm=load_mllm("tiny"))
    theirs = generate(pipe, cfg, refs, "a red circle", seed=3)
    a, b = (np.asarray(x, dtype=np.int16) for x in (ours, theirs))
    assert np.abs(a - b).max() <= 1


def test_eval_command_prints_the_means(trained_run, clip, dino, tmp_path, monkeypatch, capsys):
    """``visadapt easyref eval`` end to end; the metric models by name are the small ones here (no download)."""
    import json

    import visadapt.diffusion.easyref.eval as easyref_eval
    from visadapt.cli import main

    monkeypatch.setattr(easyref_eval, "load_clip", lambda name, pretrained, device: clip)
    monkeypatch.setattr(easyref_eval, "load_dino", lambda name, device: dino)
    data, run = trained_run
    argv = ["easyref", "eval", "--data", str(data), "--adapter", str(run), "--model", "tiny-sdxl", "--mllm", "tiny",
            "--steps", "2", "--size", "32", "--max-groups", "1", "--out", str(tmp_path / "e")]
    assert main(argv) == 0
    r = json.loads((tmp_path / "e" / "results.json").read_text())
    assert len(r["groups"]) == 1 and f"{r['metrics']['clip_i']:.4f}"[:5] in capsys.readouterr().out
    assert main([*argv[:-1], str(tmp_path / "f"), "--adapter", str(tmp_path)]) == 2  # no adapter there: exit 2


# ------------------------------------------------------------------------------------------------- offline metrics
@pytest.mark.parametrize("metric_args, needs, local", [
    ([], "open_clip ViT-L-14 weights 'openai'", "--clip-pretrained FILE, or --clip-model local-dir:FOLDER"),
    (["--clip-model", "visadapt-demo-clip"], "timm vit_base_patch14_dinov2.lvd142m weights",
     "--dino-model local-dir:FOLDER"),
])
def test_offline_eval_without_the_metric_weights_says_which_in_one_line(trained_run, tmp_path, metric_args, needs,
                                                                        local):
    """Offline with an empty cache: one line naming the weights, how to pass local ones and the offline choice
    (before: a 55-line chained traceback), before the pipeline loads and with nothing written."""
    import os
    import subprocess
    import sys

    data, run = trained_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("VISADAPT_DEBUG", None)
    out = tmp_path / "e"
    proc = subprocess.run([sys.executable, "-m", "visadapt.cli", "easyref", "eval", "--data", str(data), "--adapter",
                           str(run), "--model", "tiny-sdxl", "--mllm", "tiny", *metric_args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("(set VISADAPT_DEBUG=1"), proc.stderr[-3000:]
    assert needs in lines[0] and local in lines[0], lines[0]
    assert "--clip-model visadapt-demo-clip --dino-model visadapt-demo-vit" in lines[0], lines[0]
    assert not out.exists()


def test_offline_metrics_score_end_to_end(trained_run, tmp_path, capsys):
    """``--clip-model visadapt-demo-clip --dino-model visadapt-demo-vit``: the shipped demo models, no download."""
    import json
    import math

    from visadapt.cli import main

    data, run = trained_run
    out = tmp_path / "e"
    assert main(["easyref", "eval", "--data", str(data), "--adapter", str(run), "--model", "tiny-sdxl", "--mllm",
                 "tiny", "--steps", "2", "--size", "32", "--clip-model", "visadapt-demo-clip", "--dino-model",
                 "visadapt-demo-vit", "--out", str(out)]) == 0, capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert len(r["groups"]) == 2 and all(math.isfinite(v) and -1 <= v <= 1 for v in r["metrics"].values())
    assert r["config"]["clip_model"] == "visadapt-demo-clip" and r["config"]["dino_model"] == "visadapt-demo-vit"
    assert (out / "grid.png").is_file()


def test_openai_clip_weights_get_quick_gelu(monkeypatch):
    """OpenAI's CLIPs were trained with QuickGELU; open_clip builds ``ViT-L-14`` with GELU unless told."""
    import open_clip

    from visadapt.diffusion.easyref import eval as easyref_eval

    seen = {}

    def create(name, pretrained=None, **kwargs):
        seen.update(kwargs, name=name, pretrained=pretrained)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    with pytest.raises(easyref_eval.MetricWeightsError):
        easyref_eval.load_clip("ViT-L-14", "openai")
    assert seen["force_quick_gelu"] is True and seen["weights_only"] is True and seen["pretrained"] == "openai"
