"""The "auto" backend's one-time self-check of the Triton kernels (``visadapt.kernels.selfcheck``).

Which tests run where:
- Plain CPU run: "auto" sends CPU tensors to eager, so it must never run a check (``test_auto_never_checks_cpu``);
  ``test_selfcheck_under_the_interpreter`` then re-runs this file in a subprocess with TRITON_INTERPRET=1 and
  backend.py's test hook VISADAPT_KERNELS_AUTO_INTERPRET=1 (both read at import), under which "auto" treats CPU
  tensors as it treats CUDA ones: self-check first, then the real Triton kernels, interpreted.
- Machine with CUDA: the other tests run directly on the GPU, and the subprocess is not needed.

Failures are made by patching the launchers of ``triton_kernels`` (``lora_forward``, ``routed_forward``): the
custom ops and the self-check both look them up at call time.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from visadapt import kernels
from visadapt.kernels import backend as kernel_backend
from visadapt.kernels import selfcheck

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
AUTO_INTERPRETS = INTERPRETED and os.environ.get("VISADAPT_KERNELS_AUTO_INTERPRET") == "1"
DEVICE = torch.empty(0, device="cuda" if torch.cuda.is_available() else "cpu").device  # with its index, as x's
auto_runs_triton = pytest.mark.skipif(
    not kernel_backend.triton_available() or not (torch.cuda.is_available() or AUTO_INTERPRETS),
    reason="needs CUDA, or the interpreter subprocess (test_selfcheck_under_the_interpreter)")
OPS = ["lora_linear", "block_lora_linear", "routed_lora"]
FORWARD = {"lora_linear": "lora_forward", "block_lora_linear": "lora_forward", "routed_lora": "routed_forward"}
BACKWARD = {"lora_linear": "lora_backward", "block_lora_linear": "lora_backward", "routed_lora": "routed_backward"}


@pytest.fixture(autouse=True)
def _fresh_checks():
    """Every test starts on "auto" with no check done, and leaves it so."""
    before = kernels.get_backend()
    kernels.set_backend("auto")
    selfcheck.reset()
    yield
    selfcheck.reset()
    kernels.set_backend(before)
    kernels.set_deterministic(False)


def run(op: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(output, dx, dA, dB) of one call of the public op, with gradients, on fixed inputs (N = 40 tokens)."""
    gen = torch.Generator().manual_seed(1)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_(grad)

    x = randn(2, 20, 48, dtype=dtype, grad=True)
    if op == "routed_lora":
        lora_a, lora_b = randn(3, 4, 48, grad=True), randn(3, 24, 4, grad=True)
        index = torch.randint(-1, 3, (2, 20), generator=gen).to(DEVICE)
        out = kernels.routed_lora(x, lora_a, lora_b, [0.5, 1.0, 2.0], index)
    else:
        weight, bias = randn(24, 48, dtype=dtype) / 7, randn(24, dtype=dtype)
        lora_a, lora_b = randn(4, 48 if op == "lora_linear" else 16, grad=True), randn(24, 4, grad=True)
        if op == "lora_linear":
            out = kernels.lora_linear(x, weight, bias, lora_a, lora_b, 0.75)
        else:
            out = kernels.block_lora_linear(x, weight, bias, lora_a, lora_b, 3, 0.75)
    out.backward(torch.randn(out.shape, generator=gen).to(out))
    return out.detach(), x.grad, lora_a.grad, lora_b.grad


def eager(op: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    kernels.set_backend("eager")
    try:
        return run(op, dtype)
    finally:
        kernels.set_backend("auto")


def spy(monkeypatch, name: str, change=None) -> list:
    """Count the calls of ``triton_kernels.<name>``; ``change(real, *args)`` replaces the call when given."""
    from visadapt.kernels import triton_kernels

    calls, real = [], getattr(triton_kernels, name)

    def launcher(*args):
        calls.append(name)
        return real(*args) if change is None else change(real, *args)

    monkeypatch.setattr(triton_kernels, name, launcher)
    return calls


def self_check_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, kernels.KernelSelfCheckWarning)]


def assert_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0, msg=name)


def raise_error(real, *args):
    raise RuntimeError("boom: simulated launch failure")


def off_by_one(real, *args):
    out, *rest = real(*args)
    return (out + 1, *rest)


def double_d_a(real, *args):
    dx, d_a, d_b = real(*args)
    return dx, d_a * 2, d_b


# (which launcher fails, how, what the warning must say)
FAILURES = {"forward-raises": (FORWARD, raise_error, "boom"),
            "forward-wrong-y": (FORWARD, off_by_one, "y differs from the reference"),
            "backward-wrong-dA": (BACKWARD, double_d_a, "dA differs from the reference")}


@auto_runs_triton
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("op", OPS)
def test_failing_kernel_falls_back_to_eager_with_one_warning(monkeypatch, op, failure):
    """A launcher that raises or returns a wrong y or dA: one warning over three calls (forward and backward),
    the launcher called once (by the check) and never again, and every result bit-identical to eager."""
    launchers, change, says = FAILURES[failure]
    want = eager(op)
    calls = spy(monkeypatch, launchers[op], change)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # so that "once" is the self-check's doing, not Python's filter
        results = [run(op) for _ in range(3)]
    messages = self_check_warnings(record)
    assert len(messages) == 1, messages
    assert op in messages[0] and says in messages[0] and "VISADAPT_KERNELS=eager" in messages[0], messages[0]
    assert calls == [launchers[op]]
    assert selfcheck.results() == {(op, DEVICE, torch.float32, torch.float32): False}
    for got in results:
        assert_equal(got, want)


