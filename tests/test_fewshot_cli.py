"""The few-shot command line as a newcomer meets it: the demo honours its options, models choose their own
default weights, OpenAI weights get QuickGELU, load failures are one line, reports skip other tasks' runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visadapt.cli import main
from visadapt.fewshot import demo as fewshot_demo
from visadapt.fewshot import model as clip_model
from visadapt.fewshot.cli import default_pretrained
from visadapt.fewshot.report import write_report


def test_demo_honours_the_options_it_does_not_fix(monkeypatch, tmp_path):
    seen = {}

    def fake_run_demo(out, resume=False, **overrides):
        seen.update(overrides)
        return 0

    monkeypatch.setattr(fewshot_demo, "run_demo", fake_run_demo)
    assert main(["fewshot", "train", "--demo", "--out", str(tmp_path / "d"), "--lr", "1e-3", "--seed", "4",
                 "--shots", "8", "--iters", "20", "--method", "comp-lora"]) == 0
    assert seen == {"lr": 1e-3, "seed": 4, "shots": 8, "iters": 20, "method": "comp-lora"}
    config = fewshot_demo.demo_config(Path("data"), [], **seen)
    assert (config.lr, config.seed, config.shots, config.iters, config.method) == (1e-3, 4, 8, 20, "comp-lora")
    assert config.crop_scale_min == fewshot_demo.DEMO_SETTINGS["crop_scale_min"]  # the rest keeps the demo's


def test_demo_refuses_options_it_fixes(capsys, tmp_path):
    assert main(["fewshot", "train", "--demo", "--out", str(tmp_path / "d"), "--dataset", "dtd"]) == 2
    assert "--demo brings its own data and model; drop --dataset" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("model, given, expected", [
    ("ViT-B-16", None, "openai"), ("visadapt-demo-clip", None, None), ("local-dir:/x", None, None),
    ("hf-hub:org/clip", None, None), ("ViT-B-16", "none", None), ("ViT-B-16", "laion2b_s34b_b88k", "laion2b_s34b_b88k"),
])
def test_the_default_tag_belongs_to_the_default_architectures_only(model, given, expected):
    assert default_pretrained(model, given) == expected


def test_openai_weights_get_quick_gelu(monkeypatch):
    assert clip_model.needs_quick_gelu("ViT-B-16", "openai")
    assert clip_model.needs_quick_gelu("ViT-L-14", "openai")
    assert not clip_model.needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert not clip_model.needs_quick_gelu("ViT-B-16", None)
    calls = []

    def capture(name, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here: no weights offline")

    monkeypatch.setattr(clip_model.open_clip, "create_model_and_transforms", capture)
    with pytest.raises(ValueError):
        clip_model.load_clip("ViT-B-16", "openai")
    assert calls[-1]["force_quick_gelu"] is True
    with pytest.raises(ValueError):
        clip_model.load_clip("ViT-B-16", "laion2b_s34b_b88k")
    assert calls[-1]["force_quick_gelu"] is False


def test_quick_gelu_changes_the_activation():
    import open_clip
    from open_clip.transformer import QuickGELU

    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True, **_TINY)
    assert any(isinstance(m, QuickGELU) for m in model.modules())
    assert not any(isinstance(m, QuickGELU) for m in open_clip.create_model("ViT-B-32", **_TINY).modules())


_TINY = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
             text_cfg=dict(context_length=8, vocab_size=49408, width=16, heads=1, layers=1))


@pytest.mark.parametrize("argv, message", [
    (["--model", "ViT-Nope-99"], "is not an open_clip architecture"),
    (["--model", "ViT-B-16"], "download them once with a network"),  # the default openai tag, not in the cache
    (["--model", "hf-hub:nobody/no-such-clip"], "could not load it"),
])
def test_model_load_failures_are_one_line_naming_the_fix(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    folder = tmp_path / "imgs"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (folder / split / name).mkdir(parents=True)
            from PIL import Image

            Image.new("RGB", (8, 8)).save(folder / split / name / "0.png")
    code = main(["fewshot", "zeroshot", "--dataset", "imagefolder", "--root", str(folder), *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert message in err.replace("\n", " "), err


def _results(folder: Path, **values) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(values))


def test_report_takes_the_few_shot_runs_and_names_the_others(tmp_path):
    runs = tmp_path / "runs"
    common = dict(dataset="imagefolder", root="/data/shapes", method="lora", top1=60.0, zeroshot_top1=20.0, seed=1)
    _results(runs / "a", shots=4, **common)
    _results(runs / "b", shots=16, **{**common, "top1": 70.0})
    _results(runs / "hsi", dataset="synthetic", OA=80.0, AA=70.0, kappa=60.0)
    out, skipped = write_report([runs], tmp_path / "report")
    assert skipped == [str(runs / "hsi")]
    text = (out / "report.md").read_text()
    assert "shapes (image folder)" in text and "left out" in text and "hsi" in text
    assert (out / "accuracy_vs_shots.png").stat().st_size > 1000
    assert main(["fewshot", "report", str(runs), "--out", str(tmp_path / "r2")]) == 0
    with pytest.raises(FileNotFoundError, match="found only other runs"):
        write_report([runs / "hsi"], tmp_path / "r3")


def test_report_counts_distinct_seeds_not_runs(tmp_path, monkeypatch):
    """Two runs of one seed (a rerun, a copied folder) are one seed: no "2 seeds", no "± 0.00" from them."""
    from visadapt.utils import figures

    runs = tmp_path / "runs"
    common = dict(dataset="imagefolder", root="/data/shapes", method="lora", zeroshot_top1=20.0, shots=4)
    _results(runs / "a", seed=1, top1=60.0, **common)
    _results(runs / "a-again", seed=1, top1=62.0, **common)
    _results(runs / "b", seed=1, top1=50.0, **{**common, "method": "glad"})
    _results(runs / "c", seed=2, top1=54.0, **{**common, "method": "glad"})
    _results(runs / "d", seed=2, top1=58.0, **{**common, "method": "glad"})
    legends = []
    save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: (legends.extend(
        t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()), save(fig, path)))
    out, _ = write_report([runs], tmp_path / "report")
    text = (out / "report.md").read_text()
    assert "| lora | 61.00 (1 seed, 2 runs) |" in text and "± 0.00" not in text
    assert "| glad | 53.00 ± 4.24 (2 seeds, 3 runs) |" in text  # seed 2's two runs count once: mean(50, 56)
    assert "lora (1 seed, 2 runs)" in legends and "glad (2 seeds, 3 runs)" in legends
