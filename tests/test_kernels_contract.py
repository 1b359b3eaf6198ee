"""The contract of the visadapt.kernels custom ops on every backend: fakes, gradients against peft, fp16 range,
determinism, and no host synchronisation in the routed op.

Each test takes a ``backend``: "eager" always; "triton" where the Triton kernels can run, i.e. on CUDA or on CPU
under Triton's interpreter. A plain CPU run therefore checks the eager backend, and
``test_contract_under_the_interpreter`` re-runs this file in a subprocess with ``TRITON_INTERPRET=1`` (it must be
set before ``visadapt.kernels`` is imported) so that every test also runs the real Triton kernels, interpreted.
Shapes stay tiny: the interpreter runs each program of a grid in Python.
"""

import os

import pytest
import torch
import torch.nn as nn
from interpreted import require_interpreted_run

from visadapt import kernels
from visadapt.kernels import backend as kernel_backend
from visadapt.kernels.routed import routing_plan

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CAN_RUN_TRITON = kernel_backend.triton_available() and (torch.cuda.is_available() or INTERPRETED)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["eager", pytest.param("triton", marks=pytest.mark.skipif(
    not CAN_RUN_TRITON, reason="needs CUDA, or the TRITON_INTERPRET=1 subprocess of this file"))]
D_IN, D_OUT, SCALE = 30, 7, 0.75


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Force one backend for the test and count the Triton launches, so a silent eager fallback cannot pass."""
    before = kernels.get_backend()
    kernels.set_backend(request.param)
    launches = []
    if request.param == "triton":
        from visadapt.kernels import triton_kernels

        for name in ("_shrink_kernel", "_linear_expand_kernel", "_routed_expand_kernel", "_reduce_kernel"):
            kernel = getattr(triton_kernels, name)
            run = kernel.run
            monkeypatch.setattr(kernel, "run", lambda *a, _run=run, _name=name, **k: (launches.append(_name),
                                                                                       _run(*a, **k))[1])
    yield request.param
    kernels.set_backend(before)
    assert request.param == "eager" or launches, "the Triton backend launched no kernel"


def randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


# --- 1. every op's fake matches its real outputs (shapes, dtypes, strides) ---------------------------------------


def lora_op_cases(gen):
    """(name, lora_fwd args) for LoRA, Block-LoRA, delta only, and a transposed (non-contiguous) A and x."""
    x = randn(6, D_IN, gen=gen)
    w, b = randn(D_OUT, D_IN, gen=gen), randn(D_OUT, gen=gen)
    a_t = randn(D_IN, 3, gen=gen).T  # (3, 30) with strides (1, 3)
    return [
        ("lora", (x, w, b, randn(3, D_IN, gen=gen), randn(D_OUT, 3, gen=gen), 1, SCALE)),
        ("block3", (x, w, b, randn(3, D_IN // 3, gen=gen), randn(D_OUT, 3, gen=gen), 3, SCALE)),
        ("delta-only", (x, None, None, randn(2, D_IN // 5, gen=gen), randn(D_OUT, 2, gen=gen), 5, SCALE)),
        ("strided", (randn(D_IN, 6, gen=gen).T, w, None, a_t, randn(3, D_OUT, gen=gen).T, 1, SCALE)),
    ]


@pytest.fixture(params=["default", "deterministic", "fused-shrink"])
def mode(request):
    """The kernels' switches, each of which takes other code paths (partials, per-slot buffers, fused shrink)."""
    kernels.set_deterministic(request.param == "deterministic")
    kernel_backend.set_fuse_shrink(request.param == "fused-shrink")
    yield request.param
    kernels.set_deterministic(False)
    kernel_backend.set_fuse_shrink(False)


