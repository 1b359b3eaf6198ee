"""LowRankMultiheadAttention against torch's own nn.MultiheadAttention run with the merged weights.

The adapted forward re-implements nn.MultiheadAttention with explicit projections; every option it accepts (batch
layout, unbatched input, attention weights, masks, causal hint, cross-attention, attention_parts) must give what
torch gives for W + ΔW. torch may take its fused fast path for the reference in eval + no_grad; results must match
all the same.
"""

import copy

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import get_peft_model

import visadapt
from visadapt.adapters import LowRankMultiheadAttention

E, H = 16, 2
N, L, S = 3, 5, 7
METHODS = ("block", "comp")


class Holder(nn.Module):
    def __init__(self, batch_first: bool, bias: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first)

    def forward(self, *args, **kwargs):
        return self.attn(*args, **kwargs)


def config(method, **overrides):
    common = dict(r=2, init_weights=False, target_modules=["attn"])
    common.update(overrides)
    if method == "block":
        return visadapt.BlockLoraConfig(n_blocks=2, **common)
    return visadapt.CompLoraConfig(k=2, **common)


def adapted(method, batch_first=True, bias=True, **overrides):
    """(peft model, its LowRankMultiheadAttention, an untouched copy of the base MHA)."""
    torch.manual_seed(0)
    model = Holder(batch_first, bias)
    if bias:  # torch initialises both biases to zero; make them matter
        with torch.no_grad():
            model.attn.in_proj_bias.normal_()
            model.attn.out_proj.bias.normal_()
    base = copy.deepcopy(model.attn).eval()
    pm = get_peft_model(model, config(method, **overrides)).eval()
    layer = pm.base_model.model.attn
    assert isinstance(layer, LowRankMultiheadAttention)
    return pm, layer, base


def merged(layer, adapter="default"):
    """A plain nn.MultiheadAttention holding W + ΔW."""
    ref = copy.deepcopy(layer.get_base_layer()).eval()
    delta_in, delta_out = layer.get_delta_weight(adapter)
    with torch.no_grad():
        if delta_in is not None:
            ref.in_proj_weight += delta_in
        if delta_out is not None:
            ref.out_proj.weight += delta_out
    return ref


def seq(length, batch_first, n=N, seed=1):
    x = torch.randn(n, length, E, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1).contiguous()


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def check(pm, layer, base, *inputs, **kwargs):
    """Adapted forward == merged torch MHA (outputs and weights); and the adapter really changes the output."""
    with torch.no_grad():
        out, weights = pm(*inputs, **kwargs)
        ref_out, ref_weights = merged(layer)(*inputs, **kwargs)
        base_out, _ = base(*inputs, **kwargs)
    close(out, ref_out)
    if kwargs.get("need_weights", True):
        assert weights is not None and weights.shape == ref_weights.shape
        close(weights, ref_weights)
    else:
        assert weights is None and ref_weights is None
    assert (out - base_out).abs().max() > 1e-3, "the adapter must change the output"
    return out, weights


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
def test_self_attention_matches_merged_torch_mha(method, batch_first, bias, need_weights):
    pm, layer, base = adapted(method, batch_first, bias)
    x = seq(L, batch_first)
    out, weights = check(pm, layer, base, x, x, x, need_weights=need_weights)
    assert out.shape == x.shape
    if need_weights:
        assert weights.shape == (N, L, L)
        close(weights.sum(-1), torch.ones(N, L))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_per_head_attention_weights(method, batch_first):
    pm, layer, base = adapted(method, batch_first)
    x = seq(L, batch_first)
    _, weights = check(pm, layer, base, x, x, x, need_weights=True, average_attn_weights=False)
    assert weights.shape == (N, H, L, L)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("weights_kw", [dict(need_weights=False), dict(need_weights=True),
                                        dict(need_weights=True, average_attn_weights=False)],
                         ids=["no_weights", "avg_weights", "head_weights"])
def test_unbatched_input(method, batch_first, weights_kw):
    pm, layer, base = adapted(method, batch_first)
    x = seq(L, True, n=1)[0]  # (L, E)
    out, weights = check(pm, layer, base, x, x, x, **weights_kw)
    assert out.shape == (L, E)
    if weights_kw["need_weights"]:
        assert weights.shape == ((L, L) if weights_kw.get("average_attn_weights", True) else (H, L, L))


