r"""Functions without a rule.

- **Differentiable functions** (any floating-point output): the primal rows run the function as
  the model calls it; the tangent rows take ``torch.func.jvp`` of the same function at their
  primal rows' values. This assumes the function keeps samples apart, as every function of a
  model the penalty is defined for does; it costs a second evaluation on the tangent rows' primal
  values. The engine warns once per function that takes this path.
- **Non-differentiable results** (comparisons, argmax, rounding: integer or bool outputs): computed
  on the primal rows and laid out for every row, each tangent row taking its primal row's value
  (:meth:`~grokalign_fast.dual.streams.Streams.align`), so a mask built from the input applies to the
  tangent rows as the primal's mask.
"""
from __future__ import annotations

from typing import List

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .streams import Streams


def _is_float_tensor(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def call(ctx: Streams, func, args, kwargs):
    """The dual result of ``func``, which has no rule: non-differentiable outputs aligned to every
    row, differentiable ones through ``torch.func.jvp``."""
    flat, spec = tree_flatten((args, kwargs or {}))
    dual_pos: List[int] = [i for i, v in enumerate(flat) if ctx.is_dual(v)]
    primal_flat = list(flat)
    splits = {}
    for i in dual_pos:
        splits[i] = ctx.split(flat[i])
        primal_flat[i] = splits[i][0]
    # Constants laid out per stacked row (a mask from the input): the primal rows' part here, the
    # tangent rows' part (already one value per tangent row) in the JVP below.
    aligned = {i: ctx.split(v)[:2] for i, v in enumerate(flat) if ctx.is_aligned(v)}
    for i, (primal, _) in aligned.items():
        primal_flat[i] = primal
    a, k = tree_unflatten(primal_flat, spec)
    out_p = func(*a, **k)
    flat_out, out_spec = tree_flatten(out_p)
    if not any(_is_float_tensor(v) for v in flat_out):
        return tree_unflatten([ctx.align(v) if isinstance(v, torch.Tensor) else v for v in flat_out], out_spec)

    K = ctx.K
    points, tangents = [], []
    for i in dual_pos:
        p, t, m = splits[i]
        at_rows = ctx.rows(p, m)  # [R*m, ...]: the primal value under each tangent row of one stream
        points.append(at_rows.unsqueeze(0).expand((K,) + tuple(at_rows.shape)).reshape((-1,) + tuple(at_rows.shape[1:])))
        tangents.append(t.reshape((-1,) + tuple(t.shape[2:])))

    def f(*values):
        filled = list(flat)
        for i, (_, tangent_rows) in aligned.items():
            filled[i] = tangent_rows.reshape((-1,) + tuple(tangent_rows.shape[2:]))
        for i, v in zip(dual_pos, values):
            filled[i] = v
        fa, fk = tree_unflatten(filled, spec)
        return func(*fa, **fk)

    _, out_t = torch.func.jvp(f, tuple(points), tuple(tangents))
    flat_t, _ = tree_flatten(out_t)
    joined = []
    for p, t in zip(flat_out, flat_t):
        if _is_float_tensor(p):
            joined.append(ctx.join(p, t))
        elif isinstance(p, torch.Tensor):
            joined.append(ctx.align(p))
        else:
            joined.append(p)
    return tree_unflatten(joined, out_spec)
