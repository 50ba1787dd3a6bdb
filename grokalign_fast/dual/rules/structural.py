r"""Structure and arithmetic: residual add, products, cat, views, slicing, reductions over
features, average pooling, padding, softmax and pointwise math.

- **Linear maps that keep every sample's rows to itself** (views and reshapes that keep the batch
  leading, permutes and transposes that leave dimension 0 in place, slicing of other dimensions,
  sums and means over features, average pools, interpolation, zero padding, a product with a
  constant) run on the stacked rows as they are: the map of the tangent is the map itself.
  Arguments that would move, slice or reduce dimension 0 raise :class:`SampleMixingError`.
- **Adding a constant** (a bias, a positional embedding) moves the primal rows only.
- **Products of two dual values** follow the product rule, ``(a b)' = a' b + a b'``.
- **Softmax**: ``p' = p * (t - sum(p * t))``; log-softmax: ``t - sum(p * t)``.
- **Other pointwise functions of one dual value** (exp, log, sqrt, pow by a constant, ...) take
  their slope ``f'(z)`` from ``torch.func.jvp`` on the primal rows (one pass over B rows) and
  apply it to the tangent rows.
"""
from __future__ import annotations

import operator
from numbers import Number

import torch
import torch.nn.functional as F

from . import method, register
from ._args import arg
from .. import fallback
from ..streams import SampleMixingError, Streams


def _mark_checked(ctx: Streams, out):
    """Mark every tensor of ``out`` (a tensor or a tuple / list of them) as dual, after checking
    that each keeps the stacked rows leading."""
    if isinstance(out, torch.Tensor):
        ctx.block(out)
        return ctx.mark(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_mark_checked(ctx, o) for o in out)
    return out


def _mixing(what: str) -> SampleMixingError:
    return SampleMixingError(
        f"the model {what}: the per-sample Jacobian is only defined for models whose samples stay independent"
    )


def _dims(value, ndim: int):
    if value is None:
        return None
    if isinstance(value, int):
        return [value % ndim]
    return [int(d) % ndim for d in value]


# ------------------------------------------------------------------ maps that keep samples apart


def _linear(ctx: Streams, func, args, kwargs):
    return _mark_checked(ctx, func(*args, **(kwargs or {})))


register("view", method("view"), method("reshape"), torch.reshape, method("view_as"), method("reshape_as"),
         method("contiguous"), method("clone"), torch.clone, method("expand_as"), method("float"),
         method("double"), method("half"), method("bfloat16"), method("to"), method("type_as"),
         method("flatten"), torch.flatten, method("unflatten"), torch.unflatten)(_linear)
register("linear_map", F.pixel_shuffle, F.pixel_unshuffle, F.unfold, F.fold, F.interpolate, F.upsample, torch.neg,
         method("neg"), method("__neg__"), operator.neg, method("__pos__"), operator.pos)(_linear)
register("avg_pool", F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
         F.adaptive_avg_pool3d)(_linear)


@register("view", method("expand"))
def expand(ctx: Streams, func, args, kwargs):
    x = args[0]
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
    if len(sizes) != x.dim() or (sizes[0] != -1 and sizes[0] != x.shape[0]):
        raise _mixing(f"expands dimension 0 of a value of shape {list(x.shape)} to {list(sizes)}")
    return _linear(ctx, func, args, kwargs)


@register("view", method("permute"), torch.permute)
def permute(ctx: Streams, func, args, kwargs):
    x = args[0]
    dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
    if not dims:
        dims = kwargs.get("dims")
    if int(dims[0]) % x.dim() != 0:
        raise _mixing(f"permutes the batch dimension away from the front (dims={list(dims)})")
    return _linear(ctx, func, args, kwargs)


@register("view", method("transpose"), torch.transpose, method("swapaxes"), torch.swapaxes, method("swapdims"),
          torch.swapdims, method("movedim"), torch.movedim)
def transpose(ctx: Streams, func, args, kwargs):
    x = args[0]
    a, b = arg(args, kwargs, 1, "dim0"), arg(args, kwargs, 2, "dim1")
    da, db = _dims(a, x.dim()), _dims(b, x.dim())
    if (0 in da) != (0 in db) or (0 in da and da != db):
        raise _mixing(f"moves the batch dimension ({getattr(func, '__name__', func)}({a}, {b}))")
    return _linear(ctx, func, args, kwargs)


@register("view", method("squeeze"), torch.squeeze)
def squeeze(ctx: Streams, func, args, kwargs):
    x = args[0]
    dims = _dims(arg(args, kwargs, 1, "dim"), x.dim())
    if dims is not None and 0 in dims:
        raise _mixing("squeezes the batch dimension")
    return _linear(ctx, func, args, kwargs)


