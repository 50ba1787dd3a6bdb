"""The whole-MLP ops' Python side: one C++ op call runs every layer of a piecewise-linear
``nn.Sequential`` plan (see :func:`.model.plan`), primal and probe rows stacked through each GEMM.

Two ops share the argument layout and this module (their C++ side shares
``csrc/common/whole_mlp.h``; each op's driver, a template on the device's elementwise row passes, is
registered for the CPU (``csrc/cpu``) and CUDA (``csrc/cuda``) keys, its autograd is
``csrc/autograd/whole_mlp_autograd.cpp``):

* ``grokalign::dual_mlp_sqnorm`` (``csrc/common/dual_mlp_sqnorm.h``): the forward-mode
  (input-space) estimate, probes ``v`` [K, R, IN];
* ``grokalign::reverse_mlp`` (``csrc/common/reverse_mlp.h``, specification
  :mod:`.reverse_mlp`): the output-space estimate, probes ``u`` [K, R, C].

Importing this module registers the four ops' fakes (shapes, dtypes and the storage offsets of the
saved state, as the kernels return them), for FakeTensor and torch.compile.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ... import _backends
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
    return _backends.op_unavailable_reason(("dual_mlp_sqnorm", "dual_mlp_sqnorm_backward"), x)


_OPS = ("reverse_mlp", "reverse_mlp_backward", "dual_mlp_sqnorm", "dual_mlp_sqnorm_backward")
_IDENTITY, _RELU = ACT_CODE["identity"], ACT_CODE["relu"]

if extension_ops_reason(_OPS) is None:

    def _check_fake_args(op, x, probes, weights):
        torch._check(x.dim() == 2, lambda: f"{op}: x must be [B, IN], got {x.shape}")
        torch._check(probes.dim() == 3, lambda: f"{op}: the probes must be [K, R, n], got {probes.shape}")
        torch._check(len(weights) >= 1, lambda: f"{op}: weights must hold at least one [OUT, IN] matrix")

    def _fake_slopes(x, weights, acts):
        """D_1..D_L as the kernels save them: empty for identity, a bool mask [B, n_l] for relu, the
        slopes [B, n_l] in x's dtype for leaky relu."""
        B = x.shape[0]
        out = []
        for w, act in zip(weights, acts):
            if act == _IDENTITY:
                out.append(x.new_empty((0,)))
            else:
                out.append(x.new_empty((B, w.shape[0]), dtype=torch.bool if act == _RELU else x.dtype))
        return out

    @torch.library.register_fake("grokalign::reverse_mlp")
    def _reverse_mlp_fake(x, u, index, weights, biases, has_bias, acts, alphas, root=False, scale=1.0):
        _check_fake_args("reverse_mlp", x, u, weights)
        B, KR, L = x.shape[0], u.shape[0] * u.shape[1], len(weights)
        hidden = [w.shape[0] for w in weights[:-1]]
        saved = [x.new_empty((B + KR, n)) for n in hidden]  # S_l = [h_l; t_l]
        saved.append(x.new_empty((KR, x.shape[1])))  # g = J^T u
        saved += _fake_slopes(x, weights, acts)
        saved += [x.new_empty((KR, n)) for n in hidden]  # delta_1..delta_{L-1}
        return x.new_empty((B, weights[L - 1].shape[0])), x.new_empty((u.shape[1],)), saved

    @torch.library.register_fake("grokalign::dual_mlp_sqnorm")
    def _dual_mlp_sqnorm_fake(x, v, index, weights, biases, has_bias, acts, alphas, root=False, scale=1.0):
        _check_fake_args("dual_mlp_sqnorm", x, v, weights)
        B, KR, C = x.shape[0], v.shape[0] * v.shape[1], weights[-1].shape[0]
        saved = [x.new_empty((B + KR, w.shape[0])) for w in weights[:-1]]  # S_2..S_L = [h_l; t_l]
        saved += _fake_slopes(x, weights, acts)
        saved.append(x.new_empty((B + KR, C))[B:])  # t_L: the tangent rows of the last layer's buffer
        return x.new_empty((B, C)), x.new_empty((v.shape[1],)), saved

    def _fake_backward(grad_y, grad_est, x, weights, has_bias, need_x, zero_weights):
        B, IN = x.shape
        grad_x = x.new_empty((B, IN) if need_x else (0,))
        # Without any incoming gradient the reverse op returns zeros_like(weight) (weight's strides).
        grad_weights = [torch.empty_like(w) if zero_weights else x.new_empty(tuple(w.shape)) for w in weights]
        grad_biases = [x.new_empty((w.shape[0],)) for w, b in zip(weights, has_bias) if b]
        return grad_x, grad_weights, grad_biases

    @torch.library.register_fake("grokalign::reverse_mlp_backward")
    def _reverse_mlp_backward_fake(grad_y, grad_est, x, u, index, weights, saved, has_bias, need_x, root=False,
                                   scale=1.0):
        return _fake_backward(grad_y, grad_est, x, weights, has_bias, need_x,
                              zero_weights=grad_y is None and grad_est is None)

    @torch.library.register_fake("grokalign::dual_mlp_sqnorm_backward")
    def _dual_mlp_sqnorm_backward_fake(grad_y, grad_sq, x, v, index, weights, saved, has_bias, need_x, root=False,
                                       scale=1.0):
        return _fake_backward(grad_y, grad_sq, x, weights, has_bias, need_x, zero_weights=False)


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
