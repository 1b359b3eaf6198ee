"""The composer app without a browser: generate() as a plain function, the box preview, the CLI wiring, and the
/generate API through gradio_client against the app served in-process (tiny pipeline, 64×64, 2 steps).
The real-browser test is tests/test_app_browser.py."""

import json
import os

import pytest
from PIL import Image

from visadapt.apps import composer
from visadapt.diffusion import LoraFileError
from visadapt.diffusion.tiny import save_random_lora, tiny_pipeline
from visadapt.pipelines import LoRAComposerPipeline, LoRAComposerXLPipeline

LIMIT_MB = 1.0  # the served app's upload limit; the LoRA files of the tiny pipeline are ~60 kB
FAST = dict(steps=2, width=64, height=64)


@pytest.fixture(scope="module")
def pipe():
    return composer.load_pipeline(device="cpu")


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return [save_random_lora(pipe, folder / f"{n}.safetensors", seed=i + 1) for i, n in enumerate(("cat", "dog"))]


def two(loras, **override):
    slots = [dict(lora=str(loras[0]), name="cat", prompt="a photo of a cat", xmin=0, ymin=0, xmax=0.5, ymax=1,
                  weight=1.0),
             dict(lora=str(loras[1]), name="dog", prompt="a photo of a dog", xmin=0.5, ymin=0, xmax=1, ymax=1,
                  weight=0.8)]
    for slot, values in zip(slots, override.get("slots", [{}, {}])):
        slot.update(values)
    return slots


# -- the plain function ----------------------------------------------------------------------------------------

def test_generate_reports_every_step_and_returns_its_settings(pipe, loras):
    seen = []
    image, settings = composer.generate(pipe, prompt="a cat and a dog", concepts=two(loras), seed=3,
                                        progress=lambda s, t: seen.append((s, t)), **FAST)
    assert image.size == (64, 64)
    assert seen == [(1, 2), (2, 2)]
    assert [c["name"] for c in settings["concepts"]] == ["cat", "dog"]
    assert settings["concepts"][1]["box"] == [0.5, 0.0, 1.0, 1.0] and settings["concepts"][1]["weight"] == 0.8
    assert settings["seed"] == 3 and settings["pipeline"] == "LoRAComposerPipeline"
    assert settings["composer"]["loss_downsample"] == 1  # on the world model (tested below with the app's default)
    # The concepts act on the image, and DECOR words reach the pipeline.
    plain, _ = composer.generate(pipe, prompt="a cat and a dog", seed=3, **FAST)
    assert plain.tobytes() != image.tobytes()
    _, with_decor = composer.generate(pipe, prompt="a cat and a dog", concepts=two(loras), seed=3,
                                      decor_words="grass, tree", decor_strength=0.5, **FAST)
    assert with_decor["decor"] == {"words": ["grass", "tree"], "strength": 0.5}


@pytest.mark.parametrize("change, message", [
    (dict(slots=[dict(xmin=0.6), {}]), "empty"),
    (dict(slots=[dict(xmax=1.5), {}]), "outside the canvas"),
    (dict(slots=[{}, dict(name="cat")]), "share the name"),
    (dict(slots=[dict(name="my cat"), {}]), "letters, digits"),
    (dict(slots=[dict(prompt="a cat " * 80), {}]), "tokens"),
    (dict(slots=[dict(prompt=" "), {}]), "regional prompt is empty"),
    (dict(slots=[dict(lora=None), {}]), "no LoRA file"),
    (dict(slots=[dict(tokens="lion"), {}]), "'lion' is not in the regional prompt"),
    (dict(width=72), "multiple of 16"),
    (dict(loss_downsample=4), "Loss-map downsampling must be one of 1, 2 for this model"),  # no attention at 4
    (dict(loss_downsample=1.5), "Loss-map downsampling must be one of 1, 2 for this model"),
])
def test_bad_input_raises_value_errors_that_say_what_to_fix(pipe, loras, change, message):
    kwargs = {**FAST, **{k: v for k, v in change.items() if k != "slots"}}
    with pytest.raises(ValueError, match=message):
        composer.generate(pipe, prompt="x", concepts=two(loras, **change), **kwargs)


