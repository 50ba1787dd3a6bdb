r"""Triton backend of ``attention_jvp``: a flash-style forward shared by the probes, and a blockwise
backward that recomputes the probabilities from the saved row statistics.

Specification: :mod:`.reference` (per head, ``s = c q k^T`` (causal: ``-inf`` where key ``j > i``),
``p = softmax_j(s)``, ``o = p v``; per probe ``s_t = c (q_t k^T + q k_t^T)``,
``mu_i = sum_j p_ij s_t,ij``, ``o_t = (p * (s_t - mu)) v + p v_t``), whose docstring also derives the
backward formulas used here.

Layout of this file: load/score helpers, the forward kernel, the backward's shared tile and its two
kernels, the launchers, the ``autograd.Function``, the public entry points.

Forward (``_attn_jvp_fwd_kernel``). A program owns one (batch, head), ``BM`` query rows and a chunk
of ``PC`` probes. It loops over key blocks with an online softmax: the running row maximum ``m_i``
and normaliser ``l_i`` of the primal, shared by every probe of the chunk, and the accumulators

    acc_o  = sum_j e^(s_ij - m_i) v_j                            [BM, dv]
    acc_mu = sum_j e^(s_ij - m_i) s_t,ij                         [PC, BM]
    acc_t  = sum_j e^(s_ij - m_i) (s_t,ij v_j + v_t,j)           [PC, BM, dv]

each rescaled by ``e^(m_old - m_new)`` when the maximum grows. The epilogue writes ``o = acc_o / l``,
``mu = acc_mu / l``, ``o_t = acc_t / l - mu o`` and ``lse = m + log l``; ``T x S`` is never
materialised. The probe tiles are stacked so that one ``tl.dot`` serves them all where the other
operand is shared (``q_t k^T``, ``(p s_t) v``) and a batched (3-D) ``tl.dot`` where it is per probe
(``q k_t^T``, ``p v_t``).

Probe chunks: up to ``_MAX_PC`` probes share one primal pass (one program); more probes take more
programs on grid axis 2, each recomputing the primal scores (chunk 0 alone stores ``o`` and ``lse``).

Backward. ``r_i = o_i . g_t,i`` (per probe) and ``D_i = o_i . g_o,i + sum_probes [o_t,i . g_t,i -
mu_i r_i]`` are row reductions done in torch. Every program then recomputes, per (query block, key
block) tile (``_bwd_tile``), ``p = exp(s - lse)``, ``s_t``, ``a_ij = v_j . g_t,i``, and

    g_st = p (a - r)                                                        (per probe)
    g_s  = p (v_j . g_o,i - D_i + sum_probes [(s_t - mu) a + v_t,j . g_t,i - s_t r])

``_attn_jvp_bwd_kv_kernel`` (one program per key block, looping over query blocks) accumulates

    g_v  = p^T g_o + sum_probes (p (s_t - mu))^T g_t        g_vt = p^T g_t
    g_k  = c g_s^T q + c sum_probes g_st^T q_t              g_kt = c g_st^T q

and ``_attn_jvp_bwd_q_kernel`` (one program per query block, looping over key blocks)

    g_q  = c g_s k + c sum_probes g_st k_t                  g_qt = c g_st k

so no atomics are needed. Saved for backward (only when an input requires a gradient under grad
mode): the six inputs, ``o``, ``o_t``, ``lse`` and ``mu``. A gradient that does not reach the
backward (one output unused) is read as an expanded zero (no memory; the kernels still do its work).
Everything is linear in the per-probe terms, so probe chunks add: chunk 0 alone reads ``g_o`` and
``D`` (the other chunks load them as zeros), each chunk writes its partial ``g_q, g_k, g_v`` and
torch sums them (a plain store when there is a single chunk).

Precision: scores, statistics and accumulators are float32 for float16/bfloat16/float32 inputs and
float64 for float64; low-precision tiles enter ``tl.dot`` in the input dtype (probabilities cast to
it, as flash-attention does) with float32 accumulation. float32 ``tl.dot`` uses TF32 only where
``torch.backends.cuda.matmul.allow_tf32`` allows it. The scale is a compile-time constant so that
float64 keeps it exactly (a runtime float argument would be passed as float32); each distinct scale
compiles once. Offsets are int64 (``P B H T d`` may pass ``2^31``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ... import _backends

from .._triton import jit as _jit, tl, triton  # noqa: F401


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTERPRETED_DTYPES = (torch.float32, torch.float64)

# Tuning (GPU): BM = BN = 32 query rows / key columns per tile, so that the per-probe score tiles
# [PC, BM, BN] (PC <= 4) stay at 4K elements next to the [PC, BM, dv] accumulator; head dims are
# padded to a power of two >= 16 (tl.dot) and capped at 256 (register tiles). Small problems shrink
# the sequence blocks to the next power of two >= 16, which also keeps the interpreter's work low.
_BLOCK_M, _BLOCK_N, _MAX_PC, _MAX_HEAD_DIM = 32, 32, 4, 256


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------
@_jit
def _load2(ptr, r, c, s_r, s_c, n_r, n_c):
    """``[len(r), len(c)]`` tile ``ptr[r * s_r + c * s_c]``, zero outside ``r < n_r``, ``c < n_c``."""
    return tl.load(ptr + r[:, None] * s_r + c[None, :] * s_c, mask=(r[:, None] < n_r) & (c[None, :] < n_c),
                   other=0.0)


@_jit
def _load3(ptr, a, r, c, s_a, s_r, s_c, n_a, n_r, n_c):
    """``[len(a), len(r), len(c)]`` tile (``a``: probes), zero outside the bounds."""
    mask = (a[:, None, None] < n_a) & (r[None, :, None] < n_r) & (c[None, None, :] < n_c)
    return tl.load(ptr + a[:, None, None] * s_a + r[None, :, None] * s_r + c[None, None, :] * s_c, mask=mask,
                   other=0.0)


@_jit
def _visible(rm, rn, S, CAUSAL: tl.constexpr):
    """Key ``rn`` exists and (causal) ``rn <= rm``; rows past T are not masked (their loads are zeros,
    so they add nothing to the backward and the forward stores none of them)."""
    ok = rn[None, :] < S
    if CAUSAL:
        ok = ok & (rn[None, :] <= rm[:, None])
    return ok


@_jit
def _scores(q, qt, kT, ktT, SCALE: tl.constexpr, ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
            PC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """``s = c q k^T`` [BM, BN] and ``s_t = c (q_t k^T + q k_t^T)`` [PC, BM, BN] (unmasked)."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    s = tl.dot(q, kT, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    st = tl.reshape(tl.dot(tl.reshape(qt, (PC * BM, BD)), kT, input_precision=DOT_PRECISION, out_dtype=acc_dtype),
                    (PC, BM, BN))
    st += tl.dot(tl.broadcast_to(q[None, :, :], (PC, BM, BD)), ktT, input_precision=DOT_PRECISION,
                 out_dtype=acc_dtype)
    return s * SCALE, st * SCALE


