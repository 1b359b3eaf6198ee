"""CoACT's pieces on small tensors: SupCon against a hand computation, the teacher's EMA, the session schedules of
the spec tables, index lists, the metrics, and the HF ViT → timm weight mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visadapt.incremental.config import FSCIL_TABLE, FSCIT_TABLE, IncrementalConfig
from visadapt.incremental.losses import consistency, ema_update, supcon
from visadapt.incremental.metrics import harmonic_mean, session_accuracy, summarize
from visadapt.incremental.model import Backbone, CoactModel, adapter_config, block_indices, hf_vit_to_timm
from visadapt.incremental.sessions import (
    SessionPlan,
    cec_session_to_pools,
    draw_pools,
    plan_for,
    read_index_list,
    session_rows,
    write_index_list,
)


# ------------------------------------------------------------------------------------------------------ SupCon
def _supcon_by_hand(views: list[list[list[float]]], labels: list[int], tau: float) -> float:
    """The formula written out with Python floats: anchors = every view, positives = same label, not itself."""
    vectors = [(views[b][v], labels[b]) for v in range(len(views[0])) for b in range(len(views))]
    total = 0.0
    for a, (za, ya) in enumerate(vectors):
        dots = {n: sum(p * q for p, q in zip(za, zn)) / tau for n, (zn, _) in enumerate(vectors) if n != a}
        log_denominator = math.log(sum(math.exp(d) for d in dots.values()))
        positives = [n for n, (_, yn) in enumerate(vectors) if n != a and yn == ya]
        terms = [dots[p] - log_denominator for p in positives]
        total += -(sum(terms) / max(len(terms), 1))
    return total / len(vectors)


@pytest.mark.parametrize("labels", [[0, 1], [0, 0, 1], [2, 2, 2], [0, 1, 2]])
def test_supcon_equals_the_hand_computation(labels):
    g = torch.Generator().manual_seed(len(labels))
    views = torch.nn.functional.normalize(torch.randn(len(labels), 3, 4, generator=g), dim=-1)
    tau = 0.5
    expected = _supcon_by_hand(views.tolist(), labels, tau)
    got = supcon(views, torch.tensor(labels), temperature=tau, base_temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the (τ / τ_base) prefactor
    assert supcon(views, torch.tensor(labels), tau, 2 * tau).item() == pytest.approx(expected / 2, rel=1e-5)


def test_supcon_rewards_aligned_views():
    labels = torch.tensor([0, 1])
    aligned = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    crossed = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    assert supcon(aligned, labels) < supcon(crossed, labels)


def test_consistency_on_base_logits_only():
    a, b = torch.zeros(2, 5), torch.zeros(2, 5)
    b[:, 3:] = 2.0  # differs only in the logits of later classes
    assert consistency(a, b).item() == pytest.approx(4 * 2 / 5)
    assert consistency(a, b, base_classes=3).item() == 0.0


# --------------------------------------------------------------------------------------------------------- EMA
def _tiny_backbone() -> Backbone:
    import timm.models.vision_transformer as vt

    torch.manual_seed(0)
    trunk = vt.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    return Backbone(trunk, torch.nn.Linear(32, 32), 32, 16, (0.5,) * 3, (0.5,) * 3, "blocks", 3, "timm")


def test_the_teacher_has_no_adapter_and_the_ema_moves_shared_weights_only():
    torch.manual_seed(0)
    cfg = IncrementalConfig(r=4, lora_alpha=4, adapt_blocks=3)
    backbone = _tiny_backbone()
    model = CoactModel(backbone, 6, adapter_config(cfg, backbone))
    named = dict(model.named_parameters())
    assert model.adapter_names and all("lora" in n for n in model.adapter_names)
    assert not any("lora" in n for n, _ in model.teacher.named_parameters())
    assert set(model.shared).isdisjoint(model.adapter_names)
    # the teacher starts as the student's shared weights
    for s, t in model.shared.items():
        assert torch.equal(named[s], named[t]), s
    stage2 = model.stage2_names(1)
    assert stage2 and not any(".blocks.0." in n for n in stage2) and "student.pooler.weight" in stage2
    assert not any("patch_embed" in n or "pos_embed" in n for n in stage2)
    lora_before = {n: named[n].detach().clone() for n in model.adapter_names}
    teacher_before = {t: named[t].detach().clone() for t in model.shared.values()}
    with torch.no_grad():
        for n in [*stage2, *model.adapter_names]:
            named[n].add_(1.0)  # the student moved
    ema_update([named[model.shared[n]] for n in stage2], [named[n] for n in stage2], 0.9)
    for s, t in model.shared.items():
        if s in stage2:
            torch.testing.assert_close(named[t], 0.9 * teacher_before[t] + 0.1 * named[s])
        else:
            assert torch.equal(named[t], teacher_before[t]), t
    for n in model.adapter_names:  # the EMA never writes the student, LoRA included
        assert torch.equal(named[n], lora_before[n] + 1.0)


def test_controlled_fine_tuning_layer_choices():
    backbone = _tiny_backbone()
    model = CoactModel(backbone, 4, None)
    assert model.stage2_names(500) == []
    assert set(model.stage2_names(-1)) == set(model.shared)
    assert len(model.stage2_names(0)) < len(model.shared)  # the embeddings stay frozen
    assert block_indices(12, 12) == list(range(12)) and block_indices(6, 12) == list(range(6))
    assert block_indices(-9, 12) == [9, 10, 11]


# --------------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("setting, table", [("fscil", FSCIL_TABLE), ("fscit", FSCIT_TABLE)])
def test_session_schedule_follows_the_spec_tables(setting, table):
    for dataset, (total, base, way, sessions) in table.items():
        plan = plan_for(setting, dataset, total)
        assert (plan.base, plan.way, plan.sessions) == (base, way, sessions)
        assert plan.seen(plan.sessions - 1) == total  # every class set partitions exactly
        counts = [len(plan.new_classes(s)) for s in range(plan.sessions)]
        assert counts == [base] + [way] * (sessions - 1)
        seen = [plan.seen(s) for s in range(plan.sessions)]
        assert seen == sorted(set(seen))  # the test set grows every session


def test_session_schedule_examples_and_errors():
    plan = plan_for("fscil", "cifar100", 100)
    assert list(plan.new_classes(1)) == [60, 61, 62, 63, 64] and plan.seen(8) == 100
    assert plan_for("fscil", "cub200", 200).new_classes(10) == range(190, 200)
    with pytest.raises(ValueError, match="--base-classes"):
        plan_for("fscil", "dtd", 47)
    with pytest.raises(ValueError, match="200 classes"):
        plan_for("fscil", "cub200", 100)
    # another release of a table's dataset (CoOp's Caltech101 has 100 classes, the table's 102) with explicit counts
    assert plan_for("fscit", "caltech101", 100, base=10, way=10).to_json() == {
        "num_classes": 100, "base": 10, "way": 10, "sessions": 10}
    with pytest.raises(ValueError, match="Lower --sessions"):
        SessionPlan(10, 4, 3, 4)


def test_session_rows_fscil_base_takes_everything_and_novel_the_first_shots():
    labels = np.repeat(np.arange(6), 10)
    plan = SessionPlan(6, 2, 2, 3)
    pools = draw_pools(labels, seed=3)
    assert session_rows(0, plan, "fscil", 5, pools, labels) == list(range(20))
    rows = session_rows(1, plan, "fscil", 5, pools, labels)
    assert rows == pools[2][:5] + pools[3][:5] and set(labels[rows]) == {2, 3}
    assert session_rows(0, plan, "fscit", 3, pools, labels) == pools[0][:3] + pools[1][:3]
    with pytest.raises(ValueError, match="--shots 11"):
        session_rows(1, plan, "fscil", 11, pools, labels)


def test_index_list_round_trip(tmp_path):
    pools = {60: [5, 3, 9], 61: [12, 4], 0: [7]}
    path = tmp_path / "cifar100_index_list.txt"
    write_index_list(pools, path)
    assert path.read_text().splitlines()[:2] == ["60 5", "60 3"]
    assert read_index_list(path) == pools and list(read_index_list(path)) == [60, 61, 0]
    path.write_text("60 5\n60 x\n")
    with pytest.raises(ValueError, match=":2:"):
        read_index_list(path)


def test_cec_session_files_become_pools():
    names = ["images/001.Black/a.jpg", "images/001.Black/b.jpg", "images/002.Red/c.jpg"]
    labels = [0, 0, 1]
    pools = cec_session_to_pools(["CUB_200_2011/images/002.Red/c.jpg", "data/CUB_200_2011/images/001.Black/b.jpg"],
                                 names, labels)
    assert pools == {1: [2], 0: [1]}
    assert cec_session_to_pools(["2", "0"], names, labels) == {1: [2], 0: [0]}
    with pytest.raises(ValueError, match="names no training image"):
        cec_session_to_pools(["images/003.X/z.jpg"], names, labels)


# ------------------------------------------------------------------------------------------------------ metrics
def test_metrics_on_hand_made_predictions():
    plan = SessionPlan(6, 2, 2, 3)
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    pred = [0, 1, 1, 1, 2, 0, 3, 3]  # base 3/4, novel 3/4 (group 1: classes 2, 3)
    r = session_accuracy(pred, labels, plan, 1)
    assert (r["base"], r["novel"], r["all"]) == (75.0, 75.0, 75.0) and r["groups"] == [75.0, 75.0]
    r0 = session_accuracy([0, 0, 1, 0], [0, 0, 1, 1], plan, 0)
    assert r0["novel"] is None and r0["all"] == 75.0
    r2 = session_accuracy([0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 5], plan, 2)
    assert r2["groups"] == [100.0, 100.0, 50.0] and r2["novel"] == 75.0
    s = summarize([r0, r, r2])
    assert s["average_accuracy"] == pytest.approx((75 + 75 + 100 * 5 / 6) / 3)
    assert s["performance_drop"] == pytest.approx(75 - 100 * 5 / 6)
    assert s["base_forgetting"] == pytest.approx(r0["base"] - 100.0)
    assert s["harmonic_mean"] == [None, 75.0, pytest.approx(2 * 100 * 75 / 175)]
    assert harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="sees classes < 4"):
        session_accuracy([0], [5], plan, 1)


# -------------------------------------------------------------------------------------------- HF ViT → timm
def _hf_state(trunk, pooler) -> dict:
    """A HF ViTModel state dict holding ``trunk``'s weights (written from the HF names)."""
    t = trunk.state_dict()
    s = {"embeddings.cls_token": t["cls_token"], "embeddings.position_embeddings": t["pos_embed"],
         "embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
         "embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
         "layernorm.weight": t["norm.weight"], "layernorm.bias": t["norm.bias"],
         "pooler.dense.weight": pooler.weight, "pooler.dense.bias": pooler.bias}
    for i in range(len(trunk.blocks)):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            for j, part in enumerate(("query", "key", "value")):
                s[h + f"attention.attention.{part}.{kind}"] = t[b + f"attn.qkv.{kind}"].chunk(3)[j]
            s[h + f"attention.output.dense.{kind}"] = t[b + f"attn.proj.{kind}"]
            s[h + f"layernorm_before.{kind}"], s[h + f"layernorm_after.{kind}"] = t[b + f"norm1.{kind}"], t[
                b + f"norm2.{kind}"]
            s[h + f"intermediate.dense.{kind}"], s[h + f"output.dense.{kind}"] = t[b + f"mlp.fc1.{kind}"], t[
                b + f"mlp.fc2.{kind}"]
    return s