def test_every_op_passes_opcheck(backend, mode):
    """torch.library.opcheck on lora_fwd, lora_bwd, routed_fwd and routed_bwd: schema, fake vs real metadata
    (a fake promising contiguous dA while the kernel returns a transposed view fails here), autograd."""
    gen = torch.Generator().manual_seed(0)
    for name, args in lora_op_cases(gen):
        x, w, _, a, b, n_blocks, scale = args
        leaves = [t.detach().requires_grad_(True) if i in (0, 3, 4) else t for i, t in enumerate(args)]
        torch.library.opcheck(torch.ops.visadapt.lora_fwd.default, tuple(leaves))
        _, h, x_lora = torch.ops.visadapt.lora_fwd(*args)
        x_lora = x if n_blocks == 1 else x_lora
        dy = randn(x.shape[0], b.shape[0], gen=gen)
        for need_x in (True, False):
            bwd = (dy, x_lora, h, w, a, b, n_blocks, scale, need_x)
            torch.library.opcheck(torch.ops.visadapt.lora_bwd.default, bwd)
        dx, d_a, d_b = torch.ops.visadapt.lora_bwd(dy, x_lora, h, w, a, b, n_blocks, scale, True)
        assert d_a.is_contiguous() and d_b.is_contiguous() and dx.is_contiguous(), name
    fwd_args, bwd_args = routed_op_args(gen)
    torch.library.opcheck(torch.ops.visadapt.routed_fwd.default, fwd_args)
    for need_x in (True, False):
        torch.library.opcheck(torch.ops.visadapt.routed_bwd.default, (*bwd_args, need_x))


def routed_op_args(gen):
    """(routed_fwd args with grad-requiring x, A, B; routed_bwd args without need_x), transposed stacks."""
    x = randn(9, D_IN, gen=gen).requires_grad_(True)
    lora_a = randn(3, D_IN, 4, gen=gen).transpose(1, 2).requires_grad_(True)  # (3, 4, 30), non-contiguous
    lora_b = randn(3, D_OUT, 4, gen=gen).requires_grad_(True)
    index = torch.randint(-1, 3, (9, 2), generator=gen).to(DEVICE)
    scales, weights = torch.rand(3, generator=gen).to(DEVICE), torch.rand(9, 2, generator=gen).to(DEVICE)
    plan = list(routing_plan(index, scales, weights, 3))
    _, h = torch.ops.visadapt.routed_fwd(x, lora_a, lora_b, index, plan)
    dy = randn(9, D_OUT, gen=gen)
    return (x, lora_a, lora_b, index, plan), (dy, x.detach(), h.detach(), lora_a.detach(), lora_b.detach(), plan)


# --- 1b. gradients against peft's LoRA ---------------------------------------------------------------------------


def peft_lora(weight, bias, lora_a, lora_b, scale):
    """A peft LoraModel over one nn.Linear with these frozen W, b and this A, B, scale (lora_alpha = s · r)."""
    from peft import LoraConfig, get_peft_model

    r = lora_a.shape[0]
    holder = nn.Sequential()
    holder.add_module("lin", nn.Linear(weight.shape[1], weight.shape[0], device=weight.device))
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=scale * r, target_modules=["lin"],
                                              init_lora_weights=False))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.base_layer.bias.copy_(bias)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    assert layer.scaling["default"] == pytest.approx(scale)
    return model, layer.lora_A["default"].weight, layer.lora_B["default"].weight