# ----------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------
@_jit
def _attn_jvp_fwd_kernel(
    Q, K, V, QT, KT, VT, O, OT, LSE, MU,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    sqt_p, sqt_b, sqt_h, sqt_t, sqt_d, skt_p, skt_b, skt_h, skt_t, skt_d, svt_p, svt_b, svt_h, svt_t, svt_d,
    H, T, S, P, DH, DHV,
    SCALE: tl.constexpr, CAUSAL: tl.constexpr, ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """One (batch * head, query block, probe chunk). Inputs strided (q [B, H, T, d], q_t [P, B, H, T, d],
    ...); outputs contiguous: O [B, H, T, dv], OT [P, B, H, T, dv], LSE [B, H, T], MU [P, B, H, T]."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    bh = tl.program_id(0).to(tl.int64)
    n_bh = tl.num_programs(0).to(tl.int64)
    chunk = tl.program_id(2)
    b = bh // H
    h = bh % H
    i0 = tl.program_id(1) * BM
    rm = (i0 + tl.arange(0, BM)).to(tl.int64)
    pp = (chunk * PC + tl.arange(0, PC)).to(tl.int64)
    rd = tl.arange(0, BD).to(tl.int64)
    rdv = tl.arange(0, BDV).to(tl.int64)
    k_base = K + b * sk_b + h * sk_h
    kt_base = KT + b * skt_b + h * skt_h
    v_base = V + b * sv_b + h * sv_h
    vt_base = VT + b * svt_b + h * svt_h

    q = _load2(Q + b * sq_b + h * sq_h, rm, rd, sq_t, sq_d, T, DH)
    qt = _load3(QT + b * sqt_b + h * sqt_h, pp, rm, rd, sqt_p, sqt_t, sqt_d, P, T, DH)

    m = tl.full((BM,), float("-inf"), acc_dtype)
    l = tl.zeros((BM,), acc_dtype)
    acc_o = tl.zeros((BM, BDV), acc_dtype)
    acc_mu = tl.zeros((PC, BM), acc_dtype)
    acc_t = tl.zeros((PC, BM, BDV), acc_dtype)
    if CAUSAL:
        hi = tl.minimum(S, i0 + BM)  # no key beyond the block's last row is visible
    else:
        hi = S
    for j0 in range(0, hi, BN):
        rn = (j0 + tl.arange(0, BN)).to(tl.int64)
        kT = _load2(k_base, rd, rn, sk_d, sk_t, DH, S)
        ktT = _load3(kt_base, pp, rd, rn, skt_p, skt_d, skt_t, P, DH, S)
        v = _load2(v_base, rn, rdv, sv_t, sv_d, S, DHV)
        vt = _load3(vt_base, pp, rn, rdv, svt_p, svt_t, svt_d, P, S, DHV)
        s, st = _scores(q, qt, kT, ktT, SCALE, ACC_FP64, DOT_PRECISION, PC, BM, BN, BD)
        s = tl.where(_visible(rm, rn, S, CAUSAL), s, float("-inf"))
        # key 0 is visible to every row, so m is finite from the first block on
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(s - m_new[:, None])  # 0 where masked
        l = l * alpha + tl.sum(e, 1)
        acc_o = acc_o * alpha[:, None] + tl.dot(e.to(v.dtype), v, input_precision=DOT_PRECISION,
                                                out_dtype=acc_dtype)
        est = e[None, :, :] * st
        acc_mu = acc_mu * alpha[None, :] + tl.sum(est, 2)
        acc_t = acc_t * alpha[None, :, None]
        acc_t += tl.reshape(tl.dot(tl.reshape(est, (PC * BM, BN)).to(v.dtype), v, input_precision=DOT_PRECISION,
                                   out_dtype=acc_dtype), (PC, BM, BDV))
        acc_t += tl.dot(tl.broadcast_to(e[None, :, :], (PC, BM, BN)).to(vt.dtype), vt,
                        input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        m = m_new

    o = acc_o / l[:, None]
    mu = acc_mu / l[None, :]
    ot = acc_t / l[None, :, None] - mu[:, :, None] * o[None, :, :]
    row_ok = rm < T
    probe_ok = pp < P
    first = chunk == 0  # chunks > 0 recompute the primal but store none of it
    tl.store(O + (bh * T + rm[:, None]) * DHV + rdv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (rdv[None, :] < DHV) & first)
    tl.store(LSE + bh * T + rm, m + tl.log(l), mask=row_ok & first)
    tl.store(MU + (pp[:, None] * n_bh + bh) * T + rm[None, :], mu, mask=probe_ok[:, None] & row_ok[None, :])
    ot_offs = ((pp[:, None, None] * n_bh + bh) * T + rm[None, :, None]) * DHV + rdv[None, None, :]
    tl.store(OT + ot_offs, ot.to(OT.dtype.element_ty),
             mask=probe_ok[:, None, None] & row_ok[None, :, None] & (rdv[None, None, :] < DHV))


# ----------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------
@_jit
def _bwd_tile(q, qt, kT, ktT, vT, vtT, go, gt, lse, delta, mu, r, rm, rn, S,
              SCALE: tl.constexpr, CAUSAL: tl.constexpr, ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
              PC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """``(p, s_t, g_st, g_s)`` of one (query block, key block) tile (module doc, reference.py's
    backward): p and g_s [BM, BN], s_t and g_st [PC, BM, BN]. ``go``, ``delta`` are zero in probe
    chunks > 0, so that summing the chunks' g_s counts the primal terms once."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    s, st = _scores(q, qt, kT, ktT, SCALE, ACC_FP64, DOT_PRECISION, PC, BM, BN, BD)
    p = tl.where(_visible(rm, rn, S, CAUSAL), tl.exp(s - lse[:, None]), 0.0)
    a = tl.reshape(tl.dot(tl.reshape(gt, (PC * BM, BDV)), vT, input_precision=DOT_PRECISION, out_dtype=acc_dtype),
                   (PC, BM, BN))  # v_j . g_t,i
    a_vt = tl.dot(gt, vtT, input_precision=DOT_PRECISION, out_dtype=acc_dtype)  # v_t,j . g_t,i
    g_st = p[None, :, :] * (a - r[:, :, None])
    g_p = tl.sum((st - mu[:, :, None]) * a + a_vt - st * r[:, :, None], 0)
    g_p += tl.dot(go, vT, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    g_s = p * (g_p - delta[:, None])
    return p, st, g_st, g_s


@_jit
def _load_rows(Q, QT, GO, GT, LSE, DELTA, MU, R, b, h, bh, n_bh, rm, pp, rd, rdv, first,
               sq_b, sq_h, sq_t, sq_d, sqt_p, sqt_b, sqt_h, sqt_t, sqt_d,
               sgo_b, sgo_h, sgo_t, sgo_d, sgt_p, sgt_b, sgt_h, sgt_t, sgt_d, T, P, DH, DHV):
    """The query side of the backward for rows ``rm`` and probes ``pp``: q, q_t, g_o, g_t, lse, D,
    mu, r (g_o and D zero unless ``first``)."""
    q = _load2(Q + b * sq_b + h * sq_h, rm, rd, sq_t, sq_d, T, DH)
    qt = _load3(QT + b * sqt_b + h * sqt_h, pp, rm, rd, sqt_p, sqt_t, sqt_d, P, T, DH)
    go = _load2(GO + b * sgo_b + h * sgo_h, rm, rdv, sgo_t, sgo_d, tl.where(first, T, 0), DHV)
    gt = _load3(GT + b * sgt_b + h * sgt_h, pp, rm, rdv, sgt_p, sgt_t, sgt_d, P, T, DHV)
    row_ok = rm < T
    lse = tl.load(LSE + bh * T + rm, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + rm, mask=row_ok & first, other=0.0)
    stat_offs = (pp[:, None] * n_bh + bh) * T + rm[None, :]
    stat_ok = (pp[:, None] < P) & row_ok[None, :]
    mu = tl.load(MU + stat_offs, mask=stat_ok, other=0.0)
    r = tl.load(R + stat_offs, mask=stat_ok, other=0.0)
    return q, qt, go, gt, lse, delta, mu, r


@_jit
def _attn_jvp_bwd_kv_kernel(
    Q, K, V, QT, KT, VT, GO, GT, LSE, DELTA, MU, R, DK, DV, DKT, DVT,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    sqt_p, sqt_b, sqt_h, sqt_t, sqt_d, skt_p, skt_b, skt_h, skt_t, skt_d, svt_p, svt_b, svt_h, svt_t, svt_d,
    sgo_b, sgo_h, sgo_t, sgo_d, sgt_p, sgt_b, sgt_h, sgt_t, sgt_d,
    H, T, S, P, DH, DHV,
    SCALE: tl.constexpr, CAUSAL: tl.constexpr, ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """One (batch * head, key block, probe chunk): g_k, g_v (this chunk's part; DK [chunks, B, H, S, d],
    DV [chunks, B, H, S, dv]) and g_kt, g_vt of its probes (DKT [P, B, H, S, d], DVT [P, B, H, S, dv]);
    outputs contiguous. LSE, DELTA [B, H, T] and MU, R [P, B, H, T] contiguous, the rest strided."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    bh = tl.program_id(0).to(tl.int64)
    n_bh = tl.num_programs(0).to(tl.int64)
    chunk = tl.program_id(2)
    first = chunk == 0
    b = bh // H
    h = bh % H
    j0 = tl.program_id(1) * BN
    rn = (j0 + tl.arange(0, BN)).to(tl.int64)
    pp = (chunk * PC + tl.arange(0, PC)).to(tl.int64)
    rd = tl.arange(0, BD).to(tl.int64)
    rdv = tl.arange(0, BDV).to(tl.int64)

    kT = _load2(K + b * sk_b + h * sk_h, rd, rn, sk_d, sk_t, DH, S)
    ktT = _load3(KT + b * skt_b + h * skt_h, pp, rd, rn, skt_p, skt_d, skt_t, P, DH, S)
    vT = _load2(V + b * sv_b + h * sv_h, rdv, rn, sv_d, sv_t, DHV, S)
    vtT = _load3(VT + b * svt_b + h * svt_h, pp, rdv, rn, svt_p, svt_d, svt_t, P, DHV, S)

    dk = tl.zeros((BN, BD), acc_dtype)
    dv = tl.zeros((BN, BDV), acc_dtype)
    dkt = tl.zeros((PC, BN, BD), acc_dtype)
    dvt = tl.zeros((PC, BN, BDV), acc_dtype)
    if CAUSAL:
        lo = (j0 // BM) * BM  # rows above the block's first key see none of it
    else:
        lo = 0
    for i0 in range(lo, T, BM):
        rm = (i0 + tl.arange(0, BM)).to(tl.int64)
        q, qt, go, gt, lse, delta, mu, r = _load_rows(
            Q, QT, GO, GT, LSE, DELTA, MU, R, b, h, bh, n_bh, rm, pp, rd, rdv, first,
            sq_b, sq_h, sq_t, sq_d, sqt_p, sqt_b, sqt_h, sqt_t, sqt_d,
            sgo_b, sgo_h, sgo_t, sgo_d, sgt_p, sgt_b, sgt_h, sgt_t, sgt_d, T, P, DH, DHV)
        p, st, g_st, g_s = _bwd_tile(q, qt, kT, ktT, vT, vtT, go, gt, lse, delta, mu, r, rm, rn, S,
                                     SCALE, CAUSAL, ACC_FP64, DOT_PRECISION, PC, BM, BN, BD, BDV)
        gt2 = tl.reshape(gt, (PC * BM, BDV))
        pst = tl.reshape(p[None, :, :] * (st - mu[:, :, None]), (PC * BM, BN))
        dv += tl.dot(tl.trans(p).to(go.dtype), go, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        dv += tl.dot(tl.trans(pst).to(gt.dtype), gt2, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        dvt += tl.dot(tl.broadcast_to(tl.trans(p)[None, :, :], (PC, BN, BM)).to(gt.dtype), gt,
                      input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        dk += tl.dot(tl.trans(g_s).to(q.dtype), q, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        dk += tl.dot(tl.trans(tl.reshape(g_st, (PC * BM, BN))).to(qt.dtype), tl.reshape(qt, (PC * BM, BD)),
                     input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        dkt += tl.dot(tl.permute(g_st, (0, 2, 1)).to(q.dtype), tl.broadcast_to(q[None, :, :], (PC, BM, BD)),
                      input_precision=DOT_PRECISION, out_dtype=acc_dtype)

    key_ok = rn < S
    probe_ok = pp < P
    row_d = ((chunk * n_bh + bh) * S + rn[:, None]) * DH + rd[None, :]
    row_dv = ((chunk * n_bh + bh) * S + rn[:, None]) * DHV + rdv[None, :]
    tl.store(DK + row_d, (dk * SCALE).to(DK.dtype.element_ty), mask=key_ok[:, None] & (rd[None, :] < DH))
    tl.store(DV + row_dv, dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & (rdv[None, :] < DHV))
    probe_rows = (pp[:, None, None] * n_bh + bh) * S + rn[None, :, None]
    ok3 = probe_ok[:, None, None] & key_ok[None, :, None]
    tl.store(DKT + probe_rows * DH + rd[None, None, :], (dkt * SCALE).to(DKT.dtype.element_ty),
             mask=ok3 & (rd[None, None, :] < DH))
    tl.store(DVT + probe_rows * DHV + rdv[None, None, :], dvt.to(DVT.dtype.element_ty),
             mask=ok3 & (rdv[None, None, :] < DHV))


@_jit
def _attn_jvp_bwd_q_kernel(
    Q, K, V, QT, KT, VT, GO, GT, LSE, DELTA, MU, R, DQ, DQT,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    sqt_p, sqt_b, sqt_h, sqt_t, sqt_d, skt_p, skt_b, skt_h, skt_t, skt_d, svt_p, svt_b, svt_h, svt_t, svt_d,
    sgo_b, sgo_h, sgo_t, sgo_d, sgt_p, sgt_b, sgt_h, sgt_t, sgt_d,
    H, T, S, P, DH, DHV,
    SCALE: tl.constexpr, CAUSAL: tl.constexpr, ACC_FP64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
):
    """One (batch * head, query block, probe chunk): g_q (this chunk's part; DQ [chunks, B, H, T, d])
    and g_qt of its probes (DQT [P, B, H, T, d]); layouts as in the key-side kernel."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    bh = tl.program_id(0).to(tl.int64)
    n_bh = tl.num_programs(0).to(tl.int64)
    chunk = tl.program_id(2)
    first = chunk == 0
    b = bh // H
    h = bh % H
    i0 = tl.program_id(1) * BM
    rm = (i0 + tl.arange(0, BM)).to(tl.int64)
    pp = (chunk * PC + tl.arange(0, PC)).to(tl.int64)
    rd = tl.arange(0, BD).to(tl.int64)
    rdv = tl.arange(0, BDV).to(tl.int64)
    k_base = K + b * sk_b + h * sk_h
    kt_base = KT + b * skt_b + h * skt_h
    v_base = V + b * sv_b + h * sv_h
    vt_base = VT + b * svt_b + h * svt_h
    q, qt, go, gt, lse, delta, mu, r = _load_rows(
        Q, QT, GO, GT, LSE, DELTA, MU, R, b, h, bh, n_bh, rm, pp, rd, rdv, first,
        sq_b, sq_h, sq_t, sq_d, sqt_p, sqt_b, sqt_h, sqt_t, sqt_d,
        sgo_b, sgo_h, sgo_t, sgo_d, sgt_p, sgt_b, sgt_h, sgt_t, sgt_d, T, P, DH, DHV)

    dq = tl.zeros((BM, BD), acc_dtype)
    dqt = tl.zeros((PC, BM, BD), acc_dtype)
    if CAUSAL:
        hi = tl.minimum(S, i0 + BM)
    else:
        hi = S
    for j0 in range(0, hi, BN):
        rn = (j0 + tl.arange(0, BN)).to(tl.int64)
        k = _load2(k_base, rn, rd, sk_t, sk_d, S, DH)
        kt = _load3(kt_base, pp, rn, rd, skt_p, skt_t, skt_d, P, S, DH)
        vT = _load2(v_base, rdv, rn, sv_d, sv_t, DHV, S)
        vtT = _load3(vt_base, pp, rdv, rn, svt_p, svt_d, svt_t, P, DHV, S)
        _, _, g_st, g_s = _bwd_tile(q, qt, tl.trans(k), tl.permute(kt, (0, 2, 1)), vT, vtT, go, gt, lse, delta,
                                    mu, r, rm, rn, S, SCALE, CAUSAL, ACC_FP64, DOT_PRECISION, PC, BM, BN, BD, BDV)
        dq += tl.dot(g_s.to(k.dtype), k, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        dq += tl.sum(tl.dot(g_st.to(kt.dtype), kt, input_precision=DOT_PRECISION, out_dtype=acc_dtype), 0)
        dqt += tl.dot(g_st.to(k.dtype), tl.broadcast_to(k[None, :, :], (PC, BN, BD)),
                      input_precision=DOT_PRECISION, out_dtype=acc_dtype)

    row_ok = rm < T
    d_ok = rd < DH
    tl.store(DQ + ((chunk * n_bh + bh) * T + rm[:, None]) * DH + rd[None, :], (dq * SCALE).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    dqt_offs = ((pp[:, None, None] * n_bh + bh) * T + rm[None, :, None]) * DH + rd[None, None, :]
    tl.store(DQT + dqt_offs, (dqt * SCALE).to(DQT.dtype.element_ty),
             mask=(pp < P)[:, None, None] & row_ok[None, :, None] & d_ok[None, None, :])


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------
def _block(n: int, cap: int) -> int:
    """Power-of-two block for a sequence of length n: >= 16 (tl.dot), <= cap."""
    return min(cap, max(16, triton.next_power_of_2(max(int(n), 1))))


def _head_block(n: int) -> int:
    """A head dimension padded to a power of two >= 16 (masked beyond n)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _precision(x: torch.Tensor):
    """(ACC_FP64, accumulation dtype, DOT_PRECISION) for x's dtype."""
    fp64 = x.dtype == torch.float64
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return fp64, (torch.float64 if fp64 else torch.float32), "tf32" if tf32 else "ieee"


def _chunks(P: int) -> Tuple[int, int]:
    """(PC, number of chunks): PC probes per program, a power of two <= _MAX_PC."""
    pc = min(triton.next_power_of_2(max(P, 1)), _MAX_PC)
    return pc, max(1, triton.cdiv(P, pc))


def _strides(*tensors):
    return [s for x in tensors for s in x.stride()]


def _meta(q, k, v, qt, causal, scale):
    """Shape arguments and compile-time constants shared by the three kernels."""
    B, H, T, d = q.shape
    S, dv, P = k.shape[2], v.shape[3], qt.shape[0]
    fp64, _, precision = _precision(q)
    pc, n_chunks = _chunks(P)
    shapes = (H, T, S, P, d, dv)
    consts = dict(SCALE=scale, CAUSAL=causal, ACC_FP64=fp64, DOT_PRECISION=precision, PC=pc,
                  BM=_block(T, _BLOCK_M), BN=_block(S, _BLOCK_N), BD=_head_block(d), BDV=_head_block(dv))
    return shapes, consts, n_chunks


def _fwd(q, k, v, qt, kt, vt, causal: bool, scale: float):
    """``(o [B, H, T, dv], o_t [P, B, H, T, dv], lse [B, H, T], mu [P, B, H, T])``; tangents
    ``[P, B, H, *, *]``; lse and mu in the accumulation dtype."""
    B, H, T, _ = q.shape
    S, dv, P = k.shape[2], v.shape[3], qt.shape[0]
    _, acc, _ = _precision(q)
    o = torch.empty(B, H, T, dv, device=q.device, dtype=q.dtype)
    ot = torch.empty(P, B, H, T, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=acc)
    mu = torch.empty(P, B, H, T, device=q.device, dtype=acc)
    if S == 0:  # no keys: o = o_t = 0 (empty sums), as in the reference
        o.zero_()
        ot.zero_()
        mu.zero_()
        lse.fill_(float("-inf"))
        return o, ot, lse, mu
    shapes, consts, n_chunks = _meta(q, k, v, qt, causal, scale)
    if B * H * T:
        _attn_jvp_fwd_kernel[(B * H, triton.cdiv(T, consts["BM"]), n_chunks)](
            q, k, v, qt, kt, vt, o, ot, lse, mu, *_strides(q, k, v, qt, kt, vt), *shapes, **consts)
    return o, ot, lse, mu


def _sum_chunks(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient from the probe chunks' partials ``[chunks, ...]``."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0).to(dtype)


def _bwd(ctx, go, gt):
    """Gradients of (q, k, v, q_t, k_t, v_t), None where not needed (module doc)."""
    q, k, v, qt, kt, vt, o, ot, lse, mu = ctx.saved_tensors
    need = ctx.needs_input_grad[:6]
    need_q, need_kv = need[0] or need[3], need[1] or need[2] or need[4] or need[5]
    B, H, T, d = q.shape
    S, dv, P = k.shape[2], v.shape[3], qt.shape[0]
    _, acc, _ = _precision(q)
    # A missing gradient is an expanded zero (stride 0: no memory, the kernels read zeros).
    go = o.new_zeros(()).expand(o.shape) if go is None else go
    gt = ot.new_zeros(()).expand(ot.shape) if gt is None else gt
    r = (o.to(acc)[None] * gt.to(acc)).sum(-1)  # [P, B, H, T]
    delta = (o.to(acc) * go.to(acc)).sum(-1) + (ot.to(acc) * gt.to(acc)).sum(-1).sum(0) - (mu * r).sum(0)
    r, delta = r.contiguous(), delta.contiguous()

    shapes, consts, n_chunks = _meta(q, k, v, qt, ctx.causal, ctx.scale)
    part = q.dtype if n_chunks == 1 else acc  # chunk partials are summed in the accumulation dtype
    grads = [None] * 6
    strides = _strides(q, k, v, qt, kt, vt, go, gt)
    common = (q, k, v, qt, kt, vt, go, gt, lse, delta, mu, r)
    if need_kv:
        dk = torch.zeros(n_chunks, B, H, S, d, device=q.device, dtype=part)
        dvv = torch.zeros(n_chunks, B, H, S, dv, device=q.device, dtype=part)
        dkt = torch.zeros(P, B, H, S, d, device=q.device, dtype=q.dtype)
        dvt = torch.zeros(P, B, H, S, dv, device=q.device, dtype=q.dtype)
        if B * H * S and T:
            _attn_jvp_bwd_kv_kernel[(B * H, triton.cdiv(S, consts["BN"]), n_chunks)](
                *common, dk, dvv, dkt, dvt, *strides, *shapes, **consts)
        grads[1], grads[2] = _sum_chunks(dk, q.dtype), _sum_chunks(dvv, q.dtype)
        grads[4], grads[5] = dkt, dvt
    if need_q:
        dq = torch.zeros(n_chunks, B, H, T, d, device=q.device, dtype=part)
        dqt = torch.zeros(P, B, H, T, d, device=q.device, dtype=q.dtype)
        if B * H * T and S:
            _attn_jvp_bwd_q_kernel[(B * H, triton.cdiv(T, consts["BM"]), n_chunks)](
                *common, dq, dqt, *strides, *shapes, **consts)
        grads[0], grads[3] = _sum_chunks(dq, q.dtype), dqt
    return [g if n else None for g, n in zip(grads, need)]


# ----------------------------------------------------------------------------
# autograd.Function and public entry points
# ----------------------------------------------------------------------------
class _AttentionJVPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qt, kt, vt, causal, scale, save):
        o, ot, lse, mu = _fwd(q, k, v, qt, kt, vt, causal, scale)
        ctx.set_materialize_grads(False)
        ctx.causal, ctx.scale = causal, scale
        if save:
            ctx.save_for_backward(q, k, v, qt, kt, vt, o, ot, lse, mu)
        return o, ot

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, go, gt):
        return (*_bwd(ctx, go, gt), None, None, None)


def unavailable_reason(q, k, v, q_t, k_t, v_t) -> Optional[str]:
    """None when this backend can serve the call (arguments already checked by
    :func:`grokalign_fast.ops.attention_jvp.check_args`), else the reason it cannot."""
    reason = _backends.triton_unavailable_reason(q.device)
    if reason is not None:
        return reason
    if q.dtype not in _DTYPES:
        return f"the Triton kernels take float16, bfloat16, float32 or float64, not {q.dtype}"
    if q.device.type == "cpu" and q.dtype not in _INTERPRETED_DTYPES:
        return f"under the Triton interpreter the kernels serve float32 and float64 only, not {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
        return f"head dims above {_MAX_HEAD_DIM} are not supported (d={q.shape[-1]}, dv={v.shape[-1]})"
    return None


def attention_jvp_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                         v_t: torch.Tensor, causal: bool = False, scale: Optional[float] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, H, T, dv], o_t)`` as :func:`.reference.attention_jvp`, differentiable in all six inputs
    (any strides). Tangents ``[B, H, *, *]`` or ``[P, B, H, *, *]`` (all three alike); ``o_t`` has
    their layout."""
    probe_dim = q_t.dim() == 5
    if not probe_dim:
        q_t, k_t, v_t = q_t.unsqueeze(0), k_t.unsqueeze(0), v_t.unsqueeze(0)
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, q_t, k_t, v_t))
    o, ot = _AttentionJVPFunction.apply(q, k, v, q_t, k_t, v_t, bool(causal), c, save)
    return o, (ot if probe_dim else ot.squeeze(0))
