r"""Normalisation layers: batch norm (eval and train), layer norm, group norm, RMS norm.

Per-sample norms (layer, group, RMS) have the exact per-sample JVP. With ``x_hat = (x - mu) / sigma``
over the normalised features (PAPER.md):

    layer / group norm:  t' = gamma * (t_c - x_hat * mean(x_hat * t_c)) / sigma,   t_c = t - mean(t)
    RMS norm:            t' = gamma * r * (t - x * r^2 * mean(x * t)),             r = 1 / rms(x)

where x, x_hat, sigma and r are the primal row's. With the extension's kernels (``kernels="cpp"``)
each of the three is one op, ``grokalign::dual_layer_norm`` (:mod:`grokalign_fast.ops.dual_layer_norm`),
on the rows of normalised features (group norm: ``[N * G, C/G * L]``, its per-channel affine given to
the op as ``[G, C/G * L]`` rows), with the Triton kernels (``kernels="triton"``) the same op's
:mod:`grokalign_fast.ops.dual_layer_norm.triton`; the ATen rules below are its reference on the engine.

**BatchNorm in train mode** normalises with statistics of the whole batch, so each output depends
on every sample. The engine takes the *per-sample Jacobian with the batch statistics held
constant*: the batch mean and variance come from the primal rows only, the primal output and the
running statistics are exactly those of the plain call, and the tangent is
``t' = gamma * t / sqrt(var_B + eps)``. The dropped cross-sample terms are O(1/B), and the
estimate stays a sum of per-sample terms. The statistics stay functions of the parameters, so the
penalty's gradient flows through them. The reference estimators use the same definition
(:mod:`grokalign_fast.dual.batch_stats`). With the extension's kernels the whole layer is one op,
``grokalign::dual_batch_norm_train`` (:mod:`grokalign_fast.ops.dual_batch_norm_train`), with the
Triton kernels the same op's :mod:`grokalign_fast.ops.dual_batch_norm_train.triton`; in ATen ops
it is :class:`_BatchNormTrain`, the op's reference on the engine. In eval mode (running statistics)
batch norm is a per-channel affine map, ``t' = gamma * t / sqrt(running_var + eps)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...ops import dual_batch_norm_train as batch_norm_op
from ...ops import dual_layer_norm as layer_norm_op
from . import register
from ._args import arg
from ._kernels import epilogue
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
        momentum = 0.0 if momentum is None else momentum
        op, kernel = epilogue(ctx, z, batch_norm_op, "dual_batch_norm_train")
        if op is not None:
            ctx.kernel = kernel
            return ctx.mark(op(z, weight, bias, running_mean, running_var, z_p.shape[0], momentum, eps))
        return ctx.mark(_BatchNormTrain.apply(z, weight, bias, running_mean, running_var, momentum, eps,
                                              z_p.shape[0]))
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return ctx.add_bias_(z * _channel_view(scale, ndim), _channel_view(shift, ndim))


def _by_kernel(ctx: Streams, z: torch.Tensor, n: int, weight, bias, eps: float, rms: bool, plain=None):
    """The norm as the one-pass op ``grokalign::dual_layer_norm`` on ``z``'s rows of ``n`` normalised
    features (``weight``, ``bias``: ``[n]``, ``[G, n]`` or None), on the extension's kernels or the
    op's Triton kernels (:mod:`grokalign_fast.ops.dual_layer_norm.triton`) as ``ctx.kernels`` asks, or
    None where neither can serve (then the ATen rule runs). ``plain(v)``: the plain call on rows
    ``v``; under autocast the op runs in the dtype it returns for no rows (CUDA's autocast runs the
    norms in float32)."""
    if n < 1 or z.numel() == 0:
        return None
    op, kernel = epilogue(ctx, z, layer_norm_op, "dual_layer_norm")
    if op is None:
        return None
    if plain is not None and torch.is_autocast_enabled(z.device.type):
        dtype = plain(z[:0]).dtype
        z = z if dtype == z.dtype else z.to(dtype)
    ctx.block(z)  # the leading dimension holds whole samples
    per_sample = z.numel() // n // ctx.N  # normalised rows per sample
    index = None if ctx.index is None else ctx.row_index(per_sample)
    out = op(z.reshape(-1, n), weight, bias, ctx.B * per_sample, index, eps, rms)
    ctx.kernel = kernel
    return ctx.mark(out.view(z.shape))


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
    n = math.prod(shape)
    out = _by_kernel(ctx, z, n, None if weight is None else weight.reshape(n),
                     None if bias is None else bias.reshape(n), eps, rms=False,
                     plain=lambda v: F.layer_norm(v, shape, weight, bias, eps))
    if out is not None:
        return out
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
    C, L = z.shape[1], math.prod(z.shape[2:])
    if groups >= 1 and C % groups == 0:
        # The per-channel affine as [G, C/G * L] rows of the groups' features (a [C * L] copy, one
        # sample's size), so the op applies it in its pass.
        def grouped(p):
            return None if p is None else p.view(groups, C // groups, 1).expand(-1, -1, L).reshape(groups, -1)

        out = _by_kernel(ctx, z, C // groups * L, grouped(weight), grouped(bias), eps, rms=False,
                         plain=lambda v: F.group_norm(v, groups, weight, bias, eps))
        if out is not None:
            return out
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
    n = math.prod(shape)
    out = _by_kernel(ctx, z, n, None if weight is None else weight.reshape(n), None, eps, rms=True,
                     plain=lambda v: F.rms_norm(v, shape, weight, eps))
    if out is not None:
        return out
    z_p, t, m = ctx.split(z)
    out_p = F.rms_norm(z_p, shape, weight, eps)
    dims = tuple(range(-len(shape), 0))
    r = torch.rsqrt(z_p.pow(2).mean(dims, keepdim=True) + eps)
    x, rr = ctx.rows(z_p, m), ctx.rows(r, m)
    t_out = rr * (t - x * (rr * rr) * (x * t).mean(dims, keepdim=True))
    if weight is not None:
        t_out = t_out * weight
    return ctx.join(out_p, t_out)


class _BatchNormTrain(torch.autograd.Function):
    """Batch norm in train mode on the stacked rows, in one output buffer and one backward.

    Forward: the primal rows ``[:n_p]`` through ATen's batch norm (batch statistics of the primal rows,
    running statistics updated as the plain call updates them), the tangent rows scaled by
    ``gamma * invstd`` per channel. Backward, for the primal rows: ATen's batch-norm backward plus the
    tangent rows' dependence on the statistics, ``d invstd / d z = -invstd^2 x_hat / n``:

        grad_z += -(gamma invstd^2 / n) x_hat S,     grad_gamma += invstd S,     S = sum(grad_t * t)

    per channel (n values per channel); for the tangent rows ``grad_t * gamma * invstd``.
    """

    @staticmethod
    def forward(ctx, s, weight, bias, running_mean, running_var, momentum, eps, n_p):
        z_p, t = s[:n_p], s[n_p:]
        out_p, mean, invstd = torch.native_batch_norm(z_p, weight, bias, running_mean, running_var, True, momentum,
                                                      eps)
        shape = (-1,) + (1,) * (s.dim() - 2)
        scale = invstd if weight is None else invstd * weight
        out = torch.empty_like(s)
        out[:n_p] = out_p
        torch.mul(t, scale.view(shape), out=out[n_p:])
        ctx.save_for_backward(s, weight, mean, invstd)
        ctx.n_p, ctx.eps, ctx.shape = n_p, eps, shape
        return out

    @staticmethod
    def backward(ctx, grad):
        s, weight, mean, invstd = ctx.saved_tensors
        n_p, shape = ctx.n_p, ctx.shape
        z_p, t = s[:n_p], s[n_p:]
        g_p, g_t = grad[:n_p].contiguous(), grad[n_p:]
        need = ctx.needs_input_grad
        gz, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g_p, z_p, weight, None, None, mean, invstd, True, ctx.eps,
            [need[0], weight is not None and need[1], need[2]])
        dims = [0] + list(range(2, s.dim()))
        S = (g_t * t).sum(dim=dims)
        grad_s = None
        if need[0]:
            w = torch.ones_like(invstd) if weight is None else weight
            n = z_p.numel() // z_p.shape[1]
            coeff = -(w * invstd * invstd * invstd / n * S)  # times (z - mean), i.e. x_hat / invstd
            grad_s = torch.empty_like(s)
            torch.add(gz, (z_p - mean.view(shape)) * coeff.view(shape), out=grad_s[:n_p])
            torch.mul(g_t, (invstd * w).view(shape), out=grad_s[n_p:])
        if gw is not None:
            gw = gw + invstd * S
        return grad_s, gw, gb, None, None, None, None, None
