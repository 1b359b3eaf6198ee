"""Comp-LoRA specifics: the protected singular subspace survives training, k resolution, variants, errors."""

import pytest
import torch
import torch.nn as nn
from models import MLP, build
from peft import PeftModel, get_peft_model

import visadapt
from visadapt.adapters.comp_lora import resolve_k


def _train(pm, steps=30, in_dim=16, out_dim=8):
    x, y = torch.randn(64, in_dim), torch.randn(64, out_dim)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(pm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def _weights(pm, name):
    layer = getattr(pm.base_model.model, name)
    w = layer.base_layer.weight.detach()
    return w, w + layer.get_delta_weight("default").detach()


@pytest.mark.parametrize("k", [3, 0.6])
def test_top_k_left_singular_directions_are_unchanged_after_training(k):
    base = MLP()
    u_before = {n: torch.linalg.svd(getattr(base, n).weight.detach())[0] for n in ("lin0", "lin1")}
    pm = get_peft_model(base, visadapt.CompLoraConfig(r=4, k=k, target_modules=["lin0", "lin1"]))
    _train(pm)
    for name in ("lin0", "lin1"):
        w, adapted = _weights(pm, name)
        assert (adapted - w).abs().max() > 1e-2, "training must have moved the weight"
        k_used = resolve_k(k, torch.linalg.svdvals(w))
        u_k = u_before[name][:, :k_used]
        torch.testing.assert_close(u_k.T @ adapted, u_k.T @ w, atol=1e-5, rtol=0)


def test_plain_lora_would_move_those_directions():
    """Control for the test above: without the projection the same training moves U_kᵀW."""
    pm = get_peft_model(MLP(), visadapt.BlockLoraConfig(r=4, n_blocks=1, target_modules=["lin0", "lin1"]))
    _train(pm)
    w, adapted = _weights(pm, "lin1")
    u_k = torch.linalg.svd(w)[0][:, :3]
    assert (u_k.T @ adapted - u_k.T @ w).abs().max() > 1e-3


def test_in_side_protects_right_singular_directions():
    pm = get_peft_model(MLP(), visadapt.CompLoraConfig(r=4, k=3, side="in", target_modules=["lin0", "lin1"]))
    _train(pm)
    for name in ("lin0", "lin1"):
        w, adapted = _weights(pm, name)
        v_k = torch.linalg.svd(w)[2][:3].T
        torch.testing.assert_close(adapted @ v_k, w @ v_k, atol=1e-5, rtol=0)


def test_both_sides_protect_both_subspaces():
    pm = get_peft_model(MLP(), visadapt.CompLoraConfig(r=4, k=2, side="both", target_modules=["lin0"]))
    _train(pm)
    w, adapted = _weights(pm, "lin0")
    u, _, vh = torch.linalg.svd(w)
    delta = adapted - w
    assert delta.abs().max() > 1e-3
    assert (u[:, :2].T @ delta).abs().max() < 1e-5 and (delta @ vh[:2].T).abs().max() < 1e-5


def test_init_only_starts_at_the_base_model_and_trains_freely():
    base_out = build("mlp")(x := torch.randn(4, 16))
    pm = get_peft_model(build("mlp"), visadapt.CompLoraConfig(r=2, mode="init_only", target_modules=["lin0", "lin1"]))
    torch.testing.assert_close(pm(x), base_out, atol=1e-5, rtol=1e-5)
    factors = pm.base_model.model.lin0.comp_lora_factors["default"]["all"]
    w = pm.base_model.model.lin0.base_layer.weight.detach()
    # A starts in the minor right-singular subspace of W
    v_minor = torch.linalg.svd(w, full_matrices=False)[2][-2:]
    torch.testing.assert_close(factors.lora_A.detach() @ v_minor.T @ v_minor, factors.lora_A.detach(),
                               atol=1e-5, rtol=1e-4)
    first, last = _train(pm)
    assert last < 0.8 * first


def test_energy_fraction_picks_the_smallest_sufficient_k():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, .25 of 14.25
    assert resolve_k(0.6, s) == 1 and resolve_k(0.7, s) == 2 and resolve_k(0.95, s) == 3
    assert resolve_k(2, s) == 2


def test_k_larger_than_the_matrix_is_an_error():
    with pytest.raises(ValueError, match=r"lin1: k=9 is larger than this matrix allows.*k < 8"):
        get_peft_model(MLP(), visadapt.CompLoraConfig(k=9, target_modules=["lin0", "lin1"]))
    with pytest.raises(ValueError, match="energy fraction"):
        visadapt.CompLoraConfig(k=1.0)


def test_projector_is_saved_with_the_adapter(tmp_path):
    """U_k travels with the adapter, so a reload onto a different base is caught instead of silently drifting."""
    pm = get_peft_model(build("mlp"), visadapt.CompLoraConfig(r=2, k=3, target_modules=["lin0"]))
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.lin0.comp_lora_factors.all.u_k" in keys
    assert keys["base_model.model.lin0.comp_lora_factors.all.u_k"].shape == (32, 3)


def _peaked(seed: int, top: float) -> nn.Sequential:
    """A 64×64 linear with a chosen spectrum: one direction of size ``top``, the others 1."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64))
    u, _, vh = torch.linalg.svd(model[0].weight.detach())
    spectrum = torch.ones(64)
    spectrum[0] = top
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(spectrum) @ vh)
    return model


def test_fractional_k_reloads_its_saved_subspace_onto_a_base_with_another_spectrum(tmp_path):
    """k=0.5 resolves to 1 direction on a peaked base and to 32 on a flat one; the saved u_k wins on load."""
    pm = get_peft_model(_peaked(0, top=100.0), visadapt.CompLoraConfig(r=2, k=0.5, target_modules=["0"],
                                                                        init_weights=False))
    layer = pm.base_model.model[0]
    assert layer.comp_lora_factors["default"]["all"].u_k.shape == (64, 1)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_peaked(1, top=1.0), tmp_path).base_model.model[0]
    torch.testing.assert_close(loaded.comp_lora_factors["default"]["all"].u_k,
                               layer.comp_lora_factors["default"]["all"].u_k, atol=0, rtol=0)
    torch.testing.assert_close(loaded.get_delta_weight("default"), layer.get_delta_weight("default"),
                               atol=1e-6, rtol=1e-5)
