"""Block-LoRA and Comp-LoRA through peft's own API, on a toy MLP, a tiny timm ViT and a tiny open_clip CLIP."""

import json
import textwrap

import pytest
import torch
from conftest import KINDS, METHODS, make_config, run_python
from models import build, run
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import visadapt

CASES = [(kind, method) for kind in KINDS for method in METHODS]
ids = [f"{kind}-{method}" for kind, method in CASES]


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("kind,method", CASES, ids=ids)
def test_fresh_adapter_leaves_outputs_unchanged(kind, method):
    base_out = run(kind, build(kind))
    pm = get_peft_model(build(kind), make_config(method, kind, init_weights=True))
    close(run(kind, pm), base_out)


@pytest.mark.parametrize("kind,method", CASES, ids=ids)
def test_merge_unmerge_disable(kind, method):
    base_out = run(kind, build(kind))
    pm = get_peft_model(build(kind), make_config(method, kind))
    adapted = run(kind, pm)
    assert (adapted - base_out).abs().max() > 1e-3, "non-zero adapter must change the output"
    with pm.disable_adapter():
        close(run(kind, pm), base_out)
    pm.merge_adapter()
    close(run(kind, pm), adapted)
    pm.unmerge_adapter()
    close(run(kind, pm), adapted)
    with pm.disable_adapter():  # unmerged weights are the base weights again
        close(run(kind, pm), base_out)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, visadapt.adapters.LowRankLayer) for m in merged.modules())
    close(run(kind, merged), adapted)


@pytest.mark.parametrize("kind,method", CASES, ids=ids)
def test_two_adapters_switch_and_stack(kind, method):
    pm = get_peft_model(build(kind), make_config(method, kind))
    first = run(kind, pm)
    torch.manual_seed(1)
    pm.add_adapter("other", make_config(method, kind))
    pm.set_adapter("other")
    second = run(kind, pm)
    assert (second - first).abs().max() > 1e-3
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    pm.base_model.set_adapter(["default", "other"])
    both = run(kind, pm)
    pm.merge_adapter(["default", "other"])  # merged sum of both deltas == both active, unmerged
    close(run(kind, pm), both)
    pm.unmerge_adapter()
    pm.set_adapter("default")
    close(run(kind, pm), first)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every (model, method): two adapters saved with save_pretrained, and their outputs."""
    root = tmp_path_factory.mktemp("saved")
    expected = {}
    for kind, method in CASES:
        pm = get_peft_model(build(kind), make_config(method, kind))
        torch.manual_seed(1)
        pm.add_adapter("other", make_config(method, kind))
        expected[f"{kind}-{method}-default"] = run(kind, pm)
        pm.set_adapter("other")
        expected[f"{kind}-{method}-other"] = run(kind, pm)
        pm.save_pretrained(root / f"{kind}-{method}", selected_adapters=["default", "other"])
    return root, expected


# stock peft 0.21 doubles LoRA on nn.MultiheadAttention.out_proj (huggingface/peft#3774): export q, k, v there.
EXPORT_OVERRIDES = {"clip": dict(attention_parts=["q", "k", "v"])}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every (model, method): the adapter exported as plain LoRA, and its outputs."""
    root = tmp_path_factory.mktemp("exported")
    expected = {}
    for kind, method in CASES:
        pm = get_peft_model(build(kind), make_config(method, kind, **EXPORT_OVERRIDES.get(kind, {})))
        expected[f"{kind}-{method}"] = run(kind, pm)
        visadapt.export_lora(pm, root / f"{kind}-{method}")
    # Text tower only: its layer names are suffixes of the image tower's, which peft's matching must not confuse.
    pm = get_peft_model(build("clip"), make_config("comp", "clip", target_modules=r"transformer\.resblocks\.\d+\.attn",
                                                   attention_parts=["q", "k", "v"]))
    expected["clip-text"] = run("clip", pm)
    visadapt.export_lora(pm, root / "clip-text")
    return root, expected


