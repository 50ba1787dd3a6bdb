r"""Monitoring metrics of the input-output Jacobian (GrokAlign paper, section 3 and appendices).

Notation: ``f`` maps a batch ``x: [B, *in_shape]`` to ``f(x): [B, *out_shape]``
with samples independent; D = numel(in_shape), C = numel(out_shape) and
``J_b = d f(x)_b / d x_b`` is the ``C x D`` Jacobian of sample b (inputs and
outputs flattened per sample, as in :func:`grokalign_fast.jacobian.jacobian`).

- Jacobian row alignment (Definition 1: f is Jacobian-aligned at x when every
  row of J(x) is a multiple of x): ``cos(x_b, J_b[c, :])`` for each row c.
- Rank of the Jacobian from its singular values ``s_1 >= ... >= s_r``
  (r = min(C, D)): PC1 = ``s_1^2 / sum_i s_i^2`` and the effective rank
  ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` (Roy & Vetterli 2007).
- Layer-wise centroids: ``c_l(x) = grad_x sum(h_l(x))``, the centroid of the
  sub-network from the input to layer l's output ``h_l``.
- Empirical NTK ``Theta(x, x') = <grad_theta f(x), grad_theta f(x')>``.
- Fourier Gini coefficient of an embedding / unembedding matrix (modular
  addition transformer, Nanda et al. 2023).

Conventions for degenerate inputs (never a silent nan): a cosine with a zero
vector is 0; PC1 and the effective rank of a zero Jacobian are 0; the Gini
coefficient of an all-zero matrix is 0.

The Jacobian-based metrics take the exact Jacobian (C vector-Jacobian
products when C <= D, else D Jacobian-vector products): they are meant for
monitoring, on a few samples.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._validation import check_batch_input, check_batch_output, check_choice
from .centroids import _reduce, cosine
from .jacobian import _requires_grad_input, jacobian

__all__ = [
    "jacobian_row_alignment",
    "jacobian_row_alignment_stats",
    "jacobian_singular_values",
    "jacobian_pc1",
    "jacobian_effective_rank",
    "pc1_from_singular_values",
    "effective_rank_from_singular_values",
    "layerwise_centroids",
    "layerwise_centroid_alignment",
    "empirical_ntk",
    "fourier_gini",
    "gini",
]

NTK_REDUCTIONS = ("full", "diagonal", "trace")
NTK_METHODS = ("func", "autograd")
GINI_GROUPINGS = ("frequency", "real")


# --------------------------------------------------------------------------- helpers


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (value and gradient finite)."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def _check_module(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


# --------------------------------------------------------------------------- row alignment


def jacobian_row_alignment(f: Callable, x: torch.Tensor, *, create_graph: Optional[bool] = None) -> torch.Tensor:
    r"""Cosine between the input and each row of its Jacobian: ``[B, C]``.

    ``out[b, c] = <J_b[c, :], vec(x_b)> / (||J_b[c, :]|| ||vec(x_b)||)`` with
    ``J_b`` the ``C x D`` Jacobian of sample b (see the module doc). f is
    Jacobian-aligned at ``x_b`` (Definition 1: every row of ``J_b`` is a
    multiple of ``x_b``) exactly when every entry of row b is +1 or -1 (or 0
    for a zero row: a cosine with a zero vector is defined as 0).

    Args:
        f: callable mapping ``x: [B, *in_shape]`` to ``[B, *out_shape]``,
            samples independent.
        x: ``[B, *in_shape]`` floating-point inputs.
        create_graph: keep the result differentiable; defaults to
            ``torch.is_grad_enabled()``.

    Returns:
        ``[B, C]`` cosines in [-1, 1], C = numel(out_shape).
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    J = jacobian(f, x, create_graph=create_graph)  # [B, C, D]; validates f and x
    xf = (x if create_graph else x.detach()).reshape(x.shape[0], 1, -1)  # [B, 1, D]
    dots = (J * xf).sum(dim=-1)  # [B, C]
    norms = J.norm(dim=-1) * xf.norm(dim=-1)  # [B, C]
    return _safe_div(dots, norms)


