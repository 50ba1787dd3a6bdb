r"""Triton kernels of the per-sample Hutchinson reduction (the op of :mod:`grokalign_fast.ops.probe_sqnorm`;
the dual-stream engine's row sum of squares of the tangent rows).

For ``g [P, B, ...]`` (P probe products per sample, the features flattened to ``n``):
``out[b] = (1/P) sum_{p, i} g[p, b, i]^2``, with the backward ``grad_g = (2/P) grad_out[b] g`` and
that backward differentiable again, as the C++ op's (``csrc/autograd/probe_sqnorm_autograd.cpp``):
``d g = (2/P) grad_out[b] gg`` (the backward kernel on ``gg``) and
``d grad_out[b] = (2/P) sum_{p, i} gg g`` (ATen ops). :func:`probe_sqnorm` has the signature and
result of the C++ entry point :func:`grokalign_fast.ops.probe_sqnorm.cpp.probe_sqnorm`.

Kernels. ``_sqnorm_partial_kernel`` (grid: sample blocks x splits of the features) sums the squares
of its ``BB`` samples' features in its split over every probe (a ``[BB, BN]`` tile per step, ``BN``
consecutive features of ``BB`` samples, so a tile is a few contiguous runs whatever ``n`` is) into
one float partial per sample; torch adds the splits' partials in a fixed order and divides by P, so
a run gives the same bits every time. ``_sqnorm_backward_kernel`` (grid: sample blocks x feature
blocks) reads ``grad_out`` for its samples once and scales their tiles of every probe. Sums and
products are float32 (float64 for float64 rows), written once in the rows' dtype. Sample offsets
``b n`` are int64 and a probe step advances a pointer by ``B n``; feature indices are int32 unless
``n`` can pass ``2^31``.

Bytes moved per entry of ``g`` (``e`` the element size; the floor): forward ``e`` (read once; the
``[SPLIT, B]`` float partials add a few bytes per sample); backward ``2 e`` (read ``g``, write the
gradient; ``grad_out`` is read once per tile).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ... import _backends
from .. import _triton_rows as rows

from .._triton import jit as _jit, tl, triton  # noqa: F401

# Splits of the forward. On a GPU the splits along the features give _WAVES = 2 programs per SM,
# each at least _MIN_SPLIT_ELEMS = 16384 entries (its float partials, written once and read once,
# a small share of the bytes it reads). Under the interpreter the tiles are small
# (_triton_rows.row_blocks) and the splits fixed at _INTERPRETED_SPLIT = 3, so that the tests' odd
# shapes cross tile and split boundaries.
_WAVES, _MIN_SPLIT_ELEMS, _INTERPRETED_SPLIT = 2, 16384, 3
_INT32_MAX = 2**31 - 1  # feature indices up to this stay int32 (INDEX64 beyond)


@_jit
def _sqnorm_partial_kernel(
    g_ptr, part_ptr, P, B, N, STRIDE, SPLIT_N,
    INDEX64: tl.constexpr, ACC_FP64: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
):
    """Samples ``[pid_b BB, +BB)`` x features ``[pid_s SPLIT_N, +SPLIT_N)`` of every probe
    (``STRIDE = B N`` entries apart): ``sum g^2`` into ``part[pid_s, b]`` (``part: [SPLIT, B]``)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    b = pid_b * BB + tl.arange(0, BB).to(tl.int64)  # int64: b * N may pass 2^31
    b_ok = b < B
    if INDEX64:
        lo = pid_s.to(tl.int64) * SPLIT_N
    else:
        lo = pid_s * SPLIT_N
    hi = tl.minimum(lo + SPLIT_N, N)
    acc = tl.zeros((BB, BN), acc_dtype)
    ptr = g_ptr + b * N  # probe 0; each probe STRIDE further on
    for p in range(0, P):
        for n0 in range(lo, hi, BN):
            n = n0 + tl.arange(0, BN)  # int32 unless INDEX64
            ok = b_ok[:, None] & (n < hi)[None, :]
            x = tl.load(ptr[:, None] + n[None, :], mask=ok, other=0.0).to(acc_dtype)
            acc += x * x
        ptr += STRIDE
    tl.store(part_ptr + pid_s * B + b, tl.sum(acc, axis=1), mask=b_ok)


