r"""``grokalign::dual_act``: the piecewise-linear activation of the dual-stream engine as one op.

On stacked rows ``s [N, n]`` (primal rows ``[0, P)``, tangent row ``j`` riding on primal row
``src(j) = index[j % R]``, or ``j % P`` without index), ``out = s * d`` with ``d = 1`` where the
primal row's value is positive and ``0`` (ReLU) or ``alpha`` (leaky ReLU) elsewhere; the mask
``[z > 0]`` (uint8, one byte per primal entry) is the only state saved for backward, whose pass is
the same multiply. One pass over the rows, reading each row's primal mask in place, where the
plain-PyTorch rule (:func:`reference`) takes a compare, a conversion, a gather of the mask rows for a
subsample, and a multiply.

Kernels: ``csrc/cpu/dual_act_cpu.cpp``, ``csrc/cuda/dual_act_cuda.cu``; autograd (C++, so libtorch
users get gradients too): ``csrc/autograd/dual_act_autograd.cpp``. This module registers the fakes
(for FakeTensor and torch.compile), and :func:`unavailable_reason` says when the op cannot serve.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _backends
from .._stacked_rows import source_rows

ACT = {"relu": 1, "leaky_relu": 2}

_OPS = ("dual_act", "dual_act_backward")


def unavailable_reason(s: torch.Tensor) -> Optional[str]:
    """None when ``grokalign::dual_act`` can run on ``s`` (its device and dtype), else why not."""
    return _backends.op_unavailable_reason(_OPS, s)


def reference(s: torch.Tensor, primal_rows: int, index: Optional[torch.Tensor], act: str, alpha: float = 0.01):
    """The op in plain PyTorch: ``(out, mask)``."""
    P = primal_rows
    mask = s[:P] > 0
    off = alpha if act == "leaky_relu" else 0.0
    d = torch.where(mask, torch.ones((), dtype=s.dtype), torch.full((), off, dtype=s.dtype))
    return torch.cat([s[:P] * d, s[P:] * d[source_rows(s.shape[0], P, index, s.device)]]), mask.to(torch.uint8)


if _backends.extension_ops_reason(_OPS) is None:

    @torch.library.register_fake("grokalign::dual_act")
    def _dual_act_fake(s, primal_rows, index, act, alpha):
        torch._check(s.dim() == 2, lambda: f"dual_act: s must be [N, n], got {s.shape}")
        return torch.empty_like(s), s.new_empty((primal_rows, s.shape[1]), dtype=torch.uint8)

    @torch.library.register_fake("grokalign::dual_act_backward")
    def _dual_act_backward_fake(grad, mask, primal_rows, index, act, alpha):
        return torch.empty_like(grad)


def dual_act(s: torch.Tensor, primal_rows: int, index: Optional[torch.Tensor], act: str, alpha: float = 0.01):
    """``(out, mask)`` of ``grokalign::dual_act`` (see the module doc); differentiable in ``s``."""
    return torch.ops.grokalign.dual_act(s, primal_rows, index, ACT[act], float(alpha))
