"""Triton kernels behind :mod:`visadapt.kernels` (imported only when triton is; CUDA, or CPU under
``TRITON_INTERPRET=1``).

Four kernels serve the forward and backward of all three ops; each takes strides, so transposed operands
(Wᵀ, Bᵀ, Aᵀ in the backward) are views, never copies:

- ``_shrink_kernel``         H[p, :] = s_p · X[t_p, :] · Ã[l]ᵀ   tall-skinny down-projection, fp32 out (N, r)
- ``_linear_expand_kernel``  Y = X Mᵀ + b + H Ẽᵀ                 base GEMM with the up-projection in its epilogue
- ``_routed_expand_kernel``  Y[t_p, :] (+)= H[p, :] · E[l]ᵀ      up-projection of routed rows, scattered back
- ``_reduce_kernel``         O[l] += U[t_p, :]ᵀ · V[p, :]         dA and dB: reductions over tokens, fp32 atomics

Experimental (``backend.set_fuse_shrink(True)``, off until measured on a GPU): the linear-expand kernel also
computes the shrink in its main loop (h from the x tiles of the base GEMM, g from the dy tiles of the dx GEMM),
so the two ``_shrink_kernel`` launches and one read each of x and dy go away, for r / BN redundant FLOPs.

Rows are processed in *tiles*. Dense ops (LoRA, Block-LoRA) tile 0..N-1 in order, one adapter, s_p = scale.
Routed ops sort the (token, slot) pairs by adapter (the routing plan of ``routed.py``); each tile then holds rows
of a single adapter l (SGMV), gathered through ``tokens``/``pairs``, and tiles past the end (adapter -1) exit at once.
Ẽ reads its row ``n % C``: in Block-LoRA's dx = dy W + g [A_s | … | A_s], the shared A_s (r, C) acts as the
tiled matrix without materialising it.

The shrinks (x Aᵀ, dy B) run their dots in x's dtype when x is 16-bit (tensor cores, fp32 accumulation) and
in fp32 otherwise. Every dot that takes the rank-side h or g (the expand epilogues, the dA/dB reductions) keeps
that operand in fp32 (TF32 dots for 16-bit x), so a large g cannot overflow fp16 where the eager fp32 formulas
do not; h, g and the gradients accumulate in fp32.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
import triton
import triton.language as tl

from .backend import deterministic, fuse_shrink, interpreting
from .dropout import FusedDropout
from .routed import REDUCE_TILE, ROW_TILE, RoutingPlan

_DOT_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _config(**sizes):
    return triton.Config(sizes, num_warps=4 if sizes["BM"] * sizes.get("BN", 32) <= 64 * 64 else 8, num_stages=3)


# The interpreter runs each config it tries, slowly: give it one small config; the GPU autotunes the base GEMM.
# Only kernels that just store are autotuned (autotuning re-runs a kernel, which would repeat atomic adds); the
# memory-bound adapter kernels use fixed tiles.
if interpreting():
    _LINEAR_CONFIGS = [_config(BM=32, BN=32, BK=32)]
else:
    _LINEAR_CONFIGS = [_config(BM=bm, BN=bn, BK=bk) for bm, bn, bk in
                       [(128, 128, 64), (128, 64, 64), (64, 128, 64), (128, 256, 64), (64, 64, 64)]]
_SMALL = interpreting()
_SHRINK_BM, _SHRINK_BK = (32, 32) if _SMALL else (64, 64)
_ROUTED_BM = ROW_TILE  # row tile of the routed shrink/expand: the routing plan's tiles
_ROUTED_BN = 32 if _SMALL else 128
_REDUCE_BM, _REDUCE_BP = 32, (32 if _SMALL else 128)
_DETERMINISTIC_PARTIALS = 32  # dense dA/dB in deterministic mode: at most this many per-program partial sums


def _precision(dtype: torch.dtype) -> Optional[str]:
    # fp32 dots follow torch's own switch, so fp32 results match F.linear's precision on the same machine;
    # 16-bit dots have no choice to make
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _rank_precision(dtype: torch.dtype) -> Optional[str]:
    """Precision of the dots that take the fp32 rank-side operand h or g (expand epilogues, dA/dB reductions).

    Those operands stay fp32: cast to fp16 they overflow (|g| = |s · dy B| passes 65504 under a loss scale long
    before dy itself does) where the eager fp32 formulas do not. With 16-bit activations the dot runs as TF32:
    fp32's range, the 10-bit mantissa of fp16, tensor cores; fp32 activations follow torch's switch."""
    return _precision(dtype) if dtype == torch.float32 else "tf32"


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension ≥ 16


@triton.jit
def _tile(t, TILE_ADAPTER, TILE_START, TILE_END, M, TILE: tl.constexpr, ROUTED: tl.constexpr):
    """(adapter, first row, end row) of tile t; rows index the sorted pairs when ROUTED, the tokens otherwise."""
    if ROUTED:
        adapter = tl.load(TILE_ADAPTER + t)
        start = tl.load(TILE_START + t)
        end = tl.load(TILE_END + t)
    else:
        adapter = t * 0
        start = t * TILE
        end = tl.minimum(start + TILE, M)
    return adapter, start, end


@triton.jit
def _rows(rows, rmask, TOKENS, PAIRS, ROUTED: tl.constexpr):
    """(token, pair) ids of these rows, int64 for the pointer arithmetic (N · d can exceed 2³¹)."""
    if ROUTED:
        tok = tl.load(TOKENS + rows, mask=rmask, other=0).to(tl.int64)
        pair = tl.load(PAIRS + rows, mask=rmask, other=0).to(tl.int64)
    else:
        tok = rows.to(tl.int64)
        pair = rows.to(tl.int64)
    return tok, pair


@triton.jit
def _uniforms(seed, offset, rows, cols, K):
    """The four Philox uniforms of each element (rows, cols) of the (M, K) input x: one Philox4x32-10 call at
    counter offset + row·K + col (int64: M·K can pass 2³¹; tl.rand4x feeds the high 32 bits to Philox, so counters
    below 2³² draw what int32 counters would). Dropout group g (≤ 4 groups) keeps the element when the g-th is ≥ p,
    so all q/k/v masks cost one Philox call per element. Every kernel that needs the masks redraws them from these
    indices: they never exist in memory."""
    ctr = offset + rows.to(tl.int64)[:, None] * K + cols.to(tl.int64)[None, :]
    return tl.rand4x(seed, ctr)


@triton.jit
def _pick(g: tl.constexpr, u0, u1, u2, u3):
    """Group g's uniforms (g is a compile-time constant: no select runs)."""
    if g == 0:
        u = u0
    elif g == 1:
        u = u1
    elif g == 2:
        u = u2
    else:
        u = u3
    return u