@pytest.mark.parametrize("n_blocks", [1, 3], ids=["lora", "block3"])
def test_gradients_match_peft(backend, n_blocks):
    """y, dx, dA, dB of our op against peft's eager LoRA on the same nn.Linear (Block-LoRA: peft's LoRA with the
    tiled A = [A_s | A_s | A_s], whose gradient summed over the three chunks is dA_s). 37 tokens, d_in 45,
    d_out 29, r 5: no size a multiple of the interpreter's 32-row tiles."""
    gen = torch.Generator().manual_seed(1)
    d_in, d_out, r = 45, 29, 5
    x = randn(37, d_in, gen=gen).requires_grad_(True)
    w, bias = randn(d_out, d_in, gen=gen, scale=d_in ** -0.5), randn(d_out, gen=gen)
    a = randn(r, d_in // n_blocks, gen=gen, scale=0.2).requires_grad_(True)
    b = randn(d_out, r, gen=gen).requires_grad_(True)
    model, peft_a, peft_b = peft_lora(w, bias, a.detach().repeat(1, n_blocks), b.detach(), SCALE)
    x_peft = x.detach().clone().requires_grad_(True)
    if n_blocks == 1:
        ours = kernels.lora_linear(x, w, bias, a, b, SCALE)
    else:
        ours = kernels.block_lora_linear(x, w, bias, a, b, n_blocks, SCALE)
    theirs = model(x_peft)
    dy = randn(*ours.shape, gen=gen)
    ours.backward(dy)
    theirs.backward(dy)
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(x.grad, x_peft.grad, **tol)
    torch.testing.assert_close(b.grad, peft_b.grad, **tol)
    torch.testing.assert_close(a.grad, peft_a.grad.unflatten(1, (n_blocks, -1)).sum(1), **tol)
    assert a.grad.abs().max() > 1e-2 and b.grad.abs().max() > 1e-2


def test_fp16_large_hidden_in_routed_lora(backend):
    """routed_lora with fp16 x whose h passes 65504 (k = 2 slots, so the fp32 accumulation path too): finite, and
    equal to the float64 reference."""
    gen = torch.Generator().manual_seed(5)
    x = randn(37, 45, gen=gen, scale=100.0, dtype=torch.float16).requires_grad_(True)
    a = randn(3, 5, 45, gen=gen, scale=100.0).requires_grad_(True)
    b = randn(3, 29, 5, gen=gen, scale=1e-3).requires_grad_(True)
    index = torch.randint(0, 3, (37, 2), generator=gen).to(DEVICE)
    dy = randn(37, 29, gen=gen, dtype=torch.float16)
    y = kernels.routed_lora(x, a, b, [2.0, 1.0, 0.5], index)
    y.backward(dy)
    ref = [t.detach().double().cpu().requires_grad_(True) for t in (x, a, b)]
    assert (ref[0] @ ref[1][0].T).abs().max() > 65504
    expected = kernels.routed_lora_reference(*ref, [2.0, 1.0, 0.5], index.cpu())
    expected.backward(dy.double().cpu())
    for name, got, want in [("y", y, expected), ("dx", x.grad, ref[0].grad), ("dA", a.grad, ref[1].grad),
                            ("dB", b.grad, ref[2].grad)]:
        assert torch.isfinite(got).all(), f"{name} overflowed"
        torch.testing.assert_close(got.double().cpu(), want.detach(), atol=3e-3 * want.abs().max().item(),
                                   rtol=3e-3, msg=name)


# --- 1d. deterministic mode ----------------------------------------------------------------------------------


@pytest.fixture
def count_atomics(monkeypatch):
    """Count the atomic read-modify-writes the interpreted kernels execute ([0] stays 0 off the interpreter)."""
    calls = [0]
    if INTERPRETED:
        from triton.runtime import interpreter

        rmw = interpreter.InterpreterBuilder.create_atomic_rmw

        def counted(self, *args, **kwargs):
            calls[0] += 1
            return rmw(self, *args, **kwargs)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_atomic_rmw", counted)
    return calls


def _step(n_blocks: int, routed: bool):
    """One fwd+bwd with 100 tokens (several reduction tiles), k = 2 slots when routed: (y, dx, dA, dB)."""
    gen = torch.Generator().manual_seed(3)
    x = randn(100, D_IN, gen=gen).requires_grad_(True)
    if routed:
        a, b = randn(3, 4, D_IN, gen=gen).requires_grad_(True), randn(3, D_OUT, 4, gen=gen).requires_grad_(True)
        index = torch.randint(-1, 3, (100, 2), generator=gen).to(DEVICE)
        y = kernels.routed_lora(x, a, b, [0.5, 1.0, 2.0], index, torch.rand(100, 2, generator=gen).to(DEVICE))
    else:
        a = randn(3, D_IN // n_blocks, gen=gen).requires_grad_(True)
        b = randn(D_OUT, 3, gen=gen).requires_grad_(True)
        y = kernels.block_lora_linear(x, randn(D_OUT, D_IN, gen=gen), None, a, b, n_blocks, SCALE)
    y.backward(randn(*y.shape, gen=gen))
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("case", ["lora", "block3", "routed-k2"])
def test_deterministic_mode_repeats_bit_for_bit_without_atomics(backend, count_atomics, case):
    """set_deterministic(True): two runs give bit-identical y, dx, dA, dB, equal (to rounding) to the default
    mode's; under the interpreter, the default mode's reductions do use atomics and the deterministic mode none."""
    n_blocks, routed = {"lora": (1, False), "block3": (3, False), "routed-k2": (1, True)}[case]
    default = _step(n_blocks, routed)
    atomics_by_default = count_atomics[0]
    kernels.set_deterministic(True)
    try:
        first, second = _step(n_blocks, routed), _step(n_blocks, routed)
    finally:
        kernels.set_deterministic(False)
    for name, a, b, c in zip(("y", "dx", "dA", "dB"), first, second, default):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5, msg=name)
    if INTERPRETED and backend == "triton":
        assert atomics_by_default > 0, "the counter must see the default mode's atomics"
        assert count_atomics[0] == atomics_by_default, "deterministic mode ran atomics"


def test_deterministic_switches(monkeypatch):
    """On with set_deterministic, with torch.use_deterministic_algorithms, or with the environment variable."""
    import importlib

    assert not kernels.deterministic()
    kernels.set_deterministic(True)
    assert kernels.deterministic()
    kernels.set_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels.deterministic()
    finally:
        torch.use_deterministic_algorithms(False)
    backend_name = kernels.get_backend()
    monkeypatch.setenv("VISADAPT_KERNELS_DETERMINISTIC", "1")
    importlib.reload(kernel_backend)
    try:
        assert kernels.deterministic()
    finally:
        monkeypatch.delenv("VISADAPT_KERNELS_DETERMINISTIC")
        importlib.reload(kernel_backend)
        kernels.set_backend(backend_name)
    assert not kernels.deterministic()


# --- 2. routed_lora makes no host synchronisation -----------------------------------------------------------------

# aten ops that read a device value back to the host (on CUDA: a synchronisation), directly or to size an output
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
            "aten::masked_select", "aten::bincount", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"}
ON_DEVICE = ("aten::_assert_async", "triton kernel")  # a device-side assert, an (interpreted) launch: no sync on GPU


def host_reads(prof) -> list[str]:
    """Names (with their call chain) of the sync ops the profiler saw outside ON_DEVICE regions."""
    found = []
    for event in prof.events():
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if event.name in SYNC_OPS and not any(name in ON_DEVICE for name in chain):
            found.append(" < ".join(chain))
    return found


@pytest.mark.parametrize("k", [1, 2])
def test_routed_lora_makes_no_host_sync(backend, monkeypatch, k):
    """Forward and backward of routed_lora under the profiler, which sees every aten op, nested ones included:
    none may read a value back to the host (what a sync is on CUDA). The index check runs as it does on a GPU
    (torch._assert_async); interpreted kernel launches are marked, their numpy copies are no GPU cost."""
    from visadapt.kernels import routed

    monkeypatch.setattr(routed, "_asynchronous", lambda index: True)
    if backend == "triton":
        from visadapt.kernels import triton_kernels

        for name in ("_shrink_kernel", "_routed_expand_kernel", "_reduce_kernel"):
            kernel = getattr(triton_kernels, name)
            monkeypatch.setattr(kernel, "run", _marked(kernel.run))
    gen = torch.Generator().manual_seed(4)
    lead = (2, 35)
    x = randn(*lead, D_IN, gen=gen).requires_grad_(True)
    a, b = randn(3, 4, D_IN, gen=gen).requires_grad_(True), randn(3, D_OUT, 4, gen=gen).requires_grad_(True)
    index = torch.randint(-1, 3, (*lead, k), generator=gen).to(DEVICE)
    weights = torch.rand(*lead, k, generator=gen).to(DEVICE)
    scales = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    dy = randn(*lead, D_OUT, gen=gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = kernels.routed_lora(x, a, b, scales, index, weights)
        y.backward(dy)
    assert host_reads(prof) == []
    refs = [t.detach().double().cpu().requires_grad_(True) for t in (x, a, b)]
    expected = kernels.routed_lora_reference(*refs, scales.cpu(), index.cpu(), weights.cpu())
    expected.backward(dy.double().cpu())
    torch.testing.assert_close(y.double().cpu(), expected.detach(), atol=1e-5, rtol=1e-5)
    for got, ref in zip((x, a, b), refs):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, atol=1e-4, rtol=1e-5)


def test_routed_lora_with_no_tokens(backend):
    """An empty batch gives an empty delta and zero gradients (the plan then has no rows to gather)."""
    a, b = torch.randn(3, 4, D_IN, requires_grad=True), torch.randn(3, D_OUT, 4, requires_grad=True)
    x = torch.randn(0, D_IN, device=DEVICE, requires_grad=True)
    y = kernels.routed_lora(x, a.to(DEVICE), b.to(DEVICE), [1.0, 1.0, 1.0], torch.zeros(0, dtype=torch.long,
                                                                                        device=DEVICE))
    assert y.shape == (0, D_OUT)
    y.sum().backward()
    assert a.grad.abs().max() == 0 and b.grad.abs().max() == 0
    if backend == "triton":
        kernels.lora_linear(randn(2, D_IN, gen=torch.Generator()), None, None, torch.randn(2, D_IN),
                            torch.randn(D_OUT, 2), SCALE)  # a launch, for the fixture's Triton check


def _marked(run):
    def launch(*args, **kwargs):
        with torch.profiler.record_function("triton kernel"):
            return run(*args, **kwargs)
    return launch


def test_host_reads_are_seen():
    """The detector itself: .item(), .tolist() and bincount are reported, a device assert is not."""
    t = torch.arange(4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t.sum().item()
        torch.bincount(t)
        torch._assert_async(t.sum() > 0)
    reads = host_reads(prof)
    assert any(r.startswith("aten::_local_scalar_dense") for r in reads) and any("bincount" in r for r in reads)
    assert not any("_assert_async" in r for r in reads)


def test_python_float_scales_are_copied_to_the_device_once():
    """A layer passing the same Python floats every call reuses one device tensor (no copy per call)."""
    from visadapt.kernels.routed import device_scales

    first = device_scales([0.5, 1.0, 2.0], torch.device(DEVICE))
    assert device_scales((0.5, 1.0, 2.0), torch.device(DEVICE)) is first
    assert first.dtype == torch.float32 and first.tolist() == [0.5, 1.0, 2.0]
    assert device_scales([0.5, 1.0, 3.0], torch.device(DEVICE)) is not first


# --- the interpreter run -----------------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available() or not kernel_backend.triton_available(),
                    reason="runs only as the parent of the interpreter run, on machines without CUDA")
def test_contract_under_the_interpreter():
    """Re-run this file with TRITON_INTERPRET=1, so that each test above also runs with backend="triton" (the real
    kernels, interpreted on CPU); require that the triton cases ran and passed."""
    require_interpreted_run(__file__, "triton", "auto", min_passed=MIN_TRITON_CASES, timeout=600,
                            allow_skipped=False)


MIN_TRITON_CASES = 14  # the triton cases above: opcheck 3, peft 2, fp16 3, deterministic 3, sync 2, empty 1


# --- 1c. fp16: no overflow in h or g where the fp32 formulas have none --------------------------------------------


@pytest.mark.parametrize("where", ["h", "g"])
def test_fp16_large_values_do_not_overflow(backend, where):
    """fp16 activations whose h = s·x Aᵀ (forward) or g = s·dy B (backward, dy under a loss scale) pass fp16's
    65504 while y, dx, dA, dB stay in range: every result must be finite and match the float64 formulas."""
    gen = torch.Generator().manual_seed(2)
    d_in, d_out, r, scale = 45, 29, 5, 2.0
    if where == "h":  # |h| ≈ 2 · 100 · 100 · √45 ≈ 1e5, B small so the delta is ≈ 300
        x_scale, a_scale, b_scale, dy_scale = 100.0, 100.0, 1e-3, 1.0
    else:  # |g| ≈ 2 · 1e4 · 4 · √29 ≈ 4e5, A small so g A stays ≈ 1e3
        x_scale, a_scale, b_scale, dy_scale = 1.0, 1e-3, 4.0, 1e4
    x = randn(37, d_in, gen=gen, scale=x_scale, dtype=torch.float16).requires_grad_(True)
    w = randn(d_out, d_in, gen=gen, scale=0.01, dtype=torch.float16)
    a = randn(r, d_in, gen=gen, scale=a_scale).requires_grad_(True)
    b = randn(d_out, r, gen=gen, scale=b_scale).requires_grad_(True)
    dy = randn(37, d_out, gen=gen, scale=dy_scale, dtype=torch.float16)
    y = kernels.lora_linear(x, w, None, a, b, scale)
    y.backward(dy)
    ref = [t.detach().double().cpu().requires_grad_(True) for t in (x, a, b)]
    hidden = scale * ref[0] @ ref[1].T
    assert hidden.abs().max() > 65504 if where == "h" else (scale * dy.double().cpu() @ ref[2]).abs().max() > 65504
    expected = ref[0] @ w.double().cpu().T + hidden @ ref[2].T
    expected.backward(dy.double().cpu())
    for name, got, want in [("y", y, expected), ("dx", x.grad, ref[0].grad), ("dA", a.grad, ref[1].grad),
                            ("dB", b.grad, ref[2].grad)]:
        assert torch.isfinite(got).all(), f"{name} overflowed"
        torch.testing.assert_close(got.double().cpu(), want.detach(), atol=3e-3 * want.abs().max().item(),
                                   rtol=3e-3, msg=name)
