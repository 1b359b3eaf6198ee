"""Bad input gets one clear error that names the fix."""

import json

import pytest
import torch.nn as nn
from models import MLP, build
from peft import PeftModel, get_peft_model

import visadapt


@pytest.mark.parametrize("config_cls", [visadapt.BlockLoraConfig, visadapt.CompLoraConfig])
def test_targets_matching_nothing_list_the_adaptable_modules(config_cls):
    with pytest.raises(ValueError, match=r"(?s)not found in the base model.*Adaptable module names in this model: "
                                         r"lin0, lin1"):
        get_peft_model(MLP(), config_cls(target_modules=["q_proj"]))


def test_missing_target_modules_suggests_names():
    with pytest.raises(ValueError, match="Set target_modules"):
        get_peft_model(MLP(), visadapt.BlockLoraConfig())


def test_mha_out_proj_alone_is_refused():
    model = nn.Sequential()
    model.attn = nn.MultiheadAttention(16, 2)
    with pytest.raises(ValueError, match="Target the attention module itself"):
        get_peft_model(model, visadapt.BlockLoraConfig(n_blocks=2, target_modules=["out_proj"]))


def test_unsupported_layer_type_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(TypeError, match="adapt nn.Linear and nn.MultiheadAttention"):
        get_peft_model(model, visadapt.BlockLoraConfig(target_modules=["0"]))


def test_bad_attention_parts():
    with pytest.raises(ValueError, match="subset of"):
        visadapt.BlockLoraConfig(attention_parts=["q", "x"])


def test_adapter_from_an_incompatible_version_is_refused(tmp_path):
    pm = get_peft_model(build("mlp"), visadapt.BlockLoraConfig(n_blocks=4, target_modules=["lin0"]))
    pm.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(format_version=99, visadapt_version="9.0.0")
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"saved by visadapt 9\.0\.0 in adapter format 99.*pip install"):
        PeftModel.from_pretrained(build("mlp"), tmp_path)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_an_adapter_name_belongs_to_one_method_per_module():
    """Both methods may share a module (tests/test_adapters.py), but not an adapter name."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(visadapt.BlockLoraConfig(n_blocks=4, target_modules=["lin0"]), build("mlp"),
                                    adapter_name="ours")
    with pytest.raises(ValueError, match="lin0: Adapter name 'ours' is already taken on this layer by a block_lora"):
        inject_adapter_in_model(visadapt.CompLoraConfig(k=2, target_modules=["lin0"]), model, adapter_name="ours")


def test_export_of_a_non_visadapt_adapter_is_refused(tmp_path):
    from peft import LoraConfig

    pm = get_peft_model(build("mlp"), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="export_lora converts Block-LoRA and Comp-LoRA"):
        visadapt.export_lora(pm, tmp_path)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        visadapt.export_lora(pm, tmp_path, adapter_name="nope")
