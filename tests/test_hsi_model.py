"""LoLA-SpecViT: timm registration, the spec's parameter table, LoRA layers and switches, the release's schedule."""

import math

import peft
import pytest
import timm
import torch
import torch.nn as nn

from visadapt.hyperspectral import GatedLoRALinear, LoRALinear, lola_peft_config, set_lora_enabled, set_trainable
from visadapt.hyperspectral.lora import lora_layers
from visadapt.hyperspectral.model import count_parameters
from visadapt.hyperspectral.schedule import LoLASchedule, cosine_factor, lola_param_groups, lr_at_epoch
from visadapt.utils.modules import trainable_parameters

# Total and trainable (official freezing) parameters of the released configuration (FadiZidiDz/LoLA-SpecViT-Model).
SPEC_COUNTS = {6: (254_638_338, 73_586_784), 9: (254_639_541, 73_586_832), 16: (254_642_348, 73_586_944),
               22: (254_644_754, 73_587_040)}


def tiny(**kw):
    kw = {"in_chans": 8, "img_size": 9, "num_classes": 5, **kw}
    return timm.create_model("lola_specvit_tiny", **kw)


def test_full_configuration_matches_the_spec_parameter_table():
    with torch.device("meta"):  # shapes and counts only: 254.6 M parameters without allocating them
        model = timm.create_model("lola_specvit_base", num_classes=9)
        for k, (total, trainable) in SPEC_COUNTS.items():
            model.reset_classifier(k)
            set_trainable(model, "official")
            assert (count_parameters(model), trainable_parameters(model)) == (total, trainable), k
        assert model.num_features == 384
        # §3 shapes: [2, 15, 15, 15] → tokens [2, 4, 384] → logits [2, K]
        model.eval()
        feats = model.forward_features(torch.randn(2, 15, 15, 15))
        assert feats.shape == (2, 4, 384)
        assert model.forward_head(feats).shape == (2, 22)


def test_registered_with_timm_and_both_axis_layouts():
    assert {"lola_specvit_base", "lola_specvit_small", "lola_specvit_tiny"} <= set(timm.list_models("lola*"))
    for permute in (False, True):
        model = timm.create_model("lola_specvit_tiny", num_classes=9, official_axis_permute=permute).eval()
        assert model(torch.randn(2, 15, 15, 15)).shape == (2, 9)
    assert model.pretrained_cfg["input_size"] == (15, 15, 15)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("lola_specvit_tiny", pretrained=True)
    with pytest.raises(ValueError, match="expected patches"):
        tiny()(torch.randn(1, 7, 9, 9))


def test_zero_init_lora_leaves_the_output_unchanged_and_official_init_does_not():
    x = torch.randn(3, 8, 9, 9)
    outputs = {}
    for official in (False, True):
        torch.manual_seed(0)
        model = tiny(official_init=official).eval()
        with torch.no_grad():
            adapted = model(x)
            set_lora_enabled(model, False)
            base = model(x)
        outputs[official] = (adapted, base)
    assert torch.equal(outputs[False][0], outputs[False][1])
    assert not torch.allclose(outputs[True][0], outputs[True][1], atol=1e-4)  # the release: B ≠ 0, R ≠ 0 at step 0
    # the same seed draws the same frozen backbone either way
    assert torch.equal(outputs[False][1], outputs[True][1])


def test_gated_lora_formula_merge_and_fold():
    layer = GatedLoRALinear(6, 4, r=2, lora_alpha=4.0)
    for p in layer.parameters():
        nn.init.normal_(p)
    x = torch.randn(5, 6)
    w0, b0 = layer.base.weight, layer.base.bias
    a, b, g, r = (layer.lora_A.weight, layer.lora_B.weight, layer.lora_gate.weight, layer.lora_residual.weight)
    expected = x @ w0.T + b0 + torch.sigmoid(x @ g.T) * (2.0 * x @ a.T @ b.T) + x @ r.T
    torch.testing.assert_close(layer(x), expected)
    before = layer(x).detach()
    layer.fold_residual()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    assert layer.lora_residual.weight.abs().max() == 0
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        layer.merged()
    with torch.no_grad():  # with A (or B) and G, R zeroed the layer is its base
        layer.lora_B.weight.zero_()
    torch.testing.assert_close(layer(x), x @ layer.base.weight.T + b0)

    plain = LoRALinear(6, 4, r=2, lora_alpha=4.0)
    nn.init.normal_(plain.lora_B.weight)
    assert (plain.merged()(x) - plain(x)).abs().max() < 1e-5


