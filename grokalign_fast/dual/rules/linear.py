r"""Linear maps of the input: ``F.linear``, convolutions and matmul.

``y = x W^T + b`` (or ``y = W * x + b`` for a convolution): the weights act on every stacked row
at once, ``t' = W t``, and the bias lands on the primal rows only (PAPER.md, "Forward-mode JVP
through common layers"). One GEMM / convolution call covers the primal and every tangent stream,
so the weights are read once. When both factors of a matmul carry tangents (attention scores),
the product rule gives ``(a b)' = a' b + a b'``.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from . import method, register
from ._args import arg, replace_arg
from ..streams import Streams


def _add_bias_to_primal(ctx: Streams, out: torch.Tensor, bias: torch.Tensor, view_shape) -> torch.Tensor:
    """``out`` (a fresh GEMM / convolution output, not saved by its backward) with ``bias`` added
    in place on its primal rows."""
    if bias is not None:
        return ctx.add_bias_(out, bias.view(view_shape))
    return ctx.mark(out)


@register("linear", F.linear)
def linear(ctx: Streams, func, args, kwargs):
    x, weight, bias = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if ctx.is_dual(weight) or ctx.is_dual(bias) or not ctx.is_dual(x):
        return None  # a weight that depends on the input: the fallback handles it
    out = F.linear(x, weight)
    return _add_bias_to_primal(ctx, out, bias, (-1,))


def _conv(ctx: Streams, func, args, kwargs, dims: int):
    x, weight, bias = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if ctx.is_dual(weight) or ctx.is_dual(bias) or not ctx.is_dual(x):
        return None
    args, kwargs = replace_arg(args, kwargs, 2, "bias", None)
    block = ctx.B * ctx.block(x)
    padding = args[4] if len(args) > 4 else 0
    if (x.device.type == "cpu" and x.shape[0] > BLOCK_ABOVE * block and func in _CONV_DIMS and not kwargs
            and not isinstance(padding, str)):
        if torch.is_autocast_enabled("cpu"):
            # Autocast would cast inside the forward only; the backward needs the same dtypes.
            dt = torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                out = _BlockConv.apply(x.to(dt), weight.to(dt), block, func, tuple(args[3:]))
        else:
            out = _BlockConv.apply(x, weight, block, func, tuple(args[3:]))
    else:
        out = func(*args, **kwargs)
    return _add_bias_to_primal(ctx, out, bias, (-1,) + (1,) * dims)


_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

# CPU convolutions over more stacked rows than this many times the primal batch run on blocks
# (:class:`_BlockConv`); up to it, as one call. With ``subsample=0.25`` (1.25 times the batch) one
# call was faster: training steps over a plain step, interleaved in one process, 2 threads, cnn6
# 1.22-1.25x against 1.27-1.28x on blocks, ResNet-18 1.30x against 1.38x; with one probe (twice the
# batch) the blocks are faster (see _BlockConv).
BLOCK_ABOVE = 1.5


class _BlockConv(torch.autograd.Function):
    """A convolution (no bias) over the stacked rows, run on blocks of at most B rows (the primal
    batch) on the CPU.

    On the CPU a convolution over twice the user's batch can cost more than twice its time once the
    activations leave the cache (cnn6 at batch 128, 2 cores: a plain training step at batch 256
    cost 2.4x-3.1x the step at 128); blocks of the user's batch keep its cache behaviour. The
    blocks' outputs and input gradients are written into one buffer each, and the weight gradient
    is summed over the blocks."""

    @staticmethod
    def forward(ctx, x, weight, block, func, params):
        outs = [func(x[i: i + block], weight, None, *params) for i in range(0, x.shape[0], block)]
        ctx.save_for_backward(x, weight)
        ctx.block, ctx.dims, ctx.params = block, _CONV_DIMS[func], params
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dims, block = ctx.dims, ctx.block
        # (stride, padding, dilation, groups) with F.conv*d's defaults for the ones not given.
        stride, padding, dilation, groups = list(ctx.params) + [1, 0, 1, 1][len(ctx.params):]

        def expand(v):
            return [v] * dims if isinstance(v, int) else list(v)

        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = None
        for i in range(0, x.shape[0], block):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad[i: i + block].contiguous(), x[i: i + block], weight, None, expand(stride), expand(padding),
                expand(dilation), False, [0] * dims, groups, [need_x, need_w, False])
            if need_x:
                grad_x[i: i + block] = gx
            if need_w:
                grad_w = gw if grad_w is None else grad_w + gw
        return grad_x, grad_w, None, None, None


@register("conv", F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def conv(ctx, func, args, kwargs):
    weight = arg(args, kwargs, 1, "weight")
    return _conv(ctx, func, args, kwargs, weight.dim() - 2)


@register("matmul", torch.matmul, method("matmul"), method("__matmul__"), operator.matmul, torch.mm, method("mm"),
          torch.bmm, method("bmm"))
def matmul(ctx: Streams, func, args, kwargs):
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other")
    da, db = ctx.is_dual(a), ctx.is_dual(b)
    if da and db:
        a_p, a_t, ma = ctx.split(a)
        b_p, b_t, mb = ctx.split(b)
        primal = torch.matmul(a_p, b_p)
        tangent = torch.matmul(a_t, ctx.rows(b_p, mb)) + torch.matmul(ctx.rows(a_p, ma), b_t)
        return ctx.join(primal, tangent)
    # Linear in the dual factor: the constant factor must not carry a batch dimension of its own.
    const = b if da else a
    dual = a if da else b
    if isinstance(const, torch.Tensor) and const.dim() >= dual.dim() and const.dim() >= 3 and const.shape[0] != 1:
        return None
    out = func(*args, **kwargs)
    if da and not db and dual.dim() == 1:
        return None
    ctx.block(out)
    return ctx.mark(out)