@triton.jit
def _rank_group(rj, B1, B2, B3):
    """Dropout group (0..3) of each rank column j: groups are the consecutive column ranges [0, B1), [B1, B2), ...,
    unused bounds equal R (padded columns j ≥ R, zero anyway, fall in no iterated group)."""
    return (rj >= B1).to(tl.int32) + (rj >= B2).to(tl.int32) + (rj >= B3).to(tl.int32)


@triton.jit
def _dropout_mask_kernel(SEED, O, offset, M, K, drop_p, NG: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """O[g, m, k] = the keep mask of group g at (m, k), as int8: what the fused kernels draw."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    u0, u1, u2, u3 = _uniforms(tl.load(SEED), offset, rm, rk, K)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    for g in tl.static_range(NG):
        keep = _pick(g, u0, u1, u2, u3) >= drop_p
        out = (rm.to(tl.int64) + g * M)[:, None] * K + rk[None, :]  # row g·M + m of the (G·M, K) output
        tl.store(O + out, keep.to(tl.int8), mask=mask)


@triton.jit
def _shrink_kernel(X, A, H, TOKENS, PAIRS, PAIR_SCALE, TILE_ADAPTER, TILE_START, TILE_END,
                   M, K, R, scale, sxm, sxk, sal, saj, sak, shm, SEED, offset, drop_p, inv_keep, AC, B1, B2, B3,
                   ROUTED: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                   DROPOUT: tl.constexpr = False, NG: tl.constexpr = 1):
    """H[pair, j] = s · Σ_k X[tok, k] · A[l, j, k]; s = scale (dense) or PAIR_SCALE[pair] (routed).

    DROPOUT (dense only): H[m, j] = s / (1 - p) · Σ_k keep_g(j)[m, k] X[m, k] A[j, k % AC], the mask of rank
    column j's group (:func:`_rank_group`) regenerated per tile (:func:`_uniforms`); AC < K is Block-LoRA's A_s, read
    at column k mod c, so the chunk sum of the dropped x never has to exist."""
    adapter, start, end = _tile(tl.program_id(0), TILE_ADAPTER, TILE_START, TILE_END, M, BM, ROUTED)
    if adapter < 0:
        return
    rows = start + tl.arange(0, BM)
    rmask = rows < end
    tok, pair = _rows(rows, rmask, TOKENS, PAIRS, ROUTED)
    rj = tl.arange(0, BR)
    a_base = A + adapter.to(tl.int64) * sal
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)
        group = _rank_group(rj, B1, B2, B3)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + tok[:, None] * sxm + rk[None, :] * sxk, mask=rmask[:, None] & (rk[None, :] < K), other=0.0)
        if DROPOUT:
            a = tl.load(a_base + rj[None, :] * saj + (rk[:, None] % AC) * sak,
                        mask=(rj[None, :] < R) & (rk[:, None] < K), other=0.0)
            u0, u1, u2, u3 = _uniforms(seed, offset, rows, rk, K)
            for g in tl.static_range(NG):
                x_g = tl.where(_pick(g, u0, u1, u2, u3) >= drop_p, x, 0.0)
                a_g = tl.where(group[None, :] == g, a, 0.0)
                acc = tl.dot(x_g.to(DOT), a_g.to(DOT), acc, input_precision=PREC)
        else:
            a = tl.load(a_base + rj[None, :] * saj + rk[:, None] * sak,
                        mask=(rj[None, :] < R) & (rk[:, None] < K), other=0.0)
            acc = tl.dot(x.to(DOT), a.to(DOT), acc, input_precision=PREC)
    if ROUTED:
        acc = acc * tl.load(PAIR_SCALE + pair, mask=rmask, other=0.0)[:, None]
    elif DROPOUT:
        acc = acc * (scale * inv_keep)
    else:
        acc = acc * scale
    tl.store(H + pair[:, None] * shm + rj[None, :], acc, mask=rmask[:, None] & (rj[None, :] < R))


@triton.autotune(configs=_LINEAR_CONFIGS, key=["N", "K", "R", "HAS_W", "FUSE_SHRINK"])
@triton.jit
def _linear_expand_kernel(X, W, BIAS, H, E, Y, S, M, N, K, R, C, SC, scale, sxm, sxk, swn, swk, shm, sen, sej, ssj,
                          ssk, sym, syn, SEED, offset, drop_p, inv_keep, B1, B2, B3,
                          HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr,
                          DOT: tl.constexpr, PREC: tl.constexpr, SDOT: tl.constexpr, PREC_BASE: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                          GROUP_M: tl.constexpr = 8, DROPOUT: tl.constexpr = False, NG: tl.constexpr = 1):
    """Y[m, n] = Σ_k X[m, k] W[n, k] + bias[n] + Σ_j H[m, j] E[n % C, j]   (M×N output tiles, fp32 accumulator).

    The up-projection rides in the epilogue of the base GEMM, so the (N, d_out) delta is never written or
    re-read; HAS_W=False leaves the delta alone. FUSE_SHRINK (needs HAS_W): H is not read but computed in the
    main loop from the X tiles it already loads, H[m, j] = scale · Σ_k X[m, k] S[j, k % SC], and stored by the
    programs of the first column tile (the others recompute it: r / BN extra FLOPs, one read of X saved).

    DROPOUT (the dx GEMM of a dropout LoRA: Y = dx, N = d_in): the epilogue adds Σ_g keep_g ⊙ (H_g Ẽ_gᵀ) / (1 - p),
    one rank-r dot per dropout group g (H's columns of that group), masked by the group's keep mask of x at
    (m, n), regenerated here (:func:`_uniforms`) exactly as the forward's shrink drew it."""
    # grouped program order: GROUP_M row-tiles share each W column-tile while it is in L2
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rj = tl.arange(0, BR)
    mmask, nmask = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    h = tl.zeros((BM, BR), dtype=tl.float32)
    if HAS_W:
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=mmask[:, None] & (rk[None, :] < K),
                        other=0.0)
            w = tl.load(W + rn[None, :] * swn + rk[:, None] * swk, mask=nmask[None, :] & (rk[:, None] < K),
                        other=0.0)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PREC_BASE)
            if FUSE_SHRINK:
                s = tl.load(S + rj[None, :] * ssj + (rk[:, None] % SC) * ssk,
                            mask=(rj[None, :] < R) & (rk[:, None] < K), other=0.0)
                h = tl.dot(x.to(SDOT), s.to(SDOT), h, input_precision=PREC_BASE)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    hmask = mmask[:, None] & (rj[None, :] < R)
    if FUSE_SHRINK:
        h = h * scale
        tl.store(H + rm[:, None] * shm + rj[None, :], h, mask=hmask & (pid_n == 0))
    else:
        h = tl.load(H + rm[:, None] * shm + rj[None, :], mask=hmask, other=0.0)
    e = tl.load(E + (rn[None, :] % C) * sen + rj[:, None] * sej, mask=nmask[None, :] & (rj[:, None] < R),
                other=0.0)
    if DROPOUT:
        seed = tl.load(SEED)
        group = _rank_group(rj, B1, B2, B3)
        u0, u1, u2, u3 = _uniforms(seed, offset, rm, rn, N)
        for g in tl.static_range(NG):
            part = tl.dot(tl.where(group[None, :] == g, h, 0.0).to(DOT), e.to(DOT), input_precision=PREC)
            acc += tl.where(_pick(g, u0, u1, u2, u3) >= drop_p, part * inv_keep, 0.0)
    else:
        acc = tl.dot(h.to(DOT), e.to(DOT), acc, input_precision=PREC)
    tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _routed_expand_kernel(H, E, Y, TOKENS, PAIRS, TILE_ADAPTER, TILE_START, TILE_END, N, R, shm, sel, sen, sej,
                          sym, syn, ATOMIC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Y[tok, n] (+)= Σ_j H[pair, j] E[l, n, j] for the rows of one adapter; ATOMIC when k > 1 slots of a token
    may land on the same output row from different programs."""
    adapter, start, end = _tile(tl.program_id(0), TILE_ADAPTER, TILE_START, TILE_END, 0, BM, True)
    if adapter < 0:
        return
    rows = start + tl.arange(0, BM)
    rmask = rows < end
    tok, pair = _rows(rows, rmask, TOKENS, PAIRS, True)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rj = tl.arange(0, BR)
    h = tl.load(H + pair[:, None] * shm + rj[None, :], mask=rmask[:, None] & (rj[None, :] < R), other=0.0)
    e = tl.load(E + adapter.to(tl.int64) * sel + rn[None, :] * sen + rj[:, None] * sej,
                mask=(rn[None, :] < N) & (rj[:, None] < R), other=0.0)
    acc = tl.dot(h.to(DOT), e.to(DOT), input_precision=PREC)
    ptrs = Y + tok[:, None] * sym + rn[None, :] * syn
    mask = rmask[:, None] & (rn[None, :] < N)
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(U, V, O, TOKENS, PAIRS, TILE_ADAPTER, TILE_START, TILE_END, M, P, Q, sum_, sup, svm, sol, sop,
                   soq, SEED, offset, drop_p, inv_keep, B1, B2, B3,
                   ROUTED: tl.constexpr, ATOMIC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                   TILE: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
                   DROPOUT: tl.constexpr = False, NG: tl.constexpr = 1):
    """O[l, p, q] += Σ_rows U[tok, p] V[pair, q] over one tile of rows (dB: U = dy, V = h; dAᵀ: U = x, V = g).

    Each program streams its rows once, in order. ATOMIC: it adds its (BP, BQ) partial sum atomically (split over
    tokens). Otherwise (deterministic mode) it stores it: into slot l when the plan gives each adapter one tile,
    or, dense, into its own slot t of a partials buffer that the launcher sums in a fixed order.

    DROPOUT (dense dAᵀ of a dropout LoRA: U = x (M, P = d_in), V = g): O[p, q] = Σ_rows keep_g(q)[row, p] U V / (1-p),
    the mask of V's column group regenerated per tile (:func:`_uniforms`), one dot per group."""
    adapter, start, end = _tile(tl.program_id(0), TILE_ADAPTER, TILE_START, TILE_END, M, TILE, ROUTED)
    if adapter < 0:
        return
    rp = tl.program_id(1) * BP + tl.arange(0, BP)
    rq = tl.arange(0, BQ)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(SEED)
        group = _rank_group(rq, B1, B2, B3)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        rmask = rows < end
        tok, pair = _rows(rows, rmask, TOKENS, PAIRS, ROUTED)
        u = tl.load(U + tok[:, None] * sum_ + rp[None, :] * sup, mask=rmask[:, None] & (rp[None, :] < P), other=0.0)
        v = tl.load(V + pair[:, None] * svm + rq[None, :], mask=rmask[:, None] & (rq[None, :] < Q), other=0.0)
        if DROPOUT:
            u0, u1, u2, u3 = _uniforms(seed, offset, rows, rp, P)
            for g in tl.static_range(NG):
                u_g = tl.where(_pick(g, u0, u1, u2, u3) >= drop_p, u, 0.0)
                v_g = tl.where(group[None, :] == g, v, 0.0)
                acc = tl.dot(tl.trans(u_g.to(DOT)), v_g.to(DOT), acc, input_precision=PREC)
        else:
            acc = tl.dot(tl.trans(u.to(DOT)), v.to(DOT), acc, input_precision=PREC)
    if DROPOUT:
        acc = acc * inv_keep
    omask = (rp[:, None] < P) & (rq[None, :] < Q)
    if ATOMIC:
        tl.atomic_add(O + adapter.to(tl.int64) * sol + rp[:, None] * sop + rq[None, :] * soq, acc, mask=omask)
    else:
        slot = adapter if ROUTED else tl.program_id(0)
        tl.store(O + slot.to(tl.int64) * sol + rp[:, None] * sop + rq[None, :] * soq, acc, mask=omask)


# --------------------------------------------------------------------------------------------------------------
# launchers: shapes in, tensors out; every tensor lives on one device


def _dropout_args(dropout: Optional[FusedDropout], rank: int, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """The kernels' dropout arguments: (SEED, offset, drop_p, inv_keep, B1, B2, B3) and the constexprs."""
    if dropout is None:
        return (dummy, 0, 0.0, 1.0, rank, rank, rank), dict(DROPOUT=False, NG=1)
    bounds = list(itertools.accumulate(dropout.groups))[:-1]
    bounds += [rank] * (3 - len(bounds))
    inv_keep = 1.0 / (1.0 - dropout.p) if dropout.p < 1 else 0.0  # p = 1 drops everything (0 · inf would be NaN)
    return (dropout.seed, dropout.offset, dropout.p, inv_keep, *bounds), dict(DROPOUT=True, NG=len(dropout.groups))


def _shrink(x: torch.Tensor, a: torch.Tensor, rank: int, scale: float, a_strides,
            routing: Optional[RoutingPlan] = None, dropout: Optional[FusedDropout] = None,
            a_cols: int = 0) -> torch.Tensor:
    """s · x A[l]ᵀ as fp32 (rows, rank), A[l, j, k] at ``a_strides`` = (l, j, k) strides; with a routing plan
    the rows are pairs, s per pair, unrouted pairs zero. With ``dropout`` (dense only) x is dropped per rank
    group first and A read at column k mod ``a_cols`` (Block-LoRA's A_s against the full x)."""
    routed = routing is not None
    n_rows = routing.pairs.shape[0] if routed else x.shape[0]
    h = torch.zeros(n_rows, rank, device=x.device, dtype=torch.float32) if routed else \
        torch.empty(n_rows, rank, device=x.device, dtype=torch.float32)
    if x.shape[0] == 0:
        return h
    tables = (routing.tokens, routing.pairs, routing.pair_scale, routing.tile_adapter, routing.tile_start,
              routing.tile_end) if routed else (h,) * 6
    bm = _ROUTED_BM if routed else _SHRINK_BM
    grid = (routing.tile_adapter.shape[0] if routed else triton.cdiv(x.shape[0], bm),)
    drop, drop_const = _dropout_args(dropout, rank, h)
    _shrink_kernel[grid](x, a, h, *tables, x.shape[0], x.shape[1], rank, scale, x.stride(0), x.stride(1),
                         *a_strides, h.stride(0), drop[0], drop[1], drop[2], drop[3], a_cols or x.shape[1],
                         *drop[4:], ROUTED=routed, DOT=_DOT_DTYPE[x.dtype], PREC=_precision(x.dtype), BM=bm,
                         BK=_SHRINK_BK, BR=_rank_block(rank), **drop_const)
    return h


def _linear_expand(x, w, w_strides, bias, h, e, e_strides, e_rows, n_out, out_dtype,
                   shrink: Optional[tuple] = None, dropout: Optional[FusedDropout] = None) -> torch.Tensor:
    """x Mᵀ + b + h Ẽᵀ as (rows, n_out); M[n, k] at ``w_strides`` = (n, k) strides, Ẽ[n, j] at ``e_strides``.

    ``shrink`` = (S, (j, k) strides of S, SC, scale): h (an empty fp32 (rows, r)) is not read but filled by the
    kernel's main loop with scale · x S̃ᵀ, S̃[j, k] = S[j, k % SC] (needs w). ``dropout``: the dx GEMM of a
    dropout LoRA, whose epilogue masks each rank group's h Ẽᵀ with that group's mask of x (rows × n_out = d_in)."""
    m, k = x.shape
    y = torch.empty(m, n_out, device=x.device, dtype=out_dtype)
    if m == 0 or n_out == 0:
        return y
    s, s_strides, s_cols, scale = shrink or (h, (0, 0), 1, 0.0)
    drop, drop_const = _dropout_args(dropout, h.shape[1], y)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n_out, meta["BN"]),)  # noqa: E731
    _linear_expand_kernel[grid](
        x, y if w is None else w, y if bias is None else bias, h, e, y, s, m, n_out, k, h.shape[1], e_rows, s_cols,
        scale, x.stride(0), x.stride(1), *(w_strides if w is not None else (0, 0)), h.stride(0), *e_strides,
        *s_strides, y.stride(0), y.stride(1), *drop, HAS_W=w is not None, HAS_BIAS=bias is not None,
        FUSE_SHRINK=shrink is not None, DOT=tl.float32, PREC=_rank_precision(x.dtype), SDOT=_DOT_DTYPE[x.dtype],
        PREC_BASE=_precision(x.dtype), BR=_rank_block(h.shape[1]), **drop_const)
    return y


