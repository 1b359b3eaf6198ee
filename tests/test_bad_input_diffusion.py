"""Bad input to the newer diffusion commands (easyref train / eval, concept train) and the composer app: each is
refused before anything loads, with a one-line message that names the file or setting and the fix."""

from __future__ import annotations

import pytest

from visadapt.cli import main
from visadapt.diffusion.easyref.config import EasyRefEvalConfig, EasyRefTrainConfig
from visadapt.diffusion.easyref.data import write_demo_groups


@pytest.fixture()
def groups(tmp_path):
    return write_demo_groups(tmp_path / "groups", n_groups=2, per_group=2, size=48)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "--steps 0"),
    ({"scale": float("nan")}, "--scale nan"),
    ({"guidance_scale": float("inf")}, "--guidance-scale inf"),
    ({"size": 0}, "--size 0"),
    ({"images_per_group": 0}, "--images-per-group 0"),
])
def test_eval_refuses_bad_sampling_numbers_before_loading(kwargs, message, groups, tmp_path, monkeypatch):
    from visadapt.diffusion.easyref import eval as easyref_eval

    def no_loading(*args, **kw):
        raise AssertionError("loaded a model before checking the config")

    monkeypatch.setattr(easyref_eval.EasyRefSampler, "from_config", no_loading)
    cfg = EasyRefEvalConfig(data=str(groups), adapter=str(tmp_path / "none"), model="tiny-sdxl", mllm="tiny",
                            **kwargs)
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        easyref_eval.evaluate_easyref(cfg, tmp_path / "out", clip=object(), dino=object())


def test_eval_command_prints_one_line_for_steps_zero(groups, tmp_path, capsys):
    code = main(["easyref", "eval", "--data", str(groups), "--adapter", str(tmp_path), "--model", "tiny-sdxl",
                 "--mllm", "tiny", "--steps", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "--steps 0" in err and "Traceback" not in err


@pytest.mark.parametrize("kwargs, message", [
    ({"resolution": 0}, "--resolution 0"),
    ({"lr": 0.0}, "--lr 0.0"),
])
def test_train_refuses_bad_numbers(kwargs, message, groups, tmp_path):
    from visadapt.diffusion.easyref.train import EasyRefTrainer

    cfg = EasyRefTrainConfig(stage=1, data=str(groups), model="tiny-sdxl", mllm="tiny", steps=1, **kwargs)
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        EasyRefTrainer(cfg, tmp_path / "run")
