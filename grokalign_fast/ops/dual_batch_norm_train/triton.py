r"""Triton kernels of the dual-stream engine's train-mode batch norm (the op of
:mod:`grokalign_fast.ops.dual_batch_norm_train`, whose docstring gives the math).

On stacked rows ``s [N, C, L]`` (primal rows ``[0, P)``), per channel over the ``n = P L`` primal
values: ``mean``, ``var`` (biased), ``invstd = 1 / sqrt(var + eps)``; the primal rows get
``(z - mean) invstd w + b``, the tangent rows ``t invstd w``; the backward adds to ATen's train-mode
batch-norm backward the tangent rows' dependence on ``invstd`` (``S = sum_tangent g t``). The running
statistics are updated as ``F.batch_norm`` updates them. :func:`dual_batch_norm_train` has the
signature and result of the C++ entry point
:func:`grokalign_fast.ops.dual_batch_norm_train.dual_batch_norm_train`.

Kernels. ``_stats_kernel`` (grid: channel blocks x row splits) sums ``z - c`` and ``(z - c)^2``
over its split of the primal rows, with ``c`` the channel's first primal value (a shift that keeps
the variance free of cancellation when ``|mean| >> std``); torch adds the splits' float partials
(a fixed order) into ``mean = c + S1 / n`` and ``var = S2 / n - (S1 / n)^2``. ``_backward_sums_kernel``
(the same grid over all N rows) sums ``g`` and ``g (z - mean)`` over the primal rows and ``g t``
over the tangent rows. ``_apply_kernel`` is the elementwise pass of either direction over the
flattened ``[N, C, L]`` buffer, reading the per-channel values (``[C]``, cached). A program of the
two reductions covers ``BC`` channels x ``BLK`` consecutive (row, position) pairs per step (see the
tiling note below: wide where ``L`` is short, so that the loads stay coalesced). Flat indices are
int32 unless they can pass ``2^31`` (their division by ``L``, once per entry, is cheaper in 32 bits);
the reductions' element offsets are int64. Sums are float32 (float64 for float64
rows); ``eps`` is a compile-time constant (exact in float64).

Bytes moved per entry of ``s`` (``e`` the element size, a fraction ``f = P / N`` of primal rows;
the floor of two passes each way, since the statistics and the sums are needed before the
elementwise pass): forward ``(2 + f) e`` (the statistics read the primal rows, the output pass reads
every row and writes it); backward ``(4 + f) e`` (the sums read ``g`` and ``s``, the elementwise
pass reads ``g`` and the primal rows of ``s`` and writes the gradient). The ``[C]`` partials and
statistics add a few bytes per channel.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ... import _backends
from .. import _triton_rows as rows
from . import update_running_stats

from .._triton import jit as _jit, tl, triton  # noqa: F401


# Tiling. A program of the two reductions owns BC channels and one split of the channel's values
# (flat positions i = row * L + l, SPLIT_LEN of them, a multiple of BLK), and covers a [BC, BLK] tile
# per step, BC * BLK = _ELEMS = 2048 entries: BLK spans 4 rows' worth of positions (up to 1024) and
# BC fills the rest, so that a tile is a few runs of contiguous memory whatever L is (BatchNorm1d:
# L = 1, 512 channels of 4 rows; a 32 x 32 map: 2 channels of one row). The splits are chosen for
# _WAVES = 2 programs per SM, each at least _MIN_SPLIT_ELEMS = 16384 entries (so that its float
# partials, written once and read once, are a small share of the bytes it reads). The elementwise
# pass: _APPLY_BLOCK = 2048 entries per program. Under the interpreter the tiles are small
# (BC <= 4, BLK = 16, _INTERPRETED_APPLY = 128 entries) and the splits fixed at
# _INTERPRETED_SPLIT = 3, so that the tests' odd shapes cross tile, split and row boundaries.
_ELEMS, _MAX_RUN, _WAVES, _MIN_SPLIT_ELEMS, _APPLY_BLOCK = 2048, 1024, 2, 16384, 2048
_INTERPRETED_BC, _INTERPRETED_BLK, _INTERPRETED_APPLY, _INTERPRETED_SPLIT = 4, 16, 128, 3
_INT32_MAX = 2**31 - 1  # flat indices up to this stay int32 (INDEX64 beyond)


@_jit
def _stats_kernel(
    s_ptr, part_ptr, C, L, CL, LEN, SPLIT_LEN,
    INDEX64: tl.constexpr, ACC_FP64: tl.constexpr, BC: tl.constexpr, BLK: tl.constexpr,
):
    """Split ``pid_s`` (flat positions ``[pid_s SPLIT_LEN, +SPLIT_LEN)`` of the ``LEN = P L`` primal
    values of a channel, position i at row ``i // L``, column ``i % L``) of channels
    ``[pid_c BC, +BC)``: ``sum (z - c)`` and ``sum (z - c)^2`` (``c = s[0, channel, 0]``) into
    ``part[0, pid_s]`` and ``part[1, pid_s]`` (``part: [2, SPLIT, C]``)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    ch = pid_c * BC + tl.arange(0, BC).to(tl.int64)
    ch_ok = ch < C
    shift = tl.load(s_ptr + ch * L, mask=ch_ok, other=0.0).to(acc_dtype)
    s1 = tl.zeros((BC, BLK), acc_dtype)
    s2 = tl.zeros((BC, BLK), acc_dtype)
    if INDEX64:
        lo = pid_s.to(tl.int64) * SPLIT_LEN
    else:
        lo = pid_s * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, LEN)
    for i0 in range(lo, hi, BLK):
        i = i0 + tl.arange(0, BLK)
        r = i // L  # int32 unless INDEX64: the division is the costly step
        ok = ch_ok[:, None] & (i < hi)[None, :]
        x = tl.load(s_ptr + (ch * L)[:, None] + (r.to(tl.int64) * CL + (i - r * L))[None, :], mask=ok, other=0.0)
        d = tl.where(ok, x.to(acc_dtype) - shift[:, None], 0.0)
        s1 += d
        s2 += d * d
    split = tl.num_programs(1)
    tl.store(part_ptr + pid_s * C + ch, tl.sum(s1, axis=1), mask=ch_ok)
    tl.store(part_ptr + (split + pid_s) * C + ch, tl.sum(s2, axis=1), mask=ch_ok)


