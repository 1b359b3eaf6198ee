"""visadapt.kernels against dense float64 references: y = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ, and the routed delta.

For Block-LoRA the reference uses the tiled down-projection A = [A_s | … | A_s] = a_shared.repeat(1, n).

Which tests run where:
- Plain CPU run (CI, no GPU): every test below runs on the eager backend (the custom ops' eager formulas, the
  references, torch.compile through the ops, opcheck), and ``test_triton_kernels_under_the_interpreter`` re-runs
  this file's ``test_triton_*`` tests in a subprocess with TRITON_INTERPRET=1 and VISADAPT_KERNELS=triton, i.e.
  the real Triton kernels interpreted on CPU, in fp32 and fp16 only: the interpreter computes bf16 ``tl.dot``
  on the raw bit patterns (triton issue 11584), so bf16 results there are meaningless. bf16 is covered on CPU only
  by ``test_triton_kernels_compile_for_h100_without_a_gpu``, which lowers the kernels to sm_90 binaries (no run).
- Machine with CUDA: the ``device="cuda"`` cases and the ``test_triton_*`` tests run on the GPU (Triton path by
  default), including bf16; the interpreter subprocess is then not needed and skips.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from interpreted import require_interpreted_run

from visadapt import kernels
from visadapt.kernels import backend as kernel_backend
from visadapt.kernels.routed import routing_plan

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


def call(x, weight, bias, lora_a, lora_b, n_blocks, scale=SCALE, dropout_p=0.0, training=False, dropout_groups=None):
    if n_blocks is None:
        return kernels.lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=dropout_p, training=training,
                                   dropout_groups=dropout_groups)
    return kernels.block_lora_linear(x, weight, bias, lora_a, lora_b, n_blocks, scale, dropout_p, training,
                                     dropout_groups)


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


@pytest.mark.parametrize("n_blocks", [None, 3], ids=["lora", "block3"])
def test_dropout_groups_draw_one_mask_each_in_order(n_blocks):
    """Stacked q, k, v pairs (A's row groups) each see their own mask, as three separate layers under one seed."""
    r = 2
    t = make(n_blocks, 3 * r)
    x = torch.randn(8, 5, D_IN)
    torch.manual_seed(123)
    out = call(x, **t, n_blocks=n_blocks, dropout_p=0.5, training=True, dropout_groups=[r, r, r])
    torch.manual_seed(123)
    expected = reference(x, t["weight"], t["bias"], t["lora_a"], torch.zeros_like(t["lora_b"]), n_blocks)
    for rows in (slice(0, r), slice(r, 2 * r), slice(2 * r, 3 * r)):  # masks drawn in group order
        x_dropped = F.dropout(x, 0.5, True)
        expected += reference(x, None, None, t["lora_a"][rows], t["lora_b"][:, rows], n_blocks, x_lora=x_dropped)
    close(out, expected)
    torch.manual_seed(123)
    shared = call(x, **t, n_blocks=n_blocks, dropout_p=0.5, training=True)  # one mask for all of A
    assert (out - shared).abs().max() > 1e-2
    with pytest.raises(ValueError, match="summing to its 6 rows"):
        call(x, **t, n_blocks=n_blocks, dropout_p=0.5, training=True, dropout_groups=[2, 2])


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


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("VISADAPT_KERNELS", "eager")
    importlib.reload(kernel_backend)
    assert kernels.get_backend() == "eager"
    monkeypatch.setenv("VISADAPT_KERNELS", "fast")
    with pytest.raises(ValueError, match="fast"):
        importlib.reload(kernel_backend)
    monkeypatch.setenv("VISADAPT_KERNELS", "auto")
    importlib.reload(kernel_backend)
    assert kernels.get_backend() == "auto"


def _no_triton(monkeypatch):
    """Make any use of the Triton kernels fail loudly."""
    def refuse():
        raise AssertionError("the Triton kernels were called")
    monkeypatch.setattr("visadapt.kernels.ops._kernels", refuse)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreted CPU dispatch")
def test_cpu_tensors_take_the_eager_path(monkeypatch):
    _no_triton(monkeypatch)
    for name in ("auto", "eager"):
        kernels.set_backend(name)
        t = make(None, 3)
        x = torch.randn(4, D_IN, requires_grad=True)
        kernels.lora_linear(x, **t, scale=SCALE).sum().backward()
        assert x.grad is not None
    if kernel_backend.triton_available():  # forced Triton on CPU needs the interpreter: a clear error, not a crash
        kernels.set_backend("triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.lora_linear(torch.randn(4, D_IN), **make(None, 3), scale=SCALE)


def test_eager_ops_match_the_references():
    """The custom ops' eager formulas against the plain-autograd references, with W and bias trainable too."""
    kernels.set_backend("eager")
    for n_blocks, r in [(None, 3), (5, 1)]:
        t = make(n_blocks, r)
        leaves = {"x": torch.randn(3, 4, D_IN), **{k: t[k] for k in ("weight", "bias", "lora_a", "lora_b")}}
        ours = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        refs = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        out = call(**ours, n_blocks=n_blocks)
        if n_blocks is None:
            expected = kernels.lora_linear_reference(**refs, scale=SCALE)
        else:
            expected = kernels.block_lora_linear_reference(refs["x"], refs["weight"], refs["bias"], refs["lora_a"],
                                                           refs["lora_b"], n_blocks, SCALE)
        close(out, expected)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        for k in leaves:
            close(ours[k].grad, refs[k].grad, atol=1e-5, rtol=1e-5)


# --- routed_lora -------------------------------------------------------------------------------------------------
N_ADAPTERS, R_ROUTED = 3, 4
SCALES = [0.5, 1.0, 2.0]


def make_routed(d_in=D_IN, d_out=D_OUT, r=R_ROUTED, n_adapters=N_ADAPTERS, device="cpu", gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    return (torch.randn(n_adapters, r, d_in, generator=gen).to(device),
            torch.randn(n_adapters, d_out, r, generator=gen).to(device) / r ** 0.5)


def routed_reference(x, lora_a, lora_b, scales, index, weights=None):
    """Dense float64 Σ_j w_ij s_l (x_i A_lᵀ) B_lᵀ over the slots j of each token, l = index_ij (-1 skipped)."""
    if index.dim() == x.dim() - 1:
        index = index.unsqueeze(-1)
    w = torch.ones(index.shape, dtype=torch.float64) if weights is None else weights.double().reshape(index.shape)
    s = torch.as_tensor(scales, dtype=torch.float64)
    on = (index >= 0).double()
    safe = index.clamp_min(0)
    hidden = torch.einsum("...d,...jrd->...jr", x.double(), lora_a.double()[safe])
    delta = torch.einsum("...jr,...jor->...jo", hidden, lora_b.double()[safe])
    return (delta * (w * s[safe] * on).unsqueeze(-1)).sum(-2)


def routed_cases(lead, gen_seed=1):
    """(name, index, weights) covering -1, one adapter for all, an unused adapter, k = 1 both ways, k = 2."""
    gen = torch.Generator().manual_seed(gen_seed)
    mixed = torch.randint(-1, N_ADAPTERS, lead, generator=gen)
    two = torch.randint(-1, N_ADAPTERS, (*lead, 2), generator=gen)
    return [
        ("k1-mixed", mixed, None),
        ("k1-as-(...,1)", mixed.unsqueeze(-1), None),
        ("all-on-one", torch.full(lead, 2), None),
        ("one-unused", torch.where(mixed == 1, 0, mixed), torch.rand(lead, generator=gen)),
        ("k2-weighted", two, torch.rand(*lead, 2, generator=gen)),
        ("none", torch.full(lead, -1), None),
    ]


def check_routed(x, lora_a, lora_b, index, weights, fwd_tol, grad_tol):
    """Forward and gradients (x, A, B) of kernels.routed_lora against routed_reference."""
    leaves = [x, lora_a, lora_b]
    ours = [t.detach().clone().requires_grad_(True) for t in leaves]
    refs = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    out = kernels.routed_lora(*ours, SCALES, index, weights)
    assert out.shape == (*x.shape[:-1], lora_b.shape[1]) and out.dtype == x.dtype
    idx_cpu, w_cpu = index.cpu(), None if weights is None else weights.cpu()
    expected = routed_reference(*refs, SCALES, idx_cpu, w_cpu)
    tol = dict(atol=fwd_tol * max(expected.abs().max().item(), 1.0), rtol=fwd_tol)
    close(out.cpu(), expected, **tol)
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad.to(out))
    expected.backward(grad)
    if (idx_cpu < 0).all():
        assert all(o.grad is None or o.grad.abs().max() == 0 for o in ours)
        return
    for name, o, r in zip(("x", "A", "B"), ours, refs):
        assert o.grad.dtype == o.dtype, name
        close(o.grad.cpu(), r.grad, atol=grad_tol * max(r.grad.abs().max().item(), 1.0), rtol=grad_tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(9,), (2, 5)], ids=["2d", "3d"])
def test_routed_lora_matches_dense_reference(lead, device):
    lora_a, lora_b = make_routed(device=device)
    x = torch.randn(*lead, D_IN, device=device)
    for _name, index, weights in routed_cases(lead):
        index = index.to(device)
        weights = None if weights is None else weights.to(device)
        check_routed(x, lora_a, lora_b, index, weights, 1e-5, 1e-5)


def test_routed_lora_reference_matches_the_op():
    lora_a, lora_b = make_routed()
    x = torch.randn(2, 5, D_IN)
    for _, index, weights in routed_cases((2, 5)):
        close(kernels.routed_lora(x, lora_a, lora_b, SCALES, index, weights),
              kernels.routed_lora_reference(x, lora_a, lora_b, SCALES, index, weights))


def test_routed_lora_semantics():
    """Per-token weights and -1 behave as documented: delta of a token = Σ_j w_j s_l (x A_lᵀ) B_lᵀ."""
    lora_a, lora_b = make_routed()
    x = torch.randn(4, D_IN)
    single = [kernels.routed_lora(x, lora_a, lora_b, SCALES, torch.full((4,), adapter)) for adapter in range(3)]
    close(single[1], 1.0 * (x @ lora_a[1].T) @ lora_b[1].T)
    index = torch.tensor([[0, 1], [1, -1], [-1, -1], [2, 0]])
    weights = torch.tensor([[0.5, 0.5], [1.0, 7.0], [3.0, 3.0], [0.25, 2.0]])
    out = kernels.routed_lora(x, lora_a, lora_b, SCALES, index, weights)
    close(out[0], 0.5 * single[0][0] + 0.5 * single[1][0])
    close(out[1], single[1][1])  # the -1 slot's weight is ignored
    assert out[2].abs().max() == 0
    close(out[3], 0.25 * single[2][3] + 2.0 * single[0][3])


def test_routed_lora_argument_errors():
    lora_a, lora_b = make_routed()
    x = torch.randn(4, D_IN)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        kernels.routed_lora(x, lora_a, lora_b, SCALES, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        kernels.routed_lora(x, lora_a, lora_b, SCALES, torch.tensor([0, -2, 1, 0]))
    with pytest.raises(ValueError, match="integer"):
        kernels.routed_lora(x, lora_a, lora_b, SCALES, torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected \(4,\) or \(4, 'k'\)"):
        kernels.routed_lora(x, lora_a, lora_b, SCALES, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"expected \(L, r, {D_IN}\)"):
        kernels.routed_lora(x, lora_a[..., 1:], lora_b, SCALES, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="lora_b"):
        kernels.routed_lora(x, lora_a, lora_b[..., 1:], SCALES, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="2 scales for 3 adapters"):
        kernels.routed_lora(x, lora_a, lora_b, SCALES[:2], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="weights"):
        kernels.routed_lora(x, lora_a, lora_b, SCALES, torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 3))


# --- torch.compile and the custom-op contract --------------------------------------------------------------------


def test_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) shapes and autograd registration agree with the real ops."""
    kernels.set_backend("eager")
    t = make(3, 3)
    x = torch.randn(6, D_IN, requires_grad=True)
    a, b = t["lora_a"].requires_grad_(True), t["lora_b"].requires_grad_(True)
    torch.library.opcheck(torch.ops.visadapt.lora_fwd.default, (x, t["weight"], t["bias"], a, b, 3, SCALE))
    la, lb = (p.requires_grad_(True) for p in make_routed())
    index = torch.randint(-1, N_ADAPTERS, (6, 2))
    plan = routing_plan(index, torch.rand(3), torch.rand(6, 2), N_ADAPTERS)
    torch.library.opcheck(torch.ops.visadapt.routed_fwd.default, (x, la, lb, index, list(plan)))


def test_torch_compile_traces_the_ops_fullgraph():
    """fullgraph=True fails on any graph break, so this proves the ops (and their backward) trace as nodes."""
    torch._dynamo.reset()
    t3, t1 = make(3, 3), make(None, 2)
    la, lb = make_routed()

    def step(x, a3, b3, a1, b1, la, lb, index):
        y = kernels.block_lora_linear(x, t3["weight"], t3["bias"], a3, b3, 3, SCALE)
        y = y + kernels.lora_linear(x, None, None, a1, b1, 0.5)
        return y + kernels.routed_lora(x, la, lb, SCALES, index)

    args = [torch.randn(2, 5, D_IN), t3["lora_a"], t3["lora_b"], t1["lora_a"], t1["lora_b"], la, lb]
    index = torch.randint(-1, N_ADAPTERS, (2, 5))
    eager_args = [a.clone().requires_grad_(True) for a in args]
    comp_args = [a.clone().requires_grad_(True) for a in args]
    expected = step(*eager_args, index)
    # aot_eager: dynamo + AOTAutograd (forward and backward graphs), without inductor's slow C++ build on CPU
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*comp_args, index)
    close(got, expected, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    for e, c in zip(eager_args, comp_args):
        close(c.grad, e.grad, atol=1e-6, rtol=1e-6)


# --- Triton kernels (CUDA, or CPU under the interpreter subprocess) ----------------------------------------------
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_only = pytest.mark.skipif(
    not kernel_backend.triton_available() or not (torch.cuda.is_available() or INTERPRETED),
    reason="needs CUDA, or the TRITON_INTERPRET=1 subprocess (test_triton_kernels_under_the_interpreter)")
# bf16 only on a GPU: under the interpreter, bf16 tl.dot multiplies raw bit patterns (triton issue 11584)
TRITON_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                 pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
                     not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in Triton's interpreter"))]
# relative to the largest reference value (fp32 accumulation everywhere; 16-bit rounding of inputs and dots)
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels and count their launches, so a silent eager fallback cannot pass."""
    kernels.set_backend("triton")
    from visadapt.kernels import triton_kernels

    launches = []
    for name in ("_shrink_kernel", "_linear_expand_kernel", "_routed_expand_kernel", "_reduce_kernel"):
        kernel = getattr(triton_kernels, name)
        run = kernel.run
        monkeypatch.setattr(kernel, "run", lambda *a, _run=run, _name=name, **k: (launches.append(_name),
                                                                                   _run(*a, **k))[1])
    return launches


def lora_case(n_blocks, r, dtype, lead, d_in, d_out, weight=True, bias=True, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    cols = d_in if n_blocks is None else d_in // n_blocks
    dev = TRITON_DEVICE
    return dict(
        x=torch.randn(*lead, d_in, generator=gen).to(dev, dtype),
        weight=(torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(dev, dtype) if weight else None,
        bias=torch.randn(d_out, generator=gen).to(dev, dtype) if bias else None,
        lora_a=(torch.randn(r, cols, generator=gen) / cols ** 0.5).to(dev),
        lora_b=torch.randn(d_out, r, generator=gen).to(dev),
    )


def check_lora(case, n_blocks, tol):
    """Forward and gradients (x, A, B) against the float64 reference, relative to the reference's magnitude."""
    trainable = ("x", "lora_a", "lora_b")
    ours = {k: (v.clone().requires_grad_(True) if k in trainable else v) for k, v in case.items()}
    refs = {k: (None if v is None else v.detach().double().cpu().requires_grad_(k in trainable))
            for k, v in case.items()}
    out = call(ours["x"], ours["weight"], ours["bias"], ours["lora_a"], ours["lora_b"], n_blocks)
    expected = reference(refs["x"], refs["weight"], refs["bias"], refs["lora_a"], refs["lora_b"], n_blocks)
    assert out.dtype == case["x"].dtype and out.shape == expected.shape
    close(out.cpu(), expected, atol=tol * expected.abs().max().item(), rtol=tol)
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad.to(out))
    expected.backward(grad)
    for k in trainable:
        assert ours[k].grad.dtype == case[k].dtype, k
        close(ours[k].grad.cpu(), refs[k].grad, atol=tol * refs[k].grad.abs().max().item(), rtol=tol)


@triton_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("n_blocks,r", [(None, 1), (None, 3), (None, 16), (3, 3), (5, 16)],
                         ids=["lora-r1", "lora-r3", "lora-r16", "block3-r3", "block5-r16"])
def test_triton_lora_matches_reference(triton_backend, n_blocks, r, dtype):
    # 37 rows, d_in 45, d_out 29: none a multiple of the tiles (32 interpreted, 64/128 on GPU)
    check_lora(lora_case(n_blocks, r, dtype, (37,), 45, 29), n_blocks, TOL[dtype])
    assert {"_shrink_kernel", "_linear_expand_kernel", "_reduce_kernel"} <= set(triton_backend)


@triton_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("n_blocks,r", [(None, 3), (None, 16), (3, 3)], ids=["lora-r3", "lora-r16", "block3-r3"])
def test_triton_fused_shrink_matches_reference(triton_backend, n_blocks, r, dtype):
    """The experimental fusion (h in the base GEMM's main loop, g in the dx GEMM's): same results, and no
    separate shrink kernel runs. 37 rows, d_in 45, d_out 70: several column tiles recompute h and g."""
    kernel_backend.set_fuse_shrink(True)
    try:
        check_lora(lora_case(n_blocks, r, dtype, (37,), 45, 70), n_blocks, TOL[dtype])
    finally:
        kernel_backend.set_fuse_shrink(False)
    assert "_shrink_kernel" not in triton_backend and "_linear_expand_kernel" in triton_backend


@triton_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_lora_variants(triton_backend, dtype):
    """Several tiles in every direction with r = 64, delta only (W None), no bias, 3-D strided x."""
    tol = TOL[dtype]
    check_lora(lora_case(None, 64, dtype, (70,), 66, 40), None, tol)
    check_lora(lora_case(3, 2, dtype, (2, 9), 33, 17, weight=False, bias=False), 3, tol)
    case = lora_case(None, 3, dtype, (2, 11), 40, 13, bias=False)
    case["x"] = case["x"].transpose(0, 1).contiguous().transpose(0, 1)  # (2, 11, 40) with non-default strides
    assert not case["x"].is_contiguous()
    check_lora(case, None, tol)
    assert len(triton_backend) >= 3 * 5


@triton_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_routed_matches_reference(triton_backend, dtype):
    lead = (3, 23)  # 69 tokens: several row tiles, adapters' segments start mid-tile
    lora_a, lora_b = make_routed(d_in=37, d_out=35, r=5, device=TRITON_DEVICE)
    x = torch.randn(*lead, 37).to(TRITON_DEVICE, dtype)
    for _name, index, weights in routed_cases(lead):
        index = index.to(TRITON_DEVICE)
        weights = None if weights is None else weights.to(TRITON_DEVICE)
        check_routed(x, lora_a, lora_b, index, weights, TOL[dtype], TOL[dtype])
    assert {"_shrink_kernel", "_routed_expand_kernel", "_reduce_kernel"} <= set(triton_backend)


@triton_only
def test_triton_dropout_runs_the_kernels(triton_backend):
    """p > 0 while training runs in the kernels (their masks: tests/test_kernels_dropout.py), not the reference."""
    case = lora_case(None, 3, torch.float32, (8,), 30, 7)
    out = kernels.lora_linear(**case, scale=SCALE, dropout_p=0.5, training=True)
    assert {"_shrink_kernel", "_linear_expand_kernel"} <= set(triton_backend)
    plain = kernels.lora_linear(**case, scale=SCALE)
    assert (out - plain).abs().max() > 1e-3, "dropout must change the training output"


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available() or not kernel_backend.triton_available(),
                    reason="runs only as the parent of the interpreter run, on machines without CUDA")
def test_triton_kernels_under_the_interpreter():
    """Run the test_triton_* tests above in a fresh interpreter-mode process (TRITON_INTERPRET must be set before
    triton.jit runs) and require that they ran and passed."""
    # fp32 + fp16 of each triton test
    require_interpreted_run(__file__, "test_triton_", "triton", min_passed=10, timeout=300)


@pytest.mark.parametrize("n_blocks,r", [(None, 3), (3, 3)], ids=["lora", "block3"])
def test_autocast_casts_the_input_like_f_linear(n_blocks, r):
    """Under autocast the ops see x, W, b in autocast's dtype (as F.linear would) and keep fp32 adapter math."""
    t = make(n_blocks, r)
    x = torch.randn(4, 5, D_IN)
    a, b = t["lora_a"].clone().requires_grad_(True), t["lora_b"].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(x, t["weight"], t["bias"], a, b, n_blocks)
        if n_blocks is None:
            routed = kernels.routed_lora(x, a[None], b[None], [SCALE], torch.zeros(4, 5, dtype=torch.long))
    assert out.dtype == torch.bfloat16
    x16, w16, b16 = (v.to(torch.bfloat16) for v in (x, t["weight"], t["bias"]))
    close(out, reference(x16, w16, b16, t["lora_a"], t["lora_b"], n_blocks), atol=6e-2, rtol=2e-2)
    if n_blocks is None:
        assert routed.dtype == torch.bfloat16
        close(routed, reference(x16, None, None, t["lora_a"], t["lora_b"], None), atol=6e-2, rtol=2e-2)
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and a.grad.abs().max() > 0


def test_block_lora_keeps_the_chunk_sum_not_x():
    """Block-LoRA's memory saving: with W frozen the backward keeps x̃ (N, d_in / n), never x (N, d_in)."""
    t = make(5, 3)
    x = torch.randn(12, D_IN, requires_grad=True)
    a, b = t["lora_a"].requires_grad_(True), t["lora_b"].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(tuple(s.shape)) or s, lambda s: s):
        kernels.block_lora_linear(x, t["weight"], t["bias"], a, b, 5, SCALE)
    assert (12, D_IN // 5) in saved and (12, D_IN) not in saved, saved


@pytest.mark.skipif(INTERPRETED or not kernel_backend.triton_available(), reason="needs triton's compiler")
def test_triton_kernels_compile_for_h100_without_a_gpu():
    """Lower each kernel to an sm_90 (H100) binary with bf16 inputs: the interpreter accepts code that the real
    compiler rejects (types, layouts, shared memory), and bf16 never runs under it. Compiling needs no GPU."""
    compiler = pytest.importorskip("triton.compiler")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from visadapt.kernels import triton_kernels as tk

    def lower(kernel, types, consts):
        while not isinstance(kernel, JITFunction):  # unwrap triton.autotune
            kernel = kernel.fn
        names = kernel.arg_names
        consts = {**{k: v for k, v in dict(DROPOUT=False, NG=1).items() if k in names}, **consts}  # their defaults
        signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        source = compiler.ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        assert binary.asm.get("cubin"), kernel.__name__

    tables = dict(TOKENS="*i32", PAIRS="*i32", TILE_ADAPTER="*i32", TILE_START="*i32", TILE_END="*i32")
    bf16 = dict(DOT=tl.bfloat16, PREC=None)
    rank_side = dict(DOT=tl.float32, PREC="tf32")  # the fp32 h / g operand of 16-bit activations, as launched
    lower(tk._shrink_kernel, dict(X="*bf16", A="*fp32", H="*fp32", PAIR_SCALE="*fp32", scale="fp32", **tables),
          dict(ROUTED=True, BM=64, BK=64, BR=16, **bf16))
    lower(tk._linear_expand_kernel, dict(X="*bf16", W="*bf16", BIAS="*bf16", H="*fp32", E="*fp32", Y="*bf16"),
          dict(HAS_W=True, HAS_BIAS=True, FUSE_SHRINK=False, SDOT=tl.bfloat16, PREC_BASE=None, BM=128, BN=128,
               BK=64, BR=16, GROUP_M=8, **rank_side))
    lower(tk._linear_expand_kernel, dict(X="*bf16", W="*bf16", BIAS="*bf16", H="*fp32", E="*fp32", Y="*bf16",
                                         S="*fp32", scale="fp32"),
          dict(HAS_W=True, HAS_BIAS=True, FUSE_SHRINK=True, SDOT=tl.bfloat16, PREC_BASE=None, BM=128, BN=128,
               BK=64, BR=16, GROUP_M=8, **rank_side))
    lower(tk._routed_expand_kernel, dict(H="*fp32", E="*fp32", Y="*fp32", **tables),
          dict(ATOMIC=True, BM=64, BN=128, BR=16, **rank_side))
    for routed, atomic in [(False, True), (False, False), (True, False)]:  # atomic=False: deterministic mode
        lower(tk._reduce_kernel, dict(U="*bf16", V="*fp32", O="*fp32", **tables),
              dict(ROUTED=routed, ATOMIC=atomic, TILE=1024, BM=32, BP=128, BQ=16, **rank_side))
    # fused dropout: three groups (q, k, v), int64 seed read from the device, fp32 probabilities
    drop = dict(SEED="*i64", offset="i64", drop_p="fp32", inv_keep="fp32")
    lower(tk._shrink_kernel, dict(X="*bf16", A="*fp32", H="*fp32", PAIR_SCALE="*fp32", scale="fp32", **drop,
                                  **tables), dict(ROUTED=False, BM=64, BK=64, BR=16, DROPOUT=True, NG=3, **bf16))
    lower(tk._linear_expand_kernel, dict(X="*bf16", W="*bf16", BIAS="*bf16", H="*fp32", E="*fp32", Y="*bf16",
                                         **drop),
          dict(HAS_W=True, HAS_BIAS=False, FUSE_SHRINK=False, SDOT=tl.bfloat16, PREC_BASE=None, BM=128, BN=128,
               BK=64, BR=16, GROUP_M=8, DROPOUT=True, NG=3, **rank_side))
    for atomic in (True, False):
        lower(tk._reduce_kernel, dict(U="*bf16", V="*fp32", O="*fp32", **drop, **tables),
              dict(ROUTED=False, ATOMIC=atomic, TILE=1024, BM=32, BP=128, BQ=16, DROPOUT=True, NG=3, **rank_side))
    lower(tk._dropout_mask_kernel, dict(O="*i8", **drop), dict(NG=3, BM=32, BK=32))
