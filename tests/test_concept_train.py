"""``visadapt concept train`` on the tiny offline SD and SDXL pipelines, with instance images the tests draw.

Training lowers the loss on a fixed evaluation batch; an interrupted run resumes bit-exactly; the diffusers and
kohya exports load as concepts in the composer pipelines and change their output; bad inputs name the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from visadapt.cli import main
from visadapt.diffusion import ComposerConfig, Concept
from visadapt.diffusion.concept.train import ConceptTrainConfig, train_concept
from visadapt.diffusion.tiny import tiny_pipeline
from visadapt.pipelines import LoRAComposerPipeline, LoRAComposerXLPipeline

PLAIN = ComposerConfig(latent_optimization=False, latent_reinit=False)
FAST = dict(trigger="sks", instance_prompt="a photo of sks toy", sample_steps=2, sample_count=2, class_steps=2,
            num_class_images=2)


def draw_images(folder: Path, count: int = 4, sizes=((32, 32),), seed: int = 0) -> Path:
    """``count`` pictures of one red square on a noisy dark ground (the concept), sizes cycling through ``sizes``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        pixels = rng.integers(0, 30, (h, w, 3)).astype(np.uint8)
        pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = [200, 40, 40]
        Image.fromarray(pixels).save(folder / f"toy_{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return draw_images(tmp_path_factory.mktemp("instance"))


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "sd"
    cfg = ConceptTrainConfig(model="tiny-sd", images=str(images), steps=40, lr=1e-2, sample_every=20, **FAST)
    return out, train_concept(cfg, out)


def composed(pipe, concepts=None, prompt="a photo of sks toy") -> torch.Tensor:
    return pipe(prompt=prompt, concepts=concepts, composer=PLAIN, num_inference_steps=2, height=32, width=32,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_training_lowers_the_loss_on_a_fixed_batch_and_writes_the_run(trained):
    out, r = trained
    assert r["eval_loss_after"] < 0.85 * r["eval_loss_before"], r
    assert r["steps"] == 40 and r["num_images"] == 4 and r["resized_images"] == [] and not r["sdxl"]
    for name in ("results.json", "run_config.json", "training_curve.png", "report.md", "samples/step_000020.png",
                 "samples/step_000040.png", "diffusers/sks/pytorch_lora_weights.safetensors",
                 "kohya/sks/sks.safetensors"):
        assert (out / name).is_file(), name
    assert Image.open(out / "samples/step_000020.png").size == (64, 32)  # 2 samples of 32 px, one row
    assert not (out / "checkpoint").exists()
    assert json.loads((out / "results.json").read_text())["lora_files"] == r["lora_files"]


def test_diffusers_and_kohya_files_load_as_composer_concepts(trained):
    out, _ = trained
    pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)  # the same base weights (seed 0)
    without = composed(pipe)
    files = {fmt: out / fmt / "sks" for fmt in ("diffusers", "kohya")}
    images = {fmt: composed(pipe, [Concept(lora=folder, prompt="a photo of sks toy", box=[0, 0, 1, 1],
                                           tokens=["sks"])]) for fmt, folder in files.items()}
    assert (images["diffusers"] - without).abs().max() > 1e-3  # the concept acts
    torch.testing.assert_close(images["kohya"], images["diffusers"], atol=1e-4, rtol=1e-4)
    kohya = load_file(str(out / "kohya/sks/sks.safetensors"))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)


def test_the_app_takes_the_trained_file_as_an_upload(trained):
    from visadapt.apps import composer as app

    out, r = trained
    pipe = app.load_pipeline(device="cpu")  # the app's tiny pipeline: the base the concept was trained on
    slot = dict(lora=str(out / r["lora_files"]["kohya"]), name="sks", prompt="a photo of sks toy", xmin=0, ymin=0,
                xmax=1, ymax=1, weight=1.0)
    image, settings = app.generate(pipe, prompt="a photo of sks toy", concepts=[slot], steps=2, width=32, height=32)
    plain, _ = app.generate(pipe, prompt="a photo of sks toy", steps=2, width=32, height=32)
    assert settings["concepts"][0]["lora"] == "sks.safetensors" and image.tobytes() != plain.tobytes()


