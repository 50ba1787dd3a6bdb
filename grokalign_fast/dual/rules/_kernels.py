"""The one-pass epilogue op a rule calls for the engine's ``kernels`` choice, where one can serve."""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Tuple

import torch

from ..streams import Streams


def epilogue(ctx: Streams, z: torch.Tensor, op, name: str) -> Tuple[Optional[Callable], Optional[str]]:
    """``(function, kernel)``: the entry point ``name`` of the op package ``op``
    (:mod:`grokalign_fast.ops.dual_act`, ...) on the kernels ``ctx.kernels`` asks for, the C++
    extension's (``"cpp"``) or the Triton kernels of its ``triton`` module (``"triton"``), when its
    ``unavailable_reason`` says it can run on ``z`` (device and dtype); else ``(None, None)``, and the
    rule runs its ATen ops."""
    if ctx.kernels == "cpp" and op.unavailable_reason(z) is None:
        return getattr(op, name), "cpp"
    if ctx.kernels == "triton":
        kernels = importlib.import_module(op.__name__ + ".triton")
        if kernels.unavailable_reason(z) is None:
            return getattr(kernels, name), "triton"
    return None, None
