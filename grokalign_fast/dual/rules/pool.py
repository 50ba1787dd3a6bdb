r"""Pooling. Max pools: the tangent is gathered at the primal's argmax (PAPER.md); the pooling runs
once, on the primal rows, and its indices are the compact save. Average pools are linear and run on
the stacked rows as they are (:mod:`.structural`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._args import arg, replace_arg
from ..streams import Streams


def _max_pool(ctx: Streams, func, args, kwargs, spatial: int, indices_pos: int):
    z = arg(args, kwargs, 0, "input")
    if arg(args, kwargs, indices_pos, "return_indices", False):
        return None  # the caller wants the indices too: the fallback serves it
    if z.dim() < spatial + 1:
        return None
    z_p, _, m = ctx.split(z)
    args, kwargs = replace_arg(args, kwargs, indices_pos, "return_indices", True)
    with torch.no_grad():
        _, idx = func(z_p.detach(), *args[1:], **(kwargs or {}))
    # Every row gathered at its primal row's argmax: the primal rows' maxima and the tangents, in one
    # gather (its backward, a scatter-add, is the max-pool's).
    lead = tuple(idx.shape[1: idx.dim() - spatial])
    out_shape = (-1,) + tuple(idx.shape[1:])
    if ctx.index is None:  # every stream lines up with the primal rows: the indices broadcast over them
        streams = (ctx.K + 1, idx.shape[0]) + lead
        flat_idx = idx.reshape(streams[1:] + (-1,)).unsqueeze(0).expand(streams + (-1,))
        out = z.reshape(streams + (-1,)).gather(-1, flat_idx)
        return ctx.mark(out.reshape(out_shape))
    rows = ctx.rows(idx, m)
    full = torch.cat([idx, rows.unsqueeze(0).expand((ctx.K,) + tuple(rows.shape)).reshape((-1,) + tuple(idx.shape[1:]))])
    out = z.reshape((full.shape[0],) + lead + (-1,)).gather(-1, full.reshape((full.shape[0],) + lead + (-1,)))
    return ctx.mark(out.reshape(out_shape))


# The pooled dimensions and the position of ``return_indices`` among each function's arguments.
_MAX_POOLS = {
    F.max_pool1d: (1, 6), F.max_pool2d: (2, 6), F.max_pool3d: (3, 6),
    F.adaptive_max_pool1d: (1, 2), F.adaptive_max_pool2d: (2, 2), F.adaptive_max_pool3d: (3, 2),
}


@register("max_pool", *_MAX_POOLS)
def max_pool(ctx, func, args, kwargs):
    return _max_pool(ctx, func, args, kwargs, *_MAX_POOLS[func])