def test_focus_words_choose_what_the_composer_pulls_into_the_box(pipe, loras):
    assert composer.focus_words(" sks, hexagon ") == ["sks", "hexagon"] and composer.focus_words("") is None

    def draw(tokens):
        return composer.generate(pipe, prompt="a cat and a dog", seed=3, **FAST,
                                 concepts=two(loras, slots=[dict(tokens=tokens), {}]))

    (default, settings), (cat, named) = draw(""), draw("cat")
    assert settings["concepts"][0]["tokens"] is None and named["concepts"][0]["tokens"] == ["cat"]
    assert cat.tobytes() == default.tobytes()  # "cat" is the content word of "a photo of a cat": the default
    photo, _ = draw("photo")
    assert photo.tobytes() != default.tobytes()


def test_lora_uploads_must_be_safetensors_and_within_the_limit(pipe, loras, tmp_path):
    pickled = tmp_path / "cat.ckpt"
    pickled.write_bytes(loras[0].read_bytes())
    with pytest.raises(LoraFileError, match="not a .safetensors file"):
        composer.generate(pipe, prompt="x", concepts=two(loras, slots=[dict(lora=str(pickled)), {}]), **FAST)
    with pytest.raises(LoraFileError, match="--max-lora-mb"):
        composer.generate(pipe, prompt="x", concepts=two(loras), max_lora_bytes=1000, **FAST)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFileError, match="not a readable safetensors"):
        composer.generate(pipe, prompt="x", concepts=two(loras, slots=[dict(lora=str(garbage)), {}]), **FAST)


def test_a_mix_of_show_ed_lora_file_is_a_concept_too(pipe, loras, tmp_path):
    import torch

    # Mix-of-Show's layout: new tokens with one embedding per cross-attention layer, LoRA down/up on attn2's K.
    gen = torch.Generator().manual_seed(0)
    n_layers = sum(name.endswith("attn2.processor") for name in pipe.unet.attn_processors)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    params = {"new_concept_embedding": {"<cat1>": torch.randn(n_layers, width, generator=gen)},
              "text_encoder": {},
              "unet": {f"{layer}.lora_down.weight": torch.randn(2, width, generator=gen),
                       f"{layer}.lora_up.weight": torch.randn(pipe.unet.get_submodule(layer).out_features, 2,
                                                              generator=gen)}}
    path = tmp_path / "catA.pth"
    torch.save({"params": params}, str(path))
    slots = two(loras, slots=[dict(lora=str(path), prompt="a photo of a <cat1> cat"), {}])
    image, settings = composer.generate(pipe, prompt="a cat and a dog", concepts=slots, seed=3, **FAST)
    plain, _ = composer.generate(pipe, prompt="a cat and a dog", concepts=two(loras), seed=3, **FAST)
    assert settings["concepts"][0]["lora"] == "catA.pth" and image.tobytes() != plain.tobytes()


def test_box_preview_draws_each_box_in_its_concept_colour():
    image = composer.draw_boxes(128, 64, [("cat", (0, 0, 0.5, 1)), ("dog", (0.5, 0.25, 1, 0.75)),
                                          ("unset", (None, 0, 1, 1))])
    assert image.size == (composer.PREVIEW_SIDE, composer.PREVIEW_SIDE // 2)
    red, green = (Image.new("RGB", (1, 1), c).getpixel((0, 0)) for c in composer.COLOURS[:2])
    assert image.getpixel((1, 64)) == red  # left edge of the cat box
    assert image.getpixel((129, 64)) == green  # left edge of the dog box, half way across
    assert image.getpixel((200, 10)) != green  # above the dog box


def test_the_loss_maps_offered_are_the_unets_attention_levels_and_start_where_the_composer_places_best(pipe):
    from types import SimpleNamespace

    from visadapt.diffusion.tiny import sd15_layout_unet

    sd15 = SimpleNamespace(name_or_path="runwayml/stable-diffusion-v1-5", unet=sd15_layout_unet())
    assert composer.loss_downsamplings(sd15) == [1, 2, 4, 8] and composer.default_loss_downsample(sd15) == 4
    # The world model has attention at 1 and 2 only: 4 would silently run at 2, so it is not offered.
    assert composer.loss_downsamplings(pipe) == [1, 2] and composer.default_loss_downsample(pipe) == 1
    tiny = tiny_pipeline("sdxl")  # attention at 2 only: the official 4 falls back to it, as the pipeline does
    assert composer.loss_downsamplings(tiny) == [2] and composer.default_loss_downsample(tiny) == 2


def test_png_download_carries_the_settings(tmp_path):
    settings = {"seed": 5, "prompt": "p"}
    path = composer.save_png(Image.new("RGB", (16, 16)), settings, tmp_path)
    assert json.loads(Image.open(path).text["parameters"]) == settings


def test_model_folders_pick_the_sd_or_sdxl_composer(tmp_path):
    for kind, cls in (("sd", LoRAComposerPipeline), ("sdxl", LoRAComposerXLPipeline)):
        tiny_pipeline(kind).save_pretrained(tmp_path / kind)
        assert type(composer.load_pipeline(str(tmp_path / kind), device="cpu")) is cls
    with pytest.raises(ValueError, match="not a folder"):
        composer.load_pipeline(str(tmp_path / "missing"), device="cpu")


def test_cli_registers_the_app_command():
    from visadapt.cli import build_parser

    args = build_parser().parse_args(["app", "--port", "7999", "--max-lora-mb", "5"])
    assert args.func is composer.run_app
    assert (args.host, args.port, args.share, args.model, args.max_lora_mb) == ("127.0.0.1", 7999, False, None, 5.0)


def test_a_hub_id_missing_offline_says_so_and_how_to_pass_a_folder(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"not in the local Hugging Face cache.*--model /path/to/folder") as info:
        composer.load_pipeline("visadapt-tests/no-such-model", device="cpu")
    assert "model_index.json" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_the_served_app_names_the_share_flag(monkeypatch, capsys):
    import gradio as gr

    from visadapt.cli import build_parser

    apps = []
    build = composer.build_app
    monkeypatch.setattr(composer, "build_app", lambda *a, **k: apps.append(build(*a, **k)) or apps[-1])
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)  # return instead of serving forever
    try:
        assert composer.run_app(build_parser().parse_args(["app"])) == 0
    finally:
        for app in apps:
            app.close()
    out = capsys.readouterr().out
    assert "Running on local URL:  http://127.0.0.1:" in out
    assert "start the app with --share" in out and "share=True" not in out


