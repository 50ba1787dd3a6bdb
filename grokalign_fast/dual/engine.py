r"""Running a model on the dual stream: every torch function it calls goes through its rule.

:func:`run` stacks the input and the tangent probes (``[x; V]``, see :mod:`.streams`), calls the
model once inside :class:`DualMode`, and reduces the tangent rows of the output to the per-row
Hutchinson estimate ``(1/K) sum_k ||J(x[index[r]]) V[k, r]||^2``. The model's own ``forward`` runs
unchanged: its Python control flow, its submodules' state updates (BatchNorm's running statistics,
dropout's random numbers) happen once, on the primal rows, exactly as in a plain call.

:class:`DualMode` is a ``TorchFunctionMode``: a call with a dual argument goes to the rule of its
function (:mod:`.rules`), or, with none, to :mod:`.fallback` (with a one-time warning naming the
function). Calls without dual arguments (parameter arithmetic, buffer updates) run as they are.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable, Optional, Set

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import _backends
from ..ops.probe_sqnorm import cpp as probe_sqnorm_cpp
from ..ops.probe_sqnorm import function as probe_sqnorm_ops
from ..ops.probe_sqnorm import triton as probe_sqnorm_triton
from . import fallback
from .rules import lookup
from .embedding import is_token_input, not_embedded
from .rules.attention import batch_first_attention
from .streams import SampleMixingError, Streams

# Tensor attributes and methods that read metadata: they run on the stacked value as they are.
_METADATA_ATTRS = frozenset({
    "shape", "dtype", "device", "requires_grad", "ndim", "is_cuda", "is_cpu", "is_mps", "layout", "grad_fn",
    "is_leaf", "names", "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes", "is_nested", "grad",
    "output_nr", "_version", "_base", "is_mkldnn",
})
_METADATA_METHODS = frozenset(
    getattr(torch.Tensor, n) for n in (
        "size", "dim", "numel", "__len__", "stride", "is_floating_point", "is_contiguous", "element_size",
        "data_ptr", "storage_offset", "ndimension", "nelement", "get_device", "is_complex", "__format__",
        "__repr__", "__hash__", "untyped_storage", "is_signed", "__bool__",
        # Autograd hooks (FSDP's pre-backward unshard among them) go on the stacked value: its
        # gradient is the one the backward reaches.
        "register_hook", "register_post_accumulate_grad_hook", "retain_grad",
    ) if hasattr(torch.Tensor, n)
)
_WARNED: Set[str] = set()
KERNELS = ("torch", "cpp", "triton")


def func_name(func) -> str:
    """A readable name of a torch function, method or attribute getter."""
    owner = getattr(func, "__self__", None)
    if owner is not None and hasattr(owner, "__objclass__") and hasattr(owner, "__name__"):
        return f"Tensor.{owner.__name__}"
    name = getattr(func, "__name__", None) or repr(func)
    qualname = getattr(func, "__qualname__", "") or ""
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional") or getattr(F, name, None) is func:
        return f"F.{name}"
    if "TensorBase" in qualname or qualname.startswith("Tensor."):
        return f"Tensor.{name}"
    if getattr(torch, name, None) is func:
        return f"torch.{name}"
    return f"{module}.{qualname or name}" if module else name


def _getset_name(func) -> Optional[str]:
    owner = getattr(func, "__self__", None)
    if owner is not None and getattr(func, "__name__", "") == "__get__":
        return getattr(owner, "__name__", None)
    return None


def _has_dual(ctx: Streams, args, kwargs) -> bool:
    for a in args:
        if ctx.is_dual(a):
            return True
        if isinstance(a, (list, tuple)):
            for b in a:
                if ctx.is_dual(b):
                    return True
    if kwargs:
        for a in kwargs.values():
            if ctx.is_dual(a):
                return True
    return False


def _is_inplace_method(func) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") and getattr(torch.Tensor, name, None) is func


class DualMode(TorchFunctionMode):
    """Dispatch every torch call with a dual argument to its rule. ``counts``: calls per rule name
    (and ``"fallback:<function>"`` for functions without a rule); ``strict``: raise instead of
    falling back, naming the function; ``warned``: the function names already warned about."""

    def __init__(self, ctx: Streams, *, strict: bool = False, warned: Optional[Set[str]] = None):
        super().__init__()
        self.ctx = ctx
        self.strict = strict
        self.warned = _WARNED if warned is None else warned
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ctx = self.ctx
        if func is F.embedding and ctx.seed is not None and args and args[0] is ctx.seed[0]:
            return self._seed(func, args, kwargs)
        if not _has_dual(ctx, args, kwargs) or func in _METADATA_METHODS:
            return func(*args, **kwargs)
        attr = _getset_name(func)
        if attr is not None:
            if attr in _METADATA_ATTRS:
                return func(*args, **kwargs)
            if attr in ("T", "mT", "H", "mH"):
                raise SampleMixingError(f"the model takes Tensor.{attr} of a value, which moves the batch dimension")
        rule = lookup(func)
        if rule is not None:
            ctx.kernel = None
            out = rule.fn(ctx, func, args, kwargs)
            if out is not None:
                self.counts[rule.name if ctx.kernel is None else f"{rule.name}[{ctx.kernel}]"] += 1
                return self._inplace(func, args, out)
        name = func_name(func)
        if self.strict:
            raise NoRuleError(name)
        self.counts["fallback:" + name] += 1
        if name not in self.warned:
            self.warned.add(name)
            warnings.warn(
                f"grokalign_fast.dual: no rule for {name}; its tangent is computed by torch.func.jvp on the "
                "tangent rows' primal values (correct for functions that keep samples apart, slower)",
                stacklevel=2,
            )
        return self._inplace(func, args, fallback.call(ctx, func, args, kwargs))

    def _seed(self, func, args, kwargs):
        """The first embedding lookup of the token input: its output becomes the dual value, with the
        probes as its tangent rows (:mod:`grokalign_fast.dual.embedding`)."""
        ctx = self.ctx
        tokens, V = ctx.seed
        ctx.seed = None
        e = func(*args, **kwargs)
        if tuple(e.shape[1:]) != tuple(V.shape[2:]):
            raise ValueError(f"the probes have per-sample shape {list(V.shape[2:])} but the embedding of x has "
                             f"{list(e.shape[1:])}")
        self.counts["embedding"] += 1
        return ctx.join(e, V.reshape((-1,) + tuple(e.shape[1:])).to(e.dtype))

    def _inplace(self, func, args, out):
        """An in-place method's result is written back into its first argument, as the plain call would."""
        if _is_inplace_method(func) and isinstance(out, torch.Tensor) and args and args[0] is not out:
            target = args[0]
            if target.shape == out.shape:
                target.copy_(out)
                return self.ctx.mark(target)
        return out


