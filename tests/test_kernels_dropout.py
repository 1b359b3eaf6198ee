"""Dropout inside the fused LoRA kernels (visadapt.kernels.dropout): Philox masks drawn from (seed, offset) in the
forward and redrawn in the backward, one per q/k/v group, and training that resumes bit-exactly through them.

Which tests run where:
- Plain CPU run: the eager path (no Triton on CPU tensors) keeps torch's dropout; the references take explicit
  masks; bad arguments are refused. ``test_fused_dropout_under_the_interpreter`` re-runs this file's
  ``test_fused_*`` tests in a subprocess with TRITON_INTERPRET=1 and VISADAPT_KERNELS=triton (the real kernels,
  interpreted on CPU, fp32 and fp16: bf16 ``tl.dot`` is wrong in the interpreter, triton issue 11584).
- Machine with CUDA: the ``test_fused_*`` tests run on the GPU directly.
Shapes are tiny so that the interpreted run takes seconds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from interpreted import require_interpreted_run
from safetensors.torch import load_file
from torch.utils.data import Dataset

from visadapt import kernels
from visadapt.kernels import backend as kernel_backend
from visadapt.kernels.lora import block_lora_linear_reference, lora_linear_reference
from visadapt.run_config import RunConfig, recipe_default
from visadapt.training import Trainer
from visadapt.utils.cli import option

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
fused_only = pytest.mark.skipif(
    not kernel_backend.triton_available() or not (torch.cuda.is_available() or INTERPRETED),
    reason="needs CUDA, or the TRITON_INTERPRET=1 subprocess (test_fused_dropout_under_the_interpreter)")
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# bf16 only on a GPU: under the interpreter, bf16 tl.dot multiplies raw bit patterns (triton issue 11584)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
              not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in Triton's interpreter"))]
SCALE = 0.75
KERNELS = ("_shrink_kernel", "_linear_expand_kernel", "_reduce_kernel")


@pytest.fixture(autouse=True)
def _restore_backend():
    before = kernels.get_backend()
    yield
    kernels.set_backend(before)


def case(n_blocks, r, lead, d_in, d_out, dtype=torch.float32, weight=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cols = d_in // n_blocks
    return dict(
        x=torch.randn(*lead, d_in, generator=gen).to(DEVICE, dtype),
        weight=(torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(DEVICE, dtype) if weight else None,
        bias=torch.randn(d_out, generator=gen).to(DEVICE, dtype) if weight else None,
        lora_a=(torch.randn(r, cols, generator=gen) / cols ** 0.5).to(DEVICE),
        lora_b=torch.randn(d_out, r, generator=gen).to(DEVICE),
    )


def call(t, n_blocks, p, groups=None, rng=None, training=True):
    if n_blocks == 1:
        return kernels.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE, p, training,
                                   groups, dropout_rng=rng)
    return kernels.block_lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], n_blocks, SCALE, p,
                                     training, groups, dropout_rng=rng)


def reference(t, n_blocks, p, groups, mask):
    if n_blocks == 1:
        return lora_linear_reference(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE, p, True, groups,
                                     dropout_mask=mask)
    return block_lora_linear_reference(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], n_blocks, SCALE, p,
                                       True, groups, dropout_mask=mask)


# --- plain CPU: the eager path and the arguments ------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETED, reason="the eager path of CPU tensors")
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_cpu_eager_path_keeps_torchs_dropout(backend):
    """No Triton on CPU tensors: the masks are F.dropout's from torch's RNG, as before; dropout_rng is unused."""
    kernels.set_backend(backend)
    t = case(1, 3, (6,), 12, 5)
    torch.manual_seed(3)
    out = call(t, 1, 0.5, rng=(123, 0))
    after = torch.get_rng_state()
    torch.manual_seed(3)
    expected = lora_linear_reference(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], SCALE, 0.5, True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert torch.equal(after, torch.get_rng_state()), "the eager path consumed the RNG differently"


@pytest.mark.parametrize("n_blocks,groups", [(1, None), (1, [1, 2]), (3, [2, 1])])
def test_reference_applies_a_given_mask(n_blocks, groups):
    """dropout_mask replaces F.dropout's draw: group g's A rows see x · mask[g] / (1 − p)."""
    t = case(n_blocks, 3, (2, 4), 12, 5)
    n_groups = len(groups) if groups else 1
    mask = torch.rand(n_groups, 2, 4, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    got = reference(t, n_blocks, 0.3, groups, mask)
    a_eff = t["lora_a"].repeat(1, n_blocks)
    rows = list(groups or [3])
    hidden = torch.cat([(t["x"] * m / 0.7) @ a.T for m, a in zip(mask, a_eff.split(rows))], -1)
    expected = F.linear(t["x"], t["weight"], t["bias"]) + SCALE * hidden @ t["lora_b"].T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"dropout_mask has shape .* expected \(groups, \*x.shape\)"):
        reference(t, n_blocks, 0.3, groups, mask[..., 1:])


def test_bad_dropout_arguments_are_refused():
    t = case(1, 3, (4,), 12, 5)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout_p must be between 0 and 1"):
            call(t, 1, p)
    from visadapt.kernels.dropout import seed_tensor

    for rng, says in [((1, -1), "offset must be an int >= 0"), ((-5, 0), r"seed must be an int in \[0, 2\*\*63\)"),
                      ((torch.zeros(2, dtype=torch.long), 0), "one int64")]:
        with pytest.raises(ValueError, match=says):
            seed_tensor(rng, torch.device("cpu"))


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="CPU without the interpreter")
def test_dropout_mask_needs_the_triton_kernels():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.dropout_mask((4, 12), 0.25, (1, 0), device="cpu")


# --- the fused path (CUDA, or CPU under the interpreter subprocess) ------------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """Force the Triton kernels and record their launches, so that an eager fallback cannot pass."""
    kernels.set_backend("triton")
    from visadapt.kernels import triton_kernels

    seen = []
    for name in KERNELS:
        kernel = getattr(triton_kernels, name)
        monkeypatch.setattr(kernel, "run", lambda *a, _run=kernel.run, _name=name, **k: (seen.append(_name),
                                                                                          _run(*a, **k))[1])
    return seen


@fused_only
def test_fused_masks_are_reproducible_from_seed_and_offset():
    """The mask is a function of (seed, offset) alone: equal for equal pairs, other for another seed, and
    counter-based: offset k shifts each group's flat stream by k elements."""
    shape = (3, 7, 10)  # 21 rows of 10
    m = kernels.dropout_mask(shape, 0.5, (2024, 0), n_groups=2, device=DEVICE)
    assert m.shape == (2, *shape) and m.dtype == torch.bool
    assert torch.equal(m, kernels.dropout_mask(shape, 0.5, (2024, 0), n_groups=2, device=DEVICE))
    assert not torch.equal(m, kernels.dropout_mask(shape, 0.5, (2025, 0), n_groups=2, device=DEVICE))
    shifted = kernels.dropout_mask(shape, 0.5, (2024, 13), n_groups=2, device=DEVICE).flatten(1)
    assert torch.equal(shifted[:, :-13], m.flatten(1)[:, 13:])
    assert torch.equal(m[:1], kernels.dropout_mask(shape, 0.5, (2024, 0), n_groups=1, device=DEVICE))
    seed = torch.tensor([2024], dtype=torch.int64, device=DEVICE)  # a seed tensor draws as its int does
    assert torch.equal(m, kernels.dropout_mask(shape, 0.5, (seed, 0), n_groups=2, device=DEVICE))


