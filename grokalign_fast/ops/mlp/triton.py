r"""Triton backend of the dual-stream Linear (+bias) + activation.

Specification: :mod:`.reference` (``z = x W^T + b``, ``y = s(z)``,
``u_k = t_k W^T``, ``t'_k = s'(z[index]) * u_k``, ``sq[r] = (1/K) sum_k ||t'_k[r]||^2``).

Layout of this file (Liger-Kernel style): autotuning helpers, the index and
activation helpers, the forward kernel, the backward kernels (epilogue, the two GEMMs), their launchers, the
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
the programs of the first IN tile). The weight gradient's reduction (the
``B + K R`` stacked rows) is split across a grid axis (split-K, see
``_weight_split``) into float partials that one ``sum(0)`` reduces. Only when
``b`` needs a gradient and ``W`` does not is ``gb`` a plain ``torch`` column sum.

Tuning: the forward, the GEMM and the weight-gradient kernels are autotuned
(``triton.autotune``, keyed on the problem sizes) over tables for H100/H200
written beside each kernel with the reasons; under the CPU interpreter each
has one config. Indices fit in int32 but element offsets need not: every
offset is formed from int64 indices (``_span``) or by advancing a pointer.

Precision: accumulation is float32 for float16/bfloat16/float32 inputs and
float64 for float64; float16 and bfloat16 tiles enter ``tl.dot`` as they are
(only the interpreter upcasts bfloat16, see ``_precision``); float32 ``tl.dot``
uses TF32 only where ``torch.backends.cuda.matmul.allow_tf32`` allows it. ``alpha`` (leaky ReLU)
is a compile-time constant so that float64 keeps it exactly.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ... import _backends
from .reference import ACT_CODE, PIECEWISE_LINEAR

from .._triton import jit as _jit, tl, triton  # noqa: F401


def _autotune(configs, key: List[str], prune: Optional[Callable] = None, reset_to_zero: Optional[List[str]] = None):
    """``triton.autotune`` over ``configs`` keyed on the launch arguments named in ``key`` (the
    identity where triton is missing)."""
    if triton is None:  # pragma: no cover
        return lambda fn: fn
    return triton.autotune(configs, key, prune_configs_by=None if prune is None else {"early_config_prune": prune},
                           reset_to_zero=reset_to_zero)


def _heuristics(values: Dict[str, Callable]):
    """``triton.heuristics`` (the identity where triton is missing)."""
    if triton is None:  # pragma: no cover
        return lambda fn: fn
    return triton.heuristics(values)


def _as_configs(entries) -> list:
    """``triton.Config`` for each ``(blocks, num_warps, num_stages)`` entry."""
    return [triton.Config(dict(blocks), num_warps=warps, num_stages=stages) for blocks, warps, stages in entries]


def _configs(gpu, interpreted) -> list:
    """The autotuning configs of a kernel: the ``gpu`` table on a GPU; under Triton's CPU
    interpreter the single entry ``interpreted``, since timing there means nothing and every
    config would cost a run. Decided when this module is imported, as triton.jit decides
    interpretation when the kernels are defined."""
    if triton is None:  # pragma: no cover
        return []
    return _as_configs([interpreted] if _backends.triton_interpreted() else gpu)


def _prune(**sizes: Callable[[dict], int]):
    """An ``early_config_prune``: ``sizes`` maps a block name to a function of the launch arguments
    giving the size of the dimension that block tiles. A config is kept when each of its blocks is
    at most the next power of two of its size, or is the smallest value of that block in the list
    (a tile wider than its dimension adds only masked work, so it is not worth benchmarking). Each
    table lists its all-smallest entry, which is always kept."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        cap = {name: max(min(c.kwargs[name] for c in configs), triton.next_power_of_2(max(int(size(args)), 1)))
               for name, size in sizes.items()}
        return [c for c in configs if all(c.kwargs[name] <= cap[name] for name in sizes)]
    return prune