def _masks(kind, l_q, s_k, gen):
    """kwargs for one mask kind; bool masks never block a whole row (that gives NaN in torch too)."""
    if kind == "bool":
        mask = torch.rand(l_q, s_k, generator=gen) < 0.4
        mask[:, 0] = False
        return dict(attn_mask=mask)
    if kind == "float":
        return dict(attn_mask=torch.randn(l_q, s_k, generator=gen))
    if kind == "bool_3d":
        mask = torch.rand(N * H, l_q, s_k, generator=gen) < 0.4
        mask[..., 0] = False
        return dict(attn_mask=mask)
    if kind == "float_3d":
        return dict(attn_mask=torch.randn(N * H, l_q, s_k, generator=gen))
    if kind == "key_padding":
        pad = torch.zeros(N, s_k, dtype=torch.bool)
        pad[1, -2:] = True
        pad[2, -1] = True
        return dict(key_padding_mask=pad)
    if kind == "bool+key_padding":
        return {**_masks("bool", l_q, s_k, gen), **_masks("key_padding", l_q, s_k, gen)}
    if kind == "causal":
        return dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(l_q), is_causal=True)
    if kind == "causal_bool":
        return dict(attn_mask=torch.ones(l_q, s_k, dtype=torch.bool).triu(1), is_causal=True)
    if kind == "causal+key_padding":
        return {**_masks("causal_bool", l_q, s_k, gen), **_masks("key_padding", l_q, s_k, gen)}
    raise KeyError(kind)


