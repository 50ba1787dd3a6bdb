r"""Estimators of the per-sample Jacobian Frobenius norm (reference path).

For ``f`` mapping a batch ``[B, ...]`` to outputs ``[B, ...]`` with samples
independent, ``J_b = d f(x)_b / d x_b`` is the ``C x D`` Jacobian of sample b
(outputs and inputs flattened per sample). Estimators of ``||J_b||_F^2``:

- ``"reverse"`` (output space; the authors' and Hoffman et al.'s estimator):
  ``(1/k) sum_p ||u_p^T J_b||^2`` with output probes ``E[u u^T] = I``: one
  vector-Jacobian product per probe, reusing a single forward pass. Exact when
  C = 1 (whatever the probe distribution, up to its scale: with ``"sphere"``
  probes it is exact for C = 1).
- ``"forward"`` (input space, Hutchinson): ``(1/k) sum_p ||J_b v_p||^2`` with
  input probes ``E[v v^T] = I``: one Jacobian-vector product per probe.
- ``"exact"``: the full Jacobian with ``min(C, D)`` products (C VJPs or D JVPs).

All three are unbiased for ``||J_b||_F^2`` (``squared=True``). With
``squared=False`` the per-sample norm is the square root of the per-sample
estimate, as in the authors' code; by Jensen's inequality this is biased low,
``E sqrt(est) <= ||J_b||_F``, with the gap shrinking as ``num_probes`` grows
(it is exact for ``"exact"`` and for ``"orthogonal"`` probes with k = dim).
The square root has value 0 and gradient 0 where the estimate is 0.

Results are differentiable (with respect to ``x`` and to whatever ``f``
closes over) when grad mode is enabled, so they can be added to a loss.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from . import _backends
from ._validation import (
    check_batch_input,
    check_batch_output,
    check_choice,
    check_finite,
    check_generator,
    check_num_probes,
)
from .dual.rules._args import arg
from .ops.probe_sqnorm import probe_sqnorm
from .probes import draw_probes, resolve_probes

ESTIMATORS = ("reverse", "forward", "exact")
REDUCTIONS = ("mean", "sum", "none")


def _check_callable(f, name: str = "f") -> None:
    if not callable(f):
        raise TypeError(f"{name} must be callable (a function or nn.Module mapping [B, ...] to [B, ...]), got {type(f).__name__}")


def _requires_grad_input(x: torch.Tensor) -> torch.Tensor:
    """x itself when it already carries a graph (e.g. embeddings), else a leaf copy."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _vjps(out: torch.Tensor, x_: torch.Tensor, cotangents, create_graph: bool) -> torch.Tensor:
    """Stack ``u_p^T J`` for each cotangent ``u_p`` (shape of ``out``): [P, *x.shape]."""
    if not out.requires_grad:
        raise ValueError(
            "f(x) does not depend differentiably on x (its output carries no autograd graph); "
            "f must be built from differentiable torch operations and must not run under torch.no_grad()"
        )
    grads = []
    n = len(cotangents)
    for p, u in enumerate(cotangents):
        (g,) = torch.autograd.grad(
            out, x_, u, create_graph=create_graph, retain_graph=create_graph or p < n - 1, allow_unused=True
        )
        grads.append(torch.zeros_like(x_) if g is None else g)
    return torch.stack(grads)


