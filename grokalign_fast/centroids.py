r"""Centroids and centroid alignment (monitoring).

The centroid at x is ``c(x) = J(x)^T 1``: the sum of the rows of the Jacobian,
one vector-Jacobian product with a vector of ones (``grad_x sum_c f_c(x)``).
For a continuous piecewise-affine network it is the centroid of the linear
region holding x. Its alignment with x, ``cos(x, c(x))``, tracks the phases of
training (memorising, aligning, plateau).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._validation import check_batch_input, check_batch_output, check_choice
from .jacobian import REDUCTIONS, _check_callable, _requires_grad_input, _vjps, reduce

_EPS = 1e-12


def centroid(f: Callable, x: torch.Tensor, *, create_graph: Optional[bool] = None) -> torch.Tensor:
    """``c(x) = J(x)^T 1`` per sample, shape ``[B, *x.shape[1:]]`` (one VJP).

    Differentiable when grad mode is enabled (``create_graph`` defaults to
    ``torch.is_grad_enabled()``).
    """
    _check_callable(f)
    check_batch_input(x)
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x_ = _requires_grad_input(x)
        out = check_batch_output(f(x_), x.shape[0])
        c = _vjps(out, x_, [torch.ones_like(out)], create_graph)[0]
    return c if create_graph else c.detach()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    check_choice(reduction, "reduction", REDUCTIONS)
    return reduce(values, reduction)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Per-row cosine of two ``[B, ...]`` tensors; 0 where either vector is 0."""
    a, b = _flat(a), _flat(b)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    return (a * b).sum(dim=1) / (na * nb).clamp_min(eps)


def centroid_alignment(f: Callable, x: torch.Tensor, *, reduction: str = "none") -> torch.Tensor:
    """``cos(x, c(x))`` per sample (``[B]`` with ``reduction="none"``)."""
    return _reduce(cosine(x, centroid(f, x)), reduction)


def centroid_inner_product(f: Callable, x: torch.Tensor, *, reduction: str = "none") -> torch.Tensor:
    """``<x, c(x)>`` per sample."""
    c = centroid(f, x)
    return _reduce((_flat(x) * _flat(c)).sum(dim=1), reduction)


def centroid_norm(f: Callable, x: torch.Tensor, *, reduction: str = "none") -> torch.Tensor:
    """``||c(x)||_2`` per sample."""
    return _reduce(_flat(centroid(f, x)).norm(dim=1), reduction)