def _reduce(u, v, routing: Optional[RoutingPlan] = None, n_adapters=1, transpose: bool = False,
            dropout: Optional[FusedDropout] = None) -> torch.Tensor:
    """fp32 O[l] = Σ_rows u[tok]ᵀ v[pair], contiguous (L, P, Q), or (L, Q, P) holding Oᵀ when ``transpose`` (dA:
    the kernel writes through swapped strides, so the result is a dense tensor, not a transposed view);
    u (tokens, P), v (rows or pairs, Q) fp32. Deterministic mode: no atomics (see :func:`_reduce_kernel`).
    ``dropout`` (dense dA): u = x is dropped with the mask of v's column group."""
    p, q = u.shape[1], v.shape[1]
    if routing is not None:
        tables, n_tiles, tile, m = (routing.tokens, routing.pairs, routing.reduce_adapter, routing.reduce_start,
                                    routing.reduce_end), routing.reduce_adapter.shape[0], REDUCE_TILE, 0
        slots = n_adapters
        # cdiv(P, tile) + L tiles with cdiv = 1: no adapter has two tiles, so each program may store its sum
        exact = n_tiles <= n_adapters + 1
    else:
        exact = deterministic()
        # split the tokens into ≈ 128 row-tiles: enough programs, few atomics (deterministic: fewer partials)
        tiles = _DETERMINISTIC_PARTIALS if exact else 128
        tile = max(_REDUCE_BM, triton.next_power_of_2(triton.cdiv(u.shape[0], tiles)))
        n_tiles, m = triton.cdiv(u.shape[0], tile), u.shape[0]
        slots = n_tiles if exact else 1
        tables = None
    out = torch.zeros(slots, *((q, p) if transpose else (p, q)), device=u.device, dtype=torch.float32)
    if u.shape[0] == 0 or p == 0:
        return out[:n_adapters] if routing is not None else out.sum(0, keepdim=True)
    o_strides = (out.stride(0), out.stride(2), out.stride(1)) if transpose else out.stride()
    grid = (n_tiles, triton.cdiv(p, _REDUCE_BP))
    drop, drop_const = _dropout_args(dropout, q, out)
    _reduce_kernel[grid](u, v, out, *(tables or (out,) * 5), m, p, q, u.stride(0), u.stride(1), v.stride(0),
                         *o_strides, *drop, ROUTED=routing is not None, ATOMIC=not exact, DOT=tl.float32,
                         PREC=_rank_precision(u.dtype), TILE=tile, BM=_REDUCE_BM, BP=_REDUCE_BP, BQ=_rank_block(q),
                         **drop_const)
    return out if routing is not None or slots == 1 else out.sum(0, keepdim=True)