def _smallest(table, name: str) -> int:
    """The smallest value of block ``name`` in a tuning table."""
    return min(blocks[name] for blocks, _, _ in table)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Activation codes (reference.ACT_CODE): 0 identity, 1 relu, 2 leaky_relu,
# 3 gelu, 4 gelu_tanh, 5 silu, 6 tanh, 7 sigmoid. Literal constants below are
# materialised in the tensor's dtype (exact in float64):
#   0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2 pi),
#   0.7978845608028654 = sqrt(2/pi), 0.044715 (tanh-GELU), 0.134145 = 3 * 0.044715,
#   0.26829 = 6 * 0.044715.


# ----------------------------------------------------------------------------
# Index helper and activation helpers (ACT, ALPHA are compile-time constants)
# ----------------------------------------------------------------------------
@_jit
def _span(start, BLOCK: tl.constexpr):
    """The indices ``start + [0, BLOCK)`` as int64. A row or column index fits in int32, but an
    index times a stride or a row length (an element offset into t [K, R, IN], u [K, R, OUT] or
    G [B + K R, OUT]) can pass 2^31; every offset in the kernels is formed from these."""
    return start + tl.arange(0, BLOCK).to(tl.int64)


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
# Tuning. A program owns BM primal rows and the KC * BM tangent rows of a chunk of KC <= 8
# streams (_FWD_MAX_KC bounds the tangent tile; more streams take more programs on grid axis 2,
# each recomputing its z tile: one extra primal GEMM per 8 streams). A config gives ROWS, the
# tangent tile's row budget, and BM = max(16, ROWS // KC) (16: tl.dot's smallest M), so each
# BK x BN weight tile feeds (1 + KC) * BM ~ ROWS..2 ROWS rows of MMA before it is dropped.
# GPU table (H100/H200: 132 SMs, 227 KB of shared memory per block): ROWS and BN 64..128, BK
# 32..64; 8 warps for ROWS = BN = 128, whose two float32 accumulators (primal and tangent,
# 128 x 128 each) would take 256 registers per thread with 4 warps, else 4; 4 stages where four
# float32 stages (x, t and W tiles) fit in shared memory, else 3. The first entry, 3 stages of
# 64 x 64 x 32, also fits float64 (compiled for sm_90 it takes 96 KB at KC = 1, 104 KB at KC = 8)
# and is the one config under the interpreter (the tests' TILED shape spans several of its
# BK = 32 steps and BN = 64 tiles).
_FWD_TUNING = [
    (dict(ROWS=64, BN=64, BK=32), 4, 3),
    (dict(ROWS=64, BN=64, BK=64), 4, 4),
    (dict(ROWS=64, BN=128, BK=32), 4, 4),
    (dict(ROWS=128, BN=64, BK=32), 4, 4),
    (dict(ROWS=128, BN=128, BK=32), 8, 4),
    (dict(ROWS=128, BN=128, BK=64), 8, 3),
]
_FWD_CONFIGS = _configs(_FWD_TUNING, _FWD_TUNING[0])
_FWD_MAX_KC = 8


