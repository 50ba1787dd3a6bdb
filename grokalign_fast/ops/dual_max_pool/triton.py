r"""Triton kernels of the dual-stream engine's max pool (the op of :mod:`grokalign_fast.ops.dual_max_pool`,
whose docstring gives the math).

On stacked rows ``z [N, C, L]`` (primal rows ``[0, P)``, tangent row ``j`` riding on primal row
``index[j % R]``, or ``j % P`` without index) and the primal rows' argmax indices ``idx [P, C, Lout]``:
``out[r, c, o] = z[r, c, idx[src(r), c, o]]``; the backward scatters
``grad_z[r, c, idx[src(r), c, o]] += g[r, c, o]``. Only ``idx`` and the index are saved.
:func:`dual_max_pool` has the signature and result of the C++ entry point
:func:`grokalign_fast.ops.dual_max_pool.dual_max_pool`, and its gradient is the C++ op's: ``z``'s only,
first order.

Kernel (the row-kernel layout of :mod:`grokalign_fast.ops._triton_rows`, over the output columns
``j = c Lout + o`` of a row): ``_dual_max_pool_kernel`` reads a tile of the primal rows' argmax
indices once, turns each into its column ``c L + idx`` of a z row, and then moves the values of the
primal rows and of every rider: forward, a gather ``out[row, j] = z[row, c L + idx]``; backward, a
scatter-add of ``g[row, j]`` into a zeroed buffer (``tl.atomic_add``; float32 for float16 / bfloat16
rows, then cast, as the CUDA kernel does). Two outputs of a row add into one entry only where
windows overlap and share their maximum; there the order of the (few) terms is the GPU's, so the
rounding may differ from run to run; elsewhere each entry gets one term, added to zero, exactly.
Columns are int32 (the division by ``Lout``, once per primal entry, is cheaper in 32 bits) unless
``C Lout`` can pass ``2^31``; element offsets are int64. ``idx`` values are checked to lie in
``[0, L)`` for CPU tensors; on a GPU an out-of-range ``idx`` is the caller's error, as with ATen's
``gather`` and the CUDA kernel.

Bytes moved per output entry (``e`` the element size, a fraction ``f = P / N`` of primal rows; the
floor): forward ``2 e`` (read one ``z`` entry, write ``out``) plus ``8 f`` (the int64 ``idx``, read
once per primal entry however many rows ride on it); the gathered reads touch whole memory sectors,
so a pool that drops most of ``z`` (a 2x2 window) still reads most of its sectors. Backward, per
output entry ``e`` (read ``g``) plus ``8 f`` plus one atomic add, and per entry of ``z`` the zeroed
buffer (``a`` bytes, 4 or 8) and, for float16 / bfloat16, its cast (``a + e``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _triton_rows as rows

from .._triton import jit as _jit, tl, triton  # noqa: F401

_INT32_MAX = 2**31 - 1  # output columns up to this stay int32 (INDEX64 beyond)


@_jit
def _move(src_ptr, dst_ptr, row, cols, zc, CL, CLO, ok, BACKWARD: tl.constexpr):
    """Rows ``row [BR]`` x output columns ``cols [BN]`` (``zc [BR, BN]``: each one's column in a z
    row): forward ``dst[row, cols] = src[row, zc]`` (src = z, dst = out); backward
    ``dst[row, zc] += src[row, cols]`` (src = g, dst = the zeroed buffer)."""
    out_offs = row[:, None] * CLO + cols[None, :]
    z_offs = row[:, None] * CL + zc
    if BACKWARD:
        g = tl.load(src_ptr + out_offs, mask=ok, other=0.0)
        tl.atomic_add(dst_ptr + z_offs, g.to(dst_ptr.dtype.element_ty), mask=ok, sem="relaxed")
    else:
        v = tl.load(src_ptr + z_offs, mask=ok, other=0.0)
        tl.store(dst_ptr + out_offs, v.to(dst_ptr.dtype.element_ty), mask=ok)


@_jit
def _dual_max_pool_kernel(
    src_ptr, idx_ptr, dst_ptr, offsets_ptr, riders_ptr, P, R, K, L, LOUT, CL, CLO,
    BACKWARD: tl.constexpr, HAS_INDEX: tl.constexpr, INDEX64: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):
    """Primal rows ``[pid_r BR, +BR)`` x output columns ``[pid_n BN, +BN)`` (``CL = C L``,
    ``CLO = C Lout``): the argmax indices of those primal rows, then :func:`_move` for the primal
    rows and every rider of theirs."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rp = pid_r * BR + tl.arange(0, BR).to(tl.int64)  # int64: row * CL may pass 2^31
    if INDEX64:
        cols = pid_n.to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    else:
        cols = pid_n * BN + tl.arange(0, BN)  # int32: a 64-bit division per entry would cost more than its bytes
    r_ok = rp < P
    c_ok = cols < CLO
    ok = r_ok[:, None] & c_ok[None, :]
    am = tl.load(idx_ptr + rp[:, None] * CLO + cols[None, :], mask=ok, other=0)
    zc = ((cols // LOUT).to(tl.int64) * L)[None, :] + am
    _move(src_ptr, dst_ptr, rp, cols, zc, CL, CLO, ok, BACKWARD)
    if HAS_INDEX:
        q0 = tl.load(offsets_ptr + rp, mask=r_ok, other=0)
        count = tl.load(offsets_ptr + rp + 1, mask=r_ok, other=0) - q0
        for q in range(0, tl.max(count, axis=0)):
            has = q < count
            r = tl.load(riders_ptr + q0 + q, mask=has, other=0)
            j_ok = has[:, None] & c_ok[None, :]
            for k in range(0, K):
                _move(src_ptr, dst_ptr, P + k * R + r, cols, zc, CL, CLO, j_ok, BACKWARD)
    else:
        for k in range(0, K):
            _move(src_ptr, dst_ptr, P + k * P + rp, cols, zc, CL, CLO, ok, BACKWARD)


def _launch(src, idx, dst, P, R, offsets, order, L, backward):
    """Run the kernel over the primal tiles: ``src`` / ``dst`` are z / out (forward) or g / the
    zeroed buffer (backward), all contiguous; ``idx [P, C, Lout]``."""
    N = src.shape[0]
    C, Lout = idx.shape[1], idx.shape[2]
    CLO = C * Lout
    if N * CLO == 0 or L == 0:
        return
    br, bn = rows.row_blocks(P, CLO)
    _dual_max_pool_kernel[rows.row_grid(P, CLO, br, bn)](
        src, idx, dst, src if offsets is None else offsets, src if order is None else order,
        P, R, (N - P) // R, L, Lout, C * L, CLO,
        BACKWARD=backward, HAS_INDEX=offsets is not None, INDEX64=CLO + bn > _INT32_MAX, BR=br, BN=bn,
    )


class _DualMaxPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, idx, index, P, R):
        N, C, L = z.shape
        offsets, order = rows.riders(index, P)
        out = torch.empty(N, C, idx.shape[2], device=z.device, dtype=rows.store_dtype(z.dtype))
        _launch(z, idx, out, P, R, offsets, order, L, backward=False)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(idx, offsets, order)
        ctx.P, ctx.R, ctx.L = P, R, L
        return out.to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        idx, offsets, order = ctx.saved_tensors
        g = grad_out.contiguous()
        acc = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        grad = torch.zeros(g.shape[0], g.shape[1], ctx.L, device=g.device, dtype=acc)
        _launch(g, idx, grad, ctx.P, ctx.R, offsets, order, ctx.L, backward=True)
        return grad.to(g.dtype), None, None, None, None


def unavailable_reason(z: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on ``z`` (its device and dtype), else why not."""
    return rows.unavailable_reason("dual_max_pool", z)


def _check_idx(z: torch.Tensor, idx: torch.Tensor) -> None:
    """idx: long ``[P, C, Lout]`` on z's device, ``P`` in ``[1, N]``, values in ``[0, L)`` (checked
    for a CPU idx)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 3:
        raise ValueError(f"dual_max_pool: z: the rows must be [N, C, L], got {list(getattr(z, 'shape', []))}")
    N, C, L = z.shape
    if not isinstance(idx, torch.Tensor) or idx.dim() != 3 or idx.dtype != torch.long or idx.shape[1] != C \
            or not 1 <= idx.shape[0] <= N:
        raise ValueError(f"dual_max_pool: idx must be long [P, C={C}, Lout] with P in [1, {N}], got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} {list(getattr(idx, 'shape', []))}")
    if idx.device != z.device:
        raise ValueError(f"dual_max_pool: idx must be on {z.device} (the rows' device), got {idx.device}")
    if idx.device.type == "cpu" and idx.numel():
        lo, hi = torch.aminmax(idx)
        if lo < 0 or hi >= L:
            raise ValueError(f"dual_max_pool: idx must lie in [0, {L}), got values in [{int(lo)}, {int(hi)}]")


def dual_max_pool(z: torch.Tensor, idx: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` as :func:`grokalign_fast.ops.dual_max_pool.dual_max_pool` (see the module doc), on the
    Triton kernels; differentiable in ``z``.

    Args:
        z: ``[N, C, L]`` stacked rows, the primal rows first.
        idx: ``[P, C, Lout]`` long, the primal rows' argmax into L.
        index: ``[R]`` long, the primal row of each of a stream's tangent rows; None: ``j % P``.
    """
    _check_idx(z, idx)
    P = idx.shape[0]
    R = rows.check_rows("dual_max_pool", z, P, index, dims=3, name="z")
    index = None if index is None else index.contiguous()
    return _DualMaxPoolFunction.apply(z.contiguous(), idx.contiguous(), index, P, R)
