r"""Pointwise activations and dropout: ``y = s(z)``, ``t' = s'(z) * t`` with z the primal row's value.

- Positively homogeneous activations (ReLU, leaky ReLU) and dropout are ``y = d(z) * z`` with a
  slope ``d`` that is piecewise constant in z: the whole stacked buffer is multiplied by the
  primal rows' slope (:meth:`Streams.scale`). No gradient flows through the mask. With the
  extension's kernels (``ctx.kernels == "cpp"``), ReLU and leaky ReLU run as its one-pass op
  ``grokalign::dual_act`` (:mod:`grokalign_fast.ops.dual_act`: a byte mask is the saved state), with
  ``ctx.kernels == "triton"`` as the same op's Triton kernels (:mod:`grokalign_fast.ops.dual_act.triton`).
- Smooth activations (GELU, SiLU, tanh, sigmoid, ELU, softplus): the primal runs the plain
  function, the tangent rows take ``s'(z)`` of their primal row, and training differentiates
  through ``s'`` (it needs ``s''``, which autograd derives from the closed forms of
  :mod:`grokalign_fast.ops.dual_smooth_act`). With the extension's kernels they run as its
  one-pass op ``grokalign::dual_smooth_act``, which saves only the input rows; with the Triton
  kernels as :mod:`grokalign_fast.ops.dual_smooth_act.triton`, the same op.
- Dropout draws its mask once, for the primal rows, with the same random numbers the plain call
  draws; each tangent row takes its primal row's mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops import dual_act as dual_act_op
from ...ops import dual_smooth_act as smooth_op
from . import method, register
from ._args import arg
from ._kernels import epilogue
from ..streams import Streams


def smooth(ctx: Streams, z: torch.Tensor, value, slope) -> torch.Tensor:
    """The dual result of a smooth pointwise map: ``value(z_p)`` on the primal rows and
    ``slope(z_p)[row] * t`` on the tangent rows."""
    z_p, t, m = ctx.split(z)
    return ctx.join(value(z_p), t * ctx.rows(slope(z_p), m))


def _smooth(ctx: Streams, z: torch.Tensor, act: str, **params) -> torch.Tensor:
    """The smooth activation ``act`` of :mod:`grokalign_fast.ops.dual_smooth_act` (with its
    ``params``): its one-pass op on the rows flattened to [N*m, features] where the kernels serve,
    else :func:`smooth` with its plain-PyTorch value and slope."""
    op, kernel = epilogue(ctx, z, smooth_op, "dual_smooth_act") if z.dim() >= 1 else (None, None)
    if op is not None:
        m = ctx.block(z)
        index = None if ctx.index is None else ctx.row_index(m)
        out = op(z.reshape(z.shape[0], -1), ctx.B * m, index, act, **params)
        ctx.kernel = kernel
        return ctx.mark(out.view(z.shape))
    return smooth(ctx, z, lambda v: smooth_op.value(v, act, **params), lambda v: smooth_op.slope(v, act, **params))


def _by_kernel(ctx: Streams, z: torch.Tensor, act: str, alpha: float):
    """The activation as the one-pass op ``dual_act`` (the extension's or the Triton kernels, as
    ``ctx.kernels`` asks) on the rows flattened to [N*m, features], or None where it cannot serve
    (then the ATen ops below run)."""
    op, kernel = epilogue(ctx, z, dual_act_op, "dual_act") if z.dim() >= 1 else (None, None)
    if op is None:
        return None
    m = ctx.block(z)
    index = None if ctx.index is None else ctx.row_index(m)
    out, _ = op(z.reshape(z.shape[0], -1), ctx.B * m, index, act, alpha)
    ctx.kernel = kernel
    return ctx.mark(out.view(z.shape))


@register("relu", F.relu, torch.relu, method("relu"), F.relu_, torch.relu_, method("relu_"))
def relu(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    out = _by_kernel(ctx, z, "relu", 0.0)
    if out is not None:
        return out
    z_p, _, _ = ctx.split(z)
    return ctx.scale(z, z_p > 0)


@register("leaky_relu", F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu)
def leaky_relu(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    slope = float(arg(args, kwargs, 1, "negative_slope", 0.01))
    out = _by_kernel(ctx, z, "leaky_relu", slope)
    if out is not None:
        return out
    z_p, _, _ = ctx.split(z)
    d = torch.where(z_p > 0, torch.ones((), dtype=z.dtype, device=z.device),
                    torch.full((), slope, dtype=z.dtype, device=z.device))
    return ctx.scale(z, d)


@register("gelu", F.gelu)
def gelu(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    approximate = arg(args, kwargs, 1, "approximate", "none")
    return _smooth(ctx, z, "gelu_tanh" if approximate == "tanh" else "gelu")


@register("silu", F.silu)
def silu(ctx: Streams, func, args, kwargs):
    return _smooth(ctx, arg(args, kwargs, 0, "input"), "silu")


@register("tanh", torch.tanh, method("tanh"), F.tanh)
def tanh(ctx: Streams, func, args, kwargs):
    return _smooth(ctx, arg(args, kwargs, 0, "input"), "tanh")


@register("sigmoid", torch.sigmoid, method("sigmoid"), F.sigmoid)
def sigmoid(ctx: Streams, func, args, kwargs):
    return _smooth(ctx, arg(args, kwargs, 0, "input"), "sigmoid")


@register("elu", F.elu)
def elu(ctx: Streams, func, args, kwargs):
    return _smooth(ctx, arg(args, kwargs, 0, "input"), "elu", alpha=float(arg(args, kwargs, 1, "alpha", 1.0)))


@register("softplus", F.softplus)
def softplus(ctx: Streams, func, args, kwargs):
    return _smooth(ctx, arg(args, kwargs, 0, "input"), "softplus", beta=float(arg(args, kwargs, 1, "beta", 1.0)),
                   threshold=float(arg(args, kwargs, 2, "threshold", 20.0)))


@register("hardtanh", F.hardtanh, F.relu6)
def hardtanh(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    if func is F.relu6:
        lo, hi = 0.0, 6.0
    else:
        lo, hi = float(arg(args, kwargs, 1, "min_val", -1.0)), float(arg(args, kwargs, 2, "max_val", 1.0))
    return smooth(ctx, z, lambda v: torch.clamp(v, lo, hi), lambda v: ((v > lo) & (v < hi)).to(v.dtype))


@register("dropout", F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
def dropout(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    p = float(arg(args, kwargs, 1, "p", 0.5))
    training = bool(arg(args, kwargs, 2, "training", True))
    if not training or p == 0.0:
        return z
    z_p, _, _ = ctx.split(z)
    # The plain call's random numbers: the same dropout of ones of the primal rows' shape is its mask, scaled.
    return ctx.scale(z, func(torch.ones_like(z_p), p, True))