def jacobian_row_alignment_stats(
    f: Callable, x: torch.Tensor, *, create_graph: Optional[bool] = None
) -> Dict[str, torch.Tensor]:
    r"""Summaries over the C rows of :func:`jacobian_row_alignment`, each ``[B]``.

    Returns a dict with
      - ``"max"``: ``max_c cos(x_b, J_b[c])`` and ``"min"``: ``min_c cos(x_b, J_b[c])``
        (the paper's Appendix C, Table 2, reports max/min);
      - ``"mean"``: ``mean_c cos(x_b, J_b[c])``;
      - ``"abs_min"``: ``min_c |cos(x_b, J_b[c])|``, which is 1 exactly when f is
        Jacobian-aligned at ``x_b`` (all rows nonzero multiples of ``x_b``, of
        either sign).
    """
    cos = jacobian_row_alignment(f, x, create_graph=create_graph)  # [B, C]
    return {
        "max": cos.max(dim=1).values,
        "min": cos.min(dim=1).values,
        "mean": cos.mean(dim=1),
        "abs_min": cos.abs().min(dim=1).values,
    }


# --------------------------------------------------------------------------- rank


def pc1_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    r"""``s_1^2 / sum_i s_i^2`` over the last dim of ``s: [..., r]`` (singular values >= 0) -> ``[...]``.

    Computed as ``1 / sum_i (s_i / s_1)^2`` (no underflow of ``s_i^2`` for tiny
    Jacobians). Lies in ``[1/r, 1]``; defined as **0 when all s_i = 0** (a zero
    Jacobian has no principal direction).
    """
    smax = s.max(dim=-1).values  # [...]
    r = _safe_div(s, smax.unsqueeze(-1))  # [..., r], 0 where s = 0 entirely
    return _safe_div(torch.ones_like(smax), r.pow(2).sum(dim=-1))


def effective_rank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    r"""Effective rank ``exp(-sum_i p_i log p_i)``, ``p_i = s_i / sum_j s_j``, over the last dim -> ``[...]``.

    Roy & Vetterli (2007): the normalised singular values (not their squares)
    form the distribution, with ``0 log 0 = 0``. It lies in ``[1, r]``, equals 1
    for a rank-1 matrix and k for k equal nonzero singular values; defined as
    **0 when all s_i = 0** (the rank of a zero Jacobian).
    """
    total = s.sum(dim=-1)  # [...]
    p = _safe_div(s, total.unsqueeze(-1))  # [..., r]
    pos = p > 0
    plogp = torch.where(pos, p * torch.where(pos, p, torch.ones_like(p)).log(), torch.zeros_like(p))
    erank = torch.exp(-plogp.sum(dim=-1))
    return torch.where(total > 0, erank, torch.zeros_like(erank))


def jacobian_singular_values(f: Callable, x: torch.Tensor, *, create_graph: Optional[bool] = None) -> torch.Tensor:
    """Singular values of each ``J_b`` in descending order: ``[B, min(C, D)]``."""
    return torch.linalg.svdvals(jacobian(f, x, create_graph=create_graph))


def jacobian_pc1(
    f: Callable, x: torch.Tensor, *, reduction: str = "none", create_graph: Optional[bool] = None
) -> torch.Tensor:
    r"""PC1 of the Jacobian, ``s_1^2 / sum_i s_i^2`` per sample (the authors' rank measure).

    ``s_i`` are the singular values of the ``C x D`` Jacobian ``J_b``; PC1 is the
    share of ``||J_b||_F^2`` carried by the leading singular direction: 1 for a
    rank-1 Jacobian, ``1/r`` (r = min(C, D)) when all singular values are
    equal, and **0 for a zero Jacobian** (by definition, see
    :func:`pc1_from_singular_values`).

    Returns ``[B]`` with ``reduction="none"``, else the batch mean / sum.
    """
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    return _reduce(pc1_from_singular_values(jacobian_singular_values(f, x, create_graph=create_graph)), reduction)


