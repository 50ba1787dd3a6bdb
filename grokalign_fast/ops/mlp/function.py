"""Dual-stream Linear + activation with a per-call backend.

Public functions :func:`dual_linear` and :func:`dual_linear_sqnorm` take the
same arguments as their counterparts in :mod:`.reference` (the specification)
plus ``backend``. Each fast backend module (``cpp``, ``triton``) provides
``unavailable_reason(x, t, weight, bias, act, index)`` (None when it can serve
the call) and the two functions, whose results are differentiable with respect
to ``x``, ``t``, ``weight`` and ``bias`` through both outputs.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ... import _backends
from . import reference
from .reference import ACTIVATIONS

ORDER = ("cpp", "triton", "reference")


def check_args(x, t, weight, bias, act, index) -> None:
    """Shape/dtype checks shared by every backend, each error naming the argument."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [B, IN], got {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape [OUT, IN={x.shape[1]}], got {list(weight.shape)}")
    if t.dim() != 3 or t.shape[2] != x.shape[1]:
        raise ValueError(f"t must have shape [K, R, IN={x.shape[1]}], got {list(t.shape)}")
    if t.shape[0] < 1:
        raise ValueError("t must carry at least one tangent stream (K >= 1)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape [OUT={weight.shape[0]}], got {list(bias.shape)}")
    if index is None:
        if t.shape[1] != x.shape[0]:
            raise ValueError(f"t has R={t.shape[1]} rows but x has B={x.shape[0]}; pass index for a subset")
    else:
        if index.dim() != 1 or index.shape[0] != t.shape[1] or index.dtype != torch.long:
            raise ValueError(f"index must be a long tensor of shape [R={t.shape[1]}], got {index.dtype} {list(index.shape)}")
    dtypes = {x.dtype, t.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"x, t, weight and bias must share one dtype, got {sorted(map(str, dtypes))}")
    devices = {x.device, t.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"x, t, weight and bias must be on one device, got {sorted(map(str, devices))}")


def unavailable_reasons(x, t, weight, bias, act, index) -> Dict[str, Optional[str]]:
    reasons: Dict[str, Optional[str]] = {"reference": None}
    for name in ("cpp", "triton"):
        module = backend_module(name)
        reasons[name] = module.unavailable_reason(x, t, weight, bias, act, index)
    return reasons


def backend_module(name: str):
    if name == "cpp":
        from . import cpp as module
    elif name == "triton":
        from . import triton as module
    else:
        module = reference
    return module


def _choose(x, t, weight, bias, act, alpha, index, backend) -> object:
    check_args(x, t, weight, bias, act, index)
    name = _backends.select(backend, unavailable_reasons(x, t, weight, bias, act, index), ORDER)
    return backend_module(name)


def dual_linear(x, t, weight, bias=None, act="identity", alpha=0.01, index=None, *, backend="auto"):
    """``(y [B, OUT], t' [K, R, OUT])``; see :func:`.reference.dual_linear`."""
    return _choose(x, t, weight, bias, act, alpha, index, backend).dual_linear(x, t, weight, bias, act, alpha, index)


def dual_linear_sqnorm(x, t, weight, bias=None, act="identity", alpha=0.01, index=None, *, backend="auto"):
    """``(y [B, OUT], sq [R])``; see :func:`.reference.dual_linear_sqnorm`."""
    return _choose(x, t, weight, bias, act, alpha, index, backend).dual_linear_sqnorm(
        x, t, weight, bias, act, alpha, index
    )