@pytest.mark.parametrize("change, message", [
    (dict(slots=[dict(weight=float("nan")), {}]), "Concept 1: weight must be a finite number"),
    (dict(slots=[{}, dict(xmax=float("inf"))]), "Concept 2: xmax must be a finite number"),
    (dict(guidance=float("nan")), "Guidance must be a finite number"),
    (dict(seed=float("nan")), "Seed must be a finite number"),
    (dict(steps="many"), "Steps must be a number"),
    (dict(decor_words="grass", decor_strength=float("nan")), "DECOR strength must be a finite number"),
])
def test_non_finite_numbers_are_refused_with_a_message(pipe, loras, change, message):
    kwargs = {**FAST, **{k: v for k, v in change.items() if k != "slots"}}
    with pytest.raises(ValueError, match=message):
        composer.generate(pipe, prompt="x", concepts=two(loras, **change), **kwargs)


# -- the served app through its API ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(pipe, tmp_path_factory):
    from gradio_client import Client

    out = tmp_path_factory.mktemp("app-out")
    app = composer.build_app(pipe, max_lora_mb=LIMIT_MB, output_dir=out)
    _, url, _ = composer.launch(app, port=None, max_lora_mb=LIMIT_MB, output_dir=out, prevent_thread_lock=True,
                                quiet=True)
    try:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    finally:
        app.close()


def api_call(client, loras, **override):
    from gradio_client import handle_file

    values = dict(prompt="a cat and a dog", n_concepts=2, seed=1, **FAST,
                  lora_1=handle_file(str(loras[0])), name_1="cat", prompt_1="a photo of a cat",
                  xmin_1=0, ymin_1=0, xmax_1=0.5, ymax_1=1,
                  lora_2=handle_file(str(loras[1])), name_2="dog", prompt_2="a photo of a dog",
                  xmin_2=0.5, ymin_2=0, xmax_2=1, ymax_2=1, weight_2=0.7)
    values.update(override)
    return client.predict(**values, api_name="/generate")


def test_api_generates_with_two_uploaded_loras(client, pipe, loras):
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names[:3] == ["prompt", "negative_prompt", "n_concepts"] and "lora_4" in names
    assert "loss_downsample" in names
    gallery, png, settings = api_call(client, loras)
    # The app serves the world model: its 16×16 latent gets SD's 16×16 loss grid at downsampling 1, not 4.
    assert composer.is_world_model(pipe) and settings["composer"]["loss_downsample"] == 1
    assert len(gallery) == 1 and "seed 1" in gallery[0]["caption"] and "dog@0.7" in gallery[0]["caption"]
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (64, 64)
    assert json.loads(image.text["parameters"]) == settings
    assert [c["lora"] for c in settings["concepts"]] == ["cat.safetensors", "dog.safetensors"]
    # Same seed and settings through the API as through the plain function.
    direct, _ = composer.generate(pipe, prompt="a cat and a dog", concepts=two(loras, slots=[
        {}, dict(weight=0.7)]), seed=1, **FAST)
    assert Image.open(gallery[0]["image"]).convert("RGB").tobytes() == direct.tobytes()