@fused_only
@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_fused_keep_rate_is_within_a_binomial_bound(p):
    """Each group keeps 1 − p of the elements within 5σ of Binomial(n, 1 − p); the groups' masks agree as
    independent masks do (p² + (1 − p)²), i.e. q, k and v really draw their own."""
    m = kernels.dropout_mask((64, 48), p, (7, 0), n_groups=3, device=DEVICE).cpu()
    n = m[0].numel()
    for group in m:
        kept = group.sum().item()
        assert abs(kept - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p)), (kept, n, p)
    agree = (m[0] == m[1]).float().sum().item()
    q = p * p + (1 - p) ** 2
    assert abs(agree - n * q) <= 5 * math.sqrt(n * q * (1 - q)), (agree, n, q)


@fused_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_blocks,r,groups,weight", [(1, 3, None, True), (1, 6, [2, 1, 3], True),
                                                      (3, 6, [2, 4], True), (1, 4, [1, 3], False)],
                         ids=["lora", "lora-qkv", "block3-2groups", "delta-only"])
def test_fused_gradients_match_the_eager_formula_given_the_same_mask(launches, n_blocks, r, groups, weight, dtype):
    """y, dx, dA, dB of the fused path equal the eager reference fed the masks that dropout_mask writes out for the
    same (seed, offset): 37 rows (3-D, strided), d_in 45, d_out 29, none a multiple of the tiles."""
    t = case(n_blocks, r, (37,), 45, 29, dtype, weight)
    t["x"] = t["x"].reshape(1, 37, 45).transpose(0, 1).contiguous().transpose(0, 1)  # (1, 37, 45), other strides
    p, rng = 0.25, (99, 5)
    trainable = ("x", "lora_a", "lora_b")
    ours = {k: (v.clone().requires_grad_(True) if k in trainable else v) for k, v in t.items()}
    out = call(ours, n_blocks, p, groups, rng)
    n_groups = len(groups) if groups else 1
    mask = kernels.dropout_mask(t["x"].shape, p, rng, n_groups, device=DEVICE).cpu()
    assert 0 < mask.float().mean() < 1
    refs = {k: (None if v is None else v.detach().double().cpu().requires_grad_(k in trainable))
            for k, v in t.items()}
    expected = reference(refs, n_blocks, p, groups, mask)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, atol=tol * expected.abs().max().item(), rtol=tol)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out.backward(grad.to(out))
    expected.backward(grad)
    assert set(launches) == set(KERNELS)
    for k in trainable:
        want = refs[k].grad
        torch.testing.assert_close(ours[k].grad.double().cpu(), want, atol=tol * want.abs().max().item(), rtol=tol,
                                   msg=k)
    # another mask gives another result: the comparison above could fail
    other = kernels.dropout_mask(t["x"].shape, p, (100, 5), n_groups, device=DEVICE).cpu()
    assert (reference(refs, n_blocks, p, groups, other) - expected).abs().max() > 1e-2