def test_save_load_in_fresh_process(saved, tmp_path):
    root, expected = saved
    run_python(textwrap.dedent(f"""
        import visadapt  # registers the tuner types with peft
        from peft import PeftModel
        from models import build, run
        from safetensors.torch import save_file
        out = {{}}
        for name in {sorted({k.rsplit('-', 1)[0] for k in expected})!r}:
            kind = name.split("-")[0]
            pm = PeftModel.from_pretrained(build(kind), r"{root}/" + name)
            pm.load_adapter(r"{root}/" + name + "/other", adapter_name="other")
            out[name + "-default"] = run(kind, pm)
            pm.set_adapter("other")
            out[name + "-other"] = run(kind, pm)
        save_file(out, r"{tmp_path}/out.safetensors")
    """), tmp_path)
    got = load_file(tmp_path / "out.safetensors")
    for key, value in expected.items():
        close(got[key], value)


def test_export_loads_in_stock_peft_without_visadapt(exported, tmp_path):
    """... silently: the config names only the pairs the file holds (a CLIP-LoRA q, k, v export once made peft
    warn about 48 missing out_proj keys)."""
    root, expected = exported
    run_python(textwrap.dedent(f"""
        import logging, sys, warnings
        from peft import PeftModel
        from models import build, run
        from safetensors.torch import save_file
        records = []
        handler = logging.Handler(); handler.emit = records.append
        logging.getLogger().addHandler(handler)
        out = {{}}
        for name in {sorted(expected)!r}:
            model = build(name.split("-")[0])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pm = PeftModel.from_pretrained(model, r"{root}/" + name)
            said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
            assert not [m for m in said if "missing" in m.lower() or "unexpected" in m.lower()], (name, said)
            assert type(pm.peft_config["default"]).__name__ == "LoraConfig"
            out[name] = run(name.split("-")[0], pm)
        assert not any(m.startswith("visadapt") for m in sys.modules), "visadapt was imported"
        save_file(out, r"{tmp_path}/out.safetensors")
    """), tmp_path)
    got = load_file(tmp_path / "out.safetensors")
    for name, value in expected.items():
        close(got[name], value)