@_jit
def _sqnorm_backward_kernel(
    g_ptr, grad_ptr, out_ptr, P, B, N, STRIDE,
    INDEX64: tl.constexpr, ACC_FP64: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr,
):
    """Features ``[pid_n BN, +BN)`` x samples ``[pid_b BB, +BB)`` of every probe:
    ``out = (2 / P) grad[b] g`` (the features along the grid's first axis, which has no 65535 limit)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    b = pid_b * BB + tl.arange(0, BB).to(tl.int64)  # int64: b * N may pass 2^31
    b_ok = b < B
    if INDEX64:
        n = pid_n.to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    else:
        n = pid_n * BN + tl.arange(0, BN)
    ok = b_ok[:, None] & (n < N)[None, :]
    # P, an int, promoted to acc_dtype (a float argument 2 / P would arrive as float32)
    w = tl.load(grad_ptr + b, mask=b_ok, other=0.0).to(acc_dtype) * 2.0 / P
    offs = (b * N)[:, None] + n[None, :]
    src = g_ptr + offs
    dst = out_ptr + offs
    for p in range(0, P):
        x = tl.load(src, mask=ok, other=0.0).to(acc_dtype)
        tl.store(dst, (x * w[:, None]).to(out_ptr.dtype.element_ty), mask=ok)
        src += STRIDE
        dst += STRIDE


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(P: int, B: int, N: int, bb: int, bn: int, device: torch.device):
    """``(SPLIT, SPLIT_N)``: the forward's splits of the N features, SPLIT_N each (a multiple of bn)."""
    if _backends.triton_interpreted():
        split = _INTERPRETED_SPLIT
    else:
        split = min(triton.cdiv(_WAVES * _sm_count(device), triton.cdiv(B, bb)),
                    max(1, P * N * bb // _MIN_SPLIT_ELEMS))
    split_n = triton.cdiv(triton.cdiv(N, max(1, split)), bn) * bn
    return triton.cdiv(N, split_n), split_n


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(g: torch.Tensor) -> torch.Tensor:
    P, B, N = g.shape
    acc = _acc_dtype(g.dtype)
    if B * N == 0:
        return torch.zeros(B, device=g.device, dtype=g.dtype)
    bb, bn = rows.row_blocks(B, N)
    split, split_n = _split(P, B, N, bb, bn, g.device)
    part = torch.empty(split, B, device=g.device, dtype=acc)
    _sqnorm_partial_kernel[(triton.cdiv(B, bb), split)](g, part, P, B, N, B * N, split_n,
                                                        INDEX64=N + split_n > _INT32_MAX,
                                                        ACC_FP64=acc == torch.float64, BB=bb, BN=bn)
    return (part.sum(0) / P).to(g.dtype)


def _backward(g: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    P, B, N = g.shape
    out = torch.empty(g.shape, device=g.device, dtype=rows.store_dtype(g.dtype))
    if g.numel():
        bb, bn = rows.row_blocks(B, N)
        _sqnorm_backward_kernel[(triton.cdiv(N, bn), triton.cdiv(B, bb))](
            g, grad_out, out, P, B, N, B * N,
            INDEX64=N + bn > _INT32_MAX, ACC_FP64=g.dtype == torch.float64, BB=bb, BN=bn)
    return out.to(g.dtype)


class _ProbeSqnormBackward(torch.autograd.Function):
    """``grad_g = (2/P) grad_out[b] g``, differentiable in both (double backward)."""

    @staticmethod
    def forward(ctx, g, grad_out):
        ctx.save_for_backward(g, grad_out)
        return _backward(g, grad_out)

    @staticmethod
    def backward(ctx, gg):
        g, grad_out = ctx.saved_tensors
        d_g = d_grad = None
        if ctx.needs_input_grad[0]:
            d_g = _ProbeSqnormBackward.apply(gg.contiguous(), grad_out)
        if ctx.needs_input_grad[1]:
            d_grad = (gg * g).sum(dim=(0, 2)) * (2.0 / g.shape[0])
        return d_g, d_grad


class _ProbeSqnorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g):
        ctx.save_for_backward(g)
        return _forward(g)

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        return _ProbeSqnormBackward.apply(g, grad_out.contiguous())


def unavailable_reason(g: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on ``g`` (its device and dtype), else why not."""
    return rows.unavailable_reason("probe_sqnorm", g)


def probe_sqnorm(g: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``(1/P) sum_p ||g[p, b]||^2`` as :func:`grokalign_fast.ops.probe_sqnorm.cpp.probe_sqnorm`
    (see the module doc), on the Triton kernels; differentiable twice in ``g``.

    Args:
        g: ``[P, B, ...]``: P >= 1 probe products for each of B samples, float16, bfloat16, float32
            or float64.
    """
    if not isinstance(g, torch.Tensor) or g.dim() < 2:
        raise ValueError(f"probe_sqnorm: g must be [P, B, ...], got {list(getattr(g, 'shape', []))}")
    if g.dtype not in rows.DTYPES:
        raise TypeError(f"probe_sqnorm: g must be float16, bfloat16, float32 or float64, got {g.dtype}")
    if g.shape[0] < 1:
        raise ValueError(f"probe_sqnorm: g needs at least one probe (P >= 1), got {list(g.shape)}")
    g3 = g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:]))
    return _ProbeSqnorm.apply(g3.contiguous())