def jacobian_effective_rank(
    f: Callable, x: torch.Tensor, *, reduction: str = "none", create_graph: Optional[bool] = None
) -> torch.Tensor:
    r"""Effective rank of the Jacobian per sample (Roy & Vetterli 2007).

    ``erank(J_b) = exp(-sum_i p_i log p_i)`` with ``p_i = s_i / sum_j s_j`` and
    ``s_i`` the singular values of the ``C x D`` Jacobian ``J_b``. In
    ``[1, min(C, D)]``: 1 for a rank-1 Jacobian, k for k equal nonzero singular
    values; **0 for a zero Jacobian** (by definition, see
    :func:`effective_rank_from_singular_values`). Singular values at round-off
    level add a negligible amount (``-p log p`` with p ~ 1e-16 is ~ 4e-15).

    Returns ``[B]`` with ``reduction="none"``, else the batch mean / sum.
    """
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    s = jacobian_singular_values(f, x, create_graph=create_graph)
    return _reduce(effective_rank_from_singular_values(s), reduction)


# --------------------------------------------------------------------------- layer-wise centroids


def _resolve_modules(model: nn.Module, modules) -> List[Tuple[str, nn.Module]]:
    if isinstance(modules, nn.Module):
        raise TypeError(
            "modules must be a dict {name: submodule} or a list of names from model.named_modules(), "
            "got a single nn.Module; wrap it as {'name': module}"
        )
    if isinstance(modules, Mapping):
        items = list(modules.items())
        for name, mod in items:
            if not isinstance(name, str):
                raise TypeError(f"modules keys must be str names, got {name!r}")
            if not isinstance(mod, nn.Module):
                raise TypeError(f"modules[{name!r}] must be an nn.Module, got {type(mod).__name__}")
    elif isinstance(modules, Sequence) and not isinstance(modules, (str, bytes)):
        named = dict(model.named_modules())
        items = []
        for name in modules:
            if not isinstance(name, str):
                raise TypeError(f"modules must hold str names of model.named_modules(), got {name!r}")
            if name not in named:
                known = [n for n in named if n][:12]
                raise ValueError(
                    f"modules: {name!r} is not a submodule name of model; "
                    f"names from model.named_modules() include {known}"
                )
            items.append((name, named[name]))
    else:
        raise TypeError(
            "modules must be a dict {name: submodule} or a list of names from model.named_modules(), "
            f"got {type(modules).__name__}"
        )
    if not items:
        raise ValueError("modules is empty: give at least one submodule")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"modules has repeated names: {names}")
    return items


def layerwise_centroids(
    model: nn.Module,
    x: torch.Tensor,
    modules: Union[Mapping[str, nn.Module], Sequence[str]],
    *,
    create_graph: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    r"""Centroid of the sub-network from the input to each given layer's output.

    For a submodule l with output ``h_l(x): [B, *out_l]`` (captured by a
    forward hook during one forward pass of ``model``), the layer-wise centroid
    is ``c_l(x) = J_l(x)^T 1 = grad_x sum_k h_l(x)_k``, the sum over the
    non-batch dims of ``h_l``: one vector-Jacobian product with a vector of
    ones per layer. For the last layer it is ``grokalign_fast.centroids.centroid``
    of the whole model. Samples must be independent (no batch statistics).

    Args:
        model: the network; called once as ``model(x)``.
        x: ``[B, *in_shape]`` floating-point inputs.
        modules: ``{name: submodule}`` or a list of names from
            ``model.named_modules()`` (``""`` is the model itself). Each must
            be called exactly once in the forward pass and return a tensor
            ``[B, ...]``, not modified in place afterwards (e.g. by a following
            ``ReLU(inplace=True)``), else a ``ValueError`` says which.
        create_graph: keep the results differentiable; defaults to
            ``torch.is_grad_enabled()``.

    Returns:
        ``{name: [B, *in_shape]}`` in the order of ``modules``; zero where the
        layer's output does not depend on x.
    """
    _check_module(model)
    check_batch_input(x)
    items = _resolve_modules(model, modules)
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    B = x.shape[0]
    captured: Dict[str, List[Tuple[torch.Tensor, int]]] = {name: [] for name, _ in items}

    def make_hook(name):
        def hook(_mod, _inp, out):
            captured[name].append((out, out._version if isinstance(out, torch.Tensor) else -1))

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in items]
    try:
        with torch.enable_grad():
            x_ = _requires_grad_input(x)
            model(x_)
    finally:
        for h in handles:
            h.remove()

    outs = []
    for name, _ in items:
        calls = captured[name]
        if len(calls) != 1:
            raise ValueError(
                f"modules[{name!r}] was called {len(calls)} times in model's forward pass; it must be "
                "called exactly once (a layer used several times has no single output)"
            )
        out, version = calls[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"modules[{name!r}] returned {type(out).__name__}; layer-wise centroids need a tensor "
                "output of shape [B, ...]"
            )
        check_batch_output(out, B, name=f"modules[{name!r}]")
        if out._version != version:
            raise ValueError(
                f"the output of modules[{name!r}] was modified in place later in the forward pass "
                "(e.g. by ReLU(inplace=True)); use out-of-place operations so the captured output is "
                "the layer's own"
            )
        outs.append(out)

    result: Dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        for i, ((name, _), out) in enumerate(zip(items, outs)):
            if not out.requires_grad:  # independent of x (and of any trainable parameter)
                result[name] = torch.zeros_like(x)
                continue
            last = i == len(outs) - 1
            (g,) = torch.autograd.grad(
                out, x_, torch.ones_like(out), create_graph=create_graph, retain_graph=create_graph or not last,
                allow_unused=True,
            )
            g = torch.zeros_like(x) if g is None else g
            result[name] = g if create_graph else g.detach()
    return result