class _ExplicitLayerNorm(TorchFunctionMode):
    """``F.layer_norm`` as its formula ``(x - mean) / sqrt(var + eps) * weight + bias``.

    PyTorch's own layer norm has a wrong second-order forward-mode derivative (pytorch/pytorch
    #196700, seen with torch 2.13 on the CPU): the gradient of a ``torch.func.jvp`` product with
    respect to anything before the layer norm is wrong, so the penalty's parameter gradient would
    be. The reference's forward-mode products run layer norms through this mode; plain autograd
    (double backward) through the native op is correct and unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm:
            x = arg(args, kwargs, 0, "input")
            shape = tuple(arg(args, kwargs, 1, "normalized_shape"))
            weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
            eps = arg(args, kwargs, 4, "eps", 1e-5)
            dims = tuple(range(-len(shape), 0))
            var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
            out = (x - mean) * torch.rsqrt(var + eps)
            if weight is not None:
                out = out * weight
            if bias is not None:
                out = out + bias
            return out
        return func(*args, **kwargs)


def _explicit_norms(f):
    def g(*a):
        with _ExplicitLayerNorm():
            return f(*a)

    return g


def _jvps(f, x: torch.Tensor, tangents) -> Tuple[torch.Tensor, torch.Tensor]:
    """Primal output and stacked ``J v_p`` for each tangent: ([B, ...], [P, B, ...]).

    The first product is one ``torch.func.jvp`` (it also validates the output);
    the others are batched with ``torch.func.vmap`` when f supports it (same
    numbers, one batched pass), else computed one by one (e.g. random layers
    such as dropout, which vmap refuses).
    """
    f = _explicit_norms(f)
    primal, t0 = torch.func.jvp(f, (x,), (tangents[0],))
    primal = check_batch_output(primal, x.shape[0])
    if len(tangents) == 1:
        return primal, t0.unsqueeze(0)
    rest = torch.stack(list(tangents[1:]))
    try:
        T = torch.func.vmap(lambda v: torch.func.jvp(f, (x,), (v,))[1])(rest)
    except RuntimeError:
        T = torch.stack([torch.func.jvp(f, (x,), (v,))[1] for v in rest])
    return primal, torch.cat([t0.unsqueeze(0), T])


def _basis(count: int, batch: int, shape, like: torch.Tensor, index: int) -> torch.Tensor:
    e = torch.zeros((batch, count), dtype=like.dtype, device=like.device)
    e[:, index] = 1
    return e.reshape((batch,) + tuple(shape))


def _probe_products(
    f: Callable,
    x: torch.Tensor,
    *,
    estimator: str = "reverse",
    num_probes: int = 1,
    probes: str = "auto",
    generator: Optional[torch.Generator] = None,
    create_graph: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`probe_products` without the attention backend's context."""
    _check_callable(f)
    check_batch_input(x)
    check_choice(estimator, "estimator", ESTIMATORS)
    probes = resolve_probes(probes, estimator)
    check_num_probes(num_probes)
    check_generator(generator)
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    B = x.shape[0]
    in_shape = tuple(x.shape[1:])
    D = x[0].numel()

    if estimator == "forward":
        V = draw_probes(probes, num_probes, B, in_shape, dtype=x.dtype, device=x.device, generator=generator)
        with torch.set_grad_enabled(create_graph):
            out, G = _jvps(f, x, list(V))
        return out, G, 1

    with torch.enable_grad():
        x_ = _requires_grad_input(x)
        out = check_batch_output(f(x_), B)
        out_shape = tuple(out.shape[1:])
        C = out[0].numel()
        if estimator == "reverse":
            U = draw_probes(probes, num_probes, B, out_shape, dtype=out.dtype, device=out.device, generator=generator)
            return out, _vjps(out, x_, list(U), create_graph), 1
        if C <= D:  # exact with C vector-Jacobian products
            return out, _vjps(out, x_, [_basis(C, B, out_shape, out, c) for c in range(C)], create_graph), C
    # exact with D Jacobian-vector products
    with torch.set_grad_enabled(create_graph):
        _, G = _jvps(f, x, [_basis(D, B, in_shape, x, d) for d in range(D)])
    return out, G, D


