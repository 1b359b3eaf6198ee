"""The shapes world of the few-shot demo and the tiny CLIP pretrained on it (visadapt.utils.worlds.shapes,
pretrain/demo_clip.py)."""

import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import pretrain_script
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from visadapt.fewshot.model import DEMO_MODEL, resolve_model_name
from visadapt.utils.worlds import shapes as world
from visadapt.utils.worlds.models import DEMO_CLIP_DIR

demo_pretrain = pretrain_script("demo_clip")


def _draw(seed: int, n: int = 20) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    return [world.render_array(s, rng) for s in scenes], [world.caption(s, rng) for s in scenes]


def test_world_is_deterministic_per_seed():
    images, captions = _draw(0)
    again_images, again_captions = _draw(0)
    other_images, other_captions = _draw(1)
    assert all(np.array_equal(a, b) for a, b in zip(images, again_images)) and captions == again_captions
    assert not all(np.array_equal(a, b) for a, b in zip(images, other_images)) and captions != other_captions
    image = world.render(world.sample_scene(np.random.default_rng(0)), np.random.default_rng(0))
    assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and image.mode == "RGB"


def test_heldout_shapes_never_appear_in_captions():
    assert not set(world.HELDOUT_SHAPES) & set(world.SEEN_SHAPES)
    _, captions = _draw(2, n=3000)
    tokenizer = SimpleTokenizer()
    caption_tokens = {t for c in captions for t in tokenizer.encode(c)}
    for shape in world.HELDOUT_SHAPES:
        assert not any(shape in c for c in captions)
        assert not set(tokenizer.encode(shape)) & caption_tokens, shape  # not even a shared word piece
    # start and end tokens included, no caption is truncated by the demo model's context
    assert max(len(tokenizer.encode(c)) for c in captions) + 2 <= demo_pretrain.CONTEXT_LENGTH


def test_write_task_layout_and_reuse(tmp_path):
    dest = world.write_task(tmp_path, "colours", n_train=2, n_val=0, n_test=3, seed=0)
    assert dest == tmp_path / "colours"
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == ["test", "train"]
    assert sorted(p.name for p in (dest / "train").iterdir()) == sorted(c.replace(" ", "_") for c in
                                                                          world.TASKS["colours"].classes)
    for split, n in (("train", 2), ("test", 3)):
        for folder in (dest / split).iterdir():
            assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in range(n)]
    assert json.loads((dest / "world.json").read_text())["n_test"] == 3

    sentinel = dest / "sentinel"
    sentinel.touch()
    assert world.write_task(tmp_path, "colours", 2, 0, 3, seed=0) == dest and sentinel.exists()  # reused
    world.write_task(tmp_path, "colours", 2, 0, 3, seed=1)
    assert not sentinel.exists()  # other parameters: rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colours"]  # no staging folder left behind

    copy = world.write_task(tmp_path / "copy", "colours", 2, 0, 3, seed=1)
    for png in dest.glob("*/*/*.png"):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(copy / png.relative_to(dest))))


@pytest.fixture(scope="module")
def demo_clip():
    # A strict load: no missing keys.
    model, _, preprocess = open_clip.create_model_and_transforms(resolve_model_name(DEMO_MODEL))
    return model, preprocess, open_clip.get_tokenizer(resolve_model_name(DEMO_MODEL))


def test_demo_clip_is_small_and_preprocessed_as_trained(demo_clip):
    model, preprocess, tokenizer = demo_clip
    assert (DEMO_CLIP_DIR / "open_clip_model.safetensors").stat().st_size <= 5_000_000
    assert tokenizer("a photo of a red circle.").shape == (1, demo_pretrain.CONTEXT_LENGTH)
    image = world.render_array(world.sample_scene(np.random.default_rng(0)), np.random.default_rng(0))
    torch.testing.assert_close(preprocess(Image.fromarray(image)), demo_pretrain.to_tensor(image[None])[0])


# Measured on this test set: shapes 86.5% (chance 10%), colours 97.5% (chance 12.5%).
@pytest.mark.parametrize("task, min_accuracy", [("shapes", 0.7), ("colours", 0.8)])
def test_demo_clip_zero_shot(demo_clip, tmp_path, task, min_accuracy):
    model, preprocess, tokenizer = demo_clip
    root = world.write_task(tmp_path, task, n_train=0, n_val=0, n_test=20, seed=1)
    folders = sorted((root / "test").iterdir())
    images = [Image.open(p).convert("RGB") for f in folders for p in sorted(f.iterdir())]
    labels = [i for i, f in enumerate(folders) for _ in f.iterdir()]
    classes = [f.name.replace("_", " ") for f in folders]
    accuracy = demo_pretrain.zero_shot_accuracy(model, tokenizer, preprocess, images, labels, classes)
    assert accuracy >= min_accuracy


def test_demo_pretrain_short_run_writes_a_loadable_folder(tmp_path, capsys):
    out = tmp_path / "clip"
    threads = torch.get_num_threads()
    try:
        assert demo_pretrain.main(["--out", str(out), "--steps", "2", "--batch-size", "8",
                                   "--eval-per-class", "2"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets one thread
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert "zero-shot shapes" in capsys.readouterr().out
    open_clip.create_model_and_transforms(f"local-dir:{out}")