@register("unsqueeze", method("unsqueeze"), torch.unsqueeze)
def unsqueeze(ctx: Streams, func, args, kwargs):
    x = args[0]
    d = int(arg(args, kwargs, 1, "dim"))
    if d % (x.dim() + 1) == 0:
        raise _mixing("adds a dimension in front of the batch dimension")
    return _linear(ctx, func, args, kwargs)


def _reduce_over(pos: int, name: str, default):
    def rule(ctx, func, args, kwargs):
        x = arg(args, kwargs, 0, "input")
        dims = _dims(arg(args, kwargs, pos, name, default), x.dim())
        if dims is None or 0 in dims:
            raise _mixing(f"calls {getattr(func, '__name__', func)} over the batch dimension (dim={dims})")
        return _linear(ctx, func, args, kwargs)

    return rule


register("reduce", method("sum"), torch.sum, method("mean"), torch.mean)(_reduce_over(1, "dim", None))
register("reduce", method("cumsum"), torch.cumsum, method("narrow"), torch.narrow, method("select"),
         torch.select, method("unbind"), torch.unbind)(_reduce_over(1, "dim", 0))
register("reduce", method("flip"), torch.flip)(_reduce_over(1, "dims", None))
register("reduce", method("roll"), torch.roll)(_reduce_over(2, "dims", None))
register("reduce", method("chunk"), torch.chunk, method("tensor_split"), torch.tensor_split)(
    _reduce_over(2, "dim", 0))
register("reduce", method("split"), torch.split)(_reduce_over(2, "dim", 0))


@register("getitem", operator.getitem, method("__getitem__"))
def getitem(ctx: Streams, func, args, kwargs):
    x, idx = args[0], args[1]
    if not isinstance(x, torch.Tensor):
        return None
    first = idx[0] if isinstance(idx, tuple) and idx else idx
    ok = first is Ellipsis or (isinstance(first, slice) and first == slice(None))
    if isinstance(idx, tuple) and idx:
        # Several tensor indices apart from each other move the indexed dimensions to the front.
        ok = ok and sum(isinstance(i, (torch.Tensor, list)) for i in idx) <= 1
    if not ok:
        raise _mixing(f"indexes the batch dimension ({idx!r}); slice other dimensions only, as x[:, ...]")
    if ctx.is_dual(idx):
        return None
    return _linear(ctx, func, args, kwargs)


@register("pad", F.pad)
def pad(ctx: Streams, func, args, kwargs):
    x = arg(args, kwargs, 0, "input")
    widths = arg(args, kwargs, 1, "pad")
    mode = arg(args, kwargs, 2, "mode", "constant")
    value = arg(args, kwargs, 3, "value", None)
    if len(widths) >= 2 * x.dim():
        raise _mixing("pads the batch dimension")
    if mode == "constant" and value not in (None, 0, 0.0):
        x_p, t, m = ctx.split(x)
        return ctx.join(F.pad(x_p, widths, mode, value), F.pad(t, widths, mode, 0.0))
    return _linear(ctx, func, args, kwargs)


# ------------------------------------------------------------------ arithmetic


def _is_const_batched(ctx: Streams, c, x: torch.Tensor) -> bool:
    """True when the constant ``c`` carries a leading dimension that lines up with ``x``'s rows (a
    per-row constant): it would apply one sample's value to another's tangent rows."""
    return (isinstance(c, torch.Tensor) and c.dim() >= x.dim() and c.shape[0] != 1
            and not ctx.is_aligned(c))


@register("add", operator.add, torch.add, method("add"), method("__add__"), method("__radd__"), method("add_"),
          method("__iadd__"), operator.iadd)
def add(ctx: Streams, func, args, kwargs):
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other")
    alpha = (kwargs or {}).get("alpha", 1)
    da, db = ctx.is_dual(a), ctx.is_dual(b)
    if da and db:
        out = a + b if alpha == 1 else torch.add(a, b, alpha=alpha)
        return _mark_checked(ctx, out)
    x, c = (a, b) if da else (b, a)
    if _is_const_batched(ctx, c, x):
        return None
    if not da:  # c + alpha * x
        x_p, t, _ = ctx.split(x)
        return ctx.join(c + alpha * x_p, alpha * t if alpha != 1 else t)
    return ctx.add_to_primal(x, c if alpha == 1 else alpha * c)


@register("sub", operator.sub, torch.sub, method("sub"), method("__sub__"), method("__rsub__"), method("sub_"),
          method("__isub__"), operator.isub, torch.rsub)
