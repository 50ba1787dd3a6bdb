r"""Triton kernels of the dual-stream engine's ReLU / leaky ReLU (the op of :mod:`grokalign_fast.ops.dual_act`).

On stacked rows ``s [N, n]`` (primal rows ``[0, P)``, tangent row ``j`` riding on primal row
``index[j % R]``, or ``j % P`` without index): ``out = s * d`` with ``d = 1`` where the primal row's
value is positive and ``0`` (ReLU) or ``alpha`` (leaky ReLU) elsewhere, and the uint8 mask
``[z > 0]`` of the primal rows, the only state saved for backward, whose pass is ``grad * d``.
:func:`dual_act` has the signature and results of the C++ entry point :func:`grokalign_fast.ops.dual_act.dual_act`.

Kernels (the row-kernel layout of :mod:`grokalign_fast.ops._triton_rows`): ``_dual_act_fwd_kernel``
reads a tile of primal rows once, writes their output and mask, and then every rider's output from
the mask in registers; ``_dual_act_bwd_kernel`` reads the mask tile once and scales the primal rows'
and the riders' gradients. Offsets are int64 (``N n`` may pass ``2^31``). ``alpha`` is a
compile-time constant (exact in float64); the product is formed in float32 (float64 for float64
rows) and rounded once to the rows' dtype.

Bytes moved per entry of ``s`` (the floor, with ``e`` the element size and a fraction ``P / N`` of
primal rows): forward ``2 e`` (read ``s``, write ``out``) plus ``P / N`` byte (the mask); backward
``2 e`` plus ``P / N`` byte (read ``grad`` and the mask, write the gradient). Each primal entry and
its mask are read once per pass however many tangent rows ride on it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _triton_rows as rows
from . import ACT

from .._triton import jit as _jit, tl, triton  # noqa: F401


@_jit
def _dual_act_fwd_kernel(
    s_ptr, mask_ptr, out_ptr, offsets_ptr, riders_ptr, P, R, K, n,
    OFF: tl.constexpr, HAS_INDEX: tl.constexpr, ACC_FP64: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):
    """Primal rows ``[pid_r BR, +BR)`` x columns ``[pid_n BN, +BN)``: ``out = z d``, ``mask = z > 0``,
    then ``out_j = t_j d`` for every rider j of those rows (``OFF``: d where ``z <= 0``)."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rp = pid_r * BR + tl.arange(0, BR).to(tl.int64)  # int64: row * n may pass 2^31
    cols = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    r_ok = rp < P
    c_ok = cols < n
    ok = r_ok[:, None] & c_ok[None, :]
    z = tl.load(s_ptr + rp[:, None] * n + cols[None, :], mask=ok, other=0.0)
    if ACC_FP64:
        one = tl.full((BR, BN), 1.0, tl.float64)
    else:
        one = tl.full((BR, BN), 1.0, tl.float32)
    pos = z > 0
    d = tl.where(pos, one, one * OFF)  # one * OFF keeps alpha exact in float64
    tl.store(out_ptr + rp[:, None] * n + cols[None, :], (z.to(one.dtype) * d).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(mask_ptr + rp[:, None] * n + cols[None, :], pos.to(tl.uint8), mask=ok)
    if HAS_INDEX:
        q0 = tl.load(offsets_ptr + rp, mask=r_ok, other=0)
        count = tl.load(offsets_ptr + rp + 1, mask=r_ok, other=0) - q0
        for q in range(0, tl.max(count, axis=0)):
            has = q < count
            r = tl.load(riders_ptr + q0 + q, mask=has, other=0)
            j_ok = has[:, None] & c_ok[None, :]
            for k in range(0, K):
                offs = (P + k * R + r)[:, None] * n + cols[None, :]
                t = tl.load(s_ptr + offs, mask=j_ok, other=0.0)
                tl.store(out_ptr + offs, (t.to(one.dtype) * d).to(out_ptr.dtype.element_ty), mask=j_ok)
    else:
        for k in range(0, K):
            offs = (P + k * P + rp)[:, None] * n + cols[None, :]
            t = tl.load(s_ptr + offs, mask=ok, other=0.0)
            tl.store(out_ptr + offs, (t.to(one.dtype) * d).to(out_ptr.dtype.element_ty), mask=ok)


@_jit
def _dual_act_bwd_kernel(
    g_ptr, mask_ptr, out_ptr, offsets_ptr, riders_ptr, P, R, K, n,
    OFF: tl.constexpr, HAS_INDEX: tl.constexpr, ACC_FP64: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):
    """The same tile: ``grad = g d`` on the primal rows and their riders, d from the saved mask."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rp = pid_r * BR + tl.arange(0, BR).to(tl.int64)  # int64: row * n may pass 2^31
    cols = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    r_ok = rp < P
    c_ok = cols < n
    ok = r_ok[:, None] & c_ok[None, :]
    if ACC_FP64:
        one = tl.full((BR, BN), 1.0, tl.float64)
    else:
        one = tl.full((BR, BN), 1.0, tl.float32)
    m = tl.load(mask_ptr + rp[:, None] * n + cols[None, :], mask=ok, other=0)
    d = tl.where(m != 0, one, one * OFF)
    g = tl.load(g_ptr + rp[:, None] * n + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + rp[:, None] * n + cols[None, :], (g.to(one.dtype) * d).to(out_ptr.dtype.element_ty), mask=ok)
    if HAS_INDEX:
        q0 = tl.load(offsets_ptr + rp, mask=r_ok, other=0)
        count = tl.load(offsets_ptr + rp + 1, mask=r_ok, other=0) - q0
        for q in range(0, tl.max(count, axis=0)):
            has = q < count
            r = tl.load(riders_ptr + q0 + q, mask=has, other=0)
            j_ok = has[:, None] & c_ok[None, :]
            for k in range(0, K):
                offs = (P + k * R + r)[:, None] * n + cols[None, :]
                gj = tl.load(g_ptr + offs, mask=j_ok, other=0.0)
                tl.store(out_ptr + offs, (gj.to(one.dtype) * d).to(out_ptr.dtype.element_ty), mask=j_ok)
    else:
        for k in range(0, K):
            offs = (P + k * P + rp)[:, None] * n + cols[None, :]
            gj = tl.load(g_ptr + offs, mask=ok, other=0.0)
            tl.store(out_ptr + offs, (gj.to(one.dtype) * d).to(out_ptr.dtype.element_ty), mask=ok)


def _launch(kernel, src, aux, P, R, offsets, order, off, dtype):
    """Run ``kernel`` over the primal tiles of ``src`` [N, n] (``aux``: the mask buffer the forward
    writes or the backward reads); returns the output rows in ``dtype``."""
    N, n = src.shape
    out = torch.empty(N, n, device=src.device, dtype=rows.store_dtype(dtype))
    if N * n:
        br, bn = rows.row_blocks(P, n)
        kernel[rows.row_grid(P, n, br, bn)](
            src, aux, out, src if offsets is None else offsets, src if order is None else order,
            P, R, (N - P) // R, n,
            OFF=off, HAS_INDEX=offsets is not None, ACC_FP64=dtype == torch.float64, BR=br, BN=bn,
        )
    return out.to(dtype)


class _DualActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, P, R, index, act, alpha):
        offsets, order = rows.riders(index, P)
        off = float(alpha) if act == "leaky_relu" else 0.0
        mask = torch.empty(P, s.shape[1], device=s.device, dtype=torch.uint8)
        out = _launch(_dual_act_fwd_kernel, s, mask, P, R, offsets, order, off, s.dtype)
        ctx.mark_non_differentiable(mask)
        ctx.save_for_backward(mask, offsets, order)
        ctx.P, ctx.R, ctx.off = P, R, off
        return out, mask

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_mask):
        mask, offsets, order = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None
        grad = _launch(_dual_act_bwd_kernel, grad_out.contiguous(), mask, ctx.P, ctx.R, offsets, order, ctx.off,
                       grad_out.dtype)
        return grad, None, None, None, None, None


def unavailable_reason(s: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on ``s`` (its device and dtype), else why not."""
    return rows.unavailable_reason("dual_act", s)


def dual_act(s: torch.Tensor, primal_rows: int, index: Optional[torch.Tensor], act: str, alpha: float = 0.01):
    """``(out, mask)`` as :func:`grokalign_fast.ops.dual_act.dual_act` (see the module doc), on the
    Triton kernels; differentiable in ``s``.

    Args:
        s: ``[N, n]`` stacked rows, the primal rows first.
        primal_rows: P.
        index: ``[R]`` long, the primal row of each of a stream's tangent rows; None: ``j % P``.
        act: ``"relu"`` or ``"leaky_relu"``; alpha: leaky ReLU's slope for ``z <= 0``.
    """
    if act not in ACT:
        raise ValueError(f"dual_act: act must be one of {tuple(ACT)}, got {act!r}")
    R = rows.check_rows("dual_act", s, primal_rows, index)
    index = None if index is None else index.contiguous()
    return _DualActFunction.apply(s.contiguous(), primal_rows, R, index, act, float(alpha))