@_jit
def _backward_sums_kernel(
    g_ptr, s_ptr, mean_ptr, part_ptr, C, L, CL, LEN, PRIMAL_LEN, SPLIT_LEN,
    INDEX64: tl.constexpr, ACC_FP64: tl.constexpr, BC: tl.constexpr, BLK: tl.constexpr,
):
    """Split ``pid_s`` (flat positions of all ``LEN = N L`` values of a channel, the first
    ``PRIMAL_LEN = P L`` on the primal rows) of channels ``[pid_c BC, +BC)``: ``sum g`` and
    ``sum g (z - mean)`` over the primal positions and ``sum g t`` over the tangent ones into
    ``part[0..2, pid_s]`` (``part: [3, SPLIT, C]``)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    ch = pid_c * BC + tl.arange(0, BC).to(tl.int64)
    ch_ok = ch < C
    mean = tl.load(mean_ptr + ch, mask=ch_ok, other=0.0).to(acc_dtype)
    sum_g = tl.zeros((BC, BLK), acc_dtype)
    dot = tl.zeros((BC, BLK), acc_dtype)
    sum_gt = tl.zeros((BC, BLK), acc_dtype)
    if INDEX64:
        lo = pid_s.to(tl.int64) * SPLIT_LEN
    else:
        lo = pid_s * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, LEN)
    for i0 in range(lo, hi, BLK):
        i = i0 + tl.arange(0, BLK)
        r = i // L  # int32 unless INDEX64: the division is the costly step
        ok = ch_ok[:, None] & (i < hi)[None, :]
        offs = (ch * L)[:, None] + (r.to(tl.int64) * CL + (i - r * L))[None, :]
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
        x = tl.load(s_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
        primal = (i < PRIMAL_LEN)[None, :]
        g_p = tl.where(primal, g, 0.0)
        sum_g += g_p
        dot += g_p * (x - mean[:, None])
        sum_gt += tl.where(primal, 0.0, g * x)
    split = tl.num_programs(1)
    tl.store(part_ptr + pid_s * C + ch, tl.sum(sum_g, axis=1), mask=ch_ok)
    tl.store(part_ptr + (split + pid_s) * C + ch, tl.sum(dot, axis=1), mask=ch_ok)
    tl.store(part_ptr + (2 * split + pid_s) * C + ch, tl.sum(sum_gt, axis=1), mask=ch_ok)


@_jit
def _apply_kernel(
    x_ptr, s_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sum_g_ptr, dots_ptr, total, primal_end, C, L, count,
    BACKWARD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, EPS: tl.constexpr,
    INDEX64: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Entries ``[pid BLOCK, +BLOCK)`` of the flattened ``[N, C, L]`` rows, ``scale = invstd w``.
    Forward (``x = s``): ``(z - mean) scale + b`` on the primal rows, ``t scale`` on the tangent rows.
    Backward (``x = g``): ``scale (g - sum_g / n - (z - mean) invstd^2 (dot + S) / n)`` on the primal
    rows, ``g scale`` on the tangent rows (``dots = dot + S``)."""
    pid = tl.program_id(0)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    if INDEX64:
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        i = pid * BLOCK + tl.arange(0, BLOCK)  # int32: a 64-bit division per entry would cost more than its bytes
    ok = i < total
    c = (i // L) % C
    primal = i < primal_end
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(acc_dtype)
    mean = tl.load(mean_ptr + c, mask=ok, other=0.0).to(acc_dtype)
    var = tl.load(var_ptr + c, mask=ok, other=0.0).to(acc_dtype) + EPS
    if ACC_FP64:
        invstd = 1.0 / tl.sqrt(var)
    else:
        invstd = 1.0 / tl.sqrt_rn(var)  # IEEE-rounded, as 1 / std::sqrt in the C++ kernels
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + c, mask=ok, other=0.0).to(acc_dtype)
    if BACKWARD:
        z = tl.load(s_ptr + i, mask=ok & primal, other=0.0).to(acc_dtype)
        sum_g = tl.load(sum_g_ptr + c, mask=ok, other=0.0).to(acc_dtype)
        dots = tl.load(dots_ptr + c, mask=ok, other=0.0).to(acc_dtype)
        # count = n, an int (a float argument 1 / n would arrive as float32), promoted to acc_dtype
        k = invstd * invstd * (dots / count)
        y = tl.where(primal, scale * (x - sum_g / count - (z - mean) * k), x * scale)
    else:
        shift = -mean * scale
        if HAS_B:
            shift = shift + tl.load(b_ptr + c, mask=ok, other=0.0).to(acc_dtype)
        y = x * scale + tl.where(primal, shift, 0.0)
    tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(C: int, L: int):
    """``(BC, BLK)`` of the two reductions (see the tiling note above)."""
    if _backends.triton_interpreted():
        return min(triton.next_power_of_2(max(C, 1)), _INTERPRETED_BC), _INTERPRETED_BLK
    run = min(4 * triton.next_power_of_2(max(L, 1)), _MAX_RUN)
    bc = min(triton.next_power_of_2(max(C, 1)), max(1, _ELEMS // run))
    return bc, _ELEMS // bc


def _split(length: int, C: int, bc: int, blk: int, device: torch.device):
    """``(SPLIT, SPLIT_LEN)``: a reduction over ``length`` positions per channel in SPLIT programs per
    channel block, SPLIT_LEN positions each (a multiple of ``blk``)."""
    if _backends.triton_interpreted():
        split = _INTERPRETED_SPLIT
    else:
        split = min(triton.cdiv(_WAVES * _sm_count(device), triton.cdiv(C, bc)),
                    max(1, length * bc // _MIN_SPLIT_ELEMS))
    split_len = triton.cdiv(triton.cdiv(length, max(1, split)), blk) * blk
    return triton.cdiv(length, split_len), split_len


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _apply(x, s, out, mean, var, weight, bias, sum_g, dots, P, n, eps, backward):
    total = x.numel()
    if not total:
        return
    N, C, L = s.shape
    block = _INTERPRETED_APPLY if _backends.triton_interpreted() else _APPLY_BLOCK
    _apply_kernel[(triton.cdiv(total, block),)](
        x, s, out, mean, var, mean if weight is None else weight, mean if bias is None else bias,
        mean if sum_g is None else sum_g, mean if dots is None else dots, total, P * C * L, C, L, n,
        BACKWARD=backward, HAS_W=weight is not None, HAS_B=bias is not None, EPS=eps,
        INDEX64=total + block > _INT32_MAX, ACC_FP64=s.dtype == torch.float64, BLOCK=block,
    )


class _DualBatchNormTrainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, weight, bias, P, eps):
        N, C, L = s.shape
        n = P * L
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        stat = _stat_dtype(s.dtype)
        if n and C:
            bc, blk = _tiles(C, L)
            split, split_len = _split(n, C, bc, blk, s.device)
            part = torch.empty(2, split, C, device=s.device, dtype=acc)
            _stats_kernel[(triton.cdiv(C, bc), split)](s, part, C, L, C * L, n, split_len,
                                                       INDEX64=n + split_len > _INT32_MAX,
                                                       ACC_FP64=acc == torch.float64, BC=bc, BLK=blk)
            s1, s2 = (part.sum(1) / n).unbind(0)
            mean = (s[0, :, 0].to(acc) + s1).to(stat)
            var = (s2 - s1 * s1).clamp_min(0).to(stat)
        else:
            mean = torch.zeros(C, device=s.device, dtype=stat)
            var = torch.zeros(C, device=s.device, dtype=stat)
        out = torch.empty(s.shape, device=s.device, dtype=rows.store_dtype(s.dtype))
        _apply(s, s, out, mean, var, weight, bias, None, None, P, max(n, 1), eps, backward=False)
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(s, weight, mean, var)
        ctx.P, ctx.eps, ctx.bias_dtype = P, eps, None if bias is None else bias.dtype
        return out.to(s.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_mean, grad_var):
        s, weight, mean, var = ctx.saved_tensors
        need_s, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out is None:
            return None, None, None, None, None
        g = grad_out.contiguous()
        P, eps = ctx.P, ctx.eps
        N, C, L = s.shape
        n = P * L
        acc = torch.float64 if s.dtype == torch.float64 else torch.float32
        if N * C * L:
            bc, blk = _tiles(C, L)
            split, split_len = _split(N * L, C, bc, blk, s.device)
            part = torch.empty(3, split, C, device=s.device, dtype=acc)
            _backward_sums_kernel[(triton.cdiv(C, bc), split)](g, s, mean, part, C, L, C * L, N * L, n, split_len,
                                                              INDEX64=N * L + split_len > _INT32_MAX,
                                                              ACC_FP64=acc == torch.float64, BC=bc, BLK=blk)
            sum_g, dot, sum_gt = part.sum(1).unbind(0)
        else:
            sum_g = dot = sum_gt = torch.zeros(C, device=s.device, dtype=acc)
        dots = dot + sum_gt
        grad_s = grad_w = grad_b = None
        if need_s:
            grad_s = torch.empty(s.shape, device=s.device, dtype=rows.store_dtype(s.dtype))
            _apply(g, s, grad_s, mean, var, weight, None, sum_g, dots, P, max(n, 1), eps, backward=True)
            grad_s = grad_s.to(s.dtype)
        if need_w and weight is not None:
            grad_w = (1 / torch.sqrt(var.to(acc) + eps) * dots).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            grad_b = sum_g.to(ctx.bias_dtype)
        return grad_s, grad_w, grad_b, None, None


def unavailable_reason(s: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on ``s`` (its device and dtype), else why not."""
    return rows.unavailable_reason("dual_batch_norm_train", s)


def _check_param(name: str, v: Optional[torch.Tensor], s: torch.Tensor) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] != s.shape[1] or not v.is_floating_point() \
            or v.device != s.device:
        raise ValueError(f"dual_batch_norm_train: {name} must be a floating-point [C={s.shape[1]}] tensor on "
                         f"{s.device}, got {getattr(v, 'dtype', type(v).__name__)} {list(getattr(v, 'shape', []))}")


def dual_batch_norm_train(s: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], primal_rows: int,
                          momentum: float, eps: float) -> torch.Tensor:
    """``out`` as :func:`grokalign_fast.ops.dual_batch_norm_train.dual_batch_norm_train` (see the
    module doc), on the Triton kernels; differentiable in ``s``, ``weight`` and ``bias``; updates the
    running statistics (None: not tracked).

    Args:
        s: ``[N, C, *spatial]`` stacked rows, the ``primal_rows`` primal rows first.
        weight, bias: ``[C]`` or None.
        running_mean, running_var: ``[C]`` buffers or None.
        momentum, eps: as ``F.batch_norm``'s.
    """
    if not isinstance(s, torch.Tensor) or s.dim() < 2:
        raise ValueError(f"dual_batch_norm_train: s (the stacked rows) must be [N, C, *spatial], got "
                         f"{list(getattr(s, 'shape', []))}")
    if s.dtype not in rows.DTYPES:
        raise TypeError(f"dual_batch_norm_train: s must be float16, bfloat16, float32 or float64, got {s.dtype}")
    N = s.shape[0]
    if isinstance(primal_rows, bool) or not isinstance(primal_rows, int) or not 1 <= primal_rows <= N:
        raise ValueError(f"dual_batch_norm_train: primal_rows must be an int in [1, {N}], got {primal_rows!r}")
    rows3 = s.reshape(N, s.shape[1], -1)
    for name, v in (("weight", weight), ("bias", bias)):
        _check_param(name, v, s)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    out, mean, var = _DualBatchNormTrainFunction.apply(rows3.contiguous(), weight, bias, primal_rows, float(eps))
    update_running_stats(running_mean, running_var, mean, var, primal_rows * math.prod(s.shape[2:]), momentum)
    return out.view(s.shape)
