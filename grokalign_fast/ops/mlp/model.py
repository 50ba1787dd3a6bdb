"""The fused forward-mode path for whole MLPs: one dual-stream pass gives the
model output and the per-sample Hutchinson estimate of ||J||_F^2.

A model qualifies when it is an ``nn.Sequential`` (nested Sequentials are
flattened) of ``nn.Linear``, the activations of :data:`MODULE_ACTIVATIONS`,
``nn.Flatten`` (the default ``start_dim=1``), ``nn.Dropout`` and
``nn.Identity``, where every activation directly follows a Linear (it is fused
into that Linear's epilogue) and the model ends with a Linear (optionally
followed by its activation). :func:`plan` returns the layer plan or the reason a
model does not qualify.

The tangent streams start from the probes ``V`` ([K, R, *x.shape[1:]]), for the
primal rows ``index`` (all rows when None); the last layer reduces
``(1/K) sum_k ||t'_k||^2`` in its epilogue.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from ..._backends import extension_ops_reason
from . import function
from .reference import ACT_CODE

MODULE_ACTIVATIONS = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.GELU: "gelu",  # "gelu_tanh" when approximate="tanh"
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}


@dataclass
class LinearStep:
    linear: nn.Linear
    act: str = "identity"
    alpha: float = 0.01


@dataclass
class DropoutStep:
    p: float


@dataclass
class FlattenStep:
    pass


Step = Union[LinearStep, DropoutStep, FlattenStep]


def _flatten_modules(model: nn.Module) -> List[nn.Module]:
    out = []
    for m in model:
        out.extend(_flatten_modules(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _activation_name(m: nn.Module) -> Optional[Tuple[str, float]]:
    for cls, name in MODULE_ACTIVATIONS.items():
        if type(m) is cls:
            if cls is nn.GELU:
                return ("gelu_tanh" if m.approximate == "tanh" else "gelu"), 0.0
            if cls is nn.LeakyReLU:
                return name, float(m.negative_slope)
            return name, 0.0
    return None


def plan(model) -> Tuple[Optional[List[Step]], Optional[str]]:
    """``(steps, None)`` when the fused path can run ``model``, else ``(None, reason)``."""
    if not isinstance(model, nn.Sequential):
        return None, f"the fused MLP path runs nn.Sequential models, got {type(model).__name__}"
    steps: List[Step] = []
    for i, m in enumerate(_flatten_modules(model)):
        act = _activation_name(m)
        if isinstance(m, nn.Linear):
            steps.append(LinearStep(m))
        elif act is not None:
            if not steps or not isinstance(steps[-1], LinearStep) or steps[-1].act != "identity":
                return None, f"layer {i} ({type(m).__name__}) must directly follow an nn.Linear to be fused"
            steps[-1].act, steps[-1].alpha = act
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return None, f"layer {i}: only nn.Flatten(start_dim=1, end_dim=-1) is supported"
            steps.append(FlattenStep())
        elif isinstance(m, nn.Dropout):
            steps.append(DropoutStep(float(m.p)))
        elif isinstance(m, nn.Identity):
            continue
        else:
            return None, f"layer {i} ({type(m).__name__}) is not supported by the fused MLP path"
    if not steps or not isinstance(steps[-1], LinearStep):
        return None, "the model must end with an nn.Linear (optionally followed by its activation)"
    return steps, None


def unavailable_reasons(model, x: torch.Tensor, steps: Optional[List[Step]] = None):
    """Per backend (cpp, triton, reference): None when it can run the whole model, else why not."""
    if steps is None:
        steps, reason = plan(model)
        if reason is not None:
            return {name: reason for name in ("cpp", "triton", "reference")}
    reasons = {"cpp": None, "triton": None, "reference": None}
    d = x[0].numel()
    if x.dim() != 2 and not isinstance(steps[0], FlattenStep):
        reason = f"x has shape {list(x.shape)}: the fused MLP path needs [B, IN] inputs or a leading nn.Flatten"
        return {name: reason for name in reasons}
    for s in steps:
        if isinstance(s, LinearStep):
            w, b = s.linear.weight, s.linear.bias
            if w.dtype != x.dtype or w.device != x.device:
                reason = f"x ({x.dtype}, {x.device}) and the weights ({w.dtype}, {w.device}) must share dtype and device"
                return {name: reason for name in reasons}
            if w.shape[1] != d:
                reason = f"nn.Linear expects {w.shape[1]} inputs, gets {d}"
                return {name: reason for name in reasons}
            xs = x.new_empty((1, d))
            ts = x.new_empty((1, 1, d))
            per_op = function.unavailable_reasons(xs, ts, w, b, s.act, None)
            for name in ("cpp", "triton"):
                if reasons[name] is None and per_op[name] is not None:
                    reasons[name] = per_op[name]
            d = w.shape[0]
    return reasons


WHOLE_MLP_ACTIVATIONS = ("identity", "relu", "leaky_relu")


def whole_mlp_reason(steps: List[Step], training: bool, x: torch.Tensor) -> Optional[str]:
    """None when the whole-MLP op ``grokalign::dual_mlp_sqnorm`` (one call for every layer,
    primal and tangent rows stacked through each GEMM) can run the plan, else why not."""
    for s in steps:
        if isinstance(s, LinearStep) and s.act not in WHOLE_MLP_ACTIVATIONS:
            return f"the whole-MLP op needs piecewise-linear activations {WHOLE_MLP_ACTIVATIONS}, got {s.act!r}"
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
        y, est, _ = op(h, v, index, *args, root, scale)
        return y, est

    return run


def dual_forward(
    steps: List[Step],
    x: torch.Tensor,
    V: torch.Tensor,
    *,
    index: Optional[torch.Tensor] = None,
    training: bool = True,
    backend: str,
    generator: Optional[torch.Generator] = None,
    checked: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the plan on the primal ``x`` [B, ...] and the tangents ``V`` [K, R, ...].

    Returns ``(y [B, OUT], sq [R])`` with ``sq[r] = (1/K) sum_k ||J(x[index[r]]) V[k, r]||^2``.
    Dropout (in training) uses one mask per primal row for the primal and its tangents.
    ``checked=True``: the caller has already checked with :func:`unavailable_reasons` that the
    named ``backend`` ("cpp", "triton" or "reference") runs every layer, and the per-layer
    argument checks and backend choice are skipped (~50 us per layer on a CPU). With
    ``backend="cpp"`` a piecewise-linear plan (see :func:`whole_mlp_reason`) then runs as one
    call of the whole-MLP op ``grokalign::dual_mlp_sqnorm``; other plans run layer by layer.
    """
    K, R = V.shape[0], V.shape[1]
    h = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
    t = V.reshape(K, R, -1)
    last = max(i for i, s in enumerate(steps) if isinstance(s, LinearStep))
    if checked and backend == "cpp" and whole_mlp_reason(steps, training, x) is None:
        return whole_mlp_runner("dual_mlp_sqnorm", steps)(h, t, index)
    sq = None
    if checked:
        if backend not in function.ORDER:
            raise ValueError(f"checked=True needs a backend named in {function.ORDER}, got {backend!r}")
        module = function.backend_module(backend)
        dual_linear, dual_linear_sqnorm = module.dual_linear, module.dual_linear_sqnorm
    else:
        dual_linear = functools.partial(function.dual_linear, backend=backend)
        dual_linear_sqnorm = functools.partial(function.dual_linear_sqnorm, backend=backend)
    for i, s in enumerate(steps):
        if isinstance(s, LinearStep):
            w, b = s.linear.weight, s.linear.bias
            if i == last and all(not isinstance(r, DropoutStep) for r in steps[i + 1:]):
                h, sq = dual_linear_sqnorm(h, t, w, b, s.act, s.alpha, index)
            else:
                h, t = dual_linear(h, t, w, b, s.act, s.alpha, index)
        elif isinstance(s, DropoutStep):
            if training and s.p > 0:
                keep = torch.rand(h.shape, generator=generator, device=h.device if generator is None else generator.device)
                scale = 0.0 if s.p >= 1 else 1.0 / (1.0 - s.p)
                mask = (keep.to(h.device) >= s.p).to(h.dtype) * scale
                h = h * mask
                t = t * (mask if index is None else mask.index_select(0, index))
        # FlattenStep: already [B, features]
    if sq is None:
        sq = t.pow(2).sum(dim=(0, 2)) / K
    return h, sq