def test_bad_uploads_show_errors_and_the_app_keeps_working(client, loras, tmp_path):
    from gradio_client import handle_file

    not_safetensors = tmp_path / "cat.pt"
    not_safetensors.write_bytes(loras[0].read_bytes())
    with pytest.raises(Exception, match=r"(?i)safetensors"):
        api_call(client, loras, lora_1=handle_file(str(not_safetensors)))
    oversize = tmp_path / "huge.safetensors"
    oversize.write_bytes(os.urandom(int(LIMIT_MB * 2**20) + 4096))
    with pytest.raises(Exception, match=r"exceeds the maximum file size|MiB"):
        api_call(client, loras, lora_2=handle_file(str(oversize)))
    # gradio_client refuses it before sending; the server refuses it too (a browser or curl does not ask first).
    import httpx

    response = httpx.post(client.src.rstrip("/") + "/gradio_api/upload",
                          files={"files": ("huge.safetensors", oversize.read_bytes())})
    assert response.status_code == 413, response.text
    with pytest.raises(Exception, match="empty"):
        api_call(client, loras, xmin_2=1.0)
    gallery, png, settings = api_call(client, loras, seed=2)  # still serving
    assert "seed 2" in gallery[0]["caption"] and Image.open(png).size == (64, 64)


def raw_api_error(client, loras, lora_path=None, **override) -> str:
    """POST /generate with a hand-written JSON body (gradio_client refuses to send NaN) and return the error event's
    data (the message the page shows)."""
    import httpx

    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]
    base = client.src.rstrip("/") + "/gradio_api"
    uploaded = httpx.post(f"{base}/upload", files={"files": (loras[0].name, loras[0].read_bytes())}).json()[0]
    values = dict(prompt="a cat and a dog", n_concepts=1, seed=1, **FAST, name_1="cat", prompt_1="a photo of a cat",
                  xmin_1=0, ymin_1=0, xmax_1=0.5, ymax_1=1,
                  lora_1={"path": uploaded, "meta": {"_type": "gradio.FileData"}})
    values.update(override)
    if lora_path is not None:  # a path on the server instead of an upload
        values["lora_1"] = {"path": lora_path, "meta": {"_type": "gradio.FileData"}}
    data = [values.get(p["parameter_name"], p.get("parameter_default")) for p in endpoint["parameters"]]
    body = json.dumps({"data": data}, allow_nan=True)
    event = httpx.post(f"{base}/call/generate", content=body,
                       headers={"content-type": "application/json"}).json()["event_id"]
    stream = httpx.get(f"{base}/call/generate/{event}", timeout=120).text
    assert "event: error" in stream, stream
    return stream.split("event: error", 1)[1]


def test_api_refuses_nan_with_a_message_and_one_log_line(client, loras, caplog, capfd):
    for override, message in ((dict(seed=float("nan")), "Seed must be a finite number"),
                              (dict(weight_1=float("nan")), "Concept 1: weight must be a finite number"),
                              (dict(guidance=float("nan")), "Guidance must be a finite number")):
        caplog.clear()
        with caplog.at_level("WARNING", logger=composer.log.name):
            assert message in raw_api_error(client, loras, **override)
        refused = [r for r in caplog.records if r.name == composer.log.name]
        assert len(refused) == 1 and message in refused[0].getMessage() and refused[0].exc_info is None
    assert "Traceback" not in capfd.readouterr().err


def test_api_refuses_a_server_side_path_with_a_message_and_one_log_line(client, loras, caplog, capfd):
    """Gradio refuses the path before the handler runs: the caller gets its message, the log one line and no
    traceback."""
    capfd.readouterr()
    with caplog.at_level("WARNING", logger=composer.log.name):
        assert "not uploaded by a user" in raw_api_error(client, loras, lora_path=str(loras[0]))
    refused = [r for r in caplog.records if r.name == composer.log.name]
    assert len(refused) == 1 and "not uploaded by a user" in refused[0].getMessage() and refused[0].exc_info is None
    assert "Traceback" not in capfd.readouterr().err