class NoRuleError(RuntimeError):
    def __init__(self, name: str):
        super().__init__(f"no dual-stream rule for {name}")
        self.name = name


def run(
    model: Callable,
    x: torch.Tensor,
    V: torch.Tensor,
    index: Optional[torch.Tensor] = None,
    *,
    strict: bool = False,
    warned: Optional[Set[str]] = None,
    kernels: str = "torch",
    jx: bool = False,
):
    """Run ``model`` on the dual stream.

    Args:
        model: maps ``[B, ...]`` to ``[B, ...]`` with samples independent.
        x: the primal batch ``[B, ...]``: floating point, or integer tokens whose first embedding lookup
            the Jacobian is taken at (:mod:`grokalign_fast.dual.embedding`).
        V: tangent probes ``[K, R, *shape]`` (``shape``: ``x.shape[1:]``, or the embedding's per-sample
            shape); stream k of row r rides on ``x[index[r]]``.
        index: ``[R]`` long, or None for every row (R = B).
        strict: raise :class:`NoRuleError` for a function without a rule instead of falling back.
        warned: the names already warned about (the fallback warns once per name in this set; a
            planner keeps one set per plan); None: one set for the process.
        kernels: which kernels the rules run (one of :data:`KERNELS`): ``"torch"``, every rule in
            plain PyTorch (ATen ops: the rules' reference); ``"cpp"``, the extension's fused
            epilogues where one serves (``grokalign::dual_act``, ``dual_smooth_act``, ``dual_max_pool``,
            ``dual_batch_norm_train``, ``dual_layer_norm``, counted as ``"<rule>[cpp]"``) and the row
            sum of squares as ``grokalign::probe_sqnorm`` (counted as ``"probe_sqnorm[cpp]"``); needs
            the extension. ``"triton"``, the Triton kernels of the same epilogues where they serve
            (``dual_act``, ``dual_smooth_act``, ``dual_max_pool``, ``dual_batch_norm_train``,
            ``dual_layer_norm``, counted as ``"<rule>[triton]"``; the other rules in ATen ops) and of the
            row sum of squares (``"probe_sqnorm[triton]"``); needs triton and a CUDA input, or a CPU
            input under Triton's interpreter (``TRITON_INTERPRET=1``).
        jx: also carry the tangent ``x[index[r]]`` itself (one more stream) and return ``J x`` at each
            row: the offset ``f(x) - J x`` of the local affine map costs that stream.

    Returns:
        ``(y, sq, counts)``: the model's output ``[B, ...]``, ``sq[r] = (1/K) sum_k ||J V[k, r]||^2``
        ``[R]``, and the calls per rule; with ``jx``, also ``J x`` ``[R, *y.shape[1:]]``.
    """
    if jx:
        if is_token_input(x):
            raise NotImplementedError("the offset term J x needs floating-point inputs, not tokens")
        rows_x = x if index is None else x.index_select(0, index)
        V = torch.cat([V, rows_x.unsqueeze(0).to(V.dtype)])
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels != "torch":
        check = _backends.cpp_unavailable_reason if kernels == "cpp" else _backends.triton_unavailable_reason
        reason = check(x.device)
        if reason is not None:
            raise _backends.BackendUnavailableError(f'kernels="{kernels}" cannot run: {reason}')
    B, K, R = x.shape[0], V.shape[0], V.shape[1]
    ctx = Streams(B, K, R, index)
    ctx.kernels = kernels
    if is_token_input(x):
        # The tangents start at the first embedding lookup of the tokens (see DualMode._seed).
        s, ctx.seed = x, (x, V)
    else:
        s = ctx.mark(torch.cat([x, V.reshape((K * R,) + tuple(x.shape[1:]))]))
    mode = DualMode(ctx, strict=strict, warned=warned)
    ctx.mode = mode  # rules that run a composition of other rules (attention) re-enter it
    with batch_first_attention(model), mode:
        out = model(s)
    if ctx.seed is not None:
        raise not_embedded(x)
    if not ctx.is_dual(out):
        raise SampleMixingError(
            f"the model's output on the dual stream is not a per-sample value ({type(out).__name__} of shape "
            f"{list(getattr(out, 'shape', []))}); it must return a tensor [B, ...] computed from x"
        )
    y, t, m = ctx.split(out)
    if m != 1:
        raise SampleMixingError(f"the model's output has {out.shape[0]} rows for a batch of {B}")
    if t.dtype in (torch.float16, torch.bfloat16):  # (autocast) the sum of squares accumulates in float32
        t = t.float()
    streams = t.reshape(K, R, -1)
    sq = _row_sqnorm(streams[:-1] if jx else streams, kernels, mode.counts)
    if jx:
        return y, sq, mode.counts, streams[-1].view((R,) + tuple(y.shape[1:]))
    return y, sq, mode.counts


def _row_sqnorm(t: torch.Tensor, kernels: str, counts: Counter) -> torch.Tensor:
    """``(1/K) sum_{k, n} t[k, r, n]^2`` of the tangent rows ``t [K, R, n]``: ``grokalign::probe_sqnorm``
    with the extension's kernels or its Triton kernels (:mod:`grokalign_fast.ops.probe_sqnorm.triton`),
    as ``kernels`` asks, where they serve (one pass, its backward the ``2/K t g`` scaling), else ATen
    ops."""
    if kernels == "cpp" and probe_sqnorm_ops.unavailable_reasons(t)["cpp"] is None:
        counts["probe_sqnorm[cpp]"] += 1
        return probe_sqnorm_cpp.probe_sqnorm(t)
    if kernels == "triton" and probe_sqnorm_triton.unavailable_reason(t) is None:
        counts["probe_sqnorm[triton]"] += 1
        return probe_sqnorm_triton.probe_sqnorm(t)
    return t.pow(2).sum(dim=(0, 2)) / t.shape[0]
