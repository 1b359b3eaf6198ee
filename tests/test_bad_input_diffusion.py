"""Bad input to the newer diffusion commands (easyref train / eval, concept train) and the composer app: each is
refused before anything loads, with a one-line message that names the file or setting and the fix."""

from __future__ import annotations

import pytest
from images import huge_png

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
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):  # the config refuses them when built
        cfg = EasyRefEvalConfig(data=str(groups), adapter=str(tmp_path / "none"), model="tiny-sdxl", mllm="tiny",
                                **kwargs)
        easyref_eval.evaluate_easyref(cfg, tmp_path / "out", clip=object(), dino=object())


def test_eval_command_prints_one_line_for_steps_zero(groups, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["easyref", "eval", "--data", str(groups), "--adapter", str(tmp_path), "--model", "tiny-sdxl",
              "--mllm", "tiny", "--steps", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--steps: must be an integer >= 1, got 0" in err and "Traceback" not in err


@pytest.mark.parametrize("kwargs, message", [
    ({"resolution": 0}, "--resolution 0"),
    ({"lr": 0.0}, "--lr 0.0"),
])
def test_train_refuses_bad_numbers(kwargs, message, groups, tmp_path):
    from visadapt.diffusion.easyref.train import EasyRefTrainer

    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        cfg = EasyRefTrainConfig(stage=1, data=str(groups), model="tiny-sdxl", mllm="tiny", steps=1, **kwargs)
        EasyRefTrainer(cfg, tmp_path / "run")


# ----------------------------------------------------------------------------------------------- huge images
def assert_names_the_limit(err, path):
    text = str(err)
    assert str(path) in text and "20000x20000" in text and "VISADAPT_MAX_IMAGE_PIXELS" in text
    assert "PIL.Image.MAX_IMAGE_PIXELS" in text


def test_easyref_training_item_refuses_a_huge_image(groups):
    from visadapt.diffusion.easyref.data import EasyRefItems, scan_groups
    from visadapt.utils import DatasetLayoutError

    found = scan_groups(groups)
    huge = huge_png(found[0].images[0])
    items = EasyRefItems(found, stage=1, resolution=32)
    with pytest.raises(DatasetLayoutError) as err:
        items[(0, 0)]
    assert_names_the_limit(err.value, huge)


def test_easyref_eval_refuses_a_huge_reference(groups, tmp_path):
    from visadapt.diffusion.easyref.data import scan_groups
    from visadapt.diffusion.easyref.eval import evaluate_easyref

    huge = huge_png(scan_groups(groups)[0].images[0])
    cfg = EasyRefEvalConfig(data=str(groups), model="tiny-sdxl", mllm="tiny")
    with pytest.raises(ValueError) as err:
        evaluate_easyref(cfg, tmp_path / "out", pipe=object(), clip=object(), dino=object())
    assert_names_the_limit(err.value, huge)


def test_concept_train_command_refuses_a_huge_image_in_one_line(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i}.png")
    huge = huge_png(folder / "3.png")
    code = main(["concept", "train", "--out", str(tmp_path / "run"), "--model", "tiny-sd", "--images", str(folder),
                 "--trigger", "sks", "--instance-prompt", "a photo of sks toy", "--steps", "1", "--sample-every",
                 "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert_names_the_limit(err, huge)


def test_the_env_var_raises_the_limit(tmp_path, monkeypatch):
    from PIL import Image

    from visadapt.utils.images import open_rgb

    Image.new("RGB", (48, 48)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refused over 2000 pixels
    with pytest.raises(ValueError, match="48x48 .2304 pixels.*limit of 1000 pixels"):
        open_rgb(tmp_path / "a.png")
    monkeypatch.setenv("VISADAPT_MAX_IMAGE_PIXELS", "5000")
    assert open_rgb(tmp_path / "a.png").size == (48, 48)
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's own setting is left as it was


# ----------------------------------------------------------------------------------------------- face boxes
@pytest.mark.parametrize("box", ["5000 5000 6000 6000", "10 10 60 30", "-4 0 20 20"])
def test_stage_two_refuses_a_face_box_outside_the_image(box, groups):
    from visadapt.diffusion.easyref.data import EasyRefItems, scan_groups
    from visadapt.utils import DatasetLayoutError

    image = sorted((groups / sorted(p.name for p in groups.iterdir())[0]).glob("*.png"))[0]
    image.with_suffix(".face.txt").write_text(box + "\n")
    items = EasyRefItems(scan_groups(groups), stage=2, resolution=32, ref_drop=0, text_drop=0, both_drop=0)
    with pytest.raises(DatasetLayoutError) as err:
        items[(0, 0)]
    text = str(err.value)
    assert str(image.with_suffix(".face.txt")) in text and box in text and "48x48" in text


def test_stage_two_takes_a_face_box_on_the_image_edge(groups):
    from visadapt.diffusion.easyref.data import EasyRefItems, scan_groups

    image = sorted((groups / sorted(p.name for p in groups.iterdir())[0]).glob("*.png"))[0]
    image.with_suffix(".face.txt").write_text("0 0 48 48\n")
    items = EasyRefItems(scan_groups(groups), stage=2, resolution=32, ref_drop=0, text_drop=0, both_drop=0)
    assert items[(0, 0)]["references"][0].size == (48, 48)


def test_the_pipeline_refuses_a_huge_reference_image(tmp_path, monkeypatch):
    from PIL import Image

    from visadapt.diffusion.easyref.encoder import EasyRefInputError, load_reference

    huge = huge_png(tmp_path / "ref.png")
    with pytest.raises(EasyRefInputError) as err:
        load_reference(str(huge))
    assert_names_the_limit(err.value, huge)
    Image.new("RGB", (48, 48)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(EasyRefInputError, match="limit of 1000 pixels"):
        load_reference(str(tmp_path / "small.png"))
    monkeypatch.setenv("VISADAPT_MAX_IMAGE_PIXELS", "none")  # the env var lifts the limit here too
    assert load_reference(str(tmp_path / "small.png")).size == (48, 48)


def test_easyref_demo_data_writes_groups_and_never_overwrites(tmp_path, capsys):
    from visadapt.diffusion.easyref.data import scan_groups

    out = tmp_path / "groups"
    assert main(["easyref", "demo-data", "--out", str(out), "--groups", "2", "--per-group", "3"]) == 0
    groups = scan_groups(out)
    assert [len(g) for g in groups] == [3, 3] and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["easyref", "demo-data", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds files; pass a new or empty folder" in err and "Traceback" not in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
