"""The rules of the dual-stream engine: one per function (or family of functions) a model calls.

A rule is ``fn(ctx, func, args, kwargs) -> value``: ``ctx`` is the call's
:class:`~grokalign_fast.dual.streams.Streams`, ``func`` the function the model called (a
``torch.nn.functional`` function, a ``torch`` builtin, a ``Tensor`` method or an ``operator``),
with at least one dual argument. It returns the dual result (marked with ``ctx.mark``): the
primal rows as the plain call gives them, the tangent rows the Jacobian-vector product of each
sample. Rules are registered against every alias of the function (``F.relu``, ``torch.relu``,
``Tensor.relu``) and looked up by :func:`lookup`.

Modules: :mod:`.linear` (Linear, convolutions, matmul), :mod:`.act` (activations, dropout),
:mod:`.norm` (batch, layer, group and RMS norms), :mod:`.pool` (max and average pools),
:mod:`.structural` (add, mul, cat, views, slicing, reductions over features, softmax, pointwise
math), :mod:`.attention` (scaled dot-product and multi-head attention as the explicit formula). Each rule's reference is ``torch.func.jvp`` of the same function on one sample, which
``tests/test_dual_rules.py`` compares it with in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable


RULES: Dict[object, Rule] = {}


def register(name: str, *targets):
    """Register the decorated rule under ``name`` for every callable in ``targets`` (None skipped,
    so an alias a torch version lacks costs nothing)."""

    def deco(fn):
        rule = Rule(name, fn)
        for t in targets:
            if t is not None:
                RULES[t] = rule
        return fn

    return deco


def method(name: str):
    """``torch.Tensor.<name>``, or None where this torch has no such method."""
    return getattr(torch.Tensor, name, None)


def lookup(func) -> Optional[Rule]:
    try:
        return RULES.get(func)
    except TypeError:  # unhashable callable
        return None


# Importing the rule modules registers them.
from . import act, attention, linear, norm, pool, structural  # noqa: E402,F401

__all__ = ["RULES", "Rule", "lookup", "register", "method"]