# --------------------------------------------------------------------------------------------------------------
# LoRA / Block-LoRA (A (r, c): c = d_in for LoRA, d_in / n_blocks for Block-LoRA)


def lora_forward(x, weight, bias, lora_a, lora_b, n_blocks: int, scale: float,
                 dropout: Optional[FusedDropout] = None):
    """(y (N, d_out) in x's dtype, h = s · x̃ Aᵀ (N, r) fp32, x̃ (x itself for LoRA)).

    Block-LoRA's chunk sum x̃ is one memory-bound torch reduction: it is the tensor the backward keeps (n times
    smaller than x), and the shrink then reads c instead of d_in columns. With ``dropout`` the shrink reads x
    itself, drops it per rank group in registers (A_s read at column k mod c for Block-LoRA) and the third result
    is x: the backward regenerates the masks from it, the seed and the offset."""
    rank, a_cols = lora_a.shape
    if dropout is not None:
        h = _shrink(x, lora_a, rank, scale, (0, lora_a.stride(0), lora_a.stride(1)), dropout=dropout, a_cols=a_cols)
        y = _linear_expand(x, weight, None if weight is None else (weight.stride(0), weight.stride(1)), bias, h,
                           lora_b, (lora_b.stride(0), lora_b.stride(1)), lora_b.shape[0], lora_b.shape[0], x.dtype)
        return y, h, x
    x_lora = x if n_blocks == 1 else x.unflatten(-1, (n_blocks, -1)).sum(-2)
    fuse = fuse_shrink() and weight is not None
    if fuse:  # h accumulates in the base GEMM's main loop (Block-LoRA: A_s read at column k mod c)
        h = torch.empty(x.shape[0], rank, device=x.device, dtype=torch.float32)
        shrink = (lora_a, (lora_a.stride(0), lora_a.stride(1)), a_cols, scale)
    else:
        h, shrink = _shrink(x_lora, lora_a, rank, scale, (0, lora_a.stride(0), lora_a.stride(1))), None
    y = _linear_expand(x, weight, None if weight is None else (weight.stride(0), weight.stride(1)), bias, h,
                       lora_b, (lora_b.stride(0), lora_b.stride(1)), lora_b.shape[0], lora_b.shape[0], x.dtype,
                       shrink)
    return y, h, x_lora