def sub(ctx: Streams, func, args, kwargs):
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other")
    if func in (method("__rsub__"), torch.rsub):
        a, b = b, a
    alpha = (kwargs or {}).get("alpha", 1)
    da, db = ctx.is_dual(a), ctx.is_dual(b)
    if da and db:
        return _mark_checked(ctx, torch.sub(a, b, alpha=alpha) if alpha != 1 else a - b)
    if da:
        if _is_const_batched(ctx, b, a):
            return None
        return ctx.add_to_primal(a, -alpha * b if alpha != 1 else -b)
    if _is_const_batched(ctx, a, b):
        return None
    b_p, t, _ = ctx.split(b)
    return ctx.join(a - alpha * b_p, -alpha * t)


@register("mul", operator.mul, torch.mul, method("mul"), method("__mul__"), method("__rmul__"), method("mul_"),
          method("__imul__"), operator.imul)
def mul(ctx: Streams, func, args, kwargs):
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other")
    da, db = ctx.is_dual(a), ctx.is_dual(b)
    if da and db:
        a_p, a_t, ma = ctx.split(a)
        b_p, b_t, mb = ctx.split(b)
        return ctx.join(a_p * b_p, a_t * ctx.rows(b_p, mb) + ctx.rows(a_p, ma) * b_t)
    x, c = (a, b) if da else (b, a)
    if _is_const_batched(ctx, c, x):
        return None
    return _mark_checked(ctx, x * c)


@register("div", operator.truediv, torch.div, torch.true_divide, method("div"), method("true_divide"),
          method("__truediv__"), method("div_"), method("__itruediv__"), operator.itruediv)
def div(ctx: Streams, func, args, kwargs):
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other")
    if (kwargs or {}).get("rounding_mode") is not None or ctx.is_dual(b):
        return None  # a dual divisor: the fallback differentiates it
    if _is_const_batched(ctx, b, a):
        return None
    return _mark_checked(ctx, a / b)


@register("cat", torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack)
def cat(ctx: Streams, func, args, kwargs):
    tensors = list(arg(args, kwargs, 0, "tensors"))
    if func is torch.hstack:
        dim = 1 if tensors and tensors[0].dim() > 1 else 0
    else:
        dim = arg(args, kwargs, 1, "dim", 0)
    ref = next(t for t in tensors if ctx.is_dual(t))
    ndim = ref.dim() + (1 if func is torch.stack else 0)
    if int(dim) % ndim == 0:
        raise _mixing(f"concatenates along the batch dimension ({getattr(func, '__name__', func)}, dim={dim})")
    parts = []
    for t in tensors:
        if ctx.is_dual(t):
            parts.append(t)
        elif isinstance(t, torch.Tensor) and t.dim() == ref.dim() and t.shape[0] == ref.shape[0]:
            # A constant built per stacked row (e.g. a token expanded to x.shape[0]): it has no tangent.
            m = ctx.block(t)
            parts.append(torch.cat([t[: ctx.B * m], t.new_zeros((t.shape[0] - ctx.B * m,) + tuple(t.shape[1:]))]))
        else:
            return None
    return ctx.mark((torch.stack if func is torch.stack else torch.cat)(parts, dim=dim))


# ------------------------------------------------------------------ softmax and pointwise math


_LOG_SOFTMAX = (F.log_softmax, torch.log_softmax, method("log_softmax"))


@register("softmax", F.softmax, torch.softmax, method("softmax"), *_LOG_SOFTMAX)
def softmax(ctx: Streams, func, args, kwargs):
    """Softmax ``p' = p * (t - sum(p * t))``; log-softmax ``t - sum(p * t)``."""
    z = arg(args, kwargs, 0, "input")
    dim = arg(args, kwargs, 1, "dim")
    if dim is None or int(dim) % z.dim() == 0:
        raise _mixing(f"takes a {getattr(func, '__name__', 'softmax')} over the batch dimension")
    dtype = (kwargs or {}).get("dtype")
    dim = int(dim) - z.dim() if int(dim) >= 0 else int(dim)  # the tangent carries a leading stream dimension
    z_p, t, m = ctx.split(z if dtype is None else z.to(dtype))
    if func in _LOG_SOFTMAX:
        out_p = torch.log_softmax(z_p, dim)
        pr = ctx.rows(out_p.exp(), m)
        return ctx.join(out_p, t - (pr * t).sum(dim, keepdim=True))
    p = torch.softmax(z_p, dim)
    pr = ctx.rows(p, m)
    return ctx.join(p, pr * (t - (pr * t).sum(dim, keepdim=True)))