def test_plain_lora_is_peft_lora_on_the_same_sites():
    torch.manual_seed(0)
    model = tiny(lora_placement="none", official_init=False).eval()
    pm = peft.get_peft_model(model, lola_peft_config("all", r=4, lora_alpha=8.0))
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(wrapped) == 3 * 4 + 1  # qkv, proj, fc1, fc2 in each of 3 blocks + the head
    assert all(n.endswith(("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "head")) for n in wrapped)
    assert not any("swiglu" in n or "se." in n for n in wrapped)
    # Built-in plain LoRA with the same weights computes the same function.
    torch.manual_seed(0)
    builtin = tiny(lora_placement="all", lora_gate_residual=False, official_init=False).eval()
    peft_state = {}
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            nn.init.normal_(module.lora_B["default"].weight, std=0.02)
            peft_state[name] = module
    for name, layer in builtin.named_modules():
        if isinstance(layer, LoRALinear):
            src = peft_state[name]
            with torch.no_grad():
                layer.base.weight.copy_(src.base_layer.weight)
                layer.base.bias.copy_(src.base_layer.bias)
                layer.lora_A.weight.copy_(src.lora_A["default"].weight)
                layer.lora_B.weight.copy_(src.lora_B["default"].weight)
    own = {k: v for k, v in builtin.state_dict().items() if ".base." not in k and "lora_" not in k}
    builtin.load_state_dict({**builtin.state_dict(), **{k: v for k, v in model.state_dict().items() if k in own}})
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(builtin(x), pm(x), atol=1e-5, rtol=1e-4)


def test_placements_and_freezing_regimes():
    counts = {}
    for placement in ("attn", "attn_mlp", "all"):
        model = tiny(lora_placement=placement)
        set_trainable(model, "official")
        counts[placement] = trainable_parameters(model)
        assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        assert len(lora_layers(model)) == {"attn": 6, "attn_mlp": 12, "all": 13}[placement]
    assert counts["attn"] < counts["attn_mlp"] < counts["all"]
    model = tiny()
    set_trainable(model, "standard")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".base." in n for n in frozen)
    set_trainable(model, "full")
    assert trainable_parameters(model) == count_parameters(model)
    with pytest.raises(ValueError, match="freeze regime"):
        set_trainable(model, "lora")


@pytest.mark.parametrize("t, expected", [(5.0, 1.05e-5), (9.99, 1.0e-6), (10.0, 2e-5), (30.0, 2e-5), (70.0, 2e-5),
                                         (100.0, 1.41e-5)])
def test_schedule_formula_at_the_spec_points(t, expected):
    assert lr_at_epoch(t) == pytest.approx(expected, rel=0.01, abs=1e-8)


def test_schedule_trace_per_iteration_with_lora_groups():
    model = tiny(lora_placement="attn")
    set_trainable(model, "standard")
    groups = lola_param_groups(model, lr=2e-5)
    assert [g["name"] for g in groups] == ["lora", "other"] and groups[1]["lr"] == pytest.approx(2e-6)
    opt = torch.optim.AdamW(groups)
    n = 7  # micro-batches per epoch
    sched = LoLASchedule(opt, steps_per_epoch=n, lora_lr_scale=2.0)
    trace = []
    for _ in range(100 * n):
        trace.append([g["lr"] for g in opt.param_groups])
        sched.step()
    for e in range(5):  # epoch-level linear warm-up, the same for both groups
        assert trace[e * n + 3] == pytest.approx([2e-5 * (e + 1) / 5] * 2)
    for it in (5 * n, 5 * n + 3, 10 * n, 29 * n + 6, 30 * n, 77 * n + 2, 100 * n - 1):
        t = it // n + (it % n) / n
        c = cosine_factor(t)
        assert trace[it][0] == pytest.approx(1e-6 + (2e-5 - 1e-6) * c * 2.0)  # λ = 2 on the LoRA group only
        assert trace[it][1] == pytest.approx(lr_at_epoch(t, eta0=2e-6))
    # restarts: lr back at the peak exactly at t = 10, 30, 70
    assert [trace[k * n][1] for k in (10, 30, 70)] == pytest.approx([2e-6] * 3)
    assert trace[10 * n - 1][1] < 1.1e-6


def test_cycle_lora_scale_follows_the_restarts():
    model = tiny()
    set_trainable(model, "official")
    opt = torch.optim.AdamW(lola_param_groups(model, lr=1e-3))
    sched = LoLASchedule(opt, steps_per_epoch=2, warmup_epochs=1, t0=2, model=model, cycle_lora_scale=True,
                         lora_scale_min=0.5)
    layer = lora_layers(model)[0]
    seen = []
    for _ in range(12):
        seen.append(float(layer.lora_factor))
        sched.step()
    assert seen[:2] == [1.0, 1.0]  # warm-up
    expected = [0.5 + 0.5 * cosine_factor(i / 2, 2) for i in range(2, 12)]
    assert seen[2:] == pytest.approx(expected)
    assert min(seen) < 0.6 and not math.isclose(seen[2], seen[3])