def lora_backward(dy, x_lora, h, weight, lora_a, lora_b, n_blocks: int, scale: float, need_x: bool,
                  dropout: Optional[FusedDropout] = None):
    """(dx or None, dA (r, c), dB (d_out, r)) with g = s · dy B (N, r):
    dx = dy W + g Ã (one fused GEMM; Ã = A_s tiled n times, read at column k mod c), dB = dyᵀ h, dA = gᵀ x̃.

    With ``dropout`` x_lora is x itself and the masks are regenerated: dx = dy W + Σ_g keep_g ⊙ g_g Ã_g / (1-p)
    (the dx GEMM's epilogue), dAᵀ = Σ_rows (keep_g ⊙ x)ᵀ g_g / (1-p) (the reduction), folded over the n chunks
    for Block-LoRA (dA_s = Σ_j dA[:, j·c:(j+1)·c])."""
    rank, a_cols = lora_a.shape
    b_t = (lora_b.stride(1), lora_b.stride(0))  # Bᵀ as (r, d_out)
    fuse = fuse_shrink() and weight is not None and need_x
    if dropout is not None:
        g = _shrink(dy, lora_b, rank, scale, (0, *b_t))
        dx = None
        if need_x:
            dx = _linear_expand(dy, weight, None if weight is None else (weight.stride(1), weight.stride(0)), None,
                                g, lora_a, (lora_a.stride(1), lora_a.stride(0)), a_cols, x_lora.shape[1],
                                x_lora.dtype, dropout=dropout)
        d_b = _reduce(dy, h)[0]
        d_a = _reduce(x_lora, g, transpose=True, dropout=dropout)[0]  # (r, d_in)
        if n_blocks > 1:
            d_a = d_a.unflatten(1, (n_blocks, a_cols)).sum(1)
        return dx, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)
    if fuse:  # g accumulates in the dx GEMM's main loop over d_out, from the dy tiles it loads anyway
        g, shrink = torch.empty(dy.shape[0], rank, device=dy.device, dtype=torch.float32), \
            (lora_b, b_t, lora_b.shape[0], scale)
    else:
        g, shrink = _shrink(dy, lora_b, rank, scale, (0, *b_t)), None
    dx = None
    if need_x:
        dx = _linear_expand(dy, weight, None if weight is None else (weight.stride(1), weight.stride(0)), None, g,
                            lora_a, (lora_a.stride(1), lora_a.stride(0)), a_cols, a_cols * n_blocks, x_lora.dtype,
                            shrink)
    d_b = _reduce(dy, h)[0]
    d_a = _reduce(x_lora, g, transpose=True)[0]  # (r, c)
    return dx, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


