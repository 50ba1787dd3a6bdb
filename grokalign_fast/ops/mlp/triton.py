r"""Triton backend of the dual-stream Linear (+bias) + activation.

Specification: :mod:`.reference` (``z = x W^T + b``, ``y = s(z)``,
``u_k = t_k W^T``, ``t'_k = s'(z[index]) * u_k``, ``sq[r] = (1/K) sum_k ||t'_k[r]||^2``).

Layout of this file (Liger-Kernel style): activation helpers, the forward
kernel, the backward kernels (epilogue, the two GEMMs), their launchers, the
``autograd.Function`` and the two public functions.

Forward (``_dual_linear_fwd_kernel``). A program owns ``BM`` primal rows,
``BN`` output columns and a chunk of ``KC`` tangent streams. Each step of the
loop over IN loads one weight tile ``W[n-tile, k-tile]^T`` once and applies it
to the primal tile ``x[BM, BK]`` and to the ``KC * BM`` stacked tangent rows
(one ``tl.dot`` each). The epilogue works in registers: ``z = acc + b`` (bias
on the primal only), ``y = s(z)``, ``t' = s'(z) * u`` (the tangent accumulator
reshaped to ``[KC, BM, BN]``), and for the squared-norm variant the per-row sum
of ``t'^2`` over the tile, written to a small ``[chunks * n-tiles, R]`` buffer
that one ``sum(0)`` reduces (deterministic; ``t'`` itself is never written).
With ``index=None`` (tangent row r rides on primal row r) this single pass is
the fast path. With ``index`` the work is split in two launches of the same
kernel: a primal pass (``z``-GEMM, stores ``y`` and the saved ``z``/mask), then
a tangent pass whose epilogue gathers ``z[index]`` (or the mask) from the first.

Saved for backward (only when a gradient is needed): ReLU / leaky ReLU a
``uint8`` mask ``z > 0``; smooth activations ``z`` (input dtype); identity
nothing; plus ``u = t W^T`` where the backward needs it (smooth activations,
whose ``s''`` term is ``sum_k gt_k u_k``, and the squared-norm variant, whose
tangent cotangent is ``(2/K) gsq * t'``). Recomputing ``u`` would cost one more
GEMM per tangent stream; storing it costs the same memory as ``t'``.

Backward. ``_dual_linear_bwd_epilogue_kernel`` forms, in the accumulation
dtype, one buffer ``G = [gz; gu]`` of ``B + K R`` rows:
``gu_k = gt_k * s'(z[index])`` and ``gz = gy * s'(z) + scatter_index(s''(z[index]) sum_k gt_k u_k)``
(fused in registers for ``index=None``; with ``index`` the tangent launch
``atomic_add``\ s into the rows written by the primal launch, so repeated
indices accumulate, in an order that is not deterministic on a GPU).
Two Triton GEMMs follow: ``[gx; gt_in] = G W`` (``_matmul_kernel``, one launch
over the rows that are needed, since ``gz`` and ``gu`` are stacked in one
buffer) and ``gW = gz^T x + gu^T t`` (``_dual_linear_bwd_weight_kernel``, the
two reduction segments in one loop nest, with ``gb = sum_rows gz`` fused into
the programs of the first IN tile). Only when ``b`` needs a gradient and ``W``
does not is ``gb`` a plain ``torch`` column sum.

Precision: accumulation is float32 for float16/bfloat16/float32 inputs and
float64 for float64; float32 ``tl.dot`` uses TF32 only where
``torch.backends.cuda.matmul.allow_tf32`` allows it. ``alpha`` (leaky ReLU)
is a compile-time constant so that float64 keeps it exactly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ... import _backends
from .reference import ACT_CODE, PIECEWISE_LINEAR

try:  # the module imports without triton; unavailable_reason then says why
    import triton
    import triton.language as tl

    _jit = triton.jit
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

    def _jit(fn):
        return fn


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Activation codes (reference.ACT_CODE): 0 identity, 1 relu, 2 leaky_relu,
# 3 gelu, 4 gelu_tanh, 5 silu, 6 tanh, 7 sigmoid. Literal constants below are
# materialised in the tensor's dtype (exact in float64):
#   0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2 pi),
#   0.7978845608028654 = sqrt(2/pi), 0.044715 (tanh-GELU), 0.134145 = 3 * 0.044715,
#   0.26829 = 6 * 0.044715.


# ----------------------------------------------------------------------------
# Activation helpers (ACT, ALPHA are compile-time constants)
# ----------------------------------------------------------------------------
@_jit
def _tanh(z):
    # libdevice-free: tanh|z| = (1 - e) / (1 + e), e = exp(-2|z|) <= 1 (no overflow).
    e = tl.exp(-2.0 * tl.abs(z))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -th, th)


@_jit
def _sigmoid(z):
    # 1 / (1 + exp(-z)), with the exponent kept <= 0 on both sides.
    e = tl.exp(-tl.abs(z))
    s = 1.0 / (1.0 + e)
    return tl.where(z >= 0, s, e * s)


@_jit
def _act_fwd(z, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """s(z)."""
    if ACT == 0:
        y = z
    elif ACT == 1:
        y = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        y = tl.where(z > 0, z, z * ALPHA)
    elif ACT == 3:
        y = z * (0.5 * (1.0 + tl.erf(z * 0.7071067811865476)))
    elif ACT == 4:
        th = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        y = 0.5 * z * (1.0 + th)
    elif ACT == 5:
        y = z * _sigmoid(z)
    elif ACT == 6:
        y = _tanh(z)
    else:
        y = _sigmoid(z)
    return y


@_jit
def _act_d1(z, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """s'(z) (for the piecewise-linear codes 0-2 prefer _d1_from_mask)."""
    one = tl.full(z.shape, 1.0, z.dtype)  # keeps ALPHA exact in float64
    if ACT == 0:
        d1 = one
    elif ACT == 1:
        d1 = tl.where(z > 0, one, 0.0)
    elif ACT == 2:
        d1 = tl.where(z > 0, one, one * ALPHA)
    elif ACT == 3:
        phi = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d1 = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * phi
    elif ACT == 4:
        th = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        dg = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        d1 = 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * dg
    elif ACT == 5:
        s = _sigmoid(z)
        d1 = s * (1.0 + z * (1.0 - s))
    elif ACT == 6:
        th = _tanh(z)
        d1 = 1.0 - th * th
    else:
        s = _sigmoid(z)
        d1 = s * (1.0 - s)
    return d1


