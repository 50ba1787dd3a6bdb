r"""Triton kernels of the dual-stream engine's smooth activations (the op of :mod:`grokalign_fast.ops.dual_smooth_act`).

On stacked rows ``s [N, n]`` (primal rows ``[0, P)``, tangent row ``j`` riding on primal row
``src(j) = index[j % R]``, or ``j % P`` without index):

    primal row p:    y_p = s(z_p)                 tangent row j:   t'_j = s'(z_src(j)) * t_j
    backward:        grad z_p = g_p s'(z_p) + s''(z_p) sum_{j: src(j) = p} g_j t_j,
                     grad t_j = g_j s'(z_src(j))

for every activation of :data:`grokalign_fast.ops.dual_smooth_act.ACT` with the math of
``csrc/common/dual_smooth_act.h`` (gelu, gelu_tanh, silu, tanh and sigmoid through the MLP kernels'
helpers in :mod:`grokalign_fast.ops.mlp.triton`; elu and softplus here). :func:`dual_smooth_act` has
the signature and result of the C++ entry point :func:`grokalign_fast.ops.dual_smooth_act.dual_smooth_act`.

Kernels (the row-kernel layout of :mod:`grokalign_fast.ops._triton_rows`): a program reads a tile of
primal rows once and evaluates ``s'`` (and in the backward ``s''``) once per primal entry, in
registers; it then serves the tile's riders, so no transcendental is computed per tangent entry,
and the backward's sum over the riders stays in registers (no atomics, a fixed order). Only the
input rows are saved. Offsets are int64. Arithmetic is float32 (float64 for float64 rows);
``alpha``, ``beta`` and ``threshold`` are compile-time constants (exact in float64).

Bytes moved per entry of ``s`` (the floor, ``e`` the element size): forward ``2 e`` (read ``s``,
write ``out``); backward ``3 e`` (read ``grad`` and ``s``, write the gradient).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _triton_rows as rows
from ..mlp.triton import _act_d1, _act_d2, _act_fwd, _sigmoid
from . import ACT

from .._triton import jit as _jit, tl, triton  # noqa: F401


# The kernels' codes of the two activations with parameters of their own (after the MLP ops' 0-7).
assert (ACT["elu"], ACT["softplus"]) == (8, 9), ACT


@_jit
def _expm1(z):
    """``e^z - 1`` for ``z <= 0`` without the cancellation of ``exp(z) - 1`` near 0 (Kahan's
    ``(u - 1) z / log u`` with ``u = e^z``; ``z`` itself where ``u`` rounds to 1, ``u - 1`` where it
    is below one rounding of 1); libdevice's expm1 does not run under the interpreter."""
    u = tl.exp(z)
    um1 = u - 1.0
    exact = (u == 1.0) | (um1 == -1.0)
    kahan = um1 * z / tl.log(tl.where(exact, 2.0, u))
    return tl.where(u == 1.0, z, tl.where(um1 == -1.0, um1, kahan))


@_jit
def _value(z, ACT: tl.constexpr, ALPHA: tl.constexpr, BETA: tl.constexpr, THRESHOLD: tl.constexpr):
    """s(z). elu: ``z > 0 ? z : alpha (e^z - 1)``; softplus (u = beta z): ``u > threshold ? z :
    log(1 + e^u) / beta``, as ``max(u, 0) + log(1 + e^-|u|)`` (no overflow); the MLP codes: ``_act_fwd``."""
    if ACT == 8:
        y = tl.where(z > 0, z, ALPHA * _expm1(tl.minimum(z, 0.0)))
    elif ACT == 9:
        u = z * BETA
        soft = (tl.maximum(u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))) / BETA
        y = tl.where(u > THRESHOLD, z, soft)
    else:
        y = _act_fwd(z, ACT, 0.0)
    return y