def test_interrupted_run_resumes_bit_exactly_with_prior_preservation_and_text_encoder(images, tmp_path):
    cfg = dict(model="tiny-sd", images=str(images), steps=6, lr=1e-2, checkpoint_every=2, sample_every=3,
               class_prompt="a photo of a toy", train_text_encoder=True, **FAST)
    full = train_concept(ConceptTrainConfig(**cfg), tmp_path / "full")
    assert full["prior_preservation"] and len(list((tmp_path / "full" / "class_images").glob("*.png"))) == 2

    def stop(step: int, record: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_concept(ConceptTrainConfig(**cfg), tmp_path / "cut", callbacks=[stop])
    assert (tmp_path / "cut" / "checkpoint" / "state.safetensors").is_file()
    argv = ["concept", "train", "--out", str(tmp_path / "cut"), "--config", str(tmp_path / "full" / "run_config.json")]
    assert main(argv) == 2  # the run exists: refused without --resume
    assert main([*argv, "--resume"]) == 0
    for name in ("diffusers/sks/pytorch_lora_weights.safetensors", "kohya/sks/sks.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert any(k.startswith(("text_encoder.", "lora_te_")) for k in a), name  # the text encoder trained too
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["eval_loss_after"] == full["eval_loss_after"]


# transformers' own PEFT integration on its models wants peft >= 0.22 from transformers 5.25 on ("The version of PEFT
# you are using is not compatible"), beyond the peft range visadapt supports. Text-encoder adapters go through peft's
# inject_adapter_in_model and diffusers' load_lora_weights (transformers' load_adapter, which is not gated) instead.
TRANSFORMERS_GATED = ("add_adapter", "set_adapter", "enable_adapters", "disable_adapters", "active_adapters",
                      "get_adapter_state_dict", "delete_adapter")


def test_text_encoder_adapters_never_take_transformers_gated_peft_integration(images, tmp_path, monkeypatch):
    from transformers.integrations.peft import PeftAdapterMixin

    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"transformers' {name} was called: it needs peft >= 0.22 under transformers >= 5.25")
        return call

    for name in TRANSFORMERS_GATED:
        monkeypatch.setattr(PeftAdapterMixin, name, refuse(name))
    cfg = ConceptTrainConfig(model="tiny-sd", images=str(images), steps=2, train_text_encoder=True, **FAST)
    train_concept(cfg, tmp_path / "run")
    pipe = tiny_pipeline("sd", pipeline_class=LoRAComposerPipeline)
    without = composed(pipe)
    pipe.load_lora_weights(str(tmp_path / "run" / "diffusers" / "sks"), adapter_name="sks")
    pipe.set_adapters(["sks"], [1.0])
    assert any("lora_A" in name for name, _ in pipe.text_encoder.named_parameters())  # its part really loaded
    assert (composed(pipe) - without).abs().max() > 0
    pipe.delete_adapters("sks")
    torch.testing.assert_close(composed(pipe), without)


def test_sdxl_trains_with_time_ids_and_both_text_encoders(images, tmp_path):
    cfg = ConceptTrainConfig(model="tiny-sdxl", images=str(images), steps=4, lr=1e-2, train_text_encoder=True,
                             method="block-lora", n_blocks=2, gradient_checkpointing=True, sample_every=0, **FAST)
    r = train_concept(cfg, tmp_path / "xl")
    assert r["sdxl"] and np.isfinite(r["eval_loss_after"]) and r["eval_loss_after"] != r["eval_loss_before"]
    kohya = load_file(str(tmp_path / "xl" / "kohya/sks/sks.safetensors"))
    assert {k.split("_", 2)[1] for k in kohya} == {"unet", "te1", "te2"}
    pipe = tiny_pipeline("sdxl", pipeline_class=LoRAComposerXLPipeline)
    concept = Concept(lora=tmp_path / "xl" / "diffusers" / "sks", prompt="a photo of sks toy", box=[0, 0, 1, 1])
    assert (composed(pipe, [concept]) - composed(pipe)).abs().max() > 1e-3


def test_v_prediction_pipeline_given_as_object_and_a_peft_config_file(images, tmp_path):
    """A pipeline object replaces --model; its scheduler's v-prediction sets the target (get_velocity); a visadapt
    config file (Comp-LoRA here) replaces --method."""
    from diffusers import DPMSolverMultistepScheduler

    import visadapt

    visadapt.CompLoraConfig(k=2, r=2, lora_alpha=2, target_modules=["to_q"]).save_pretrained(str(tmp_path / "cfg"))
    cfg = ConceptTrainConfig(images=str(images), steps=2, sample_every=0,
                             peft_config=str(tmp_path / "cfg" / "adapter_config.json"), **FAST)
    epsilon = train_concept(cfg, tmp_path / "epsilon", pipe=tiny_pipeline("sd"))
    pipe = tiny_pipeline("sd")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    r = train_concept(cfg, tmp_path / "run", pipe=pipe)
    assert epsilon["prediction_type"] == "epsilon"
    assert abs(r["eval_loss_before"] - epsilon["eval_loss_before"]) > 1e-3  # the same model, another target
    assert r["prediction_type"] == "v_prediction" and r["method"] == "peft-config"
    assert r["base_model"] == "StableDiffusionPipeline"
    assert np.isfinite(r["eval_loss_after"]) and r["eval_loss_after"] != r["eval_loss_before"]
    assert type(pipe.unet.peft_config["sks"]).__name__ == "CompLoraConfig"


def test_bf16_mixed_precision_with_half_frozen_weights(images, trained, tmp_path, fresh_accelerator):
    pipe = tiny_pipeline("sd")
    cfg = ConceptTrainConfig(images=str(images), steps=2, lr=1e-2, precision="bf16", half_weights=True,
                             train_text_encoder=True, **FAST)
    r = train_concept(cfg, tmp_path / "run", pipe=pipe)
    assert r["precision"] == "bf16" and (tmp_path / "run" / "samples" / "step_000002.png").is_file()
    dtypes = {(p.requires_grad, p.dtype) for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}  # frozen base halved, adapter fp32
    assert r["eval_loss_before"] == pytest.approx(trained[1]["eval_loss_before"], abs=0.02)  # the fp32 run's
    assert r["eval_loss_after"] != r["eval_loss_before"]
    assert {t.dtype for t in load_file(str(tmp_path / "run" / r["lora_files"]["diffusers"])).values()} == {
        torch.float32}


def test_a_local_diffusers_folder_is_a_base_model(images, tmp_path):
    tiny_pipeline("sd").save_pretrained(str(tmp_path / "base"))
    cfg = ConceptTrainConfig(model=str(tmp_path / "base"), images=str(images), steps=1, sample_every=0, **FAST)
    r = train_concept(cfg, tmp_path / "run")
    assert r["base_model"] == str(tmp_path / "base") and (tmp_path / "run" / r["lora_files"]["kohya"]).is_file()


def test_images_of_mixed_sizes_are_resized_and_reported(tmp_path):
    folder = draw_images(tmp_path / "mixed", count=3, sizes=((32, 32), (48, 40), (40, 64)))
    cfg = ConceptTrainConfig(model="tiny-sd", images=str(folder), steps=1, sample_every=0, **FAST)
    with pytest.warns(UserWarning, match="2 instance image.*resized and centre-cropped to 32×32"):
        r = train_concept(cfg, tmp_path / "run")
    assert r["resized_images"] == ["toy_1.png", "toy_2.png"]


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no image.*put 3-20 pictures"),
    ("two", "2 image.*at least 3"),
    ("no_trigger", "does not contain the trigger word 'sks'; write it in the prompt"),
    ("class_trigger", "class prompt describes the class without it"),
    ("stock_peft", "takes a visadapt config.*--method lora"),
])
def test_bad_inputs_name_the_fix(case, message, images, tmp_path):
    folder = images
    kwargs: dict = dict(FAST)
    if case == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "two":
        folder = draw_images(tmp_path / "two", count=2)
    elif case == "no_trigger":
        kwargs["instance_prompt"] = "a photo of a toy"
    elif case == "class_trigger":
        kwargs["class_prompt"] = "a photo of sks"
    elif case == "stock_peft":
        (tmp_path / "lora.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["to_q"]}))
        kwargs["peft_config"] = str(tmp_path / "lora.json")
    cfg = ConceptTrainConfig(model="tiny-sd", images=str(folder), steps=1, sample_every=0, **kwargs)
    with pytest.raises(ValueError, match=message):
        train_concept(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_cli_reports_a_missing_trigger_word(images, tmp_path, capsys):
    code = main(["concept", "train", "--out", str(tmp_path / "run"), "--model", "tiny-sd", "--images", str(images),
                 "--trigger", "sks", "--instance-prompt", "a photo of a toy"])
    assert code == 2 and "does not contain the trigger word" in capsys.readouterr().err


def test_help_lists_every_option_with_its_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["concept", "train", "--help"])
    text = capsys.readouterr().out
    options = text.split("\n  --")
    assert len(options) > 30 and all(option.count("(default:") <= 1 for option in options)
    flat = " ".join(text.split())
    for flag in ("--trigger", "--instance-prompt", "--class-prompt", "--method {lora,block-lora,comp-lora}",
                 "--peft-config", "--train-text-encoder", "--gradient-checkpointing", "--sample-every", "--config"):
        assert flag in flat, flag
    assert "--rank RANK LoRA rank (default: 4)" in flat and "(default: None)" not in flat


def test_images_are_read_and_encoded_a_batch_at_a_time(tmp_path, monkeypatch):
    """Issue 29: the instance and class folders were read into one pixel tensor (1000 class images at 1024 px:
    12 GB); now at most ENCODE_BATCH images' pixels exist at once, and the latents are the same."""
    from visadapt.diffusion.concept import train as concept_train

    folder = draw_images(tmp_path / "many", count=2 * concept_train.ENCODE_BATCH + 3)
    calls = []
    original = concept_train.load_images

    def spy(files, resolution):
        calls.append(len(files))
        return original(files, resolution)

    monkeypatch.setattr(concept_train, "load_images", spy)
    cfg = ConceptTrainConfig(model="tiny-sd", images=str(folder), steps=1, sample_every=0, **FAST)
    trainer = concept_train.ConceptTrainer(cfg, tmp_path / "run")
    trainer.pipe, trainer.resolution = tiny_pipeline("sd"), 32
    files = concept_train.image_files(folder)
    latents, resized = trainer._encode_folder(files)
    assert max(calls) <= concept_train.ENCODE_BATCH and sum(calls) == len(files) and resized == []
    pixels, time_ids, _ = original(files, 32)
    mean, std = concept_train.encode_latents(trainer.pipe.vae, pixels)
    assert torch.equal(latents["mean"], mean) and torch.equal(latents["std"], std)
    assert torch.equal(latents["time_ids"], time_ids)
