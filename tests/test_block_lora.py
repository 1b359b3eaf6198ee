"""Block-LoRA specifics: reduction to LoRA, parameter counts, modes and errors."""

import pytest
import torch
import torch.nn as nn
from models import MLP, build
from peft import LoraConfig, get_peft_model

import visadapt


def test_one_block_equals_plain_lora_with_the_same_weights():
    x = torch.randn(5, 16)
    block = get_peft_model(build("mlp"), visadapt.BlockLoraConfig(r=4, lora_alpha=8, n_blocks=1,
                                                                 target_modules=["lin0", "lin1"], init_weights=False))
    lora = get_peft_model(build("mlp"), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    for name in ("lin0", "lin1"):
        factors = getattr(block.base_model.model, name).block_lora_factors["default"]["all"]
        lora_layer = getattr(lora.base_model.model, name)
        with torch.no_grad():
            lora_layer.lora_A["default"].weight.copy_(factors.lora_A)
            lora_layer.lora_B["default"].weight.copy_(factors.lora_B)
    torch.testing.assert_close(block(x), lora(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["input_split", "rank_split"])
def test_forward_equals_dense_delta(mode):
    """The chunk-sum forward computes exactly x (W + s·B [A_s | … | A_s])ᵀ."""
    model = nn.Sequential(nn.Linear(24, 10))
    pm = get_peft_model(model, visadapt.BlockLoraConfig(r=4, n_blocks=4, block_mode=mode, target_modules=["0"],
                                                        init_weights=False))
    layer = pm.base_model.model[0]
    x = torch.randn(3, 7, 24)
    dense = nn.functional.linear(x, layer.base_layer.weight + layer.get_delta_weight("default"), layer.base_layer.bias)
    torch.testing.assert_close(pm(x), dense, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(layer.get_delta_weight("default")) <= (4 if mode == "input_split" else 1)


def test_trainable_parameters_follow_the_formula():
    """r·(d_in/n + d_out) per adapted matrix; rank_split has the same count."""
    for mode in ("input_split", "rank_split"):
        pm = get_peft_model(MLP(), visadapt.BlockLoraConfig(r=4, n_blocks=4, block_mode=mode,
                                                            target_modules=["lin0", "lin1"]))
        count = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        assert count == 4 * (16 // 4 + 32) + 4 * (32 // 4 + 8)


@pytest.mark.slow
def test_clip_vit_b16_count_matches_the_spec():
    """r=2, n=8 on q, k, v of both towers of a ViT-B/16 CLIP: 103,680 (r·(d_in/n + d_out) per matrix)."""
    import open_clip

    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    config = visadapt.BlockLoraConfig(r=2, n_blocks=8, target_modules=r".*resblocks\.\d+\.attn",
                                      attention_parts=["q", "k", "v"])
    pm = get_peft_model(clip, config)
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == 103_680


def test_gradients_reach_only_the_shared_factors():
    pm = get_peft_model(build("vit"), visadapt.BlockLoraConfig(r=2, n_blocks=8, target_modules=["qkv"],
                                                               attention_parts=["q", "v"]))
    pm.train()
    pm(torch.randn(2, 3, 32, 32)).sum().backward()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("block_lora_factors" in n for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if n.endswith("lora_B"))  # B=0: only dB moves
    assert not any(".k." in n for n in trainable)  # only q and v got pairs


def test_n_blocks_must_divide_the_input_width():
    with pytest.raises(ValueError, match=r"n_blocks=5 does not divide the input width 16.*1, 2, 4, 8, 16"):
        get_peft_model(MLP(), visadapt.BlockLoraConfig(n_blocks=5, target_modules=["lin0"]))


def test_rank_split_needs_r_divisible_by_n_blocks():
    with pytest.raises(ValueError, match="r divisible by n_blocks"):
        visadapt.BlockLoraConfig(r=6, n_blocks=4, block_mode="rank_split")


def test_training_reduces_loss():
    torch.manual_seed(0)
    pm = get_peft_model(MLP(), visadapt.BlockLoraConfig(r=4, n_blocks=4, target_modules=["lin0", "lin1"]))
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(50):
        loss = nn.functional.mse_loss(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
