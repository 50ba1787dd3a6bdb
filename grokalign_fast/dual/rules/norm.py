r"""Normalisation layers: batch norm (eval and train), layer norm, group norm, RMS norm.

Per-sample norms (layer, group, RMS) have the exact per-sample JVP. With ``x_hat = (x - mu) / sigma``
over the normalised features (PAPER.md):

    layer / group norm:  t' = gamma * (t_c - x_hat * mean(x_hat * t_c)) / sigma,   t_c = t - mean(t)
    RMS norm:            t' = gamma * r * (t - x * r^2 * mean(x * t)),             r = 1 / rms(x)

where x, x_hat, sigma and r are the primal row's.

**BatchNorm in train mode** normalises with statistics of the whole batch, so each output depends
on every sample. The engine takes the *per-sample Jacobian with the batch statistics held
constant*: the batch mean and variance come from the primal rows only, the primal output and the
running statistics are exactly those of the plain call, and the tangent is
``t' = gamma * t / sqrt(var_B + eps)``. The dropped cross-sample terms are O(1/B), and the
estimate stays a sum of per-sample terms. The statistics stay functions of the parameters, so the
penalty's gradient flows through them. The reference estimators use the same definition
(:mod:`grokalign_fast.dual.batch_stats`). In eval mode (running statistics) batch norm is a
per-channel affine map, ``t' = gamma * t / sqrt(running_var + eps)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._args import arg
from ..streams import SampleMixingError, Streams


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector [C] shaped to broadcast over [..., C, *spatial] of ``ndim`` dims (channel dim 1)."""
    return v.view((-1,) + (1,) * (ndim - 2))


@register("batch_norm", F.batch_norm)
def batch_norm(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    running_mean, running_var = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    weight, bias = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    training = bool(arg(args, kwargs, 5, "training", False))
    momentum, eps = arg(args, kwargs, 6, "momentum", 0.1), float(arg(args, kwargs, 7, "eps", 1e-5))
    if any(ctx.is_dual(v) for v in (running_mean, running_var, weight, bias)):
        return None
    if z.dim() < 2:
        return None
    ndim = z.dim()
    if training:
        z_p, t, m = ctx.split(z)
        per_channel = z_p.numel() // max(1, z_p.shape[1])
        if per_channel <= 1:
            raise SampleMixingError(
                f"batch norm in train mode over {z_p.shape[0]} sample(s) of shape {list(z_p.shape[1:])} has one value "
                "per channel: its output is 0 whatever the input, and its statistics mix the samples. Use a batch of "
                "more than one sample, or eval mode"
            )
        out_p = F.batch_norm(z_p, running_mean, running_var, weight, bias, True, momentum, eps)
        dims = [0] + list(range(2, ndim))
        var = z_p.var(dim=dims, unbiased=False)
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        return ctx.join(out_p, t * _channel_view(scale, ndim))
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return ctx.add_bias_(z * _channel_view(scale, ndim), _channel_view(shift, ndim))


def _centered_jvp(t: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, dims) -> torch.Tensor:
    """``(t_c - x_hat * mean(x_hat * t_c)) / sigma`` over ``dims``, with ``t_c = t - mean(t)``."""
    tc = t - t.mean(dims, keepdim=True)
    return (tc - xhat * (xhat * tc).mean(dims, keepdim=True)) * rstd


@register("layer_norm", F.layer_norm)
def layer_norm(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    shape = tuple(arg(args, kwargs, 1, "normalized_shape"))
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = float(arg(args, kwargs, 4, "eps", 1e-5))
    if ctx.is_dual(weight) or ctx.is_dual(bias) or len(shape) >= z.dim():
        return None
    z_p, t, m = ctx.split(z)
    out_p = F.layer_norm(z_p, shape, weight, bias, eps)
    dims = tuple(range(-len(shape), 0))
    var, mu = torch.var_mean(z_p, dim=dims, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (z_p - mu) * rstd
    t_out = _centered_jvp(t, ctx.rows(xhat, m), ctx.rows(rstd, m), dims)
    if weight is not None:
        t_out = t_out * weight
    return ctx.join(out_p, t_out)


@register("group_norm", F.group_norm)
def group_norm(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    groups = int(arg(args, kwargs, 1, "num_groups"))
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = float(arg(args, kwargs, 4, "eps", 1e-5))
    if ctx.is_dual(weight) or ctx.is_dual(bias) or z.dim() < 2:
        return None
    z_p, t, m = ctx.split(z)
    out_p = F.group_norm(z_p, groups, weight, bias, eps)
    zg = z_p.reshape(z_p.shape[0], groups, -1)
    var, mu = torch.var_mean(zg, dim=-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (zg - mu) * rstd
    tg = t.reshape(t.shape[0], t.shape[1], groups, -1)
    t_out = _centered_jvp(tg, ctx.rows(xhat, m), ctx.rows(rstd, m), (-1,)).reshape(t.shape)
    if weight is not None:
        t_out = t_out * _channel_view(weight, z.dim())
    return ctx.join(out_p, t_out)


@register("rms_norm", getattr(F, "rms_norm", None))
def rms_norm(ctx: Streams, func, args, kwargs):
    z = arg(args, kwargs, 0, "input")
    shape = tuple(arg(args, kwargs, 1, "normalized_shape"))
    weight = arg(args, kwargs, 2, "weight")
    eps = arg(args, kwargs, 3, "eps")
    if ctx.is_dual(weight) or len(shape) >= z.dim():
        return None
    eps = torch.finfo(z.dtype).eps if eps is None else float(eps)
    z_p, t, m = ctx.split(z)
    out_p = F.rms_norm(z_p, shape, weight, eps)
    dims = tuple(range(-len(shape), 0))
    r = torch.rsqrt(z_p.pow(2).mean(dims, keepdim=True) + eps)
    x, rr = ctx.rows(z_p, m), ctx.rows(r, m)
    t_out = rr * (t - x * (rr * rr) * (x * t).mean(dims, keepdim=True))
    if weight is not None:
        t_out = t_out * weight
    return ctx.join(out_p, t_out)