# --------------------------------------------------------------------------------------------------------------
# routed multi-LoRA


def routed_forward(x, lora_a, lora_b, routing: RoutingPlan):
    """(Δy (N, d_out) in x's dtype, h (N·k, r) fp32 per pair, zero for unrouted pairs)."""
    n_adapters, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    h = _shrink(x, lora_a, rank, 0.0, lora_a.stride(), routing)
    return _routed_expand(h, lora_b, lora_b.stride(), d_out, x.shape[0], x.dtype, routing), h


def _routed_expand(h, e, e_strides, n_out, n_tokens, dtype, routing: RoutingPlan):
    """Σ over a token's pairs of h[pair] E[l]ᵀ; E[l, n, j] at ``e_strides`` = (l, n, j).

    k > 1 slots: several programs may add to one token row, atomically into an fp32 buffer; in deterministic mode
    each pair writes its own row of a (N·k, n_out) buffer instead, and the k slots are summed in order."""
    n_pairs = routing.pairs.shape[0]
    atomic = n_pairs != n_tokens and not deterministic()
    by_pair = n_pairs != n_tokens and not atomic
    out = torch.zeros(n_pairs if by_pair else n_tokens, n_out, device=h.device,
                      dtype=torch.float32 if n_pairs != n_tokens else dtype)
    if n_tokens == 0 or n_out == 0:
        return torch.zeros(n_tokens, n_out, device=h.device, dtype=dtype)
    bn = _ROUTED_BN
    grid = (routing.tile_adapter.shape[0], triton.cdiv(n_out, bn))
    _routed_expand_kernel[grid](h, e, out, routing.pairs if by_pair else routing.tokens, routing.pairs,
                                routing.tile_adapter, routing.tile_start, routing.tile_end, n_out, h.shape[1],
                                h.stride(0), *e_strides, out.stride(0), out.stride(1), ATOMIC=atomic,
                                DOT=tl.float32, PREC=_rank_precision(dtype), BM=_ROUTED_BM, BN=bn,
                                BR=_rank_block(h.shape[1]))
    if by_pair:
        out = out.view(n_tokens, -1, n_out).sum(1)
    return out.to(dtype)