@fused_only
def test_fused_default_seed_follows_torchs_generator(launches):
    """Without dropout_rng each call draws its seed from torch's generator of x's device: the same after the same
    manual_seed, another on the next call; an explicit (seed, offset) repeats."""
    t = case(1, 3, (9,), 20, 6)
    torch.manual_seed(11)
    first, second = call(t, 1, 0.5), call(t, 1, 0.5)
    torch.manual_seed(11)
    assert torch.equal(first, call(t, 1, 0.5))
    assert not torch.equal(first, second)
    assert torch.equal(call(t, 1, 0.5, rng=(5, 0)), call(t, 1, 0.5, rng=(5, 0)))
    assert launches


@fused_only
def test_fused_p_one_drops_the_whole_branch(launches):
    t = case(1, 3, (9,), 20, 6)
    a = t["lora_a"].clone().requires_grad_(True)
    out = kernels.lora_linear(t["x"], t["weight"], t["bias"], a, t["lora_b"], SCALE, 1.0, True)
    torch.testing.assert_close(out, F.linear(t["x"], t["weight"], t["bias"]))
    out.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and launches


@fused_only
@pytest.mark.parametrize("n_blocks", [1, 3])
def test_fused_dropout_op_passes_opcheck(launches, n_blocks):
    """The op with its dropout arguments: schema, fake shapes (x̃ not returned, dx of d_in columns) and autograd."""
    t = case(n_blocks, 4, (6,), 12, 5)
    x, a, b = (t[k].clone().requires_grad_(True) for k in ("x", "lora_a", "lora_b"))
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.visadapt.lora_fwd.default,
                          (x, t["weight"], t["bias"], a, b, n_blocks, SCALE, 0.25, seed, 2, [1, 3]))
    assert launches


