"""The fused forward-mode path for whole MLPs: one dual-stream pass gives the
model output and the per-sample Hutchinson estimate of ||J||_F^2.

A model qualifies when it is an ``nn.Sequential`` (nested Sequentials are
flattened) of ``nn.Linear``, the activations of :data:`MODULE_ACTIVATIONS`,
``nn.Flatten`` (the default ``start_dim=1``), ``nn.Dropout`` and
``nn.Identity``, where every activation directly follows a Linear (it is fused
into that Linear's epilogue) and the model ends with a Linear (optionally
followed by its activation). :func:`plan` returns the layer plan or the reason a
model does not qualify. A piecewise-linear plan can also run as one call of a
whole-MLP op (:mod:`.whole_mlp`).

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

from . import function

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
    ``backend="cpp"`` a piecewise-linear plan (see :func:`.whole_mlp.whole_mlp_reason`) then runs as one
    call of the whole-MLP op ``grokalign::dual_mlp_sqnorm``; other plans run layer by layer.
    """
    K, R = V.shape[0], V.shape[1]
    h = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
    t = V.reshape(K, R, -1)
    last = max(i for i, s in enumerate(steps) if isinstance(s, LinearStep))
    if checked and backend == "cpp":
        from .whole_mlp import whole_mlp_reason, whole_mlp_runner  # whole_mlp imports this module's Step types

        if whole_mlp_reason(steps, training, x) is None:
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
