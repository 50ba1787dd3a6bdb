"""The whole-MLP ops' Python side: one C++ op call runs every layer of a piecewise-linear
``nn.Sequential`` plan (see :func:`.model.plan`), primal and probe rows stacked through each GEMM.

Two ops share the argument layout and this module (their C++ side shares
``csrc/common/whole_mlp.h``):

* ``grokalign::dual_mlp_sqnorm`` (``csrc/cpu/dual_mlp_sqnorm_cpu.cpp``): the forward-mode
  (input-space) estimate, probes ``v`` [K, R, IN];
* ``grokalign::reverse_mlp`` (``csrc/cpu/reverse_mlp_cpu.cpp``, specification
  :mod:`.reverse_mlp`): the output-space estimate, probes ``u`` [K, R, C].
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..._backends import extension_ops_reason
from .model import DropoutStep, LinearStep, Step
from .reference import ACT_CODE, PIECEWISE_LINEAR


def whole_mlp_reason(steps: List[Step], training: bool, x: torch.Tensor) -> Optional[str]:
    """None when the whole-MLP op ``grokalign::dual_mlp_sqnorm`` (one call for every layer,
    primal and tangent rows stacked through each GEMM) can run the plan, else why not."""
    for s in steps:
        if isinstance(s, LinearStep) and s.act not in PIECEWISE_LINEAR:
            return f"the whole-MLP op needs piecewise-linear activations {PIECEWISE_LINEAR}, got {s.act!r}"
        if isinstance(s, DropoutStep) and training and s.p > 0:
            return "the whole-MLP op does not run dropout in training mode"
    if x.device.type not in ("cpu", "cuda"):
        return f"the whole-MLP op runs on cpu and cuda tensors, not {x.device.type}"
    return extension_ops_reason(("dual_mlp_sqnorm", "dual_mlp_sqnorm_backward"))


def whole_mlp_op_args(steps: List[Step]):
    """``(weights, biases, has_bias, acts, alphas)``: the plan's Linear layers as the whole-MLP ops
    (``grokalign::dual_mlp_sqnorm``, ``grokalign::reverse_mlp``) take them."""
    linear = [s for s in steps if isinstance(s, LinearStep)]
    weights = [s.linear.weight for s in linear]
    biases = [s.linear.bias for s in linear if s.linear.bias is not None]
    has_bias = [s.linear.bias is not None for s in linear]
    acts = [ACT_CODE[s.act] for s in linear]
    alphas = [float(s.alpha) for s in linear]
    return weights, biases, has_bias, acts, alphas


def whole_mlp_runner(op_name: str, steps: List[Step]):
    """``run(x, probes, index=None, root=False, scale=1.0) -> (y, est)`` calling the whole-MLP op
    ``torch.ops.grokalign.<op_name>`` (``"dual_mlp_sqnorm"`` or ``"reverse_mlp"``) on ``x``
    flattened to [B, IN] and probes [K, R, ...] flattened to [K, R, n]. With ``root`` the op
    returns the per-row square root of the estimate (value and gradient 0 at 0); ``est`` comes
    times ``scale`` (a penalty weight folded into the op: ``weight / R`` makes ``est.sum()`` the
    weighted mean). The layer arguments are gathered here, once: a caller that keeps the runner
    (``GrokAlign``'s path cache) must rebuild it when a parameter is replaced."""
    op = getattr(torch.ops.grokalign, op_name)
    args = whole_mlp_op_args(steps)

    def run(x: torch.Tensor, probes: torch.Tensor, index: Optional[torch.Tensor] = None, root: bool = False,
            scale: float = 1.0):
        h = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
        v = probes if probes.dim() == 3 else probes.reshape(probes.shape[0], probes.shape[1], -1)
        layer_args = args
        if torch.is_autocast_enabled(h.device.type):
            # Under autocast the op runs in its dtype, as autocast runs nn.Linear: the inputs and the
            # layers cast (the casts are differentiable, so the parameters' gradients stay in theirs).
            dt = torch.get_autocast_dtype(h.device.type)
            h, v = h.to(dt), v.to(dt)
            weights, biases = args[0], args[1]
            layer_args = ([w.to(dt) for w in weights], [b.to(dt) for b in biases]) + tuple(args[2:])
        y, est, _ = op(h, v, index, *layer_args, root, scale)
        return y, est

    return run