def _fwd_bm(args: dict) -> int:
    """Primal rows per program of the forward: the tangent row budget shared by KC streams."""
    return max(16, args["ROWS"] // args["KC"])


@_autotune(_FWD_CONFIGS, key=["M", "IN", "OUT", "K", "KC", "HAS_PRIMAL", "HAS_TANGENT"],
           prune=_prune(ROWS=lambda a: a["KC"] * a["M"], BN=lambda a: a["OUT"], BK=lambda a: a["IN"]),
           reset_to_zero=["sq_part_ptr"])  # each config writes its own [chunks * n-tiles, R] layout
@_heuristics({"BM": _fwd_bm})
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
    KC: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One (row tile, column tile, stream chunk) of the dual-stream layer.

    Rows are primal rows (HAS_PRIMAL, M = B) or tangent rows (M = R); with
    HAS_PRIMAL and HAS_TANGENT together they coincide (index=None). With
    GATHER (tangent-only pass) s' comes from the saved tensor at rows index[r].
    Outputs y, saved are [B, OUT]; tout, u are [K, R, OUT]; sq_part is [>= chunks * n-tiles, R]
    (zeros beyond the rows this config writes); all contiguous. ROWS only sets BM (see _fwd_bm).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32

    rm = _span(pid_m * BM, BM)
    rn = _span(pid_n * BN, BN)
    rk = _span(0, BK)
    m_ok = rm < M
    n_ok = rn < OUT
    # Tangent tile: KC streams stacked, row i is stream pid_c*KC + i // BM, row pid_m*BM + i % BM.
    ti = _span(0, KC * BM)
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
        kk = _span(pid_c * KC, KC)
        offs3 = (kk[:, None] * M + rm[None, :])[:, :, None] * OUT + rn[None, None, :]  # rows of [K * M, OUT]
        mask3 = (kk < K)[:, None, None] & mn_ok[None, :, :]
        if STORE_TOUT:
            tl.store(tout_ptr + offs3, tout.to(tout_ptr.dtype.element_ty), mask=mask3)
        if STORE_U:
            tl.store(u_ptr + offs3, u3.to(u_ptr.dtype.element_ty), mask=mask3)
        if SQNORM:
            # masked loads left zeros outside the problem, so the sums need no mask
            part = tl.sum(tl.sum(tout * tout, axis=2), axis=0)
            part_row = pid_c * tl.num_programs(1) + pid_n
            tl.store(sq_part_ptr + part_row.to(tl.int64) * M + rm, part, mask=m_ok)


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
    rm = _span(pid_m * BM, BM)
    rn = _span(pid_n * BN, BN)
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
        gt_ptrs = gt_ptr + rm[:, None] * stride_gtr + rn[None, :] * stride_gto  # stream k = 0
        for k in range(0, K):
            if SQNORM or ADD_GZR:
                u_offs = (k * M + rm)[:, None] * OUT + rn[None, :]  # rows of u as [K * M, OUT]
                u = tl.load(u_ptr + u_offs, mask=mn_ok, other=0.0).to(acc_dtype)
            if SQNORM:
                g = gscale * u
            else:
                g = tl.load(gt_ptrs, mask=mn_ok, other=0.0).to(acc_dtype)
                gt_ptrs += stride_gtk
            if STORE_GU:
                tl.store(g_ptr + (B + k * M + rm)[:, None] * OUT + rn[None, :], g * d1, mask=mn_ok)
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


# Tuning. [gx; gt_in] = G W has B + K R rows (many) and a reduction over OUT: an ordinary GEMM.
# GPU table: BM, BN 64..128, BK 32..64, with GROUP_M = 8 super-grouping of row tiles
# (_MM_GROUP) so that consecutive programs reuse the W column panel from L2; 8 warps for
# 128 x 128 tiles, else 4; 4 stages where four float32 stages fit in the 227 KB of shared memory
# a block may use (A is G, float32 whatever W's dtype), else 3. The first entry, 3 stages of
# 64 x 64 x 32, also fits float64 and is the one config under the interpreter.
_MM_TUNING = [
    (dict(BM=64, BN=64, BK=32), 4, 3),
    (dict(BM=64, BN=128, BK=32), 4, 4),
    (dict(BM=128, BN=64, BK=32), 4, 4),
    (dict(BM=128, BN=128, BK=32), 8, 4),
    (dict(BM=128, BN=64, BK=64), 4, 4),
    (dict(BM=128, BN=128, BK=64), 8, 3),
]
_MM_CONFIGS = _configs(_MM_TUNING, _MM_TUNING[0])
_MM_GROUP = 8


@_autotune(_MM_CONFIGS, key=["M", "N", "KD"],
           prune=_prune(BM=lambda a: a["M"], BN=lambda a: a["N"], BK=lambda a: a["KD"]))
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
    rm = _span(pid_m * BM, BM)
    rn = _span(pid_n * BN, BN)
    rk = _span(0, BK)
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


# Tuning. gW = G^T [x; t] reduces over the B + K R stacked rows (tens of thousands) into a small
# output (a 200 x 200 layer is 16 tiles of 64 x 64, against 132 SMs), so the rows are split over
# grid axis 2 (split-K): each split writes a float partial [OUT, IN] that torch sums (a fixed
# order: deterministic, no atomics). _weight_split chooses the split count: enough for
# _W_WAVES = 2 programs per SM, counted with the table's smallest tile; each split at least
# _W_MIN_SPLIT_ROWS = 512 rows (a 64 x 64 program then reads >= 512 x 64 x (4 + 2) bytes of
# float32 G and bf16 x or t, and its float32 partial, written once and read once by the sum,
# adds at most a sixth of that) and a multiple of _W_SPLIT_ALIGN = 128 rows (the largest BR, so
# that every split's steps start on multiples of BR rows). Under the interpreter the count is fixed at
# _W_INTERPRETED_SPLIT = 3, unaligned, so that the tests' small odd sizes put split boundaries
# inside both row segments.
# GPU table: BO, BI 64..128, BR 32..64 rows per step; warps and stages by the rule of
# _MM_TUNING (the G tile is float32). The first entry, 3 stages of 64 x 64 x 32, also fits
# float64 and is the one config under the interpreter.
_W_TUNING = [
    (dict(BO=64, BI=64, BR=32), 4, 3),
    (dict(BO=64, BI=64, BR=64), 4, 4),
    (dict(BO=64, BI=128, BR=32), 4, 4),
    (dict(BO=128, BI=64, BR=32), 4, 4),
    (dict(BO=128, BI=128, BR=32), 8, 4),
    (dict(BO=128, BI=128, BR=64), 8, 3),
]
_W_CONFIGS = _configs(_W_TUNING, _W_TUNING[0])
_W_WAVES, _W_MIN_SPLIT_ROWS, _W_SPLIT_ALIGN, _W_INTERPRETED_SPLIT = 2, 512, 128, 3


@_autotune(_W_CONFIGS, key=["B", "R", "K", "IN", "OUT", "SPLIT_ROWS", "TANGENT"],
           prune=_prune(BO=lambda a: a["OUT"], BI=lambda a: a["IN"], BR=lambda a: a["SPLIT_ROWS"]))
@_jit
def _dual_linear_bwd_weight_kernel(
    g_ptr, x_ptr, t_ptr, gw_ptr, gb_ptr,
    B, R, K, IN, OUT, SPLIT_ROWS,
    stride_xm, stride_xi, stride_tk, stride_tr, stride_ti,
    TANGENT: tl.constexpr, BIAS_GRAD: tl.constexpr,
    ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BO: tl.constexpr, BI: tl.constexpr, BR: tl.constexpr,
):
    """Split ``pid_s`` of gW[OUT, IN] = gz^T x + gu^T t (G = [gz; gu] contiguous [B + K R, OUT]):
    the sum over the stacked rows [pid_s SPLIT_ROWS, (pid_s + 1) SPLIT_ROWS), the primal segment
    (rows < B, against x) then the tangent segment (against t), written to gw[pid_s] (gw:
    [SPLIT, OUT, IN]). The programs of IN tile 0 also write the split's gb = sum_rows gz to
    gb[pid_s] (gb: [SPLIT, OUT])."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    ro = _span(pid_o * BO, BO)
    ri = _span(pid_i * BI, BI)
    rr = _span(0, BR)
    o_ok = ro < OUT
    i_ok = ri < IN
    lo = pid_s * SPLIT_ROWS
    hi = lo + SPLIT_ROWS
    acc = tl.zeros((BO, BI), dtype=acc_dtype)
    gb = tl.zeros((BO,), dtype=acc_dtype)
    end = tl.minimum(hi, B)
    for r0 in range(lo, end, BR):
        rows = r0 + rr
        r_ok = rows < end
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
        # tangent rows j (stream j // R, row j % R) are the stacked rows B + j
        start = tl.maximum(lo, B) - B
        end = tl.minimum(hi, B + K * R) - B
        for r0 in range(start, end, BR):
            rows = r0 + rr
            r_ok = rows < end
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
    tl.store(gw_ptr + (pid_s * OUT + ro)[:, None] * IN + ri[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=o_ok[:, None] & i_ok[None, :])
    if BIAS_GRAD:
        tl.store(gb_ptr + pid_s * OUT + ro, gb.to(gb_ptr.dtype.element_ty), mask=o_ok & (pid_i == 0))


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------
def _block(n: int, cap: int) -> int:
    """Power-of-two block for a dimension of size n: >= 16 (tl.dot), <= cap."""
    return min(cap, max(16, triton.next_power_of_2(max(int(n), 1))))


def _precision(x: torch.Tensor):
    """(ACC_FP64, UPCAST, DOT_PRECISION) for x's dtype."""
    fp64 = x.dtype == torch.float64
    # Compiled (on a GPU), float16 and bfloat16 tiles go into tl.dot as they are, accumulating in
    # float32, and the kernels write the input dtype. Only the interpreter gets bfloat16 wrong:
    # its tl.dot multiplies the raw bits and .to(tl.bfloat16) truncates instead of rounding to
    # nearest. There alone (UPCAST) the kernels upcast bf16 tiles to float32 and write float32
    # buffers that torch rounds to bfloat16 afterwards.
    upcast = x.dtype == torch.bfloat16 and _backends.triton_interpreted()
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return fp64, upcast, "tf32" if tf32 else "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """The number of SMs of a CUDA device (queried once per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _weight_split(rows: int, out: int, inn: int, sms: Optional[int]) -> Tuple[int, int]:
    """``(SPLIT, SPLIT_ROWS)`` of the weight gradient over ``rows`` stacked rows: SPLIT programs
    along the rows, each over SPLIT_ROWS consecutive rows (the last over the rest) for an
    ``out`` x ``inn`` gradient on a GPU with ``sms`` SMs (None: the interpreter). See _W_TUNING."""
    if sms is None:
        split, align = _W_INTERPRETED_SPLIT, 1
    else:
        tiles = triton.cdiv(out, _smallest(_W_TUNING, "BO")) * triton.cdiv(inn, _smallest(_W_TUNING, "BI"))
        split, align = min(triton.cdiv(_W_WAVES * sms, tiles), rows // _W_MIN_SPLIT_ROWS), _W_SPLIT_ALIGN
    split = max(1, min(split, rows))
    split_rows = max(1, triton.cdiv(triton.cdiv(rows, split), align) * align)
    return max(1, triton.cdiv(rows, split_rows)), split_rows


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _saved_dtype(act: str, dtype: torch.dtype) -> Optional[torch.dtype]:
    if act == "identity":
        return None
    return torch.uint8 if act in PIECEWISE_LINEAR else dtype


def _fwd_grid(rows: int, out: int, n_chunks: int):
    """The forward's grid: (row tiles, OUT tiles, stream chunks) for the config's BM and BN."""
    return lambda meta: (triton.cdiv(rows, meta["BM"]), triton.cdiv(out, meta["BN"]), n_chunks)


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
    n_chunks = triton.cdiv(K, kc)
    # Zeroed rows for the most OUT tiles any config has; a config with wider tiles leaves the rest 0.
    # Where unused it is None, not the shared dummy: the autotuner zeroes it before each config.
    sq_rows = n_chunks * triton.cdiv(OUT, _smallest(_FWD_TUNING, "BN"))
    sq_part = torch.zeros(sq_rows, R, device=dev, dtype=_acc_dtype(dtype)) if sqnorm else None
    dummy = y  # stands in for the other pointers a launch does not touch
    consts = dict(
        ACT=ACT_CODE[act], ALPHA=float(alpha), HAS_BIAS=bias is not None,
        ACC_FP64=fp64, UPCAST=upcast, DOT_PRECISION=precision,
    )
    t_strides = (t.stride(0), t.stride(1), t.stride(2))
    if index is None:
        if B and OUT:
            _dual_linear_fwd_kernel[_fwd_grid(B, OUT, n_chunks)](
                x, t, weight, dummy if bias is None else bias, dummy,
                y, dummy if saved is None else saved, dummy if tout is None else tout,
                dummy if u is None else u, sq_part,
                B, IN, OUT, K, x.stride(0), x.stride(1), *t_strides, weight.stride(0), weight.stride(1),
                HAS_PRIMAL=True, HAS_TANGENT=True, GATHER=False, STORE_SAVED=saved is not None,
                STORE_TOUT=tout is not None, STORE_U=u is not None, SQNORM=sqnorm, KC=kc, **consts,
            )
    else:
        if B and OUT:
            _dual_linear_fwd_kernel[_fwd_grid(B, OUT, 1)](
                x, t, weight, dummy if bias is None else bias, dummy,
                y, dummy if saved is None else saved, dummy, dummy, None,
                B, IN, OUT, K, x.stride(0), x.stride(1), *t_strides, weight.stride(0), weight.stride(1),
                HAS_PRIMAL=True, HAS_TANGENT=False, GATHER=False, STORE_SAVED=saved is not None,
                STORE_TOUT=False, STORE_U=False, SQNORM=False, KC=1, **consts,
            )
        if R and OUT:
            _dual_linear_fwd_kernel[_fwd_grid(R, OUT, n_chunks)](
                x, t, weight, dummy, index,
                dummy, dummy if saved is None else saved, dummy if tout is None else tout,
                dummy if u is None else u, sq_part,
                R, IN, OUT, K, x.stride(0), x.stride(1), *t_strides, weight.stride(0), weight.stride(1),
                HAS_PRIMAL=False, HAS_TANGENT=True, GATHER=True, STORE_SAVED=False,
                STORE_TOUT=tout is not None, STORE_U=u is not None, SQNORM=sqnorm,
                KC=kc, **{**consts, "HAS_BIAS": False},
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
        if hi > lo and IN:
            _matmul_kernel[lambda meta: (triton.cdiv(hi - lo, meta["BM"]) * triton.cdiv(IN, meta["BN"]),)](
                A, weight, C, hi - lo, IN, OUT,
                A.stride(0), A.stride(1), weight.stride(0), weight.stride(1), C.stride(0), C.stride(1),
                ACC_FP64=fp64, UPCAST=upcast, DOT_PRECISION=precision, GROUP_M=_MM_GROUP,
            )
        if need_x:
            gx = C[:B]
        if need_t_rows:
            gt_in = C[B - lo:].view(K, R, IN)
    if need_w:
        if OUT and IN:
            sms = None if _backends.triton_interpreted() else _sm_count(dev)
            split, split_rows = _weight_split(B + (K * R if need_gu else 0), OUT, IN, sms)
            # One split writes the gradients themselves; several write float partials that one sum
            # over the split axis reduces (in a fixed order) and rounds once.
            part_dtype = store_dtype if split == 1 else _acc_dtype(dtype)
            gw_part = torch.empty(split, OUT, IN, device=dev, dtype=part_dtype)
            gb_part = torch.empty(split, OUT, device=dev, dtype=part_dtype) if need_b else None
            _dual_linear_bwd_weight_kernel[
                lambda meta: (triton.cdiv(OUT, meta["BO"]), triton.cdiv(IN, meta["BI"]), split)
            ](
                G, x, t, gw_part, dummy if gb_part is None else gb_part,
                B, R, K, IN, OUT, split_rows, x.stride(0), x.stride(1), t.stride(0), t.stride(1), t.stride(2),
                TANGENT=need_gu, BIAS_GRAD=need_b, ACC_FP64=fp64, UPCAST=upcast, DOT_PRECISION=precision,
            )
            gw = gw_part[0] if split == 1 else gw_part.sum(0).to(store_dtype)
            if need_b:
                gb = gb_part[0] if split == 1 else gb_part.sum(0).to(store_dtype)
        else:
            gw = torch.empty(OUT, IN, device=dev, dtype=store_dtype)
            if need_b:
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