def routed_backward(dy, x, h, lora_a, lora_b, routing: RoutingPlan, need_x: bool):
    """(dx or None, dA (L, r, d_in), dB (L, d_out, r)) with g[pair] = s_pair · dy[tok] B[l]."""
    n_adapters, rank, d_in = lora_a.shape
    b_t = (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1))  # Bᵀ[l] as (r, d_out)
    g = _shrink(dy, lora_b, rank, 0.0, b_t, routing)
    dx = None
    if need_x:
        a_t = (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1))  # A[l]ᵀ as (d_in, r)
        dx = _routed_expand(g, lora_a, a_t, d_in, x.shape[0], x.dtype, routing)
    d_b = _reduce(dy, h, routing, n_adapters)
    d_a = _reduce(x, g, routing, n_adapters, transpose=True)
    return dx, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


# --------------------------------------------------------------------------------------------------------------
# dropout masks


def dropout_keep_mask(dropout: FusedDropout, n_rows: int, n_cols: int) -> torch.Tensor:
    """The keep masks (groups, n_rows, n_cols) bool that the fused kernels draw for an (n_rows, n_cols) input
    under ``dropout``: the same :func:`_uniforms` on the same counters, written out (for tests and debugging)."""
    out = torch.empty(len(dropout.groups), n_rows, n_cols, device=dropout.seed.device, dtype=torch.int8)
    if out.numel():
        bm, bk = 32, 32
        grid = (triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bk))
        _dropout_mask_kernel[grid](dropout.seed, out, dropout.offset, n_rows, n_cols, dropout.p,
                                   NG=len(dropout.groups), BM=bm, BK=bk)
    return out.bool()