@auto_runs_triton
@pytest.mark.parametrize("op,dtype", [(op, torch.float32) for op in OPS] + [("lora_linear", torch.float16)],
                         ids=[*OPS, "lora_linear-fp16"])
def test_passing_kernels_route_to_triton(monkeypatch, op, dtype):
    """Correct kernels pass without a warning; then every call runs them (the check's call, then one forward and
    one backward per call), with results bit-identical to the forced "triton" backend's."""
    kernels.set_deterministic(DEVICE.type == "cuda")  # bit-identical runs need no atomics on a GPU
    kernels.set_backend("triton")
    want = run(op, dtype)
    kernels.set_backend("auto")
    forward, backward = spy(monkeypatch, FORWARD[op]), spy(monkeypatch, BACKWARD[op])
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.KernelSelfCheckWarning)
        results = [run(op, dtype) for _ in range(2)]
    # the check's cases (with and without W, and with dropout; k = 1 and k = 2), then the two calls
    checks = 2 if op == "routed_lora" else 3
    assert len(forward) == checks + 2 and len(backward) == checks + 2, (forward, backward)
    assert list(selfcheck.results().values()) == [True]
    for got in results:
        assert_equal(got, want)


def ignore_dropout(real, *args):
    return real(*args[:7])  # the launcher without its dropout argument: y unmasked


@auto_runs_triton
@pytest.mark.parametrize("op", ["lora_linear", "block_lora_linear"])
def test_dropout_kernels_that_ignore_the_mask_fail_the_check(monkeypatch, op):
    """The check's dropout case catches a forward that does not drop; then training calls with dropout take the
    eager reference (F.dropout's masks from torch's RNG), as every call of that op does."""
    calls = spy(monkeypatch, "lora_forward", ignore_dropout)
    x = torch.randn(6, 48, device=DEVICE)
    a, b = torch.randn(4, 48 if op == "lora_linear" else 16, device=DEVICE), torch.randn(8, 4, device=DEVICE)

    def train_call():
        if op == "lora_linear":
            return kernels.lora_linear(x, None, None, a, b, 1.0, 0.5, True)
        return kernels.block_lora_linear(x, None, None, a, b, 3, 1.0, 0.5, True)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(4)
        got = train_call()
    messages = self_check_warnings(record)
    assert len(messages) == 1, messages
    if op == "lora_linear":  # (Block-LoRA's backward then fails on the chunk sum it gets instead of x)
        assert "y differs" in messages[0] and "(dropout 0.25 in two groups)" in messages[0], messages
    assert len(calls) == 3  # the check's three cases; the call itself ran eager
    kernels.set_backend("eager")
    torch.manual_seed(4)
    torch.testing.assert_close(got, train_call(), atol=0, rtol=0)


@auto_runs_triton
def test_forced_triton_raises_without_check_or_fallback(monkeypatch):
    """VISADAPT_KERNELS=triton keeps meaning "force": the kernel's error propagates, nothing warns or is cached."""
    spy(monkeypatch, "lora_forward", raise_error)
    kernels.set_backend("triton")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="boom"):
            run("lora_linear")
    assert self_check_warnings(record) == [] and selfcheck.results() == {}


@auto_runs_triton
def test_check_ignores_the_callers_state():
    """First use under inference_mode (no autograd) and autocast: the check still differentiates its reference,
    in its own dtypes, and passes; the global RNG is not advanced."""
    rng = torch.get_rng_state()
    with torch.inference_mode(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert selfcheck.passed("lora_linear", DEVICE, torch.float32, torch.float32)
        assert selfcheck.passed("routed_lora", DEVICE, torch.float32, torch.float32)
    assert torch.equal(rng, torch.get_rng_state())
    with torch.no_grad():  # a first use through the op, without gradients
        kernels.block_lora_linear(torch.randn(5, 48, device=DEVICE), None, None, torch.randn(2, 16, device=DEVICE),
                                  torch.randn(8, 2, device=DEVICE), 3, 1.0)
    assert all(selfcheck.results().values()) and len(selfcheck.results()) == 3


@pytest.mark.skipif(not AUTO_INTERPRETS, reason="a real failure of Triton's CPU interpreter")
def test_interpreter_bf16_dots_are_caught():
    """The interpreter computes bf16 tl.dot on raw bit patterns (triton issue 11584): a real wrong result, which
    the check must catch, leaving bf16 on eager while fp32 keeps Triton."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = run("lora_linear", torch.bfloat16)
    messages = self_check_warnings(record)
    assert len(messages) == 1 and "torch.bfloat16" in messages[0] and "differs" in messages[0], messages
    assert_equal(got, eager("lora_linear", torch.bfloat16))
    assert selfcheck.passed("lora_linear", DEVICE, torch.float32, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available() or AUTO_INTERPRETS, reason="checks the plain CPU dispatch")
def test_auto_never_checks_cpu(monkeypatch):
    """Without the test hook, "auto" keeps CPU tensors on eager: no check, no Triton."""
    monkeypatch.setattr(selfcheck, "_run", lambda key: pytest.fail(f"self-check ran for {key}"))
    for op in OPS:
        run(op)
    assert selfcheck.results() == {}


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available() or not kernel_backend.triton_available(),
                    reason="runs only as the parent of the interpreter run, on machines without CUDA")
def test_selfcheck_under_the_interpreter():
    """Re-run this file with TRITON_INTERPRET=1 and the "auto"-on-CPU test hook; require that it all passed."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "VISADAPT_KERNELS": "auto", "VISADAPT_KERNELS_AUTO_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                          capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parent.parent)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, tail
    # 9 failing, 4 passing, 2 dropout, forced, state, bf16
    assert int(summary.split(" passed")[0].split()[-1]) >= 18, tail
