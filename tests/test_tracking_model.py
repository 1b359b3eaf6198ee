"""LoRAT model: the paper's parameter/MAC table, decoupled position embedding, adapters and merge."""

import copy

import peft
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from visadapt.tracking.model import (
    LoRAT,
    add_adapter,
    build_lorat,
    lorat_adapter_config,
    merge,
    parameter_counts,
)


def tiny_vit(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.models.VisionTransformer(img_size=84, patch_size=14, embed_dim=32, depth=depth, num_heads=2,
                                         init_values=0.5, num_classes=0)


def _randomise(params) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def tiny_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, 3, 28, 28, generator=g)
    x = torch.randn(batch, 3, 56, 56, generator=g)
    mask = torch.tensor([[[0, 1], [1, 1]]]).repeat(batch, 1, 1)
    return z, x, mask


@pytest.mark.parametrize("variant, lora, head, total, gmacs", [
    ("B-224", 10.6, 2.4, 99, 29.8),
    ("L-378", 28.3, 4.2, 336, 325.0),
    ("g-378", 70.8, 9.5, 1216, 1160.4),
])
def test_parameter_counts_and_macs_match_the_paper_table(variant, lora, head, total, gmacs):
    with torch.device("meta"):
        model = build_lorat(variant)
        counts = parameter_counts(model)
        assert round(counts["lora"] / 1e6, 1) == lora
        assert round(counts["head"] / 1e6, 1) == head
        assert counts["trainable"] == counts["lora"] + counts["head"] + 3 * model.embed_dim  # + token types
        assert round(counts["total"] / 1e6) == total
        merge(model).eval()
        size = 112 if variant.endswith("224") else 196
        z = torch.zeros(1, 3, size, size)
        x = torch.zeros(1, 3, model.x_grid[0] * 14, model.x_grid[1] * 14)
        with FlopCounterMode(display=False) as counter:
            model(z, x, torch.zeros(1, *model.z_grid, dtype=torch.long))
    assert round(counter.get_total_flops() / 2e9, 1) == gmacs


def test_variants_use_uniform_drop_path_and_paper_grids():
    with torch.device("meta"):
        model = build_lorat("L-378", lora=False)
    assert model.z_grid == (14, 14) and model.x_grid == (27, 27)
    assert {b.drop_path1.drop_prob for b in model.blocks} == {0.1}


def test_template_uses_top_left_window_of_the_shared_table_and_token_types():
    model = LoRAT(tiny_vit(), (2, 2), (4, 4)).eval()
    z, _, mask = tiny_inputs(1)
    patches = model.patch_embed.proj(z).flatten(2).transpose(1, 2)
    table = model.pos_embed.view(4, 4, -1)
    expected = patches + table[:2, :2].reshape(1, 4, -1) + model.token_type_embed[mask.flatten(1)]
    torch.testing.assert_close(model.z_tokens(z, mask), expected)
    assert model.pos_embed.shape == (1, 16, 32) and not model.pos_embed.requires_grad


def test_window_mode_takes_the_top_left_of_the_pretrained_table():
    vit = tiny_vit()
    table = vit.pos_embed.data[:, 1:].reshape(6, 6, -1)
    windowed = LoRAT(vit, (2, 2), (4, 4), pos_embed_mode="window").pos_embed.view(4, 4, -1)
    torch.testing.assert_close(windowed, table[:4, :4])
    resized = LoRAT(tiny_vit(), (2, 2), (4, 4)).pos_embed.view(4, 4, -1)
    assert not torch.allclose(resized, table[:4, :4])


def test_forward_shapes_and_boxes_around_cell_centres():
    model = LoRAT(tiny_vit(), (2, 2), (4, 4)).eval()
    out = model(*tiny_inputs())
    assert out["score_map"].shape == (2, 4, 4) and out["boxes"].shape == (2, 4, 4, 4)
    boxes = out["boxes"]
    centre = torch.tensor([[(j + 0.5) / 4, (i + 0.5) / 4] for i in range(4) for j in range(4)]).view(4, 4, 2)
    assert (boxes[..., :2] < centre).all() and (boxes[..., 2:] > centre).all()


@pytest.mark.parametrize("config", [
    None,
    lorat_adapter_config("comp-lora", r=4, lora_alpha=4, k=2),
    peft.LoraConfig(r=4, lora_alpha=4, target_modules=["qkv", "proj", "fc1", "fc2"]),
])
def test_merged_model_equals_adapted_model(config):
    model = LoRAT(tiny_vit(), (2, 2), (4, 4)).eval()
    _randomise(model.head.parameters())  # the 0.02 init makes the head nearly blind to its input
    plain = copy.deepcopy(model)
    add_adapter(model, config)
    _randomise(p for n, p in model.named_parameters() if "lora" in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head" in n for n in trainable) and "token_type_embed" in trainable
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    inputs = tiny_inputs()
    before = model(*inputs)
    assert (plain(*inputs)["boxes"] - before["boxes"]).abs().max() > 1e-6  # the adapters do something
    merged = merge(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert isinstance(merged.blocks[0].attn.qkv, torch.nn.Linear)
    after = merged(*inputs)
    torch.testing.assert_close(after["score_map"], before["score_map"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after["boxes"], before["boxes"], atol=1e-5, rtol=1e-4)


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="B-224"):
        build_lorat("B-999")


def test_one_training_step_updates_only_adapters_head_and_token_types():
    from visadapt.tracking.losses import lorat_loss
    from visadapt.tracking.model import param_groups

    model = add_adapter(LoRAT(tiny_vit(), (2, 2), (4, 4))).train()
    groups = param_groups(model)
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.token_type_embed) not in decayed and id(model.head.cls_mlp.layers[0].weight) in decayed
    assert id(model.head.cls_mlp.layers[0].bias) not in decayed
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = model(*tiny_inputs())
    loss = lorat_loss(out, torch.tensor([[0.1, 0.2, 0.6, 0.7], [0.4, 0.4, 0.5, 0.5]]))["loss"]
    loss.backward()
    torch.optim.AdamW(groups, lr=1e-3).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is not None for g in groups for p in g["params"])


def test_token_type_gradient_is_the_same_on_every_run():
    """The template's token types were gathered by indexing, whose backward accumulates with atomic adds: on several
    CPU threads the gradient's last bits (and so a whole demo run) changed from run to run."""
    model = LoRAT(tiny_vit(depth=1), (2, 2), (4, 4))
    z, x, _ = tiny_inputs(batch=256)
    mask = torch.randint(0, 2, (256, 2, 2), generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(4):
            model.zero_grad()
            model.z_tokens(z, mask).square().sum().backward()
            grads.append(model.token_type_embed.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads)