MASKS = ["bool", "float", "bool_3d", "float_3d", "key_padding", "bool+key_padding", "causal", "causal_bool",
         "causal+key_padding"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("kind", MASKS)
def test_masks_in_self_attention(method, batch_first, need_weights, kind):
    pm, layer, base = adapted(method, batch_first)
    x = seq(L, batch_first)
    masks = _masks(kind, L, L, torch.Generator().manual_seed(2))
    out, weights = check(pm, layer, base, x, x, x, need_weights=need_weights, **masks)
    # the mask matters: without it the result is different
    with torch.no_grad():
        unmasked, _ = pm(x, x, x, need_weights=need_weights)
    assert (out - unmasked).abs().max() > 1e-3
    if need_weights and masks.get("attn_mask") is not None and masks["attn_mask"].dtype == torch.bool \
            and masks["attn_mask"].dim() == 2:
        assert torch.all(weights[:, masks["attn_mask"]] == 0)


def test_unbatched_masks():
    pm, layer, base = adapted("block")
    x = seq(L, True, n=1)[0]
    gen = torch.Generator().manual_seed(3)
    pad = torch.zeros(L, dtype=torch.bool)
    pad[-2:] = True
    head_mask = torch.randn(H, L, L, generator=gen)
    for kwargs in (dict(attn_mask=_masks("bool", L, L, gen)["attn_mask"]), dict(key_padding_mask=pad),
                   dict(attn_mask=head_mask)):
        for need_weights in (True, False):
            check(pm, layer, base, x, x, x, need_weights=need_weights, **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("same_kv", [True, False], ids=["k_is_v", "k_ne_v"])
def test_cross_attention(method, batch_first, need_weights, same_kv):
    pm, layer, base = adapted(method, batch_first)
    query = seq(L, batch_first, seed=1)
    key = seq(S, batch_first, seed=2)
    value = key if same_kv else seq(S, batch_first, seed=3)
    out, weights = check(pm, layer, base, query, key, value, need_weights=need_weights)
    assert out.shape == query.shape
    if need_weights:
        assert weights.shape == (N, L, S)
    masks = {**_masks("float", L, S, torch.Generator().manual_seed(4)),
             **_masks("key_padding", L, S, torch.Generator().manual_seed(4))}
    masks["key_padding_mask"] = torch.zeros(N, S).masked_fill(masks["key_padding_mask"], float("-inf"))
    check(pm, layer, base, query, key, value, need_weights=need_weights, **masks)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("parts", [["q"], ["k"], ["v", "o"], ["o"], ["q", "k", "v"]], ids="-".join)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_attention_parts(method, parts, batch_first):
    pm, layer, base = adapted(method, batch_first, attention_parts=parts)
    assert set(layer.adapter_factors["default"]) == set(parts)
    delta_in, delta_out = layer.get_delta_weight("default")
    in_parts = [p for p in "qkv" if p in parts]
    assert (delta_in is None) == (not in_parts) and (delta_out is None) == ("o" not in parts)
    if delta_in is not None:
        for i, p in enumerate("qkv"):
            rows = delta_in[i * E:(i + 1) * E]
            assert (rows.abs().max() > 0) == (p in parts), p
    x = seq(L, batch_first)
    check(pm, layer, base, x, x, x, need_weights=True)
    check(pm, layer, base, x, x, x, need_weights=False, attn_mask=_masks("bool", L, L, torch.Generator())["attn_mask"])
    key = seq(S, batch_first, seed=5)
    check(pm, layer, base, x, key, key, need_weights=False)


def _functional_merged(layer, query, key, value, need_weights):
    """torch's functional MHA on W + ΔW with ΔW from get_delta_weight (differentiable in the adapter factors)."""
    mha = layer.get_base_layer()
    delta_in, delta_out = layer.get_delta_weight("default")
    in_w = mha.in_proj_weight + (0 if delta_in is None else delta_in)
    out_w = mha.out_proj.weight + (0 if delta_out is None else delta_out)
    seq_first = (t.transpose(0, 1) for t in (query, key, value)) if mha.batch_first else (query, key, value)
    out, weights = F.multi_head_attention_forward(
        *seq_first, E, H, in_w, mha.in_proj_bias, None, None, False, 0.0, out_w, mha.out_proj.bias,
        training=True, need_weights=need_weights)
    return (out.transpose(0, 1) if mha.batch_first else out), weights


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_gradients_reach_the_active_adapter(method, need_weights, cross, batch_first):
    pm, layer, _ = adapted(method, batch_first)
    pm.train().double()  # float64, so that the gradient comparison below is not swamped by fp32 rounding
    x = seq(L, batch_first).double()
    kv = seq(S, batch_first, seed=6).double() if cross else x
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out, _ = pm(x, kv, kv, need_weights=need_weights)
    (out * target).sum().backward()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    names = {n.rsplit(".", 1)[-1] for n in trainable}
    assert names == {"lora_A", "lora_B"} and all(".default." in n for n in trainable)
    assert len(trainable) == 8  # q, k, v, o: one A and one B each
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)
    ours = {n: p.grad.clone() for n, p in trainable.items()}
    # the same gradients as back-propagating through torch's functional MHA on W + ΔW(factors)
    pm.zero_grad()
    ref_out, _ = _functional_merged(layer, x, kv, kv, need_weights)
    close(out.detach(), ref_out.detach())
    (ref_out * target).sum().backward()
    for name, p in trainable.items():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-8, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_only_the_active_adapter_trains():
    pm, layer, _ = adapted("block")
    torch.manual_seed(1)
    pm.add_adapter("other", config("block"))
    pm.set_adapter("other")
    pm.train()
    x = seq(L, True)
    pm(x, x, x)[0].square().sum().backward()
    for name, p in pm.named_parameters():
        if ".other." in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name
    with torch.no_grad():
        close(pm(x, x, x)[0], merged(layer, "other")(x, x, x)[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_two_active_adapters_add_up(method, batch_first):
    pm, layer, _ = adapted(method, batch_first)
    torch.manual_seed(1)
    pm.add_adapter("other", config(method, attention_parts=["k", "o"]))
    pm.base_model.set_adapter(["default", "other"])
    ref = merged(layer, "default")
    delta_in, delta_out = layer.get_delta_weight("other")
    assert delta_in is not None and delta_out is not None
    with torch.no_grad():
        ref.in_proj_weight += delta_in
        ref.out_proj.weight += delta_out
    x, key = seq(L, batch_first), seq(S, batch_first, seed=8)
    with torch.no_grad():
        for q, kv in ((x, x), (x, key)):
            for need_weights in (True, False):
                out, weights = pm(q, kv, kv, need_weights=need_weights)
                ref_out, ref_weights = ref(q, kv, kv, need_weights=need_weights)
                close(out, ref_out)
                if need_weights:
                    close(weights, ref_weights)
            differ_from_default = (out - merged(layer, "default")(q, kv, kv, need_weights=False)[0]).abs().max()
            assert differ_from_default > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_lora_dropout_acts_only_in_training(method, batch_first):
    pm, layer, _ = adapted(method, batch_first, lora_dropout=0.5)
    x = seq(L, batch_first)
    key = seq(S, batch_first, seed=7)
    for q, kv in ((x, x), (x, key)):
        with torch.no_grad():
            ref = merged(layer)(q, kv, kv)[0]
            torch.manual_seed(10)
            first = pm(q, kv, kv)[0]
            torch.manual_seed(11)
            second = pm(q, kv, kv)[0]
        torch.testing.assert_close(first, second, atol=0, rtol=0)  # eval: no randomness
        close(first, ref)
        pm.train()
        with torch.no_grad():
            torch.manual_seed(10)
            train_a = pm(q, kv, kv)[0]
            torch.manual_seed(11)
            train_b = pm(q, kv, kv)[0]
            torch.manual_seed(10)
            train_a_again = pm(q, kv, kv)[0]
        pm.eval()
        assert (train_a - first).abs().max() > 1e-3, "dropout must act in training"
        assert (train_a - train_b).abs().max() > 1e-3, "different seeds, different dropout masks"
        torch.testing.assert_close(train_a, train_a_again, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_training_mode_without_dropout_matches_merged(method):
    """With lora_dropout=0 and MHA dropout 0, the training forward is the merged forward too."""
    pm, layer, _ = adapted(method)
    pm.train()
    x = seq(L, True)
    ref = merged(layer).train()
    with torch.no_grad():
        close(pm(x, x, x)[0], ref(x, x, x)[0])
        close(pm(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_projects_q_k_v_in_one_kernel_call(batch_first, monkeypatch):
    """query is key is value: one fused in-projection call plus the out-projection, whatever the layout."""
    import visadapt.adapters.layer as layer_module

    calls = []
    real = layer_module._adapted_linear
    monkeypatch.setattr(layer_module, "_adapted_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    pm, _, _ = adapted("block", batch_first=batch_first)
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    pm(x, x, x, need_weights=False)
    assert len(calls) == 2


@pytest.mark.parametrize("method", METHODS)
def test_exposes_in_and_out_features_like_peft_lora(method):
    """peft expects in_features / out_features on every tuner layer; peft's LoRA reports an MHA as (E, 3E)."""
    _, layer, _ = adapted(method)
    lora = get_peft_model(Holder(True, True), peft.LoraConfig(target_modules=["attn"])).base_model.model.attn
    assert (layer.in_features, layer.out_features) == (lora.in_features, lora.out_features) == (E, 3 * E)


@pytest.mark.parametrize("method", METHODS)
def test_q_k_v_draw_independent_dropout_masks_like_clip_lora(method):
    """CLIP-LoRA gives each of q, k, v its own LoRA layer and dropout: the fused self-attention projection draws one
    mask per part, in q, k, v order, exactly as three separate layers would under the same seed."""
    _, layer, _ = adapted(method, lora_dropout=0.5)
    layer.train()
    mha, x, s = layer.get_base_layer(), seq(L, True), layer.scaling["default"]
    torch.manual_seed(5)
    with torch.no_grad():
        got = layer._project_in(x, x, x, self_attention=True)
        torch.manual_seed(5)
        for i, part in enumerate("qkv"):
            rows = slice(i * E, (i + 1) * E)
            lora_a, lora_b = layer.adapter_factors["default"][part].pair()
            x_dropped = F.dropout(x, 0.5, True)
            close(got[i], F.linear(x, mha.in_proj_weight[rows], mha.in_proj_bias[rows])
                  + s * (x_dropped @ lora_a.T) @ lora_b.T)