def _compiled_matches_eager():
    """A training step with dropout in three groups, compiled with fullgraph=True (no graph break) and not: the same
    output and gradients after the same manual_seed."""
    torch._dynamo.reset()
    t = case(1, 6, (2, 5), 20, 6)

    def step(x, a, b):
        return kernels.lora_linear(x, t["weight"], t["bias"], a, b, SCALE, 0.25, True, [2, 2, 2])

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        a, b = t["lora_a"].clone().requires_grad_(True), t["lora_b"].clone().requires_grad_(True)
        torch.manual_seed(8)
        out = fn(t["x"], a, b)
        out.backward(torch.ones_like(out))
        results.append((out, a.grad, b.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(INTERPRETED, reason="the eager path of CPU tensors")
def test_torch_compile_traces_eager_dropout_training():
    _compiled_matches_eager()


@fused_only
def test_fused_dropout_under_torch_compile(launches):
    """The wrapper decides the route outside the trace (the self-check must not be traced) and draws the seed in
    the graph."""
    _compiled_matches_eager()
    assert set(launches) == set(KERNELS)


# --- a resumed training run through the fused path ----------------------------------------------------------------


class Points(Dataset):
    """Two noisy classes in 12-D, items fetched as (index, augmentation seed)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.cat([torch.randn(12, 12, generator=g) + 1, torch.randn(12, 12, generator=g) - 1])
        self.y = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(12, dtype=torch.long)])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index):
        i, aug = index
        return self.x[i] + 0.1 * torch.randn(12, generator=torch.Generator().manual_seed(aug)), self.y[i]


class LoraNet(nn.Module):
    """Two frozen linears with LoRA adapters trained through kernels.lora_linear with dropout 0.25; the first one
    a fused 'qkv' projection whose three row groups draw their own masks."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = nn.Parameter(torch.randn(18, 12, generator=g) / 12 ** 0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(2, 18, generator=g) / 18 ** 0.5, requires_grad=False)
        self.a1 = nn.Parameter(torch.randn(6, 12, generator=g) / 12 ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(18, 6))
        self.a2 = nn.Parameter(torch.randn(2, 18, generator=g) / 18 ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(2, 2))

    def forward(self, x):
        h = kernels.lora_linear(x, self.w1, None, self.a1, self.b1, 2.0, 0.25, self.training, [2, 2, 2])
        return kernels.lora_linear(F.relu(h), self.w2, None, self.a2, self.b2, 2.0, 0.25, self.training)


@dataclass
class TinyConfig(RunConfig):
    seed: int = recipe_default("seed", 0)
    batch_size: int = recipe_default("batch_size", 8)
    steps: int = option(8, "steps")


class TinyTrainer(Trainer):
    def setup(self) -> None:
        self.model = LoraNet().to(DEVICE)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=0.05)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.train_set, self.total_steps = Points(), self.cfg.steps

    def compute_loss(self, batch) -> torch.Tensor:
        x, y = (v.to(DEVICE) for v in batch)
        return F.cross_entropy(self.model(x), y)

    def evaluate(self, state: dict) -> dict:
        return {}

    def write_outputs(self, results: dict, state: dict) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.unwrapped_model().state_dict().items()},
                  self.out / "model.safetensors")


@fused_only
def test_fused_dropout_training_resumes_bit_identically(launches, tmp_path):
    """Eight steps straight, and the same run interrupted at step 4 (checkpoint at 3) then resumed: the adapters
    are bit-identical. The per-call seeds come from torch's generator, whose state the checkpoint restores."""
    cfg = TinyConfig(checkpoint_every=3, precision="no")
    TinyTrainer(cfg, tmp_path / "straight").run()
    assert set(launches) == set(KERNELS)

    def stop(step, record):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TinyTrainer(cfg, tmp_path / "cut", callbacks=[stop]).run()
    TinyTrainer(cfg, tmp_path / "cut", resume=True).run()
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "cut" /
                                                                                     "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b["b1"].abs().max() > 0, "the adapters trained"


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available() or not kernel_backend.triton_available(),
                    reason="runs only as the parent of the interpreter run, on machines without CUDA")
def test_fused_dropout_under_the_interpreter():
    """Run the test_fused_* tests above in a fresh TRITON_INTERPRET=1 process and require that they all passed."""
    require_interpreted_run(__file__, "test_fused_", "triton", min_passed=15, timeout=600)
