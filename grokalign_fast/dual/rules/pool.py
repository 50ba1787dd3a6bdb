r"""Pooling. Max pools: the tangent is gathered at the primal's argmax (PAPER.md); the pooling runs
once, on the primal rows, and its indices are the compact save. Every stacked row is then gathered
at its primal row's argmax (the primal rows' maxima and the tangents together), as the op
``grokalign::dual_max_pool`` with the extension's kernels (:mod:`grokalign_fast.ops.dual_max_pool`),
its Triton kernels (:mod:`grokalign_fast.ops.dual_max_pool.triton`) or its plain-PyTorch gather.
Average pools are linear and run on the stacked rows as they are (:mod:`.structural`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...ops import dual_max_pool as max_pool_op
from . import register
from ._args import arg, replace_arg
from ._kernels import epilogue
from ..streams import Streams


def _max_pool(ctx: Streams, func, args, kwargs, spatial: int, indices_pos: int):
    z = arg(args, kwargs, 0, "input")
    if arg(args, kwargs, indices_pos, "return_indices", False):
        return None  # the caller wants the indices too: the fallback serves it
    if z.dim() < spatial + 1:
        return None
    z_p, _, m = ctx.split(z)
    if func is F.max_pool2d and z_p.dim() == 4 and ctx.kernels == "cpp" and \
            max_pool_op.argmax_unavailable_reason(z_p) is None:
        # The argmax alone, from the extension (ATen's max pool also writes the values).
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        defaults = (None, None, 0, 1, False)
        pool_args = [arg(args, kwargs, i + 1, n, d) for i, (n, d) in enumerate(zip(names, defaults))]
        idx = max_pool_op.max_pool2d_argmax(z_p.detach(), *pool_args)
    else:
        args, kwargs = replace_arg(args, kwargs, indices_pos, "return_indices", True)
        with torch.no_grad():
            _, idx = func(z_p.detach(), *args[1:], **(kwargs or {}))
    out_shape = (z.shape[0],) + tuple(idx.shape[1:])
    # The rows as [rows, channels, pooled values] (one channel where the input has none).
    channels = math.prod(idx.shape[1: idx.dim() - spatial])
    rows, idx = z.reshape(z.shape[0], channels, -1), idx.reshape(idx.shape[0], channels, -1)
    index = None if ctx.index is None else ctx.row_index(m)
    op, kernel = epilogue(ctx, rows, max_pool_op, "dual_max_pool")
    if op is not None:
        out = op(rows, idx, index)
        ctx.kernel = kernel
    else:
        out = max_pool_op.reference(rows, idx, index)
    return ctx.mark(out.view(out_shape))


# The pooled dimensions and the position of ``return_indices`` among each function's arguments.
_MAX_POOLS = {
    F.max_pool1d: (1, 6), F.max_pool2d: (2, 6), F.max_pool3d: (3, 6),
    F.adaptive_max_pool1d: (1, 2), F.adaptive_max_pool2d: (2, 2), F.adaptive_max_pool3d: (3, 2),
}


@register("max_pool", *_MAX_POOLS)
def max_pool(ctx, func, args, kwargs):
    return _max_pool(ctx, func, args, kwargs, *_MAX_POOLS[func])