_POINTWISE = [
    torch.exp, method("exp"), torch.log, method("log"), torch.sqrt, method("sqrt"), torch.rsqrt, method("rsqrt"),
    torch.sin, method("sin"), torch.cos, method("cos"), torch.square, method("square"), torch.reciprocal,
    method("reciprocal"), torch.erf, method("erf"), torch.log1p, method("log1p"), torch.expm1, method("expm1"),
    torch.abs, method("abs"), method("__abs__"), torch.clamp, method("clamp"), torch.clip, method("clip"),
    torch.pow, method("pow"), method("__pow__"), operator.pow, F.softsign, F.logsigmoid, F.mish, F.hardswish,
    F.hardsigmoid, F.selu, F.celu,
]


@register("pointwise", *_POINTWISE)
def pointwise(ctx: Streams, func, args, kwargs):
    """``f(z)`` of one dual value and constants: slope ``f'(z_p)`` by one ``torch.func.jvp`` on the primal rows."""
    z = args[0] if args else None
    if not ctx.is_dual(z) or any(ctx.is_dual(a) for a in args[1:]) or any(ctx.is_dual(v) for v in (kwargs or {}).values()):
        return None
    if func in (torch.pow, method("pow"), method("__pow__"), operator.pow) and not isinstance(args[1], Number):
        return None
    rest, kw = tuple(args[1:]), dict(kwargs or {})
    kw.pop("inplace", None)

    def f(v):
        return func(v, *rest, **kw)

    z_p, t, m = ctx.split(z)
    out_p, slope = torch.func.jvp(f, (z_p,), (torch.ones_like(z_p),))
    return ctx.join(out_p, t * ctx.rows(slope, m))



# ------------------------------------------------------------------ values with no tangent

_NONDIFF = [
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne, torch.gt, torch.lt, torch.ge,
    torch.le, torch.eq, torch.ne, torch.sign, torch.argmax, torch.argmin, torch.floor, torch.ceil, torch.round,
    torch.isnan, torch.isfinite, torch.isinf, torch.signbit, torch.heaviside,
] + [method(n) for n in ("gt", "lt", "ge", "le", "eq", "ne", "__gt__", "__lt__", "__ge__", "__le__", "__eq__",
                          "__ne__", "sign", "argmax", "argmin", "floor", "ceil", "round", "isnan", "isfinite",
                          "isinf", "signbit", "bool", "long", "int")]


@register("compare", *_NONDIFF)
def compare(ctx: Streams, func, args, kwargs):
    """A comparison, rounding or argmax of dual values: computed on the primal rows and laid out for
    every row (each tangent row takes its primal row's value); it has no tangent."""
    return fallback.call(ctx, func, args, kwargs)


@register("factory", torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
          torch.randn_like, torch.randint_like, method("new_zeros"), method("new_ones"), method("new_full"),
          method("new_empty"))
def factory(ctx: Streams, func, args, kwargs):
    """A tensor shaped like a dual value: made for the primal rows (as the plain call makes it, with
    the same random numbers) and laid out for every row. It has no tangent."""
    x = args[0]
    if func in (method("new_zeros"), method("new_ones"), method("new_full"), method("new_empty")):
        return None  # explicit sizes: the constant's rows are whatever the model asked for
    x_p, _, _ = ctx.split(x)
    return ctx.align(func(x_p, *args[1:], **(kwargs or {})))


@register("where", torch.where, method("where"))
def where(ctx: Streams, func, args, kwargs):
    """``where(cond, a, b)`` with a condition from the input (laid out per row) or without a batch
    dimension: linear in ``a`` and ``b``; a constant branch has no tangent."""
    if func is method("where"):  # x.where(cond, other)
        cond, a, b = arg(args, kwargs, 1, "condition"), args[0], arg(args, kwargs, 2, "other")
    else:
        cond, a, b = arg(args, kwargs, 0, "condition"), arg(args, kwargs, 1, "input"), arg(args, kwargs, 2, "other")
    if ctx.is_dual(cond) or (isinstance(cond, torch.Tensor) and not ctx.is_aligned(cond) and cond.dim() > 0
                             and cond.shape[0] != 1 and cond.dim() >= max(getattr(a, "ndim", 0), getattr(b, "ndim", 0))):
        return None
    like = a if ctx.is_dual(a) else b
    m = ctx.block(like)
    Bm = ctx.B * m

    def as_dual(v):
        if ctx.is_dual(v):
            return v
        v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
        # The constant on the primal rows, zero on the tangent rows.
        rows = torch.zeros((like.shape[0],) + (1,) * (like.dim() - 1), dtype=like.dtype, device=like.device)
        rows[:Bm] = 1
        return v * rows

    return ctx.mark(torch.where(cond, as_dual(a), as_dual(b)))
