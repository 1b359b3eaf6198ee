"""Hyperspectral training end to end on small synthetic scenes: learning, CLI train/eval/predict, resume, pipeline."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from visadapt.cli import main
from visadapt.hyperspectral.data import scene_from_arrays
from visadapt.hyperspectral.train import HSITrainConfig, train
from visadapt.pipelines import HyperspectralPipeline
from visadapt.utils.worlds.spectra import synthetic_scene, write_scene_mat

SMALL = dict(model="lola_specvit_tiny", pca_components=6, patch_size=7, train=0.15, batch_size=32, grad_accum=2,
             lr=3e-3, warmup_epochs=1, t0=2, eta_min=1e-5, seed=0, split_seed=0, eval_batch_size=512)


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    scene = synthetic_scene(height=36, width=36, bands=40, classes=4, seed=1)
    data, gt = write_scene_mat(scene, folder, "small")
    return scene, data, gt


def test_demo_scene_is_learned_well_above_chance(tmp_path):
    world = synthetic_scene(height=48, width=48, bands=60, classes=4, seed=2)
    scene = scene_from_arrays(world.cube, world.gt, "synthetic", world.class_names)
    r = train(HSITrainConfig(**{**SMALL, "epochs": 12, "class_map": False}), tmp_path / "run", scene=scene)
    majority = 100 * np.bincount(scene.gt[scene.gt > 0]).max() / (scene.gt > 0).sum()
    assert r["OA"] > max(60.0, majority + 20), (r["OA"], majority)
    assert r["kappa"] > 40.0
    assert set(r) >= {"OA", "AA", "kappa", "per_class_accuracy", "confusion_matrix"}


def _cli_train(data, gt, out, *extra):
    return main(["hsi", "train", "--data", str(data), "--data-key", "small", "--gt", str(gt), "--gt-key", "small_gt",
                 "--out", str(out), "--model", "lola_specvit_tiny", "--pca", "6", "--patch", "7", "--train", "0.15",
                 "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "1", "--t0", "1",
                 "--seed", "3", "--split-seed", "3", *extra])


def test_cli_train_resume_eval_predict_and_pipeline(scene_files, tmp_path, capsys):
    scene, data, gt = scene_files
    # An uninterrupted run.
    assert _cli_train(data, gt, tmp_path / "full") == 0
    full = tmp_path / "full"
    results = json.loads((full / "results.json").read_text())
    assert {"OA", "AA", "kappa", "per_class_accuracy", "confusion_matrix", "per_class_f1"} <= set(results)
    assert np.array(results["confusion_matrix"]).sum() == results["num_test"]
    for name in ("class_map.png", "class_map_pred.png", "confusion_matrix.png", "training_curve.png", "report.md",
                 "split.json", "model.safetensors", "pca.safetensors", "pipeline.json"):
        assert (full / name).is_file(), name
    assert not (full / "checkpoint").exists()

    # The same run interrupted after its first checkpoint, then resumed from the CLI: identical weights.
    def stop_at(step, record):
        if step == 6:
            raise KeyboardInterrupt

    cfg = HSITrainConfig(data=str(data), data_key="small", gt=str(gt), gt_key="small_gt",
                         model="lola_specvit_tiny", pca_components=6, patch_size=7, train=0.15, epochs=2,
                         batch_size=16, lr=3e-3, warmup_epochs=1, t0=1, seed=3, split_seed=3, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", callbacks=[stop_at])
    assert (tmp_path / "cut" / "checkpoint" / "state.safetensors").is_file()
    assert _cli_train(data, gt, tmp_path / "cut", "--checkpoint-every", "4") != 0  # without --resume: refused
    assert _cli_train(data, gt, tmp_path / "cut", "--checkpoint-every", "4", "--resume") == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["OA"] == results["OA"]
    assert _cli_train(data, gt, tmp_path / "cut", "--resume") == 2  # finished: nothing to resume

    # eval on the saved split reproduces results.json; predict writes the map.
    capsys.readouterr()
    assert main(["hsi", "eval", str(full), "--json", str(tmp_path / "eval.json")]) == 0
    assert f"OA {results['OA']:.2f}%" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["kappa"] == pytest.approx(results["kappa"])
    png = tmp_path / "pred" / "map.png"
    assert main(["hsi", "predict", str(full), "--data", str(data), "--data-key", "small", "--gt", str(gt),
                 "--gt-key", "small_gt", "--out", str(png)]) == 0
    assert png.is_file() and png.with_name("map_pred.png").is_file()
    predicted = np.load(png.with_suffix(".npy"))
    np.testing.assert_array_equal(predicted, np.load(full / "class_map.npy"))

    # Pipeline round trip.
    pipe = HyperspectralPipeline.from_pretrained(full)
    out = pipe(scene.cube)
    np.testing.assert_array_equal(out.class_map, predicted)
    assert out.class_map.min() >= 1 and out.class_map.max() <= 4
    pipe.save_pretrained(tmp_path / "saved")
    again = HyperspectralPipeline.from_pretrained(tmp_path / "saved")(scene.cube, return_probs=True)
    np.testing.assert_array_equal(again.class_map, predicted)
    assert again.probs.shape == (36, 36, 4)
    with pytest.raises(ValueError, match="40 bands"):
        pipe(scene.cube[..., :30])


def test_cli_errors_are_clear(scene_files, tmp_path, capsys):
    _, data, gt = scene_files
    assert main(["hsi", "train", "--data", str(data), "--data-key", "wrong", "--gt", str(gt), "--gt-key",
                 "small_gt", "--out", str(tmp_path / "x"), "--model", "lola_specvit_tiny"]) == 2
    err = capsys.readouterr().err
    assert "no variable 'wrong'" in err and "['small']" in err
    assert main(["hsi", "train", "--out", str(tmp_path / "y")]) == 2
    assert main(["hsi", "eval", str(tmp_path / "none")]) == 2
    assert "pipeline.json" in capsys.readouterr().err


def test_peft_backend_trains_plain_lora_and_saves_a_merged_model(scene_files, tmp_path):
    scene, data, gt = scene_files
    cfg = HSITrainConfig(data=str(data), data_key="small", gt=str(gt), gt_key="small_gt", lora_backend="peft",
                         lora_gate_residual=False, **{**SMALL, "epochs": 1, "class_map": False})
    r = train(cfg, tmp_path / "peft")
    assert r["lora_backend"] == "peft" and 0 < r["trainable_params"] < r["total_params"]
    saved = json.loads((tmp_path / "peft" / "pipeline.json").read_text())
    assert saved["model_kwargs"]["lora_placement"] == "none"
    pipe = HyperspectralPipeline.from_pretrained(tmp_path / "peft")
    scores = pipe.evaluate(scene.cube, scene.gt)
    assert 0 <= scores["OA"] <= 100
    with pytest.raises(ValueError, match="plain LoRA"):
        train(HSITrainConfig(lora_backend="peft", **SMALL), tmp_path / "bad")


def test_a_last_batch_of_one_pixel_trains(scene_files, tmp_path):
    from visadapt.hyperspectral.data import stratified_split

    scene, data, gt = scene_files
    n_train = len(stratified_split(scene.gt, 0.15, 0).train)
    cfg = HSITrainConfig(data=str(data), data_key="small", gt=str(gt), gt_key="small_gt",
                         **{**SMALL, "batch_size": n_train - 1, "grad_accum": 1, "epochs": 2, "class_map": False})
    r = train(cfg, tmp_path / "run")  # BatchNorm would fail on the epoch's last batch of one pixel
    assert r["batches"] == 2 and not (tmp_path / "run" / "checkpoint").exists()


def test_predict_writes_a_readable_figure_with_or_without_ground_truth(scene_files, tmp_path, capsys, monkeypatch):
    from visadapt.hyperspectral import metrics

    scene, data, gt = scene_files
    run = tmp_path / "run"
    cfg = HSITrainConfig(data=str(data), data_key="small", gt=str(gt), gt_key="small_gt",
                         **{**SMALL, "epochs": 1, "class_map": False})
    train(cfg, run)
    figures = []
    real = metrics.plot_class_map

    def keep(prediction, truth, names, path, **kw):
        figures.append((truth is not None, kw.get("title", "")))
        return real(prediction, truth, names, path, **kw)

    monkeypatch.setattr(metrics, "plot_class_map", keep)
    alone = tmp_path / "alone" / "map.png"
    assert main(["hsi", "predict", str(run), "--data", str(data), "--out", str(alone)]) == 0  # one variable: no key
    assert alone.stat().st_size > 2000 and alone.with_name("map_pred.png").is_file()
    assert alone.with_suffix(".npy").is_file() and figures[-1][0] is False and "small" in figures[-1][1]
    assert main(["hsi", "predict", str(run), "--data", str(data), "--gt", str(tmp_path / "missing.mat"),
                 "--out", str(tmp_path / "x" / "map.png")]) == 2
    assert "missing.mat does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # failed before predicting or writing


def test_figures_say_what_they_show(tmp_path, monkeypatch):
    from visadapt.hyperspectral import metrics
    from visadapt.utils import figures

    shown = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, dpi=120: shown.append(fig))
    figures.plot_training_curve([{"step": i, "loss": 1 / i, "lr": 0.1} for i in range(1, 9)], tmp_path / "c.png")
    legend = [t.get_text() for t in shown[-1].axes[0].get_legend().get_texts()]
    assert "learning rate" in legend and "loss" in legend
    metrics.plot_confusion(np.eye(3, dtype=int) * 5, ["a", "b", "c"], tmp_path / "m.png")
    assert len(shown[-1].axes) == 2  # the matrix and its colour bar
    metrics.plot_class_map(np.ones((4, 6), int), np.zeros((4, 6), int), ["a", "b"], tmp_path / "k.png")
    labels = [t.get_text() for t in shown[-1].legends[0].get_texts()]
    assert labels == ["a", "b", "unlabelled / not predicted"]


def test_training_curve_smooths_only_runs_long_enough_to_need_it(tmp_path, monkeypatch):
    from visadapt.utils import figures

    shown = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, dpi=120: shown.append(fig))

    def legend(n_steps):
        figures.plot_training_curve([{"step": i, "loss": 1 / i, "lr": 0.1} for i in range(1, n_steps + 1)],
                                    tmp_path / "c.png")
        return [t.get_text() for t in shown[-1].axes[0].get_legend().get_texts()]

    assert legend(8) == ["loss", "learning rate"]  # not "loss (mean of 1 steps)"
    assert legend(200) == ["loss", "loss (mean of 4 steps)", "learning rate"]