@_jit
def _act_d2(z, ACT: tl.constexpr):
    """s''(z) for the smooth codes 3-7 (zero for 0-2, never called for them)."""
    if ACT == 3:
        d2 = tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
    elif ACT == 4:
        th = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        sech2 = 1.0 - th * th
        dg = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        d2g = 0.7978845608028654 * 0.26829 * z
        d2 = sech2 * dg + 0.5 * z * (-2.0 * th * sech2 * dg * dg + sech2 * d2g)
    elif ACT == 5:
        s = _sigmoid(z)
        d2 = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == 6:
        th = _tanh(z)
        d2 = -2.0 * th * (1.0 - th * th)
    elif ACT == 7:
        s = _sigmoid(z)
        d2 = s * (1.0 - s) * (1.0 - 2.0 * s)
    else:
        d2 = z * 0.0
    return d2


@_jit
def _load_d1(saved_ptr, offs, mask, ACC_FP64: tl.constexpr, ACT: tl.constexpr, ALPHA: tl.constexpr):
    """s' from the saved tensor: nothing (identity), the uint8 mask z > 0 (relu,
    leaky_relu) or z (smooth); returned in the accumulation dtype."""
    if ACC_FP64:
        one = tl.full(offs.shape, 1.0, tl.float64)
    else:
        one = tl.full(offs.shape, 1.0, tl.float32)
    if ACT == 0:
        d1 = one
    elif ACT == 1:
        pos = tl.load(saved_ptr + offs, mask=mask, other=0)
        d1 = tl.where(pos != 0, one, 0.0)
    elif ACT == 2:
        pos = tl.load(saved_ptr + offs, mask=mask, other=0)
        d1 = tl.where(pos != 0, one, one * ALPHA)
    else:
        z = tl.load(saved_ptr + offs, mask=mask, other=0.0).to(one.dtype)
        d1 = _act_d1(z, ACT, ALPHA)
    return d1


# ----------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------
# Tuning (GPU): BN = 64 output columns and BK = 32 input columns per step; the
# primal tile has BM rows and the tangent tile KC * BM rows, with BM chosen so
# that KC * BM is about 64 (BM >= 16 for tl.dot), i.e. each weight tile feeds
# (1 + KC) * BM ~ 80-128 rows of MMA before it is dropped. KC <= 8 streams per
# program bounds the register tile; more streams take more programs (grid axis
# 2), each recomputing its z tile (one extra primal GEMM per 8 streams).
# Small problems shrink every block to the next power of two >= 16 of the
# dimension, which also keeps the interpreter's program count low.
_FWD_BN, _FWD_BK, _FWD_ROWS, _FWD_MAX_KC = 64, 32, 64, 8


