r"""``grokalign::dual_smooth_act``: a smooth activation of the dual-stream engine as one op.

On stacked rows ``s [N, n]`` (primal rows ``[0, P)``, tangent row ``j`` riding on primal row
``src(j) = index[j % R]``, or ``j % P`` without index; see :mod:`grokalign_fast.dual.streams`):

    primal row p:    y_p = s(z_p)
    tangent row j:   t'_j = s'(z_src(j)) * t_j

and for a cotangent ``g`` the backward

    grad z_p = g_p * s'(z_p) + s''(z_p) * sum_{j: src(j) = p} g_j * t_j
    grad t_j = g_j * s'(z_src(j))

(the second term: the tangent rows' slope depends on their primal row). Only the input rows are
saved; the backward re-evaluates ``s'`` and ``s''``. One pass each way, where the plain-PyTorch rule
(:func:`reference`) takes the activation, its slope's several ATen ops, a gather of the slope rows
for a subsample and a multiply, and autograd saves their intermediates.

Activations (``ACT``), with ``sig`` the logistic sigmoid and ``u = b z``:

==========  ==============================  ===========================  ================================
name        s(z)                            s'(z)                        s''(z)
==========  ==============================  ===========================  ================================
gelu        z Phi(z)                        Phi + z phi                  phi (2 - z^2)
gelu_tanh   z/2 (1 + tanh(c (z + a z^3)))   ``mlp.reference.act_d1``     ``mlp.reference.act_d2``
silu        z sig(z)                        sig (1 + z (1 - sig))        sig (1 - sig) (2 + z (1 - 2 sig))
tanh        tanh z                          1 - tanh^2                   -2 tanh (1 - tanh^2)
sigmoid     sig(z)                          sig (1 - sig)                sig (1 - sig) (1 - 2 sig)
elu         z > 0 ? z : alpha (e^z - 1)     z > 0 ? 1 : alpha e^z        z > 0 ? 0 : alpha e^z
softplus    u > th ? z : log(1 + e^u) / b   u > th ? 1 : sig(u)          u > th ? 0 : b sig(u) (1 - sig(u))
==========  ==============================  ===========================  ================================

(softplus with ``beta = b`` and ``threshold = th``, as ``F.softplus``). The codes of the first five
are those of the MLP ops (:data:`grokalign_fast.ops.mlp.reference.ACT_CODE`).

Kernels: ``csrc/cpu/dual_smooth_act_cpu.cpp``, ``csrc/cuda/dual_smooth_act_cuda.cu`` (the math in
``csrc/common/dual_smooth_act.h``); autograd (C++): ``csrc/autograd/dual_smooth_act_autograd.cpp``.
This module registers the fakes, and :func:`unavailable_reason` says when the op cannot serve. :func:`value` and :func:`slope` are the
activations in plain PyTorch, differentiable twice, which the engine's plain rules run.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import _backends
from .._stacked_rows import source_rows
from ..mlp.reference import ACT_CODE, act_d1

ACT = {name: ACT_CODE[name] for name in ("gelu", "gelu_tanh", "silu", "tanh", "sigmoid")}
ACT.update(elu=len(ACT_CODE), softplus=len(ACT_CODE) + 1)  # after the MLP ops' codes (dual_smooth_act.h)

_OPS = ("dual_smooth_act", "dual_smooth_act_backward")


def value(z: torch.Tensor, act: str, alpha: float = 1.0, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """``s(z)`` in plain PyTorch (torch's own activation functions)."""
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "silu":
        return F.silu(z)
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "elu":
        return F.elu(z, alpha)
    if act == "softplus":
        return F.softplus(z, beta, threshold)
    raise ValueError(f"act must be one of {tuple(ACT)}, got {act!r}")


def slope(z: torch.Tensor, act: str, alpha: float = 1.0, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """``s'(z)`` in plain PyTorch, differentiable in ``z`` (autograd gives ``s''``)."""
    if act == "elu":
        return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(torch.clamp(z, max=0)))
    if act == "softplus":
        return torch.where(z * beta > threshold, torch.ones_like(z), torch.sigmoid(z * beta))
    if act not in ACT:
        raise ValueError(f"act must be one of {tuple(ACT)}, got {act!r}")
    return act_d1(z, act)


def unavailable_reason(s: torch.Tensor) -> Optional[str]:
    """None when ``grokalign::dual_smooth_act`` can run on ``s`` (its device and dtype), else why not."""
    return _backends.op_unavailable_reason(_OPS, s)


def reference(s: torch.Tensor, primal_rows: int, index: Optional[torch.Tensor], act: str, alpha: float = 1.0,
              beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """The op in plain PyTorch: ``out [N, n]``, differentiable (its gradient is the op's backward)."""
    P = primal_rows
    z = s[:P]
    d = slope(z, act, alpha, beta, threshold)
    return torch.cat([value(z, act, alpha, beta, threshold),
                      s[P:] * d[source_rows(s.shape[0], P, index, s.device)]])


if _backends.extension_ops_reason(_OPS) is None:

    @torch.library.register_fake("grokalign::dual_smooth_act")
    def _dual_smooth_act_fake(s, primal_rows, index, act, alpha, beta, threshold):
        torch._check(s.dim() == 2, lambda: f"dual_smooth_act: s must be [N, n], got {s.shape}")
        return torch.empty_like(s)

    @torch.library.register_fake("grokalign::dual_smooth_act_backward")
    def _dual_smooth_act_backward_fake(grad, s, primal_rows, index, act, alpha, beta, threshold):
        return torch.empty_like(s)


def dual_smooth_act(s: torch.Tensor, primal_rows: int, index: Optional[torch.Tensor], act: str, alpha: float = 1.0,
                    beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """``out`` of ``grokalign::dual_smooth_act`` (see the module doc); differentiable in ``s``.

    Args:
        s: ``[N, n]`` stacked rows, the primal rows first.
        primal_rows: P.
        index: ``[R]`` long, the primal row of each of a stream's tangent rows; None: ``j % P``.
        act: a name of :data:`ACT`; alpha: elu's; beta, threshold: softplus's.
    """
    return torch.ops.grokalign.dual_smooth_act(s, primal_rows, index, ACT[act], float(alpha), float(beta),
                                               float(threshold))
