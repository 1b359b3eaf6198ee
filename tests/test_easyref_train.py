"""EasyRef training: the image-group data (layout errors, stage splits, augmentations) and the three stages on the
tiny SDXL + tiny Qwen2-VL stack (loss goes down, resume is exact, adapter files in both layouts)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from visadapt.diffusion.easyref.config import STAGE_DEFAULTS, EasyRefTrainConfig
from visadapt.diffusion.easyref.data import EasyRefItems, collate_items, holdout_split, scan_groups, write_demo_groups
from visadapt.utils import DatasetLayoutError


@pytest.fixture(scope="module")
def groups_dir(tmp_path_factory):
    return write_demo_groups(tmp_path_factory.mktemp("groups"), n_groups=3, per_group=5, size=40)


# ---------------------------------------------------------------------------------------------------- data
def test_scan_reads_names_and_captions(groups_dir):
    groups = scan_groups(groups_dir)
    assert [len(g) for g in groups] == [5, 5, 5]
    assert groups[0].images[0].name == "00.png" and len(groups[0].captions[0]) == 2
    train, targets = holdout_split(groups)
    assert [len(g) for g in train] == [4, 4, 4]
    assert [(g.name, i) for g, i in targets] == [(g.name, 4) for g in groups]
    assert all(groups[k].images[4] not in train[k].images for k in range(3))


@pytest.mark.parametrize("case", ["empty_group", "no_caption", "empty_caption", "flat", "missing"])
def test_layout_errors_show_the_expected_tree(tmp_path, case):
    root = tmp_path / "groups"
    (root / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "dog" / "a.png")
    (root / "dog" / "a.txt").write_text("a dog\n")
    expected = {"empty_group": "holds no image", "no_caption": "no caption file", "empty_caption": "is empty",
                "flat": "no group folder", "missing": "no such folder"}[case]
    if case == "empty_group":
        (root / "cat").mkdir()
    elif case == "no_caption":
        Image.new("RGB", (8, 8)).save(root / "dog" / "b.png")
    elif case == "empty_caption":
        (root / "dog" / "a.txt").write_text("\n  \n")
    elif case == "flat":
        root = tmp_path / "flat"
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "x.png")
    else:
        root = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError, match=expected) as err:
        scan_groups(root)
    assert "<subject>/" in str(err.value) and "01.txt" in str(err.value)


def test_unreadable_image_names_the_file(tmp_path):
    root = tmp_path / "groups"
    (root / "dog").mkdir(parents=True)
    (root / "dog" / "a.png").write_bytes(b"not an image")
    (root / "dog" / "a.txt").write_text("a dog")
    items = EasyRefItems(scan_groups(root), stage=1, resolution=16)
    with pytest.raises(DatasetLayoutError, match="a.png: cannot read the image"):
        items[(0, 0)]


def test_stage_one_and_two_reference_the_target_itself(groups_dir):
    items = EasyRefItems(scan_groups(groups_dir), stage=2, resolution=32, ref_drop=0, text_drop=0, both_drop=0)
    assert len(items) == 15
    x = items[(3, 7)]
    assert x["pixels"].shape == (3, 32, 32) and x["time_ids"].tolist() == [40, 40, 0, 0, 32, 32]
    (ref,) = x["references"]
    back = torch.frombuffer(bytearray(ref.tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1)
    assert torch.equal(back.float() / 127.5 - 1, x["pixels"])  # the same crop as the target
    assert x["caption"] in scan_groups(groups_dir)[0].captions[3]


def test_stage_two_references_the_face_crop_when_a_box_is_given(tmp_path):
    root = tmp_path / "groups"
    (root / "alice").mkdir(parents=True)
    image = Image.new("RGB", (100, 60), "white")
    image.paste(Image.new("RGB", (20, 10), "red"), (40, 20))  # the "face": x 40..60, y 20..30
    image.save(root / "alice" / "a.png")
    (root / "alice" / "a.txt").write_text("alice")
    (root / "alice" / "a.face.txt").write_text("40 20 60 30\n")
    groups = scan_groups(root)
    assert groups[0].faces == ((40.0, 20.0, 60.0, 30.0),)
    two = EasyRefItems(groups, stage=2, resolution=32, ref_drop=0, text_drop=0, both_drop=0)
    sides = set()
    for seed in range(40):
        (ref,) = two[(0, seed)]["references"]
        assert ref.width == ref.height and 20 <= ref.width <= 40  # square, 0-49 % larger on each side
        red = sum(1 for p in ref.getdata() if p == (255, 0, 0))
        assert red == 200  # the whole face is inside the crop
        sides.add(ref.width)
    assert len(sides) > 5
    one = EasyRefItems(groups, stage=1, resolution=32, ref_drop=0, text_drop=0, both_drop=0)
    assert one[(0, 0)]["references"][0].size == (32, 32)  # stage 1 keeps the target crop
    (root / "alice" / "a.face.txt").write_text("40 20 x")
    with pytest.raises(DatasetLayoutError, match="four numbers"):
        scan_groups(root)


def test_stage_three_references_are_the_other_images_truncated(groups_dir):
    groups = scan_groups(groups_dir)
    items = EasyRefItems(groups, stage=3, resolution=16, ref_drop=0, text_drop=0, both_drop=0, truncate_rate=0.4)
    counts = Counter()
    for seed in range(300):
        x = items[(6, seed)]  # group 1, image 1
        refs = [r.tobytes() for r in x["references"]]
        others = {Image.open(p).convert("RGB").tobytes() for j, p in enumerate(groups[1].images) if j != 1}
        assert set(refs) <= others and len(set(refs)) == len(refs)
        counts[len(refs)] += 1
    assert set(counts) == {2, 3, 4}  # truncation keeps 2..n-1 of the n = 4 others
    assert 0.3 < (counts[2] + counts[3]) / 300 < 0.5  # p = 0.4
    capped = EasyRefItems(groups, stage=3, resolution=16, ref_drop=0, text_drop=0, both_drop=0, max_refs=2)
    assert len(capped[(0, 1)]["references"]) == 2
    with pytest.raises(DatasetLayoutError, match="two images or more"):
        single = groups[0].without(0).without(0).without(0).without(0)
        EasyRefItems([single], stage=3, resolution=16)


def test_drops_follow_their_rates_and_are_seeded(groups_dir):
    items = EasyRefItems(scan_groups(groups_dir), stage=1, resolution=16, ref_drop=0.2, text_drop=0.2, both_drop=0.2)
    kinds = Counter()
    for seed in range(500):
        x = items[(0, seed)]
        kinds[(x["refs_dropped"], x["caption"] == "")] += 1
        if x["refs_dropped"]:
            (black,) = x["references"]
            assert black.size == (512, 512) and black.getextrema() == ((0, 0),) * 3
    for kind in [(True, False), (False, True), (True, True)]:
        assert 60 < kinds[kind] < 140  # 0.2 of 500
    a, b = items[(2, 11)], items[(2, 11)]
    assert a["caption"] == b["caption"] and torch.equal(a["pixels"], b["pixels"])
    batch = collate_items([a, b])
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["captions"] == [a["caption"]] * 2


def test_stage_defaults_follow_the_official_scripts():
    one, three = EasyRefTrainConfig(stage=1).resolved(), EasyRefTrainConfig(stage=3, lr=1e-3).resolved()
    assert (one.lr, one.batch_size, one.grad_accum, one.r, one.train_mllm) == (1e-4, 8, 1, 0, False)
    assert (three.lr, three.batch_size, three.grad_accum, three.truncate_rate, three.max_seq_len) == \
        (1e-3, 1, 4, 0.4, 0)
    assert STAGE_DEFAULTS[2]["lr"] == 4e-5 and STAGE_DEFAULTS[2]["r"] == 128
    # finetune_sdxl.py: stages 1-2 run with --random_crop (square centre crop), stage 3 without (whole target)
    assert [EasyRefTrainConfig(stage=s).resolved().target_crop for s in (1, 2, 3)] == ["square", "square",
                                                                                        "keep-aspect"]


# ------------------------------------------------------------------------------------------------ training
TINY = dict(model="tiny-sdxl", mllm="tiny", steps=8, lr=3e-2, precision="no", batch_size=2, grad_accum=1,
            resolution=32, holdout=False, ref_drop=0.0, text_drop=0.0, both_drop=0.0)


@pytest.fixture(scope="module")
def overfit_dir(tmp_path_factory):
    return write_demo_groups(tmp_path_factory.mktemp("overfit"), n_groups=1, per_group=3, size=32)


@pytest.fixture(scope="module")
def stages(overfit_dir, tmp_path_factory):
    """Stages 1 → 2 → 3, each started from the previous one's run folder (LoRA rank 4 to stay tiny); all on square
    crops, batch 2 (the keep-aspect stage 3 has its own tests below)."""
    from visadapt.diffusion.easyref.train import train_easyref

    root, runs = tmp_path_factory.mktemp("stages"), {}
    for stage in (1, 2, 3):
        extra = {"r": 4, "init": str(root / f"stage{stage - 1}"), "target_crop": "square"} if stage > 1 else {}
        cfg = EasyRefTrainConfig(stage=stage, data=str(overfit_dir), **TINY, **extra)
        runs[stage] = (root / f"stage{stage}", train_easyref(cfg, root / f"stage{stage}"))
    return runs


def test_each_stage_lowers_the_loss_and_starts_where_the_last_ended(stages):
    for stage, (_, r) in stages.items():
        assert r["eval_loss_after"] < r["eval_loss_before"], (stage, r)
    # stages 1 and 2 draw the same evaluation batch: stage 2 starts from exactly stage 1's weights (+ a zero LoRA)
    assert stages[2][1]["eval_loss_before"] == pytest.approx(stages[1][1]["eval_loss_after"], rel=1e-5)
    assert stages[1][1]["trainable_params"] < stages[2][1]["trainable_params"] == stages[3][1]["trainable_params"]


def test_what_each_stage_trains_and_writes(stages):
    from safetensors.torch import load_file

    from visadapt.diffusion.easyref.files import convert_official

    one, two = (load_file(str(stages[s][0] / "easyref.safetensors")) for s in (1, 2))
    assert not any(".lora_" in k or k.startswith("encoder.mllm.") for k in one)  # stage 1: adapter only
    assert any(".to_k_ip." in k for k in one) and "encoder.reference_tokens" in one
    assert any(".lora_A." in k for k in two) and any(k.startswith("encoder.mllm.") for k in two)
    frozen = load_file(str(stages[1][0] / "easyref.safetensors"))
    changed = [k for k in two if k in frozen and not torch.equal(two[k], frozen[k])]
    assert any(".to_k_ip." in k for k in changed) and "encoder.reference_tokens" in changed
    official = load_file(str(stages[2][0] / "official" / "model.safetensors"))
    assert convert_official(official).keys() == two.keys()
    for run, _ in stages.values():
        assert {"results.json", "run_config.json", "training_curve.png", "report.md"} <= {p.name for p in run.iterdir()}
        assert not (run / "checkpoint").exists()


def test_official_file_has_the_official_layout_without_visadapt(stages, tmp_path):
    """What the official training script's loader reads: four key groups, the projector as MLPProjModel's."""
    from conftest import run_python

    path = stages[2][0] / "official" / "model.safetensors"
    code = f'''
import sys
from safetensors.torch import load_file
state = load_file({str(path)!r})
groups = {{p: [k for k in state if k.startswith(p + ".")] for p in
          ("image_proj_model", "mllm_final_layer", "multimodal_llm", "unet")}}
assert sum(map(len, groups.values())) == len(state), set(state) - set(sum(groups.values(), []))
assert {{k.split(".", 1)[1] for k in groups["image_proj_model"]}} == {{f"proj.{{i}}.{{w}}" for i in (0, 2, 3)
                                                                   for w in ("weight", "bias")}}
assert state["mllm_final_layer.reference_tokens"].shape[0] == 64
assert any(k.startswith("mllm_final_layer.layers.0.self_attn.") for k in state)
assert any(k.endswith(".processor.to_k_ip.weight") for k in groups["unet"])
assert any(k.endswith(".processor.to_q_lora.down.weight") for k in groups["unet"])
assert "visadapt" not in sys.modules
'''
    run_python(code, tmp_path)


@pytest.mark.parametrize("case", ["stage2_square", "stage3_keep_aspect"])
def test_interrupted_stage_resumes_bit_exactly(overfit_dir, wide_dir, tmp_path, case):
    import json

    from safetensors.torch import load_file

    from visadapt.cli import main
    from visadapt.diffusion.easyref.train import train_easyref

    extra = {"stage": 2, "data": str(overfit_dir)} if case == "stage2_square" else \
        {"stage": 3, "data": str(wide_dir), "batch_size": 1, "size_multiple": 8}
    cfg = EasyRefTrainConfig(r=4, checkpoint_every=2, **{**TINY, "steps": 4, "lr": 1e-3, "ref_drop": 0.2,
                                                                 "text_drop": 0.2, "both_drop": 0.2, **extra})
    with pytest.warns(UserWarning, match="without --init"):
        full = train_easyref(cfg, tmp_path / "full")

    def stop(step: int, record: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="without --init"):
        train_easyref(cfg, tmp_path / "cut", callbacks=[stop])
    assert (tmp_path / "cut" / "checkpoint" / "state.safetensors").is_file()
    argv = ["easyref", "train", "--out", str(tmp_path / "cut"), "--config", str(tmp_path / "full" / "run_config.json")]
    with pytest.warns(UserWarning, match="without --init"):
        assert main(argv) == 2  # the run exists: refused without --resume
        assert main([*argv, "--resume"]) == 0
    a, b = (load_file(str(tmp_path / run / "easyref.safetensors")) for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["eval_loss_after"] == full["eval_loss_after"]


def test_a_tied_mllm_is_written_under_both_names(overfit_dir, tmp_path):
    """Qwen2-VL-2B ties its lm_head to its embedding; the official layout keeps both keys (its loader is strict)."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    from visadapt.diffusion.easyref.tiny_mllm import tiny_qwen2vl_config, tiny_qwen2vl_processor
    from visadapt.diffusion.easyref.train import train_easyref

    processor = tiny_qwen2vl_processor()
    config = tiny_qwen2vl_config(processor.tokenizer)
    config.tie_word_embeddings = True
    model = Qwen2VLForConditionalGeneration(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    cfg = EasyRefTrainConfig(stage=2, data=str(overfit_dir), r=2, init=None, **{**TINY, "steps": 1})
    with pytest.warns(UserWarning, match="without --init"):
        train_easyref(cfg, tmp_path / "tied", mllm=(model, processor))
    official = load_file(str(tmp_path / "tied" / "official" / "model.safetensors"))
    assert torch.equal(official["multimodal_llm.lm_head.weight"], official["multimodal_llm.model.embed_tokens.weight"])


def test_bad_settings_name_the_fix(overfit_dir, tmp_path):
    from visadapt.diffusion.easyref.train import train_easyref

    with pytest.raises(ValueError, match="Pass --data"):
        train_easyref(EasyRefTrainConfig(**TINY), tmp_path / "a")
    with pytest.raises(ValueError, match="must not exceed 1"):
        train_easyref(EasyRefTrainConfig(data=str(overfit_dir), **{**TINY, "ref_drop": 0.5, "text_drop": 0.6}),
                      tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no easyref.safetensors"):
        train_easyref(EasyRefTrainConfig(stage=2, data=str(overfit_dir), init=str(tmp_path), **TINY), tmp_path / "c")


# ------------------------------------------------------------------------ stage 3: targets keep their aspect ratio
WIDE_SIZES = {(64, 32): (48, 24), (32, 48): (32, 40), (40, 40): (32, 32), (48, 36): (40, 32)}  # at R 32, multiple 8


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """One group of four images of different shapes (a red disc on white) and what keep-aspect makes of them."""
    from PIL import ImageDraw

    root = tmp_path_factory.mktemp("wide")
    (root / "red_disc").mkdir()
    for i, (w, h) in enumerate(WIDE_SIZES):
        image = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, w * 3 // 4, h * 3 // 4), fill=(220, 40, 40))
        image.save(root / "red_disc" / f"{i:02d}.png")
        (root / "red_disc" / f"{i:02d}.txt").write_text("a red disc on a white background\n")
    return root


def test_aspect_size_follows_the_official_adaptive_resize():
    from visadapt.diffusion.easyref.data import aspect_size

    # area brought to about 1024² unless within x0.8..x1.1 of it, sides rounded up to 64; a square becomes 1024²
    assert aspect_size(1920, 1080, 1024) == (1408, 768)
    assert aspect_size(1024, 1536, 1024) == (896, 1280)
    assert aspect_size(800, 600, 1024) == (1216, 896)
    assert aspect_size(1100, 1000, 1024) == (1152, 1024)  # √area = 1.02 x 1024: kept, only rounded up
    assert aspect_size(300, 300, 1024) == (1024, 1024)
    for (w, h), size in WIDE_SIZES.items():
        assert aspect_size(w, h, 32, multiple=8) == size


def test_keep_aspect_targets_keep_their_shape_and_time_ids(wide_dir):
    from torchvision.transforms.functional import pil_to_tensor

    groups = scan_groups(wide_dir)
    items = EasyRefItems(groups, stage=3, resolution=32, ref_drop=0, text_drop=0, both_drop=0,
                         target_crop="keep-aspect", size_multiple=8)
    originals = [Image.open(p).convert("RGB") for p in groups[0].images]
    for index, original in enumerate(originals):
        w, h = WIDE_SIZES[original.size]
        x = items[(index, 5)]
        assert x["pixels"].shape == (3, h, w)
        assert x["time_ids"].tolist() == [h, w, 0, 0, h, w]  # the official dataset: resized size, no crop
        shown = pil_to_tensor(original.resize((w, h), Image.Resampling.BICUBIC))
        assert torch.equal(((x["pixels"] + 1) * 127.5).round().to(torch.uint8), shown)
        assert {r.size for r in x["references"]} <= set(WIDE_SIZES) - {original.size}  # the other files, unresized
    one = EasyRefItems(groups, stage=1, resolution=32, ref_drop=0, text_drop=0, both_drop=0,
                       target_crop="keep-aspect", size_multiple=8)
    assert one[(0, 0)]["references"][0].size == (64, 32)  # stage 1: the whole file, as the official code reads it
    square = EasyRefItems(groups, stage=3, resolution=32, ref_drop=0, text_drop=0, both_drop=0)
    x = square[(0, 5)]  # 64x32: the shorter side is already 32, a 32x32 crop 16 px from the left
    assert x["pixels"].shape == (3, 32, 32) and x["time_ids"].tolist() == [32, 64, 0, 16, 32, 32]
    with pytest.raises(ValueError, match="cannot share a micro-batch.*--batch-size.*--target-crop square"):
        collate_items([items[(0, 0)], items[(1, 0)]])
    with pytest.raises(ValueError, match="target_crop must be one of"):
        EasyRefItems(groups, stage=3, resolution=32, target_crop="pad")


def test_stage_three_trains_on_whole_targets(stages, wide_dir, tmp_path):
    """The default stage 3: each micro-batch is one whole target in its shape, with its time ids; the loss drops."""
    from visadapt.diffusion.easyref.train import EasyRefTrainer

    seen = []

    class Watched(EasyRefTrainer):
        def compute_loss(self, batch):
            seen.append((tuple(batch["pixels"].shape), batch["time_ids"].tolist()))
            return super().compute_loss(batch)

    cfg = EasyRefTrainConfig(stage=3, data=str(wide_dir), r=4, init=str(stages[2][0]), size_multiple=8,
                             **{**TINY, "batch_size": 1, "steps": 12})
    r = Watched(cfg, tmp_path / "run").run()
    assert r["target_crop"] == "keep-aspect" and r["eval_loss_after"] < r["eval_loss_before"], r
    assert {shape[2:] for shape, _ in seen} == {(h, w) for w, h in WIDE_SIZES.values()}
    for (_, _, h, w), (time_ids,) in seen:
        assert time_ids == [h, w, 0, 0, h, w]


def test_keep_aspect_refuses_what_it_cannot_stack(wide_dir, tmp_path):
    from visadapt.diffusion.easyref.train import train_easyref

    with pytest.raises(ValueError, match=r"one per device.*Pass --batch-size 1 .*or --target-crop square"), \
            pytest.warns(UserWarning, match="without --init"):
        train_easyref(EasyRefTrainConfig(stage=3, data=str(wide_dir), **TINY), tmp_path / "batch")
    with pytest.raises(ValueError, match="--size-multiple 6: .*multiples of 4"), \
            pytest.warns(UserWarning, match="without --init"):
        train_easyref(EasyRefTrainConfig(stage=3, data=str(wide_dir), size_multiple=6, **{**TINY, "batch_size": 1}),
                      tmp_path / "multiple")
    assert not (tmp_path / "batch").exists() and not (tmp_path / "multiple").exists()