@_jit
def _dual_linear_fwd_kernel(
    x_ptr, t_ptr, w_ptr, b_ptr, index_ptr,
    y_ptr, saved_ptr, tout_ptr, u_ptr, sq_part_ptr,
    M, IN, OUT, K,
    stride_xm, stride_xi, stride_tk, stride_tr, stride_ti, stride_wo, stride_wi,
    ACT: tl.constexpr, ALPHA: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PRIMAL: tl.constexpr, HAS_TANGENT: tl.constexpr,
    GATHER: tl.constexpr, STORE_SAVED: tl.constexpr, STORE_TOUT: tl.constexpr,
    STORE_U: tl.constexpr, SQNORM: tl.constexpr,
    ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One (row tile, column tile, stream chunk) of the dual-stream layer.

    Rows are primal rows (HAS_PRIMAL, M = B) or tangent rows (M = R); with
    HAS_PRIMAL and HAS_TANGENT together they coincide (index=None). With
    GATHER (tangent-only pass) s' comes from the saved tensor at rows index[r].
    Outputs y, saved are [B, OUT]; tout, u are [K, R, OUT]; sq_part is [chunks * n-tiles, R]; all contiguous.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < OUT
    # Tangent tile: KC streams stacked, row i is stream pid_c*KC + i // BM, row pid_m*BM + i % BM.
    ti = tl.arange(0, KC * BM)
    t_k = pid_c * KC + ti // BM
    t_r = pid_m * BM + ti % BM
    t_ok = (t_k < K) & (t_r < M)

    acc_z = tl.zeros((BM, BN), dtype=acc_dtype)
    acc_u = tl.zeros((KC * BM, BN), dtype=acc_dtype)
    for i0 in range(0, IN, BK):
        ki = i0 + rk
        k_ok = ki < IN
        w = tl.load(
            w_ptr + rn[None, :] * stride_wo + ki[:, None] * stride_wi,
            mask=k_ok[:, None] & n_ok[None, :], other=0.0,
        )
        if UPCAST:
            w = w.to(tl.float32)
        if HAS_PRIMAL:
            a = tl.load(
                x_ptr + rm[:, None] * stride_xm + ki[None, :] * stride_xi,
                mask=m_ok[:, None] & k_ok[None, :], other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
            acc_z = tl.dot(a, w, acc_z, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        if HAS_TANGENT:
            a_t = tl.load(
                t_ptr + t_k[:, None] * stride_tk + t_r[:, None] * stride_tr + ki[None, :] * stride_ti,
                mask=t_ok[:, None] & k_ok[None, :], other=0.0,
            )
            if UPCAST:
                a_t = a_t.to(tl.float32)
            acc_u = tl.dot(a_t, w, acc_u, input_precision=DOT_PRECISION, out_dtype=acc_dtype)

    mn_ok = m_ok[:, None] & n_ok[None, :]
    offs_mn = rm[:, None] * OUT + rn[None, :]
    if HAS_PRIMAL:
        z = acc_z
        if HAS_BIAS:
            b = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(acc_dtype)
            z = z + b[None, :]
        first = mn_ok & (pid_c == 0)  # stream chunks > 0 recompute z but store nothing
        tl.store(y_ptr + offs_mn, _act_fwd(z, ACT, ALPHA).to(y_ptr.dtype.element_ty), mask=first)
        if STORE_SAVED:
            if ACT == 1 or ACT == 2:
                tl.store(saved_ptr + offs_mn, (z > 0).to(tl.uint8), mask=first)
            elif ACT >= 3:
                tl.store(saved_ptr + offs_mn, z.to(saved_ptr.dtype.element_ty), mask=first)

    if HAS_TANGENT:
        if GATHER:
            zrow = tl.load(index_ptr + rm, mask=m_ok, other=0)
            d1 = _load_d1(saved_ptr, zrow[:, None] * OUT + rn[None, :], mn_ok, ACC_FP64, ACT, ALPHA)
        else:
            d1 = _act_d1(z, ACT, ALPHA)
        u3 = tl.reshape(acc_u, (KC, BM, BN))
        tout = d1[None, :, :] * u3
        kk = pid_c * KC + tl.arange(0, KC)
        offs3 = kk[:, None, None] * (M * OUT) + offs_mn[None, :, :]
        mask3 = (kk < K)[:, None, None] & mn_ok[None, :, :]
        if STORE_TOUT:
            tl.store(tout_ptr + offs3, tout.to(tout_ptr.dtype.element_ty), mask=mask3)
        if STORE_U:
            tl.store(u_ptr + offs3, u3.to(u_ptr.dtype.element_ty), mask=mask3)
        if SQNORM:
            # masked loads left zeros outside the problem, so the sums need no mask
            part = tl.sum(tl.sum(tout * tout, axis=2), axis=0)
            tl.store(sq_part_ptr + (pid_c * tl.num_programs(1) + pid_n) * M + rm, part, mask=m_ok)


# ----------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------
# Tuning (GPU): the epilogue is elementwise over [BM, BN] tiles with a loop over
# the K streams (memory-bound: 32 x 64 keeps loads coalesced along OUT).
_EPI_BM, _EPI_BN = 32, 64


@_jit
def _dual_linear_bwd_epilogue_kernel(
    gy_ptr, gt_ptr, gsq_ptr, saved_ptr, u_ptr, index_ptr, g_ptr,
    M, B, OUT, K,
    stride_gym, stride_gyo, stride_gtk, stride_gtr, stride_gto, stride_gsq,
    ACT: tl.constexpr, ALPHA: tl.constexpr,
    PRIMAL_ROWS: tl.constexpr, TANGENT: tl.constexpr, GATHER: tl.constexpr,
    HAS_GY: tl.constexpr, SQNORM: tl.constexpr, ADD_GZR: tl.constexpr, STORE_GU: tl.constexpr,
    ACC_FP64: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """G = [gz (B rows); gu (K*R rows)] of the layer, in the accumulation dtype.

    PRIMAL_ROWS: rows are primal rows, write gz = gy * s'(z) (+ the tangent term
    when TANGENT and not GATHER: index=None). TANGENT: rows r are tangent rows:
    g_k = gt_k (or (2/K) gsq[r] t'_k for SQNORM), gu_k = g_k * s'(z[r']);
    ADD_GZR adds s''(z[r']) sum_k g_k u_k to gz[r'], atomically when GATHER
    (r' = index[r]).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < OUT
    mn_ok = m_ok[:, None] & n_ok[None, :]
    offs_mn = rm[:, None] * OUT + rn[None, :]

    gz = tl.zeros((BM, BN), dtype=acc_dtype)
    if PRIMAL_ROWS:
        if HAS_GY:
            gy = tl.load(gy_ptr + rm[:, None] * stride_gym + rn[None, :] * stride_gyo, mask=mn_ok, other=0.0)
            gz = gy.to(acc_dtype) * _load_d1(saved_ptr, offs_mn, mn_ok, ACC_FP64, ACT, ALPHA)

    if TANGENT:
        if GATHER:
            zrow = tl.load(index_ptr + rm, mask=m_ok, other=0)
        else:
            zrow = rm
        z_offs = zrow[:, None] * OUT + rn[None, :]
        if ACT >= 3:
            z = tl.load(saved_ptr + z_offs, mask=mn_ok, other=0.0).to(acc_dtype)
            d1 = _act_d1(z, ACT, ALPHA)
        else:
            d1 = _load_d1(saved_ptr, z_offs, mn_ok, ACC_FP64, ACT, ALPHA)
        if SQNORM:
            gs = tl.load(gsq_ptr + rm * stride_gsq, mask=m_ok, other=0.0).to(acc_dtype)
            gscale = gs[:, None] * d1 * 2.0 / K  # g_k = (2/K) gsq t'_k = gscale * u_k
        acc = tl.zeros((BM, BN), dtype=acc_dtype)
        for k in range(0, K):
            if SQNORM or ADD_GZR:
                u = tl.load(u_ptr + k * (M * OUT) + offs_mn, mask=mn_ok, other=0.0).to(acc_dtype)
            if SQNORM:
                g = gscale * u
            else:
                g = tl.load(
                    gt_ptr + k * stride_gtk + rm[:, None] * stride_gtr + rn[None, :] * stride_gto,
                    mask=mn_ok, other=0.0,
                ).to(acc_dtype)
            if STORE_GU:
                tl.store(g_ptr + (B + k * M) * OUT + offs_mn, g * d1, mask=mn_ok)
            if ADD_GZR:
                acc += g * u
        if ADD_GZR:
            gzr = acc * _act_d2(z, ACT)
            if GATHER:
                tl.atomic_add(g_ptr + z_offs, gzr, mask=mn_ok)
            else:
                gz += gzr

    if PRIMAL_ROWS:
        tl.store(g_ptr + offs_mn, gz, mask=mn_ok)


# Tuning (GPU): classic 64 x 64 x 32 tiles with GROUP_M = 8 super-grouping of
# row tiles for L2 reuse of the W column panel.
_MM_BM, _MM_BN, _MM_BK, _MM_GROUP = 64, 64, 32, 8


@_jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, KD,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = A[M, KD] @ B[KD, N]; A (the accumulation-dtype G) is cast to B's dtype."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=acc_dtype)
    for k0 in range(0, KD, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm < M)[:, None] & (kk < KD)[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk < KD)[:, None] & (rn < N)[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            a = a.to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


# Tuning (GPU): 64 (OUT) x 64 (IN) output tiles, 32 reduction rows per step.
_W_BO, _W_BI, _W_BR = 64, 64, 32


@_jit
def _dual_linear_bwd_weight_kernel(
    g_ptr, x_ptr, t_ptr, gw_ptr, gb_ptr,
    B, R, K, IN, OUT,
    stride_xm, stride_xi, stride_tk, stride_tr, stride_ti,
    TANGENT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BO: tl.constexpr, BI: tl.constexpr, BR: tl.constexpr,
):
    """gW[OUT, IN] = gz^T x + gu^T t (G = [gz; gu] contiguous [B + K R, OUT]);
    the programs of IN tile 0 also write gb = sum_rows gz."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    ro = pid_o * BO + tl.arange(0, BO)
    ri = pid_i * BI + tl.arange(0, BI)
    rr = tl.arange(0, BR)
    o_ok = ro < OUT
    i_ok = ri < IN
    acc = tl.zeros((BO, BI), dtype=acc_dtype)
    gb = tl.zeros((BO,), dtype=acc_dtype)
    for r0 in range(0, B, BR):
        rows = r0 + rr
        r_ok = rows < B
        a = tl.load(g_ptr + rows[None, :] * OUT + ro[:, None], mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        xb = tl.load(x_ptr + rows[:, None] * stride_xm + ri[None, :] * stride_xi,
                     mask=r_ok[:, None] & i_ok[None, :], other=0.0)
        if BIAS_GRAD:
            gb += tl.sum(a, axis=1)
        if UPCAST:
            xb = xb.to(tl.float32)
        else:
            a = a.to(xb.dtype)
        acc = tl.dot(a, xb, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    if TANGENT:
        KR = K * R
        for r0 in range(0, KR, BR):
            rows = r0 + rr
            r_ok = rows < KR
            a = tl.load(g_ptr + (B + rows[None, :]) * OUT + ro[:, None],
                        mask=o_ok[:, None] & r_ok[None, :], other=0.0)
            tb = tl.load(
                t_ptr + (rows // R)[:, None] * stride_tk + (rows % R)[:, None] * stride_tr + ri[None, :] * stride_ti,
                mask=r_ok[:, None] & i_ok[None, :], other=0.0,
            )
            if UPCAST:
                tb = tb.to(tl.float32)
            else:
                a = a.to(tb.dtype)
            acc = tl.dot(a, tb, acc, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    tl.store(gw_ptr + ro[:, None] * IN + ri[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=o_ok[:, None] & i_ok[None, :])
    if BIAS_GRAD:
        tl.store(gb_ptr + ro, gb.to(gb_ptr.dtype.element_ty), mask=o_ok & (pid_i == 0))


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------
def _block(n: int, cap: int) -> int:
    """Power-of-two block for a dimension of size n: >= 16 (tl.dot), <= cap."""
    return min(cap, max(16, triton.next_power_of_2(max(int(n), 1))))


def _precision(x: torch.Tensor):
    """(ACC_FP64, UPCAST, DOT_PRECISION) for x's dtype."""
    fp64 = x.dtype == torch.float64
    # The interpreter gets bfloat16 wrong: tl.dot multiplies the raw bits and
    # .to(tl.bfloat16) truncates instead of rounding to nearest. There (UPCAST)
    # the kernels upcast bf16 tiles to float32 and write float32 buffers that
    # torch rounds to bfloat16 afterwards.
    upcast = x.dtype == torch.bfloat16 and _backends.triton_interpreted()
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return fp64, upcast, "tf32" if tf32 else "ieee"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _saved_dtype(act: str, dtype: torch.dtype) -> Optional[torch.dtype]:
    if act == "identity":
        return None
    return torch.uint8 if act in PIECEWISE_LINEAR else dtype


def _fwd(x, t, weight, bias, act, alpha, index, sqnorm, save):
    """Launch the forward; returns (y, t_out or sq, saved, u): saved (the mask or z, see
    :func:`_saved_dtype`) and u are None unless ``save`` asks for them."""
    B, IN = x.shape
    OUT = weight.shape[0]
    K, R = t.shape[0], t.shape[1]
    dev, dtype = x.device, x.dtype
    fp64, upcast, precision = _precision(x)
    smooth = act not in PIECEWISE_LINEAR
    store_dtype = torch.float32 if upcast else dtype  # what the kernel writes
    saved_dtype = _saved_dtype(act, store_dtype)
    need_saved = saved_dtype is not None and (save or index is not None)
    store_u = save and (sqnorm or smooth)

    y = torch.empty(B, OUT, device=dev, dtype=store_dtype)
    saved = torch.empty(B, OUT, device=dev, dtype=saved_dtype) if need_saved else None
    tout = None if sqnorm else torch.empty(K, R, OUT, device=dev, dtype=store_dtype)
    u = torch.empty(K, R, OUT, device=dev, dtype=store_dtype) if store_u else None

    kc = min(triton.next_power_of_2(K), _FWD_MAX_KC)
    bn = _block(OUT, _FWD_BN)
    bk = _block(IN, _FWD_BK)
    n_chunks = triton.cdiv(K, kc)
    n_tiles = triton.cdiv(OUT, bn)
    sq_part = torch.zeros(n_chunks * n_tiles, R, device=dev, dtype=_acc_dtype(dtype)) if sqnorm else None
    dummy = y  # stands in for pointers a launch does not touch
    consts = dict(
        ACT=ACT_CODE[act], ALPHA=float(alpha), HAS_BIAS=bias is not None,
        ACC_FP64=fp64, UPCAST=upcast, DOT_PRECISION=precision, BN=bn, BK=bk,
    )
    t_strides = (t.stride(0), t.stride(1), t.stride(2))
    if index is None:
        bm = _block(B, max(16, _FWD_ROWS // kc))
        grid = (triton.cdiv(B, bm), n_tiles, n_chunks)
        if B and OUT:
            _dual_linear_fwd_kernel[grid](
                x, t, weight, dummy if bias is None else bias, dummy,
                y, dummy if saved is None else saved, dummy if tout is None else tout,
                dummy if u is None else u, dummy if sq_part is None else sq_part,
                B, IN, OUT, K, x.stride(0), x.stride(1), *t_strides, weight.stride(0), weight.stride(1),
                HAS_PRIMAL=True, HAS_TANGENT=True, GATHER=False, STORE_SAVED=saved is not None,
                STORE_TOUT=tout is not None, STORE_U=u is not None, SQNORM=sqnorm,
                KC=kc, BM=bm, **consts,
            )
    else:
        bm = _block(B, _FWD_ROWS)
        if B and OUT:
            _dual_linear_fwd_kernel[(triton.cdiv(B, bm), n_tiles, 1)](
                x, t, weight, dummy if bias is None else bias, dummy,
                y, dummy if saved is None else saved, dummy, dummy, dummy,
                B, IN, OUT, K, x.stride(0), x.stride(1), *t_strides, weight.stride(0), weight.stride(1),
                HAS_PRIMAL=True, HAS_TANGENT=False, GATHER=False, STORE_SAVED=saved is not None,
                STORE_TOUT=False, STORE_U=False, SQNORM=False, KC=1, BM=bm, **consts,
            )
        bm = _block(R, max(16, _FWD_ROWS // kc))
        if R and OUT:
            _dual_linear_fwd_kernel[(triton.cdiv(R, bm), n_tiles, n_chunks)](
                x, t, weight, dummy, index,
                dummy, dummy if saved is None else saved, dummy if tout is None else tout,
                dummy if u is None else u, dummy if sq_part is None else sq_part,
                R, IN, OUT, K, x.stride(0), x.stride(1), *t_strides, weight.stride(0), weight.stride(1),
                HAS_PRIMAL=False, HAS_TANGENT=True, GATHER=True, STORE_SAVED=False,
                STORE_TOUT=tout is not None, STORE_U=u is not None, SQNORM=sqnorm,
                KC=kc, BM=bm, **{**consts, "HAS_BIAS": False},
            )
    if sqnorm:
        sq = (sq_part.sum(0) / K).to(dtype)
        return y.to(dtype), sq, (saved if save else None), u
    return y.to(dtype), tout.to(dtype), (saved if save else None), u


def _bwd(ctx, gy, grad_tout_or_sq):
    x, t, weight, index, saved, u = ctx.saved_tensors
    act, alpha, sqnorm = ctx.act, ctx.alpha, ctx.sqnorm
    need_x, need_t, need_w, need_b = ctx.needs_input_grad[:4]
    B, IN = x.shape
    OUT = weight.shape[0]
    K, R = t.shape[0], t.shape[1]
    dev, dtype = x.device, x.dtype
    fp64, upcast, precision = _precision(x)
    store_dtype = torch.float32 if upcast else dtype  # what the kernels write (see _precision)
    smooth = act not in PIECEWISE_LINEAR
    has_tan = grad_tout_or_sq is not None
    need_gz = need_x or need_w or need_b
    need_gu = has_tan and (need_t or need_w)
    add_gzr = has_tan and need_gz and smooth
    if gy is None and not has_tan:
        return None, None, None, None

    G = torch.empty(B + (K * R if need_gu else 0), OUT, device=dev, dtype=_acc_dtype(dtype))
    dummy = G
    gy_strides = (gy.stride(0), gy.stride(1)) if gy is not None else (0, 0)
    if has_tan and not sqnorm:
        gt_strides, gsq_stride = tuple(grad_tout_or_sq.stride()), 0
    elif has_tan:
        gt_strides, gsq_stride = (0, 0, 0), grad_tout_or_sq.stride(0)
    else:
        gt_strides, gsq_stride = (0, 0, 0), 0
    consts = dict(
        ACT=ACT_CODE[act], ALPHA=float(alpha), HAS_GY=gy is not None, SQNORM=sqnorm,
        STORE_GU=need_gu, ACC_FP64=fp64, BN=_block(OUT, _EPI_BN),
    )
    args = (
        dummy if gy is None else gy,
        grad_tout_or_sq if (has_tan and not sqnorm) else dummy,  # gt_ptr
        grad_tout_or_sq if (has_tan and sqnorm) else dummy,  # gsq_ptr
        dummy if saved is None else saved, dummy if u is None else u,
    )
    strides = (*gy_strides, *gt_strides, gsq_stride)
    grid_n = triton.cdiv(OUT, consts["BN"])
    if OUT:
        if index is None:
            tangent = has_tan and (need_gu or add_gzr)
            if need_gz or tangent:
                bm = _block(B, _EPI_BM)
                _dual_linear_bwd_epilogue_kernel[(triton.cdiv(B, bm), grid_n)](
                    *args, dummy, G, B, B, OUT, K, *strides,
                    PRIMAL_ROWS=need_gz, TANGENT=tangent, GATHER=False, ADD_GZR=add_gzr, BM=bm, **consts,
                )
        else:
            if need_gz and B:
                bm = _block(B, _EPI_BM)
                _dual_linear_bwd_epilogue_kernel[(triton.cdiv(B, bm), grid_n)](
                    *args, index, G, B, B, OUT, K, *strides,
                    PRIMAL_ROWS=True, TANGENT=False, GATHER=False, ADD_GZR=False, BM=bm, **consts,
                )
            if has_tan and (need_gu or add_gzr) and R:
                bm = _block(R, _EPI_BM)
                _dual_linear_bwd_epilogue_kernel[(triton.cdiv(R, bm), grid_n)](
                    *args, index, G, R, B, OUT, K, *strides,
                    PRIMAL_ROWS=False, TANGENT=True, GATHER=True, ADD_GZR=add_gzr, BM=bm, **consts,
                )

    gx = gt_in = gw = gb = None
    # [gx; gt_in] = G[lo:hi] W: one GEMM over the needed rows of the stacked buffer.
    need_t_rows = need_t and has_tan
    if need_x or need_t_rows:
        lo = 0 if need_x else B
        hi = B + K * R if need_t_rows else B
        C = torch.empty(hi - lo, IN, device=dev, dtype=store_dtype)
        A = G[lo:hi]
        bm, bn, bk = _block(hi - lo, _MM_BM), _block(IN, _MM_BN), _block(OUT, _MM_BK)
        if hi > lo and IN:
            _matmul_kernel[(triton.cdiv(hi - lo, bm) * triton.cdiv(IN, bn),)](
                A, weight, C, hi - lo, IN, OUT,
                A.stride(0), A.stride(1), weight.stride(0), weight.stride(1), C.stride(0), C.stride(1),
                ACC_FP64=fp64, UPCAST=upcast, DOT_PRECISION=precision,
                BM=bm, BN=bn, BK=bk, GROUP_M=_MM_GROUP,
            )
        if need_x:
            gx = C[:B]
        if need_t_rows:
            gt_in = C[B - lo:].view(K, R, IN)
    if need_w:
        gw = torch.empty(OUT, IN, device=dev, dtype=store_dtype)
        gb = torch.empty(OUT, device=dev, dtype=store_dtype) if need_b else None
        bo, bi = _block(OUT, _W_BO), _block(IN, _W_BI)
        br = _block(max(B, K * R if need_gu else 0), _W_BR)
        if OUT and IN:
            _dual_linear_bwd_weight_kernel[(triton.cdiv(OUT, bo), triton.cdiv(IN, bi))](
                G, x, t, gw, dummy if gb is None else gb,
                B, R, K, IN, OUT, x.stride(0), x.stride(1), t.stride(0), t.stride(1), t.stride(2),
                TANGENT=need_gu, BIAS_GRAD=need_b, ACC_FP64=fp64, UPCAST=upcast,
                DOT_PRECISION=precision, BO=bo, BI=bi, BR=br,
            )
        elif need_b:
            gb = G[:B].sum(0).to(weight.dtype)
    elif need_b:
        gb = G[:B].sum(0).to(weight.dtype)  # plain torch column sum: W needs no gradient
    cast = (lambda v: v) if store_dtype == dtype else (lambda v: None if v is None else v.to(dtype))
    return cast(gx), cast(gt_in), cast(gw), cast(gb)


# ----------------------------------------------------------------------------
# autograd.Function and public functions
# ----------------------------------------------------------------------------
class _DualLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, weight, bias, index, act, alpha, sqnorm, save):
        y, tout_or_sq, saved, u = _fwd(x, t, weight, bias, act, alpha, index, sqnorm, save)
        ctx.set_materialize_grads(False)
        ctx.act, ctx.alpha, ctx.sqnorm = act, alpha, sqnorm
        if save:
            ctx.save_for_backward(x, t, weight, index, saved, u)
        return y, tout_or_sq

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, gy, grad_tout_or_sq):
        gx, gt, gw, gb = _bwd(ctx, gy, grad_tout_or_sq)
        return gx, gt, gw, gb, None, None, None, None, None


def unavailable_reason(x, t, weight, bias, act, index) -> Optional[str]:
    """None when this backend can serve the call, else the reason it cannot."""
    reason = _backends.triton_unavailable_reason(x.device)
    if reason is not None:
        return reason
    if x.dtype not in _DTYPES:
        return f"the Triton kernels take float16, bfloat16, float32 or float64, not {x.dtype}"
    if act not in ACT_CODE:
        return f"unknown activation {act!r}"
    if index is not None and index.device != x.device:
        return f"index is on {index.device} but x is on {x.device}"
    return None


def _prepare(x, t, weight, bias, index):
    if index is not None:
        index = index.contiguous()
        # checked on the device, without a host synchronisation
        torch._assert_async(((index >= 0) & (index < x.shape[0])).all(), "index values must lie in [0, B)")
    if bias is not None:
        bias = bias.contiguous()
    return index, bias


def _apply(x, t, weight, bias, act, alpha, index, sqnorm):
    index, bias = _prepare(x, t, weight, bias, index)
    tensors = (x, t, weight) + ((bias,) if bias is not None else ())
    save = torch.is_grad_enabled() and any(v.requires_grad for v in tensors)
    return _DualLinearFunction.apply(x, t, weight, bias, index, act, float(alpha), sqnorm, save)


def dual_linear(
    x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
    act: str = "identity", alpha: float = 0.01, index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = s(x W^T + b)`` [B, OUT] and ``t' = s'(z[index]) * (t W^T)`` [K, R, OUT].

    x: [B, IN], t: [K, R, IN], weight: [OUT, IN], bias: [OUT] or None, index:
    long [R] or None (then R = B). Differentiable in x, t, weight, bias through
    both outputs. Arguments are checked by :func:`.function.check_args`.
    """
    return _apply(x, t, weight, bias, act, alpha, index, False)


def dual_linear_sqnorm(
    x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
    act: str = "identity", alpha: float = 0.01, index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y`` [B, OUT] and ``sq[r] = (1/K) sum_k ||t'_k[r]||^2`` [R], without writing ``t'``
    (``u = t W^T`` is written only when a gradient will be needed)."""
    return _apply(x, t, weight, bias, act, alpha, index, True)