@pytest.mark.parametrize("method", METHODS)
def test_export_of_attention_out_part_is_exact(method, tmp_path):
    """The o-part pair in the file reproduces ΔW_o exactly; stock peft 0.21 is warned about (it doubles it)."""
    pm = get_peft_model(build("clip"), make_config(method, "clip"))
    with pytest.warns(UserWarning, match="peft#3774"):
        visadapt.export_lora(pm, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layer = pm.base_model.model.visual.transformer.resblocks[1].attn
    key = "base_model.model.visual.transformer.resblocks.1.attn"
    delta_in, delta_out = layer.get_delta_weight("default")
    for sub, delta in (("", delta_in), ("base_layer.out_proj.", delta_out)):
        close(tensors[f"{key}.{sub}lora_B.weight"] @ tensors[f"{key}.{sub}lora_A.weight"], delta)


def test_saved_adapter_config_is_peft_native(saved, exported):
    root, _ = saved
    config = json.loads((root / "vit-block" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BLOCK_LORA" and config["format_version"] == 1
    assert config["visadapt_version"] == visadapt.__version__
    lora = json.loads((exported[0] / "vit-block" / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["r"] == lora["lora_alpha"]


def test_export_folds_qkv_parts_into_one_exact_pair(exported):
    tensors = load_file(exported[0] / "vit-block" / "adapter_model.safetensors")
    lora_b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert lora_b.shape == (3 * 192, 3 * 2)  # q, k, v pairs of rank 2, block-diagonal
    assert torch.count_nonzero(lora_b[:192, 2:]) == 0 and torch.count_nonzero(lora_b[192:384, :2]) == 0


def test_export_is_atomic_on_failure(tmp_path, monkeypatch):
    pm = get_peft_model(build("mlp"), make_config("block", "mlp"))
    import visadapt.adapters.export as export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError):
        visadapt.export_lora(pm, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_loaded_adapter_trains(tmp_path):
    pm = get_peft_model(build("mlp"), make_config("comp", "mlp"))
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("mlp"), tmp_path, is_trainable=True)
    params = [p for p in loaded.parameters() if p.requires_grad]
    assert params and all("comp_lora_factors" in n for n, p in loaded.named_parameters() if p.requires_grad)
    loaded(torch.randn(3, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_fp16_base_keeps_fp32_adapters():
    model = build("mlp").half()
    pm = get_peft_model(model, make_config("block", "mlp"))
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if p.requires_grad)
    out = pm(torch.randn(2, 16, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_fused_qkv_parts_draw_independent_dropout_masks(method):
    """A timm-style fused qkv linear split into q, k, v parts: each part's delta sees its own dropout mask (drawn in
    q, k, v order), as CLIP-LoRA's separate q, k, v layers do, not one mask shared by all three."""
    model = torch.nn.ModuleDict({"qkv": torch.nn.Linear(16, 48)})
    config = make_config(method, "mlp", target_modules=["qkv"], attention_parts=["q", "k", "v"], lora_dropout=0.5)
    layer = get_peft_model(model, config).base_model.model["qkv"].train()
    x = torch.randn(6, 16)
    torch.manual_seed(3)
    with torch.no_grad():
        out = layer(x)
        torch.manual_seed(3)
        for i, part in enumerate("qkv"):
            rows = slice(i * 16, (i + 1) * 16)
            lora_a, lora_b = layer.adapter_factors["default"][part].pair()
            expected = torch.nn.functional.linear(x, layer.base_layer.weight[rows], layer.base_layer.bias[rows])
            expected += layer.scaling["default"] * (torch.nn.functional.dropout(x, 0.5, True) @ lora_a.T) @ lora_b.T
            close(out[:, rows], expected)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_block_and_comp_adapters_share_modules():
    """A PeftModel holds one peft type (peft's rule), so both methods go onto one model through peft's low-level API,
    as diffusers' add_adapter does: on the same layers they switch, stack, merge/unmerge and save/load per adapter."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
    from peft.functional import set_adapter

    def both(model, seed):
        torch.manual_seed(seed)
        inject_adapter_in_model(make_config("block", "vit"), model, adapter_name="block")
        inject_adapter_in_model(make_config("comp", "vit"), model, adapter_name="comp")
        return model

    base_out, model = run("vit", build("vit")), both(build("vit"), seed=0)
    layer = model.blocks[0].attn.qkv
    assert layer.adapter_layer_names == ("block_lora_factors", "comp_lora_factors")
    assert set(layer.adapter_factors) == {"block", "comp"} and repr(layer).startswith("block_lora+comp_lora.")
    outs = {}
    for name in ("block", "comp"):
        set_adapter(model, name)
        outs[name] = run("vit", model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(f"_factors.{name}." in n for n in trainable)
    assert (outs["block"] - outs["comp"]).abs().max() > 1e-3 and (outs["comp"] - base_out).abs().max() > 1e-3
    set_adapter(model, ["block", "comp"])
    stacked = run("vit", model)
    assert (stacked - outs["block"]).abs().max() > 1e-3 and (stacked - outs["comp"]).abs().max() > 1e-3
    weight = layer.base_layer.weight.detach().clone()
    tuner_layers = [m for m in model.modules() if isinstance(m, visadapt.adapters.LowRankLayer)]
    for m in tuner_layers:
        m.merge()
    assert layer.merged_adapters == ["block", "comp"]
    close(run("vit", model), stacked)
    torch.testing.assert_close(layer.base_layer.weight, weight + layer.get_delta_weight("block")
                               + layer.get_delta_weight("comp"), atol=1e-6, rtol=0)
    for m in tuner_layers:
        m.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
    saved = {name: get_peft_model_state_dict(model, adapter_name=name) for name in ("block", "comp")}
    assert saved["block"] and all("block_lora_factors" in k for k in saved["block"])
    assert saved["comp"] and all("comp_lora_factors" in k for k in saved["comp"])
    fresh = both(build("vit"), seed=5)  # the fresh adapters start elsewhere: only loading brings the outputs back
    for name in ("block", "comp"):
        set_adapter(fresh, name)
        assert (run("vit", fresh) - outs[name]).abs().max() > 1e-3
        set_peft_model_state_dict(fresh, saved[name], adapter_name=name)
        set_adapter(fresh, name)
        close(run("vit", fresh), outs[name])