def layerwise_centroid_alignment(
    model: nn.Module,
    x: torch.Tensor,
    modules: Union[Mapping[str, nn.Module], Sequence[str]],
    *,
    reduction: str = "none",
) -> Dict[str, torch.Tensor]:
    r"""``{name: cos(x, c_l(x))}`` for the layer-wise centroids of :func:`layerwise_centroids`.

    Each value is ``[B]`` with ``reduction="none"`` (else the batch mean / sum);
    the cosine with a zero centroid is 0 (as in
    :func:`grokalign_fast.centroids.centroid_alignment`).
    """
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    cents = layerwise_centroids(model, x, modules)
    return {name: _reduce(cosine(x, c), reduction) for name, c in cents.items()}


# --------------------------------------------------------------------------- empirical NTK


def _trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no parameter with requires_grad=True: the NTK is taken over those")
    return params


def _param_jacobians_func(model: nn.Module, params: Dict[str, torch.Tensor], x: torch.Tensor) -> List[torch.Tensor]:
    """Per-sample parameter Jacobians with torch.func: a list of ``[B, C, P_k]``, one per parameter."""
    from torch.func import functional_call, jacrev, vmap

    buffers = dict(model.named_buffers())
    detached = {n: p.detach() for n, p in params.items()}

    def f_single(p, xb):
        out = functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model(x) must return a tensor of shape [B, ...], got {type(out).__name__}")
        return out.reshape(-1)

    try:
        jac = vmap(jacrev(f_single), in_dims=(None, 0))(detached, x)
    except (RuntimeError, NotImplementedError) as err:
        raise RuntimeError(
            f"empirical_ntk(method='func') could not run model under torch.func.vmap/jacrev ({err}); "
            "put the model in eval mode (dropout, batch statistics) or use method='autograd'"
        ) from err
    return [jac[n].reshape(x.shape[0], jac[n].shape[1], -1) for n in params]


def _param_jacobians_autograd(model: nn.Module, params: Dict[str, torch.Tensor], x: torch.Tensor) -> List[torch.Tensor]:
    """Per-sample parameter Jacobians by autograd loops (one forward per sample, one backward per output)."""
    names = list(params)
    plist = [params[n] for n in names]
    rows: List[List[torch.Tensor]] = [[] for _ in names]  # per parameter: B tensors [C, P_k]
    with torch.enable_grad():
        for b in range(x.shape[0]):
            out = model(x[b : b + 1])
            out = check_batch_output(out, 1, name="model").reshape(-1)
            C = out.numel()
            per_c: List[List[torch.Tensor]] = [[] for _ in names]
            for c in range(C):
                grads = torch.autograd.grad(out[c], plist, retain_graph=c < C - 1, allow_unused=True)
                for k, (g, p) in enumerate(zip(grads, plist)):
                    per_c[k].append((torch.zeros_like(p) if g is None else g).reshape(-1))
            for k in range(len(names)):
                rows[k].append(torch.stack(per_c[k]))
    return [torch.stack(r) for r in rows]