def probe_products(f: Callable, x: torch.Tensor, **kw) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Run ``f`` once; return ``(f(x), G, scale)`` with ``G[p, b]`` the p-th probe product of sample b.

    ``G`` is ``J v_p`` ([P, B, *out]) for ``"forward"``, ``u_p^T J`` ([P, B, *in])
    for ``"reverse"`` and the rows or columns of J for ``"exact"``;
    ``scale * mean_p ||G[p, b]||^2`` is the estimate of ``||J_b||_F^2`` (scale is
    1, except for ``"exact"`` where it is the number of products). Keywords: ``estimator``,
    ``num_probes``, ``probes``, ``generator``, ``create_graph``.

    Scaled dot-product attention runs on its math backend here: the fused CPU and CUDA kernels
    have no forward-mode derivative and no double backward, which the estimators need.
    """
    with sdpa_kernel([SDPBackend.MATH]):
        return _probe_products(f, x, **kw)


def sq_norm_estimate(
    f: Callable,
    x: torch.Tensor,
    *,
    estimator: str = "reverse",
    num_probes: int = 1,
    probes: str = "auto",
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
    create_graph: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``f`` once and return ``(f(x), est)`` with ``est[b]`` an unbiased estimate of ``||J_b||_F^2``.

    ``create_graph`` defaults to ``torch.is_grad_enabled()``: when true the
    estimate is differentiable (training), else it is detached (monitoring).
    The reference (autograd) path computes the Jacobian products; ``backend``
    chooses the implementation of the per-sample reduction.
    """
    _backends.check_backend_name(backend)
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    out, G, scale = probe_products(
        f, x, estimator=estimator, num_probes=num_probes, probes=probes, generator=generator, create_graph=create_graph
    )
    with torch.set_grad_enabled(create_graph):
        est = probe_sqnorm(G, backend=backend)
        if scale != 1:
            est = est * scale
    if not create_graph:
        out, est = out.detach(), est.detach()
    return out, est


def penalty_estimate(
    f: Callable,
    x: torch.Tensor,
    index: Optional[torch.Tensor] = None,
    *,
    estimator: str = "reverse",
    num_probes: int = 1,
    probes: str = "auto",
    generator: Optional[torch.Generator] = None,
    offset: bool = False,
):
    """The reference path of a training penalty: ``(f(x), est)`` with ``est[r]`` the estimate of
    ``||J||_F^2`` at ``x[index[r]]`` (every row when ``index`` is None), differentiable. With
    ``offset``, ``(f(x), est, b2)`` with ``b2[r] = ||f(x_r) - J(x_r) x_r||^2``, the squared offset of
    the local affine map, ``J x`` from ``torch.func.jvp`` with the tangent ``x`` itself.

    The output is the plain forward on the whole batch. For integer tokens ``x`` the Jacobian is taken
    at their embedding (:mod:`grokalign_fast.dual.embedding`). A model with batch statistics or dropout
    (:func:`~grokalign_fast.dual.batch_stats.has_batch_dependence`) gets the per-sample Jacobian with
    the batch's statistics and masks held constant, the definition the dual-stream engine uses: the
    plain forward records them and the estimate replays them (one more forward). Otherwise, without
    ``index``, one forward serves both.
    """
    from .dual.batch_stats import BatchStatistics, has_batch_dependence
    from .dual.embedding import Substitute, as_function_of_embedding, expect_embedding, is_token_input

    kw = dict(estimator=estimator, num_probes=num_probes, probes=probes, generator=generator, backend="auto",
              create_graph=True)
    if offset and is_token_input(x):
        raise NotImplementedError("the offset term J x needs floating-point inputs, not tokens")
    if is_token_input(x):
        # The Jacobian at the tokens' embedding e = E[x]: the plain forward keeps e (with its graph to
        # the table), and the estimate differentiates e -> f(x) at the rows.
        stats = BatchStatistics(f)
        capture = Substitute(x, capture=True)
        with expect_embedding(x, lambda: capture.value is not None), stats.record(), capture, \
                sdpa_kernel([SDPBackend.MATH]):
            out = check_batch_output(f(x), x.shape[0])
        tokens = x if index is None else x.index_select(0, index)
        e = capture.value if index is None else capture.value.index_select(0, index)
        with stats.replay(index):
            _, est = sq_norm_estimate(as_function_of_embedding(f, tokens), e, **kw)
        return out, est
    if has_batch_dependence(f):
        stats = BatchStatistics(f)
        with stats.record(), sdpa_kernel([SDPBackend.MATH]):
            out = check_batch_output(f(x), x.shape[0])
        rows = x if index is None else x.index_select(0, index)
        with stats.replay(index):
            _, est = sq_norm_estimate(f, rows, **kw)
            if offset:
                return out, est, _offset_sq(f, rows)
        return out, est
    if index is None:
        out, est = sq_norm_estimate(f, x, **kw)
        return (out, est, _offset_sq(f, x)) if offset else (out, est)
    with sdpa_kernel([SDPBackend.MATH]):
        out = f(x)
    rows = x.index_select(0, index)
    _, est = sq_norm_estimate(f, rows, **kw)
    return (out, est, _offset_sq(f, rows)) if offset else (out, est)


