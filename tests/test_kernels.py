"""visadapt.kernels against a dense float64 reference: y = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ.

For Block-LoRA the reference uses the tiled down-projection A = [A_s | … | A_s] = a_shared.repeat(1, n).
"""

import pytest
import torch
import torch.nn.functional as F

from visadapt import kernels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
D_IN, D_OUT = 30, 7
SCALE = 0.75

# (n_blocks, r): n_blocks=None is plain lora_linear; odd sizes on purpose (d_in=30, d_out=7).
SHAPES = [(None, 1), (None, 3), (3, 1), (3, 3), (5, 1), (5, 3)]
SHAPE_IDS = [f"{'lora' if n is None else f'block{n}'}-r{r}" for n, r in SHAPES]


def close(actual, expected, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def make(n_blocks, r, device="cpu", dtype=torch.float32, bias=True, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    a_cols = D_IN if n_blocks is None else D_IN // n_blocks
    t = dict(
        weight=torch.randn(D_OUT, D_IN, generator=gen) / D_IN ** 0.5,
        bias=torch.randn(D_OUT, generator=gen) if bias else None,
        lora_a=torch.randn(r, a_cols, generator=gen),
        lora_b=torch.randn(D_OUT, r, generator=gen),
    )
    return {k: None if v is None else v.to(device, dtype if k in ("weight", "bias") else torch.float32)
            for k, v in t.items()}


def call(x, weight, bias, lora_a, lora_b, n_blocks, scale=SCALE, dropout_p=0.0, training=False):
    if n_blocks is None:
        return kernels.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=dropout_p, training=training)
    return kernels.block_lora_linear(x, weight, bias, lora_a, lora_b, n_blocks, scale, dropout_p, training)


def reference(x, weight, bias, lora_a, lora_b, n_blocks, scale=SCALE, x_lora=None):
    """Dense float64 y = x Wᵀ + b + s · x_lora A_effᵀ Bᵀ (x_lora defaults to x); differentiable."""
    x64 = x.double()
    a_eff = lora_a.double() if n_blocks is None else lora_a.double().repeat(1, n_blocks)
    delta = scale * (((x64 if x_lora is None else x_lora.double()) @ a_eff.T) @ lora_b.double().T)
    if weight is None:
        return delta
    base = x64 @ weight.double().T
    return delta + base if bias is None else delta + base + bias.double()


@pytest.fixture(autouse=True)
def _restore_backend():
    before = kernels.get_backend()
    yield
    kernels.set_backend(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_blocks,r", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("lead", [(4,), (2, 5)], ids=["2d", "3d"])
def test_forward_matches_dense_reference(n_blocks, r, lead, device):
    t = make(n_blocks, r, device)
    x = torch.randn(*lead, D_IN, device=device)
    out = call(x, **t, n_blocks=n_blocks)
    assert out.shape == (*lead, D_OUT) and out.dtype == torch.float32
    close(out, reference(x, **t, n_blocks=n_blocks))
    # the adapter really contributes: the result is not just the base linear
    assert (out - F.linear(x, t["weight"], t["bias"])).abs().max() > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_blocks,r", SHAPES, ids=SHAPE_IDS)
def test_gradients_match_dense_reference(n_blocks, r, device):
    t = make(n_blocks, r, device)
    x = torch.randn(2, 5, D_IN, device=device)
    grad_out = torch.randn(2, 5, D_OUT, device=device)
    leaves = {"x": x, "weight": t["weight"], "lora_a": t["lora_a"], "lora_b": t["lora_b"]}
    ours = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
    ref = {k: v.double().clone().requires_grad_(True) for k, v in leaves.items()}
    out = call(ours["x"], ours["weight"], t["bias"], ours["lora_a"], ours["lora_b"], n_blocks)
    out.backward(grad_out)
    expected = reference(ref["x"], ref["weight"], t["bias"], ref["lora_a"], ref["lora_b"], n_blocks)
    expected.backward(grad_out.double())
    for name in leaves:
        assert ours[name].grad is not None, name
        assert ours[name].grad.abs().max() > 0, name
        close(ours[name].grad, ref[name].grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n_blocks,r", [(None, 3), (3, 3), (5, 1)], ids=["lora", "block3", "block5"])
def test_non_contiguous_input(n_blocks, r):
    t = make(n_blocks, r)
    x = torch.randn(2, D_IN, 5).transpose(1, 2)  # (2, 5, 30), a strided view
    assert not x.is_contiguous()
    out = call(x, **t, n_blocks=n_blocks)
    close(out, reference(x, **t, n_blocks=n_blocks))
    close(out, call(x.contiguous(), **t, n_blocks=n_blocks), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_blocks,r", [(None, 3), (3, 3), (5, 1)], ids=["lora", "block3", "block5"])
def test_weight_none_returns_the_delta_alone(n_blocks, r):
    t = make(n_blocks, r)
    x = torch.randn(3, 4, D_IN)
    delta = call(x, None, None, t["lora_a"], t["lora_b"], n_blocks)
    close(delta, reference(x, None, None, t["lora_a"], t["lora_b"], n_blocks))
    # the delta plus the base linear is the full adapted output
    close(delta + F.linear(x, t["weight"], t["bias"]), call(x, **t, n_blocks=n_blocks))


@pytest.mark.parametrize("n_blocks,r", [(None, 3), (5, 3)], ids=["lora", "block5"])
def test_bias_none(n_blocks, r):
    t = make(n_blocks, r, bias=False)
    x = torch.randn(6, D_IN)
    out = call(x, **t, n_blocks=n_blocks)
    close(out, reference(x, **t, n_blocks=n_blocks))
    with_bias = make(n_blocks, r)
    assert (call(x, **with_bias, n_blocks=n_blocks) - out).abs().max() > 1e-2


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.bfloat16, 6e-2, 2e-2), (torch.float16, 1e-2, 5e-3)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("n_blocks,r", [(None, 3), (3, 1), (5, 3)], ids=["lora", "block3", "block5"])
def test_half_precision_inputs_with_fp32_adapters(n_blocks, r, dtype, atol, rtol):
    t = make(n_blocks, r, dtype=dtype)
    assert t["lora_a"].dtype == torch.float32 and t["weight"].dtype == dtype
    x = torch.randn(2, 5, D_IN).to(dtype)
    out = call(x, **t, n_blocks=n_blocks)
    assert out.dtype == dtype
    close(out, reference(x, **t, n_blocks=n_blocks), atol=atol, rtol=rtol)
    delta = call(x, None, None, t["lora_a"], t["lora_b"], n_blocks)
    assert delta.dtype == dtype
    close(delta, reference(x, None, None, t["lora_a"], t["lora_b"], n_blocks), atol=atol, rtol=rtol)


def test_half_precision_gradients_reach_fp32_adapters():
    t = make(3, 3, dtype=torch.bfloat16)
    a = t["lora_a"].clone().requires_grad_(True)
    b = t["lora_b"].clone().requires_grad_(True)
    x = torch.randn(4, D_IN).to(torch.bfloat16).requires_grad_(True)
    call(x, t["weight"], t["bias"], a, b, 3).float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref_a, ref_b = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    reference(x.detach(), t["weight"], t["bias"], ref_a, ref_b, 3).sum().backward()
    close(a.grad, ref_a.grad, atol=5e-2, rtol=2e-2)
    close(b.grad, ref_b.grad, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("n_blocks,r", [(None, 3), (3, 3), (5, 1)], ids=["lora", "block3", "block5"])
def test_dropout_is_inactive_when_not_training(n_blocks, r):
    t = make(n_blocks, r)
    x = torch.randn(4, 5, D_IN)
    plain = call(x, **t, n_blocks=n_blocks)
    for p in (0.1, 0.5, 0.9):
        torch.testing.assert_close(call(x, **t, n_blocks=n_blocks, dropout_p=p, training=False), plain,
                                   atol=0, rtol=0)
    torch.testing.assert_close(call(x, **t, n_blocks=n_blocks, dropout_p=0.0, training=True), plain, atol=0, rtol=0)


@pytest.mark.parametrize("n_blocks,r", [(None, 3), (3, 3), (5, 1)], ids=["lora", "block3", "block5"])
def test_dropout_in_training_acts_on_the_low_rank_branch_only(n_blocks, r):
    t = make(n_blocks, r)
    x = torch.randn(8, 5, D_IN)
    torch.manual_seed(123)
    out = call(x, **t, n_blocks=n_blocks, dropout_p=0.5, training=True)
    torch.manual_seed(123)
    x_dropped = F.dropout(x, 0.5, True)  # the same mask, drawn the same way
    assert (x_dropped == 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    # base path sees the clean x, the low-rank path the dropped (and 1/(1-p) rescaled) x
    close(out, reference(x, **t, n_blocks=n_blocks, x_lora=x_dropped))
    assert (out - call(x, **t, n_blocks=n_blocks)).abs().max() > 1e-2, "dropout must change the training output"
    # with a zero delta, dropout cannot touch the base output at all
    zero_b = torch.zeros_like(t["lora_b"])
    base = call(x, t["weight"], t["bias"], t["lora_a"], zero_b, n_blocks, dropout_p=0.5, training=True)
    torch.testing.assert_close(base, F.linear(x, t["weight"], t["bias"]), atol=1e-6, rtol=1e-6)
    # delta-only call: same mask reproduces the delta
    torch.manual_seed(7)
    delta = call(x, None, None, t["lora_a"], t["lora_b"], n_blocks, dropout_p=0.5, training=True)
    torch.manual_seed(7)
    close(delta, reference(x, None, None, t["lora_a"], t["lora_b"], n_blocks, x_lora=F.dropout(x, 0.5, True)))


def test_lora_linear_shape_mismatch_names_the_expected_shapes():
    t = make(None, 3)
    x = torch.randn(4, D_IN)
    with pytest.raises(ValueError, match=rf"expected \(r, {D_IN}\)") as err:
        kernels.lora_linear(x, t["weight"], t["bias"], torch.randn(3, D_IN - 1), t["lora_b"], SCALE)
    assert f"(3, {D_IN - 1})" in str(err.value) and f"(..., {D_IN})" in str(err.value)
    with pytest.raises(ValueError, match=rf"expected B \(d_out, r\) = \({D_OUT}, 3\)"):
        kernels.lora_linear(x, t["weight"], t["bias"], t["lora_a"], torch.randn(D_OUT, 4), SCALE)


def test_block_lora_linear_shape_mismatch_names_the_expected_shapes():
    t = make(3, 2)
    x = torch.randn(4, D_IN)
    # A_s of the wrong width for 3 blocks of 30
    with pytest.raises(ValueError, match=r"A_s \(r, 10\)") as err:
        kernels.block_lora_linear(x, t["weight"], t["bias"], torch.randn(2, 9), t["lora_b"], 3, SCALE)
    assert "(2, 9)" in str(err.value)
    # n_blocks that does not divide d_in
    with pytest.raises(ValueError, match=r"4 blocks"):
        kernels.block_lora_linear(x, t["weight"], t["bias"], torch.randn(2, 7), t["lora_b"], 4, SCALE)


def test_block_lora_linear_rank_mismatch_is_a_value_error():
    """B (d_out, r') with r' != r of A_s: like lora_linear, a ValueError naming the shapes (not a matmul error)."""
    t = make(3, 2)
    x = torch.randn(4, D_IN)
    with pytest.raises(ValueError, match=r"\(2, 10\)"):
        kernels.block_lora_linear(x, t["weight"], t["bias"], t["lora_a"], torch.randn(D_OUT, 3), 3, SCALE)


@pytest.mark.parametrize("n_blocks,r", [(None, 3), (3, 3)], ids=["lora", "block3"])
def test_lora_b_rows_must_match_the_weight(n_blocks, r):
    """B with d_out rows other than W's must raise, not broadcast a (…, 1) delta over every output."""
    t = make(n_blocks, r)
    x = torch.randn(4, D_IN)
    with pytest.raises(ValueError, match=r"d_out"):
        call(x, t["weight"], t["bias"], t["lora_a"], torch.randn(1, r), n_blocks)


def test_set_backend():
    with pytest.raises(ValueError, match="nope"):
        kernels.set_backend("nope")
    kernels.set_backend("eager")
    assert kernels.get_backend() == "eager"
    t = make(3, 3)
    x = torch.randn(4, D_IN)
    close(call(x, **t, n_blocks=3), reference(x, **t, n_blocks=3))
    kernels.set_backend("auto")
    assert kernels.get_backend() == "auto"
