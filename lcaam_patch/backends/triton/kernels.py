"""Triton kernels of fused LCAAM attention, softmax((S ◇ M) + B) V, forward and backward.

S = QKᵀ·scale (fp32 accumulation), M (B, Nq, Nk) is shared by every head, ◇ is `mul`
(FUSION_MUL) or `add`, B is an optional upstream mask (BIAS_KIND 1: additive float,
2: boolean keep mask) and CAUSAL keeps keys j <= i. Softmax statistics are fp32; a row
whose keys are all masked gets output 0 and log-sum-exp +inf, so the backward gives it
zero weight everywhere.

The backward is three deterministic kernels, without atomics:
- `_bwd_delta`: rowsum(dO·O) in fp32, one program per (query block, head, batch).
- `_bwd_dkdv_dm`: one program per (key block, batch) walks every head and query block,
  accumulates dK and dV of each head in registers, and sums dM over heads into an fp32
  buffer it alone owns (read-modify-write of its own column stripe).
- `_bwd_dq`: one program per (query block, head, batch) recomputes the tile and
  accumulates dQ.

This file is executed twice by `lcaam_patch.backends.triton.ops`: once compiled for the
GPU (autotuned) and once under Triton's interpreter for CPU tests. The interpreter keeps
bf16 as raw 16-bit integers and cannot multiply them, so UPCAST widens every dot operand
to fp32 after it was rounded to its storage type, which reproduces the GPU's arithmetic.

Rows of M and dM are read and written with a row stride the host pads to a multiple of 16
elements (column stride 1), while every access is masked by the true Nk. Head and batch
indices are 64-bit before they multiply a stride.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import triton
import triton.language as tl


# tl.max, tl.sum and tl.zeros are @triton.jit functions decorated once, in the mode Triton
# was imported in, so one of this file's two modes could not use them. The reductions use
# combine functions decorated here instead (and tl.full), which exist in both modes.
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


INTERPRET = not isinstance(_add_combine, triton.JITFunction)
"""Whether `triton.jit` made interpreted functions here (TRITON_INTERPRET=1 when this file
ran); read from what it made, which needs no version-specific settings API."""


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


def _tuned(configs: list[triton.Config], key: list[str]) -> Callable[[Any], Any]:
    """Autotune on the GPU; the interpreter takes its block sizes from the caller."""

    def wrap(fn: Any) -> Any:
        return fn if INTERPRET else triton.autotune(configs, key=key)(fn)

    return wrap


_KEY = ["NQ", "NK", "BLOCK_D", "BLOCK_DV", "FUSION_MUL", "BIAS_KIND", "CAUSAL"]
FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)])
BWD_KV_CONFIGS = _configs([(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 32, 4, 2)])
BWD_Q_CONFIGS = _configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 4, 2)])


@triton.jit
def _scores(
    q,
    k,
    mm,
    bias_bh,
    offs_m,
    offs_n,
    sbm,
    sbn,
    NQ,
    NK,
    scale,
    FUSION_MUL: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    PREC: tl.constexpr,
):
    """(S ◇ M) + B for one (BLOCK_M, BLOCK_N) tile, -inf where masked; also returns S.

    `bias_bh` points at the upstream mask of this tile's batch and head.
    """
    s = tl.dot(q, k, input_precision=PREC) * scale
    if FUSION_MUL:
        z = s * mm
    else:
        z = s + mm
    inside = (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
    if BIAS_KIND == 1:
        bias = tl.load(bias_bh + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=inside, other=0.0)
        z = z + bias.to(tl.float32)
    if BIAS_KIND == 2:
        keep = tl.load(bias_bh + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=inside, other=0)
        inside = inside & (keep != 0)
    if CAUSAL:
        inside = inside & (offs_n[None, :] <= offs_m[:, None])
    z = tl.where(inside, z, float("-inf"))
    return z, s


@_tuned(FWD_CONFIGS, _KEY)
@triton.jit
def _fwd(
    Q,
    K,
    V,
    M,
    Bias,
    O,
    LSE,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    smb,
    smm,
    smn,
    sbb,
    sbh,
    sbm,
    sbn,
    sob,
    soh,
    som,
    sod,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    FUSION_MUL: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Output and log-sum-exp of one query block of one head (grid: heads, query blocks, batch)."""
    h = tl.program_id(0).to(tl.int64)  # offsets of large batches and heads overflow int32
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bias_bh = Bias + b * sbb + h * sbh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < NQ
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < NK
        k = tl.load(
            K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=col_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        v = tl.load(
            V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
            mask=col_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        mm = tl.load(
            M + b * smb + offs_m[:, None] * smm + offs_n[None, :] * smn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if UPCAST:
            k = k.to(tl.float32)
        z, _ = _scores(
            q,
            k,
            mm,
            bias_bh,
            offs_m,
            offs_n,
            sbm,
            sbn,
            NQ,
            NK,
            scale,
            FUSION_MUL,
            BIAS_KIND,
            CAUSAL,
            PREC,
        )
        m_new = tl.maximum(m_i, tl.reduce(z, 1, _max_combine))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(z - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _add_combine)
        p_mm = p.to(V.dtype.element_ty)
        if UPCAST:
            p_mm = p_mm.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_mm, v, input_precision=PREC)
        m_i = m_new
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("inf"), m_i + tl.log(l_safe))
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv[None, :] < DV),
    )
    tl.store(LSE + (b * H + h) * NQ + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta(
    O,
    DO,
    DELTA,
    sob,
    soh,
    som,
    sod,
    sdob,
    sdoh,
    sdom,
    sdod,
    H,
    NQ,
    DV,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """rowsum(dO·O) in fp32 for one query block of one head (grid: heads, query blocks, batch)."""
    h = tl.program_id(0).to(tl.int64)  # offsets of large batches and heads overflow int32
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < NQ
    tile = row_ok[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, mask=tile, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod, mask=tile, other=0.0)
    delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _add_combine)
    tl.store(DELTA + (b * H + h) * NQ + offs_m, delta, mask=row_ok)


@_tuned(BWD_KV_CONFIGS, _KEY)
@triton.jit
def _bwd_dkdv_dm(
    Q,
    K,
    V,
    M,
    Bias,
    DO,
    LSE,
    DELTA,
    DK,
    DV_,
    DM,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    smb,
    smm,
    smn,
    sbb,
    sbh,
    sbm,
    sbn,
    sdob,
    sdoh,
    sdom,
    sdod,
    sdkb,
    sdkh,
    sdkn,
    sdkd,
    sdvb,
    sdvh,
    sdvn,
    sdvd,
    sdmb,
    sdmm,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    FUSION_MUL: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """dK, dV of every head for one key block, and dM summed over heads (grid: key blocks, batch).

    DM is fp32 (B, NQ, NK) with strides (sdmb, sdmm, 1).
    """
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # offsets of large batches and heads overflow int32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < NK
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for head in range(H):
        h = tl.cast(head, tl.int64)
        bias_bh = Bias + b * sbb + h * sbh
        kt = tl.load(
            K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=col_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        v = tl.load(
            V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
            mask=col_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
        dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
        for start_m in range(lo, NQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < NQ
            q = tl.load(
                Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D),
                other=0.0,
            )
            do = tl.load(
                DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                mask=row_ok[:, None] & (offs_dv[None, :] < DV),
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            tile = row_ok[:, None] & col_ok[None, :]
            mm = tl.load(M + b * smb + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=tile, other=0.0).to(
                tl.float32
            )
            lse = tl.load(LSE + (b * H + h) * NQ + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + (b * H + h) * NQ + offs_m, mask=row_ok, other=0.0)
            z, s = _scores(
                q,
                kt,
                mm,
                bias_bh,
                offs_m,
                offs_n,
                sbm,
                sbn,
                NQ,
                NK,
                scale,
                FUSION_MUL,
                BIAS_KIND,
                CAUSAL,
                PREC,
            )
            p = tl.exp(z - lse[:, None])
            p_mm = p.to(Q.dtype.element_ty)
            if UPCAST:
                p_mm = p_mm.to(tl.float32)
            dv += tl.dot(tl.trans(p_mm), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            dz = p * (dp - delta[:, None])
            if FUSION_MUL:
                dt = dz * mm
                dmm = dz * s
            else:
                dt = dz
                dmm = dz
            dm_ptrs = DM + b * sdmb + offs_m[:, None] * sdmm + offs_n[None, :]
            if head > 0:
                dmm += tl.load(dm_ptrs, mask=tile, other=0.0)
            tl.store(dm_ptrs, dmm, mask=tile)
            tl.debug_barrier()
            dt_mm = dt.to(Q.dtype.element_ty)
            if UPCAST:
                dt_mm = dt_mm.to(tl.float32)
            dk += tl.dot(tl.trans(dt_mm), q, input_precision=PREC)
        tl.store(
            DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
            (dk * scale).to(DK.dtype.element_ty),
            mask=col_ok[:, None] & (offs_d[None, :] < D),
        )
        tl.store(
            DV_ + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
            dv.to(DV_.dtype.element_ty),
            mask=col_ok[:, None] & (offs_dv[None, :] < DV),
        )


@_tuned(BWD_Q_CONFIGS, _KEY)
@triton.jit
def _bwd_dq(
    Q,
    K,
    V,
    M,
    Bias,
    DO,
    LSE,
    DELTA,
    DQ,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    smb,
    smm,
    smn,
    sbb,
    sbh,
    sbm,
    sbn,
    sdob,
    sdoh,
    sdom,
    sdod,
    sdqb,
    sdqh,
    sdqm,
    sdqd,
    H,
    NQ,
    NK,
    D,
    DV,
    scale,
    FUSION_MUL: tl.constexpr,
    BIAS_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """dQ of one query block of one head (grid: heads, query blocks, batch)."""
    h = tl.program_id(0).to(tl.int64)  # offsets of large batches and heads overflow int32
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bias_bh = Bias + b * sbb + h * sbh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < NQ
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
        mask=row_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + (b * H + h) * NQ + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + (b * H + h) * NQ + offs_m, mask=row_ok, other=0.0)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < NK
        kt = tl.load(
            K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=col_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        vt = tl.load(
            V + b * svb + h * svh + offs_n[None, :] * svn + offs_dv[:, None] * svd,
            mask=col_ok[None, :] & (offs_dv[:, None] < DV),
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        mm = tl.load(
            M + b * smb + offs_m[:, None] * smm + offs_n[None, :] * smn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        z, _ = _scores(
            q,
            kt,
            mm,
            bias_bh,
            offs_m,
            offs_n,
            sbm,
            sbn,
            NQ,
            NK,
            scale,
            FUSION_MUL,
            BIAS_KIND,
            CAUSAL,
            PREC,
        )
        p = tl.exp(z - lse[:, None])
        dp = tl.dot(do, vt, input_precision=PREC)
        dz = p * (dp - delta[:, None])
        if FUSION_MUL:
            dt = dz * mm
        else:
            dt = dz
        dt_mm = dt.to(Q.dtype.element_ty)
        if UPCAST:
            dt_mm = dt_mm.to(tl.float32)
        dq += tl.dot(dt_mm, tl.trans(kt), input_precision=PREC)
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < D),
    )