def _offset_sq(f: Callable, x: torch.Tensor) -> torch.Tensor:
    """``||f(x_b) - J(x_b) x_b||^2`` per row, with ``J x`` by ``torch.func.jvp`` along ``x`` itself."""
    with sdpa_kernel([SDPBackend.MATH]):
        y, jx = torch.func.jvp(_explicit_norms(f), (x,), (x,))
    return (y - jx).pow(2).flatten(1).sum(1)


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with value 0 and gradient 0 at 0 (no inf/nan gradient for a zero Jacobian).

    sqrt runs on v where v != 0 and on 1 at 0, then the mask zeroes those entries: the gradient
    there is 0 * 1/(2 sqrt(1)) = 0, never 0 * inf. A nan (or a negative value, which a squared
    norm never is) gives nan, so a broken estimate is never hidden. Four autograd ops (a forward
    and backward of ~80 us for 50 values on a CPU, half the nested-where form's ~160 us)."""
    nonzero = v != 0
    return torch.where(nonzero, v, 1.0).sqrt() * nonzero


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def jacobian_norm(
    f: Callable,
    x: torch.Tensor,
    *,
    estimator: str = "reverse",
    num_probes: int = 1,
    probes: str = "auto",
    squared: bool = False,
    reduction: str = "mean",
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
    check_finite_values: bool = True,
) -> torch.Tensor:
    r"""Per-sample Frobenius norm of the input-output Jacobian of ``f`` at ``x``.

    Args:
        f: callable mapping ``x: [B, ...]`` to ``[B, ...]``, samples independent
            (no batch statistics, e.g. BatchNorm in train mode).
        x: ``[B, ...]`` floating-point inputs (images ``[B, ch, H, W]``,
            embeddings ``[B, T, d]``, ...). D = numel per sample.
        estimator: ``"reverse"`` (output-space probes, VJPs), ``"forward"``
            (input-space Hutchinson, JVPs) or ``"exact"`` (min(C, D) products).
        num_probes: k >= 1 probes per sample (ignored by ``"exact"``).
        probes: ``"sphere"``, ``"gaussian"``, ``"rademacher"``, ``"orthogonal"``
            (see :mod:`grokalign_fast.probes`) or ``"auto"`` (default): sphere
            for "reverse" (the authors' choice), Rademacher for "forward".
        squared: True: unbiased estimate of ``||J||_F^2``; False: its square
            root per sample (the authors' choice; biased low, see module doc).
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` -> ``[B]``.
        generator: ``torch.Generator`` for the probes; the same state gives the
            same probes and the same numbers.
        backend: ``"auto"``, ``"reference"`` or ``"cpp"`` for the reduction.
        check_finite_values: raise ``FloatingPointError`` on a non-finite result.

    Returns:
        A scalar (``"mean"``/``"sum"``) or ``[B]`` tensor; differentiable when
        grad mode is enabled.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    if not isinstance(squared, bool):
        raise TypeError(f"squared must be a bool, got {squared!r}")
    _, est = sq_norm_estimate(
        f, x, estimator=estimator, num_probes=num_probes, probes=probes, generator=generator, backend=backend
    )
    if check_finite_values:
        check_finite(est, "the Jacobian norm of f at x")
    values = est if squared else safe_sqrt(est)
    return reduce(values, reduction)


def jacobian(f: Callable, x: torch.Tensor, *, create_graph: Optional[bool] = None) -> torch.Tensor:
    """Exact per-sample Jacobians, flattened: ``[B, C, D]`` (C outputs, D inputs per sample).

    Uses C vector-Jacobian products when C <= D, else D Jacobian-vector products.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    out, G, _ = probe_products(f, x, estimator="exact", create_graph=create_graph)
    B, C, D = x.shape[0], out[0].numel(), x[0].numel()
    if C <= D:  # G holds the rows of J: [C, B, *in]
        J = G.reshape(C, B, D).transpose(0, 1)
    else:  # G holds the columns of J: [D, B, *out]
        J = G.reshape(D, B, C).permute(1, 2, 0)
    return J if create_graph else J.detach()