def empirical_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: Optional[torch.Tensor] = None,
    *,
    reduction: str = "full",
    method: str = "func",
) -> torch.Tensor:
    r"""Empirical neural tangent kernel over the model's trainable parameters.

    ``Theta[a, b, i, j] = sum_theta d f_i(x1_a)/d theta * d f_j(x2_b)/d theta``
    with theta all parameters with ``requires_grad=True`` (buffers held fixed)
    and ``f_i`` the i-th of the C = numel(out_shape) per-sample outputs. So
    ``Theta(x1, x2)[a, b] = Theta(x2, x1)[b, a]^T`` and ``Theta(x, x)`` is
    positive semidefinite as a ``(B*C) x (B*C)`` matrix.

    Args:
        model: ``nn.Module`` mapping ``[B, *in_shape]`` to ``[B, *out_shape]``,
            samples independent; evaluated in its current mode (call
            ``model.eval()`` first if it has dropout or batch statistics).
        x1: ``[B1, *in_shape]`` floating-point inputs.
        x2: ``[B2, *in_shape]``, or None for ``x2 = x1`` (one Jacobian pass).
        reduction: ``"full"`` -> ``[B1, B2, C, C]``; ``"diagonal"`` ->
            ``[B1, B2, C]`` (``Theta[a, b, i, i]``); ``"trace"`` -> ``[B1, B2]``
            (``sum_i Theta[a, b, i, i]``).
        method: ``"func"`` (``torch.func``: ``vmap`` of ``jacrev`` over
            ``functional_call``, fast) or ``"autograd"`` (a forward per sample
            and a backward per output, for models ``vmap`` cannot run).

    Returns:
        The kernel, detached (a monitoring quantity). Memory: the per-sample
        parameter Jacobians, ``(B1 + B2) * C * P`` numbers for P parameters.
    """
    _check_module(model)
    check_batch_input(x1, "x1")
    if x2 is not None:
        check_batch_input(x2, "x2")
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(
                f"x2 must have the per-sample shape of x1, {list(x1.shape[1:])}; got {list(x2.shape[1:])}"
            )
    check_choice(reduction, "reduction", NTK_REDUCTIONS)
    check_choice(method, "method", NTK_METHODS)
    params = _trainable(model)
    jac_fn = _param_jacobians_func if method == "func" else _param_jacobians_autograd
    J1 = jac_fn(model, params, x1.detach())
    J2 = J1 if x2 is None else jac_fn(model, params, x2.detach())
    spec = {"full": "acp,bdp->abcd", "diagonal": "acp,bcp->abc", "trace": "acp,bcp->ab"}[reduction]
    theta = None
    for j1, j2 in zip(J1, J2):
        term = torch.einsum(spec, j1, j2)
        theta = term if theta is None else theta + term
    return theta.detach()


# --------------------------------------------------------------------------- Fourier Gini


def gini(values: torch.Tensor) -> torch.Tensor:
    r"""Gini coefficient of nonnegative values along the last dim: ``[..., n] -> [...]``.

    ``G = sum_i (2i - n - 1) v_(i) / (n sum_i v_i)`` with ``v_(1) <= ... <= v_(n)``
    sorted ascending (half the relative mean absolute difference). 0 when all
    values are equal, ``(n - 1)/n`` when one value holds everything; defined as
    **0 when all values are 0**.
    """
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got {type(values).__name__}")
    if values.dim() == 0 or values.shape[-1] == 0:
        raise ValueError(f"values must have a nonempty last dim, got shape {list(values.shape)}")
    if bool((values.detach() < 0).any()):
        raise ValueError("values must be nonnegative (the Gini coefficient of magnitudes)")
    n = values.shape[-1]
    v = values.sort(dim=-1).values
    i = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    return _safe_div(((2 * i - n - 1) * v).sum(dim=-1), n * v.sum(dim=-1))