def test_hf_vit_checkpoint_loads_into_timm_with_its_pooler(tmp_path):
    import json

    from safetensors.torch import save_file

    from visadapt.incremental.model import load_hf_vit

    source = _tiny_backbone()
    state = {f"vit.{k}": v.contiguous() for k, v in _hf_state(source.trunk, source.pooler).items()}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 128,
        "image_size": 16, "patch_size": 4, "layer_norm_eps": 1e-6}))
    loaded = load_hf_vit(str(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = torch.tanh(source.pooler(source.trunk(x)))
        got = torch.tanh(loaded.pooler(loaded.trunk(x)))
    torch.testing.assert_close(got, expected)
    assert hf_vit_to_timm(state, 3)[0].keys() == source.trunk.state_dict().keys()
    with pytest.raises(ValueError, match="--no-pooler"):
        save_file({k: v for k, v in state.items() if "pooler" not in k}, tmp_path / "model.safetensors")
        load_hf_vit(str(tmp_path))


def test_cec_session_folder_becomes_the_run_pools(tmp_path):
    from visadapt.incremental.data import IncrementalData, array_source
    from visadapt.incremental.train import _cec_pools

    labels = np.repeat(np.arange(4), 3)
    source = array_source(np.zeros((12, 2, 2, 3), np.uint8), labels, "train")
    data = IncrementalData("cifar100", source, source, list("abcd"))
    (tmp_path / "session_2.txt").write_text("7\n6\n")
    (tmp_path / "session_10.txt").write_text("11\n")
    (tmp_path / "session_1.txt").write_text("0\n3\n")
    assert _cec_pools(tmp_path, data) == {0: [0], 1: [3], 2: [7, 6], 3: [11]}
    with pytest.raises(FileNotFoundError, match="session_<s>.txt"):
        _cec_pools(tmp_path / "nothing", data)


def test_official_recipe_fills_only_what_the_user_did_not_type():
    from visadapt.cli import build_parser
    from visadapt.incremental.cli import _config

    parse = build_parser().parse_args
    cfg = _config(parse(["incremental", "train", "--out", "x", "--official-recipe", "--setting", "fscit", "--dataset",
                         "dtd", "--lr", "0.25"]))
    assert (cfg.lr, cfg.epochs_base, cfg.ft_start_layer, cfg.ft_start_epoch, cfg.shots) == (0.25, 30, -1, 10, 10)
    assert cfg.incremental_layers == ["classifier", "pet"] and cfg.inc_lr_factor == 0.001
    assert cfg.shared_inc_optimizer  # the code builds one optimizer for every later session
    plain = _config(parse(["incremental", "train", "--out", "x", "--dataset", "dtd"]))
    assert (plain.lr, plain.epochs_base, plain.ft_start_layer) == (0.1, 25, 500) and not plain.shared_inc_optimizer
    with pytest.raises(ValueError, match="no fscil settings"):
        _config(parse(["incremental", "train", "--out", "x", "--official-recipe", "--dataset", "dtd"]))


def test_official_recipe_trains_in_fp32_unless_precision_is_typed():
    # the official code has no autocast: every session runs in fp32
    from visadapt.cli import build_parser
    from visadapt.incremental.cli import _config

    parse = build_parser().parse_args
    base = ["incremental", "train", "--out", "x", "--dataset", "cifar100"]
    assert _config(parse([*base, "--official-recipe"])).precision == "no"
    assert _config(parse([*base, "--official-recipe", "--precision", "bf16"])).precision == "bf16"
    assert _config(parse(base)).precision == "auto"


def test_official_all_accuracy_is_the_mean_of_per_batch_accuracies():
    # the official test() averages each test batch's accuracy (batches of 100 in test-set order), so a short last
    # batch weighs as much as a full one; "all" stays per image
    from visadapt.incremental.metrics import OFFICIAL_TEST_BATCH

    plan = SessionPlan(4, 2, 2, 2)
    labels = np.repeat([0, 1, 2, 3], [60, 60, 60, 50])  # 230 images: batches of 100, 100 and 30
    pred = labels.copy()
    pred[200:] = 0  # the last batch (30 images) all wrong
    pred[:10] = 1  # 10 wrong in the first batch
    r = session_accuracy(pred, labels, plan, 1)
    assert OFFICIAL_TEST_BATCH == 100
    assert r["all"] == pytest.approx(100 * 190 / 230)
    assert r["all_per_batch"] == pytest.approx(100 * (0.9 + 1.0 + 0.0) / 3)
    s = summarize([session_accuracy(pred[:120], labels[:120], plan, 0), r])
    assert s["average_accuracy_per_batch"] == pytest.approx((100 * (0.9 + 1.0) / 2 + r["all_per_batch"]) / 2)
    assert s["last_accuracy_per_batch"] == r["all_per_batch"]
    from visadapt.incremental.train import run_report

    run = {"dataset": "cub200", "setting": "fscil", "recipe": "coact", "sessions": [r], **s}
    assert f"| {s['average_accuracy_per_batch']:.2f} / {r['all_per_batch']:.2f} |" in run_report([run])


def test_an_index_list_that_does_not_match_the_training_split_is_refused():
    # an official list indexes the training split in the reader's order: its rows must carry their class's label
    labels = np.repeat(np.arange(4), 3)
    plan = SessionPlan(4, 2, 2, 2)
    assert session_rows(1, plan, "fscil", 1, {2: [6], 3: [9]}, labels) == [6, 9]
    with pytest.raises(ValueError, match="sample 0 of class 2 is labelled 0"):
        session_rows(1, plan, "fscil", 1, {2: [0], 3: [9]}, labels)
    with pytest.raises(ValueError, match="sample 40 of class 3 is out of range"):
        session_rows(1, plan, "fscil", 1, {2: [6], 3: [40]}, labels)