@_jit
def _slope(z, ACT: tl.constexpr, ALPHA: tl.constexpr, BETA: tl.constexpr, THRESHOLD: tl.constexpr):
    """s'(z). elu: ``z > 0 ? 1 : alpha e^z``; softplus: ``u > threshold ? 1 : sig(u)``."""
    one = tl.full(z.shape, 1.0, z.dtype)
    if ACT == 8:
        d1 = tl.where(z > 0, one, ALPHA * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == 9:
        u = z * BETA
        d1 = tl.where(u > THRESHOLD, one, _sigmoid(u))
    else:
        d1 = _act_d1(z, ACT, 0.0)
    return d1


@_jit
def _curvature(z, ACT: tl.constexpr, ALPHA: tl.constexpr, BETA: tl.constexpr, THRESHOLD: tl.constexpr):
    """s''(z). elu: ``z > 0 ? 0 : alpha e^z``; softplus: ``u > threshold ? 0 : beta sig(u) (1 - sig(u))``."""
    zero = tl.zeros(z.shape, z.dtype)
    if ACT == 8:
        d2 = tl.where(z > 0, zero, ALPHA * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == 9:
        u = z * BETA
        sig = _sigmoid(u)
        d2 = tl.where(u > THRESHOLD, zero, BETA * sig * (1.0 - sig))
    else:
        d2 = _act_d2(z, ACT)
    return d2


@_jit
def _smooth_fwd_kernel(
    s_ptr, out_ptr, offsets_ptr, riders_ptr, P, R, K, n,
    ACT: tl.constexpr, ALPHA: tl.constexpr, BETA: tl.constexpr, THRESHOLD: tl.constexpr,
    HAS_INDEX: tl.constexpr, ACC_FP64: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):
    """Primal rows ``[pid_r BR, +BR)`` x columns ``[pid_n BN, +BN)``: ``y = s(z)``, then
    ``t'_j = s'(z) t_j`` for every rider j of those rows."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rp = pid_r * BR + tl.arange(0, BR).to(tl.int64)  # int64: row * n may pass 2^31
    cols = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    r_ok = rp < P
    c_ok = cols < n
    ok = r_ok[:, None] & c_ok[None, :]
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    z = tl.load(s_ptr + rp[:, None] * n + cols[None, :], mask=ok, other=0.0).to(acc_dtype)
    y = _value(z, ACT, ALPHA, BETA, THRESHOLD)
    tl.store(out_ptr + rp[:, None] * n + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)
    d1 = _slope(z, ACT, ALPHA, BETA, THRESHOLD)
    if HAS_INDEX:
        q0 = tl.load(offsets_ptr + rp, mask=r_ok, other=0)
        count = tl.load(offsets_ptr + rp + 1, mask=r_ok, other=0) - q0
        for q in range(0, tl.max(count, axis=0)):
            has = q < count
            r = tl.load(riders_ptr + q0 + q, mask=has, other=0)
            j_ok = has[:, None] & c_ok[None, :]
            for k in range(0, K):
                offs = (P + k * R + r)[:, None] * n + cols[None, :]
                t = tl.load(s_ptr + offs, mask=j_ok, other=0.0).to(acc_dtype)
                tl.store(out_ptr + offs, (t * d1).to(out_ptr.dtype.element_ty), mask=j_ok)
    else:
        for k in range(0, K):
            offs = (P + k * P + rp)[:, None] * n + cols[None, :]
            t = tl.load(s_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
            tl.store(out_ptr + offs, (t * d1).to(out_ptr.dtype.element_ty), mask=ok)


@_jit
def _smooth_bwd_kernel(
    g_ptr, s_ptr, out_ptr, offsets_ptr, riders_ptr, P, R, K, n,
    ACT: tl.constexpr, ALPHA: tl.constexpr, BETA: tl.constexpr, THRESHOLD: tl.constexpr,
    HAS_INDEX: tl.constexpr, ACC_FP64: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):
    """The same tile: ``grad t_j = g_j s'(z)`` for every rider j, summing ``g_j t_j`` in registers,
    then ``grad z = g s'(z) + s''(z) sum_j g_j t_j``."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rp = pid_r * BR + tl.arange(0, BR).to(tl.int64)  # int64: row * n may pass 2^31
    cols = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    r_ok = rp < P
    c_ok = cols < n
    ok = r_ok[:, None] & c_ok[None, :]
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    z = tl.load(s_ptr + rp[:, None] * n + cols[None, :], mask=ok, other=0.0).to(acc_dtype)
    d1 = _slope(z, ACT, ALPHA, BETA, THRESHOLD)
    gt = tl.zeros((BR, BN), acc_dtype)
    if HAS_INDEX:
        q0 = tl.load(offsets_ptr + rp, mask=r_ok, other=0)
        count = tl.load(offsets_ptr + rp + 1, mask=r_ok, other=0) - q0
        for q in range(0, tl.max(count, axis=0)):
            has = q < count
            r = tl.load(riders_ptr + q0 + q, mask=has, other=0)
            j_ok = has[:, None] & c_ok[None, :]
            for k in range(0, K):
                offs = (P + k * R + r)[:, None] * n + cols[None, :]
                gj = tl.load(g_ptr + offs, mask=j_ok, other=0.0).to(acc_dtype)
                gt += gj * tl.load(s_ptr + offs, mask=j_ok, other=0.0).to(acc_dtype)
                tl.store(out_ptr + offs, (gj * d1).to(out_ptr.dtype.element_ty), mask=j_ok)
    else:
        for k in range(0, K):
            offs = (P + k * P + rp)[:, None] * n + cols[None, :]
            gj = tl.load(g_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
            gt += gj * tl.load(s_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
            tl.store(out_ptr + offs, (gj * d1).to(out_ptr.dtype.element_ty), mask=ok)
    g = tl.load(g_ptr + rp[:, None] * n + cols[None, :], mask=ok, other=0.0).to(acc_dtype)
    grad = g * d1 + _curvature(z, ACT, ALPHA, BETA, THRESHOLD) * gt
    tl.store(out_ptr + rp[:, None] * n + cols[None, :], grad.to(out_ptr.dtype.element_ty), mask=ok)


def _consts(act, params, offsets, dtype, P, n):
    br, bn = rows.row_blocks(P, n)
    alpha, beta, threshold = params
    return (rows.row_grid(P, n, br, bn),
            dict(ACT=ACT[act], ALPHA=alpha, BETA=beta, THRESHOLD=threshold, HAS_INDEX=offsets is not None,
                 ACC_FP64=dtype == torch.float64, BR=br, BN=bn))


class _DualSmoothActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, P, R, index, act, params):
        offsets, order = rows.riders(index, P)
        N, n = s.shape
        out = torch.empty(N, n, device=s.device, dtype=rows.store_dtype(s.dtype))
        if N * n:
            grid, consts = _consts(act, params, offsets, s.dtype, P, n)
            _smooth_fwd_kernel[grid](s, out, s if offsets is None else offsets, s if order is None else order,
                                     P, R, (N - P) // R, n, **consts)
        ctx.save_for_backward(s, offsets, order)
        ctx.P, ctx.R, ctx.act, ctx.params = P, R, act, params
        return out.to(s.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        s, offsets, order = ctx.saved_tensors
        P, R = ctx.P, ctx.R
        g = grad_out.contiguous()
        N, n = s.shape
        grad = torch.empty(N, n, device=s.device, dtype=rows.store_dtype(s.dtype))
        if N * n:
            grid, consts = _consts(ctx.act, ctx.params, offsets, s.dtype, P, n)
            _smooth_bwd_kernel[grid](g, s, grad, s if offsets is None else offsets, s if order is None else order,
                                     P, R, (N - P) // R, n, **consts)
        return grad.to(s.dtype), None, None, None, None, None


def unavailable_reason(s: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on ``s`` (its device and dtype), else why not."""
    return rows.unavailable_reason("dual_smooth_act", s)


def dual_smooth_act(s: torch.Tensor, primal_rows: int, index: Optional[torch.Tensor], act: str, alpha: float = 1.0,
                    beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """``out`` as :func:`grokalign_fast.ops.dual_smooth_act.dual_smooth_act` (see the module doc), on
    the Triton kernels; differentiable in ``s``.

    Args:
        s: ``[N, n]`` stacked rows, the primal rows first.
        primal_rows: P.
        index: ``[R]`` long, the primal row of each of a stream's tangent rows; None: ``j % P``.
        act: a name of :data:`grokalign_fast.ops.dual_smooth_act.ACT`; alpha: elu's; beta,
            threshold: softplus's.
    """
    if act not in ACT:
        raise ValueError(f"dual_smooth_act: act must be one of {tuple(ACT)}, got {act!r}")
    R = rows.check_rows("dual_smooth_act", s, primal_rows, index)
    index = None if index is None else index.contiguous()
    params = (float(alpha), float(beta), float(threshold))
    return _DualSmoothActFunction.apply(s.contiguous(), primal_rows, R, index, act, params)