def fourier_gini(W: torch.Tensor, dim: int = 0, *, grouping: str = "frequency") -> torch.Tensor:
    r"""Fourier Gini coefficient of an embedding / unembedding matrix (scalar tensor).

    Measures how concentrated ``W`` is on few frequencies of the token index
    (Nanda et al. 2023, used by the GrokAlign paper for the modular-addition
    transformer): 0 when the energy is spread evenly over the frequencies,
    close to 1 when it sits on a few.

    What is computed, with p = ``W.shape[dim]`` (the tokens, e.g. ``W_E: [p, d]``
    with ``dim=0``, or ``W_U: [d, p]`` with ``dim=1``):

    1. ``X = torch.fft.rfft(W, dim=dim)``: bins k = 0 .. floor(p/2). For a real
       W the fft bin p - k is the conjugate of bin k, so rfft holds each real
       frequency once.
    2. The coefficients in the orthonormal real Fourier basis of R^p (constant
       ``1/sqrt(p)``, ``sqrt(2/p) cos(2 pi k t/p)``, ``sqrt(2/p) sin(2 pi k t/p)``
       for 0 < k < p/2, and for even p the alternating vector at k = p/2):
       constant ``Re X_0 / sqrt(p)``; cos ``sqrt(2/p) Re X_k``; sin
       ``-sqrt(2/p) Im X_k``; Nyquist ``Re X_{p/2} / sqrt(p)``. By Parseval their
       squares, summed over everything, give ``||W||_F^2``.
    3. One norm per component over all other dims of W (the model dimension).
       ``grouping="frequency"`` (default): the cos and sin components of
       frequency k (bins k and p - k of the full fft) form one group, norm
       ``sqrt(2/p) ||X_k||`` for 0 < k < p/2 and ``||X_k|| / sqrt(p)`` for
       k = 0 and k = p/2: floor(p/2) + 1 norms, invariant to phase shifts
       (cyclic shifts of the tokens). ``grouping="real"``: the p real basis
       components separately, as Nanda et al.'s ``fourier_basis @ W_E``.
    4. :func:`gini` of those norms. A single pure frequency gives
       ``(n - 1)/n`` with n = floor(p/2) + 1 (``"frequency"``); an all-zero W
       gives 0 (defined).

    The value is invariant to scaling W by c != 0 and differentiable in W.

    Args:
        W: real floating-point tensor with at least 1 dim and p >= 2 along ``dim``.
        dim: the token dimension (length p).
        grouping: ``"frequency"`` or ``"real"`` (see step 3).
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"W must be a real floating-point tensor, got dtype {W.dtype}")
    if W.dim() == 0 or W.numel() == 0:
        raise ValueError(f"W must be a nonempty tensor with at least one dimension (the tokens), got shape {list(W.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -W.dim() <= dim < W.dim():
        raise ValueError(f"dim must be an int in [{-W.dim()}, {W.dim() - 1}] for W of shape {list(W.shape)}, got {dim!r}")
    check_choice(grouping, "grouping", GINI_GROUPINGS)
    p = W.shape[dim]
    if p < 2:
        raise ValueError(f"W must have at least 2 tokens along dim={dim}, got shape {list(W.shape)}")
    X = torch.fft.rfft(W, dim=dim).movedim(dim, 0).reshape(p // 2 + 1, -1)  # [K, rest]
    K = X.shape[0]
    paired = torch.ones(K, dtype=torch.bool, device=W.device)
    paired[0] = False
    if p % 2 == 0:
        paired[-1] = False
    scale = torch.full((K, 1), 1.0 / p, dtype=W.dtype, device=W.device)  # [K, 1]
    scale[paired] = 2.0 / p
    scale = scale.sqrt()
    cos_c = scale * X.real  # [K, rest]
    sin_c = -scale * X.imag  # [K, rest]; zero for unpaired bins (real X)
    if grouping == "frequency":
        sq = (cos_c.pow(2) + sin_c.pow(2)).sum(dim=1)  # [K]
    else:
        sq = torch.cat([cos_c.pow(2).sum(dim=1), sin_c[paired].pow(2).sum(dim=1)])  # [p]
    pos = sq > 0
    norms = torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    return gini(norms)
