"""Block-LoRA and Comp-LoRA inside a tiny random diffusers UNet2DConditionModel (built offline from a config).

Covers diffusers' PEFT integration with a custom tuner type: add_adapter, set_adapters with weights (the
set_scale hook), disable/enable, state-dict round trips through peft, and export to a plain LoRA.
"""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import visadapt
from visadapt.adapters import LowRankLayer

diffusers = pytest.importorskip("diffusers")

# diffusers' add_adapter warns on every second adapter of a model; that is what these tests do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
N_TARGETS = 32  # 4 transformer blocks (down 1, mid 1, up 2) × (attn1 + attn2) × 4 projections
METHODS = ("block", "comp")


def build_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    return unet.eval()


def config(method="block", **overrides):
    common = dict(r=4, init_weights=False, target_modules=TARGETS)
    common.update(overrides)
    if method == "block":
        return visadapt.BlockLoraConfig(n_blocks=4, **common)
    return visadapt.CompLoraConfig(k=4, **common)


def add(unet, method, name, seed, **overrides):
    torch.manual_seed(seed)  # after building the UNet, so that each adapter gets its own random factors
    unet.add_adapter(config(method, **overrides), adapter_name=name)


def run(unet):
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    encoder_hidden_states = torch.randn(1, 7, 32, generator=gen)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=encoder_hidden_states).sample


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def differ(a, b, at_least=1e-4):
    assert (a - b).abs().max() > at_least, "outputs should differ"


def layers(unet):
    found = {n: m for n, m in unet.named_modules() if isinstance(m, LowRankLayer)}
    assert len(found) == N_TARGETS
    return found


@pytest.fixture(scope="module")
def base_out():
    return run(build_unet())


@pytest.fixture
def two_styles():
    """A UNet carrying Block-LoRA adapters style_a (seed 1) and style_b (seed 2)."""
    unet = build_unet()
    add(unet, "block", "style_a", seed=1)
    add(unet, "block", "style_b", seed=2)
    return unet


@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_leaves_output_unchanged(method, base_out):
    unet = build_unet()
    add(unet, method, "style_a", seed=1, init_weights=True)
    assert unet.active_adapters() == ["style_a"]
    layers(unet)
    close(run(unet), base_out, atol=1e-6)


def test_weights_one_and_zero_equal_the_single_adapter(two_styles, base_out):
    unet = two_styles
    unet.set_adapters("style_b")
    only_b = run(unet)
    unet.set_adapters("style_a")
    assert unet.active_adapters() == ["style_a"]
    only_a = run(unet)
    differ(only_a, base_out)
    differ(only_a, only_b)
    unet.set_adapters(["style_a", "style_b"], weights=[1.0, 0.0])
    assert sorted(unet.active_adapters()) == ["style_a", "style_b"]
    close(run(unet), only_a)
    unet.set_adapters(["style_a", "style_b"], weights=[1.0, 1.0])
    differ(run(unet), only_a)


def test_half_weight_halves_the_scaling(two_styles, base_out):
    unet = two_styles
    unet.set_adapters(["style_a", "style_b"], weights=[1.0, 0.0])
    full = run(unet)
    unet.set_adapters(["style_a", "style_b"], weights=[0.5, 0.0])
    default = config().lora_alpha / config().r
    for name, layer in layers(unet).items():
        assert layer.scaling["style_a"] == pytest.approx(0.5 * default), name
        assert layer.scaling["style_b"] == 0.0, name
    half = run(unet)
    differ(half, full)
    differ(half, base_out)
    # the same as a plain UNet with W + 0.5 · ΔW_a merged into every target
    reference = build_unet()
    targets = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in layers(unet).items():
            targets[name].weight += layer.get_delta_weight("style_a")
    close(half, run(reference))
    # and back to full strength
    unet.set_adapters(["style_a", "style_b"], weights=[1.0, 0.0])
    close(run(unet), full)


def test_disable_and_enable_adapters(two_styles, base_out):
    unet = two_styles
    unet.set_adapters(["style_a", "style_b"], weights=[1.0, 0.5])
    adapted = run(unet)
    differ(adapted, base_out)
    unet.disable_adapters()
    close(run(unet), base_out, atol=1e-6)
    unet.enable_adapters()
    close(run(unet), adapted)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_through_safetensors(method, tmp_path):
    unet = build_unet()
    add(unet, method, "style_a", seed=1)
    add(unet, method, "style_b", seed=2)
    unet.set_adapters("style_a")
    expected = run(unet)
    state = get_peft_model_state_dict(unet, adapter_name="style_a")
    assert state and all(f"{method}_lora_factors." in k for k in state)
    assert not any("style_a" in k or "style_b" in k for k in state)
    assert sum(k.endswith(".lora_B") for k in state) == N_TARGETS
    save_file(state, tmp_path / "style_a.safetensors")

    fresh = build_unet()
    add(fresh, method, "style_a", seed=3)  # different random factors until the file is loaded
    differ(run(fresh), expected)
    result = set_peft_model_state_dict(fresh, load_file(tmp_path / "style_a.safetensors"), adapter_name="style_a")
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if f"{method}_lora_factors" in k]
    close(run(fresh), expected, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_export_to_plain_lora_reproduces_the_output(method, tmp_path, base_out):
    unet = build_unet()
    add(unet, method, "style_a", seed=1)
    add(unet, method, "style_b", seed=2)
    unet.set_adapters("style_a")
    expected = run(unet)
    differ(expected, base_out)
    out_dir = visadapt.export_lora(unet, tmp_path / "lora", adapter_name="style_a", format="peft")
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"

    fresh = build_unet()
    inject_adapter_in_model(LoraConfig.from_pretrained(str(out_dir)), fresh, adapter_name="x")
    assert not any(isinstance(m, LowRankLayer) for m in fresh.modules())
    close(run(fresh), base_out, atol=1e-6)  # LoRA's B starts at zero
    result = set_peft_model_state_dict(fresh, load_file(out_dir / "adapter_model.safetensors"), adapter_name="x")
    assert not result.unexpected_keys
    close(run(fresh), expected)


def test_exported_adapter_is_independent_of_the_other_adapter(two_styles, tmp_path):
    """Export writes style_a alone, whatever the active set and weights are at export time."""
    unet = two_styles
    unet.set_adapters("style_a")
    only_a = run(unet)
    unet.set_adapters(["style_a", "style_b"], weights=[1.0, 1.0])
    out_dir = visadapt.export_lora(unet, tmp_path / "lora", adapter_name="style_a", format="peft")
    fresh = build_unet()
    inject_adapter_in_model(LoraConfig.from_pretrained(str(out_dir)), fresh, adapter_name="x")
    set_peft_model_state_dict(fresh, load_file(out_dir / "adapter_model.safetensors"), adapter_name="x")
    close(run(fresh), only_a)
