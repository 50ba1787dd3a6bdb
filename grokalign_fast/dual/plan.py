r"""The planner: one decision per model and input signature of which path computes the penalty.

:class:`Planner` (one per :class:`~grokalign_fast.GrokAlign`) returns a :class:`Plan` for an input:
the backend that runs, why each faster backend could not serve, and ``run(x, index, scale)``. Plans
are cached per signature (the input's per-sample shape, dtype and device, the train/eval mode and
every parameter's identity, dtype, device and ``requires_grad``): building one traces the model,
checks the fused ops' requirements and binds the probe drawer and the op's arguments once.

Backends (``backend=``), fastest first:

- ``"cpp"``: the C++ extension's kernels (needs the extension built). Forward estimator: for MLP
  chains (:func:`~grokalign_fast.dual.trace.mlp_chain`) their fused ops, ``grokalign::dual_mlp_sqnorm``
  (one op for a piecewise-linear MLP) or the per-layer ``grokalign::dual_linear*`` ops (smooth
  activations); for any other model (or where the fused ops cannot serve, e.g. the offset term) the
  dual-stream engine (:func:`~grokalign_fast.dual.engine.run`) with the extension's epilogues where
  they apply (``grokalign::dual_act``, ``dual_smooth_act``, ``dual_max_pool``, ``dual_batch_norm_train``,
  ``dual_layer_norm``, ``attention_jvp`` from 64 keys up, ``probe_sqnorm``; ``plan.counts`` shows
  them as ``"relu[cpp]"``, ``"max_pool[cpp]"``, ``"layer_norm[cpp]"``, ``"attention[cpp]"``, ...).
  Reverse estimator: ``grokalign::reverse_mlp`` (piecewise-linear MLPs).
- ``"triton"``: the forward estimator on Triton kernels (needs triton and a CUDA input, or a CPU
  input under Triton's interpreter). MLP chains run the per-layer Triton ops ``dual_linear*``
  (:mod:`grokalign_fast.ops.mlp.triton`); any other model (or where those cannot serve, e.g. the
  offset term) runs the dual-stream engine with the Triton epilogues where they apply
  (``dual_act``, ``dual_smooth_act``, ``dual_max_pool``, ``dual_batch_norm_train``, ``dual_layer_norm``,
  ``probe_sqnorm``: ``plan.counts`` shows ``"relu[triton]"``, ``"max_pool[triton]"``,
  ``"batch_norm[triton]"``, ``"layer_norm[triton]"``, ...) and ATen ops for the other rules. ``"auto"``
  never picks it under Triton's CPU interpreter.
- ``"dual"``: one pass without double backward, in plain PyTorch. Forward estimator: the
  dual-stream engine on any model (convolutions, norms, pooling, residual connections, attention,
  custom ``forward``) with every rule in ATen ops, the reference of the ``"cpp"`` engine's
  epilogues; reverse estimator: the one-pass output-space path of piecewise-linear MLPs
  (:mod:`grokalign_fast.ops.mlp.reverse_mlp`).
- ``"reference"``: the autograd / ``torch.func`` estimators of :mod:`grokalign_fast.jacobian`,
  any estimator on any model (an extra forward and a double backward).

``"auto"`` takes the first that can serve. A backend asked for by name never falls back: it raises
:class:`~grokalign_fast.BackendUnavailableError` with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .. import _backends
from ..jacobian import penalty_estimate, safe_sqrt
from ..ops.mlp import model as mlp_model
from ..ops.mlp.reference import PIECEWISE_LINEAR
from ..ops.mlp import reverse_mlp as mlp_reverse
from ..ops.mlp import whole_mlp
from ..probes import drawer, resolve_probes
from . import engine
from .embedding import is_token_input, no_trace, output_shape
from .trace import mlp_chain

BACKENDS = ("auto", "reference", "dual", "cpp", "triton")
ORDER = ("cpp", "triton", "dual", "reference")


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@dataclass
class Plan:
    """How the penalty is computed for one signature.

    ``run(x, index, scale) -> (model(x), values, offset)``: ``values[r] = scale * est`` at row
    ``x[index[r]]`` (every row when ``index`` is None), where ``est`` is the estimate of ``||J||_F^2``
    or, with ``squared=False``, its square root (value and gradient 0 at 0). With ``scale = weight / R``
    the penalty is ``values.sum()``. ``offset``: None, or when the planner was asked for it,
    ``||f(x_r) - J(x_r) x_r||^2`` per row (unscaled), the squared offset of the local affine map:
    exactly 0 without computing it for a bias-free MLP of piecewise-linear activations, where
    ``f(x) = J x``.
    """

    estimator: str
    backend: str
    reasons: Dict[str, Optional[str]]
    run: Callable
    description: str = ""
    counts: Dict[str, int] = field(default_factory=dict)


class Planner:
    """Plans (cached per signature) for one model and one set of estimator settings."""

    def __init__(self, model, *, estimator: str, backend: str, num_probes: int, probes: str, squared: bool,
                 generator: Optional[torch.Generator], offset: bool = False):
        self.model = model
        self.estimator = estimator
        self.backend = check_backend(backend)
        self.num_probes, self.probes, self.squared, self.generator = num_probes, probes, squared, generator
        self.offset = offset
        self.settings = (estimator, backend, num_probes, probes, squared, id(generator), offset)
        self.warned: set = set()  # the engine's fallback warnings, once per function per planner
        self._cache: Optional[Tuple[tuple, Plan]] = None

    def signature(self, x: torch.Tensor) -> tuple:
        """The input's per-sample shape, dtype and device, the train/eval mode, and the module tree
        with each parameter's identity, dtype, device and ``requires_grad`` (ids, not the tensors:
        comparing tensors would compare values)."""
        model = self.model
        tree = []
        if isinstance(model, nn.Module):
            stack = [model]
            while stack:
                m = stack.pop()
                if m is None:
                    continue
                tree.append((id(m), m.training))
                for p in m._parameters.values():
                    if p is not None:
                        tree += (id(p), p.dtype, p.device, p.requires_grad)
                stack.extend(m._modules.values())
        else:
            tree.append(id(model))
        return (x.shape[1:], x.dtype, x.device, tuple(tree))

    def plan(self, x: torch.Tensor) -> Plan:
        sig = self.signature(x)
        cache = self._cache
        if cache is not None and cache[0] == sig:
            return cache[1]
        plan = make_plan(self.model, x, estimator=self.estimator, backend=self.backend,
                         num_probes=self.num_probes, probes=self.probes, squared=self.squared,
                         generator=self.generator, warned=self.warned, offset=self.offset)
        self._cache = (sig, plan)
        return plan


def output_size(model, x: torch.Tensor) -> int:
    """Outputs per sample of ``model`` at ``x``, from one sample, leaving no trace (see
    :func:`~grokalign_fast.dual.embedding.no_trace`)."""
    steps, _ = mlp_chain(model)
    if steps is not None:
        return [s for s in steps if isinstance(s, mlp_model.LinearStep)][-1].linear.out_features
    with no_trace(model):
        return model(x[:1]).numel()


def input_shape(model, x: torch.Tensor) -> tuple:
    """The per-sample shape the Jacobian is taken with respect to: ``x``'s, or for integer tokens the
    first embedding lookup's (:mod:`grokalign_fast.dual.embedding`)."""
    return output_shape(model, x) if is_token_input(x) else tuple(x.shape[1:])


def auto_estimator(model, x: torch.Tensor) -> str:
    """``"reverse"`` when the model has no more outputs than inputs per sample, else ``"forward"``:
    both cost one extra pass per probe, and the smaller space gives the lower variance (for probes on
    the sphere of radius sqrt(n) the variance of the estimate of ||J||_F^2 = tr(A) is
    2 n/(n+2) (||A||_F^2 - tr(A)^2 / n), with A = J J^T (n = C) or J^T J (n = D))."""
    return "reverse" if output_size(model, x) <= math.prod(input_shape(model, x)) else "forward"


def _chain_reasons(model, x: torch.Tensor, estimator: str) -> Tuple[Optional[list], Dict[str, Optional[str]]]:
    """The MLP chain of ``model`` (or None) and, per fused backend, why it cannot serve."""
    training = bool(getattr(model, "training", False))
    steps, chain_reason = mlp_chain(model)
    if is_token_input(x):
        steps, chain_reason = None, "the input is integer tokens (the Jacobian is taken at their embedding)"
    fused = "the fused {} kernels serve MLP chains (nn.Linear and activations): {}"
    if estimator == "forward":
        if steps is None:
            reasons = {"cpp": fused.format("C++", chain_reason), "triton": fused.format("Triton", chain_reason)}
        else:
            per_backend = mlp_model.unavailable_reasons(model, x, steps)
            reasons = {"cpp": per_backend["cpp"], "triton": per_backend["triton"]}
            if per_backend["reference"] is not None:  # the shapes do not fit the chain
                reasons = {"cpp": per_backend["reference"], "triton": per_backend["reference"]}
        reasons["dual"] = None
        return steps, reasons
    if estimator == "reverse":
        why_triton = 'the Triton kernels compute the forward (input-space) estimator, not "reverse"'
        if steps is None:
            reasons = {"cpp": fused.format("C++", chain_reason), "triton": why_triton,
                       "dual": ("the dual-stream engine computes the forward (input-space) estimator; the one-pass "
                                f"output-space path serves piecewise-linear MLP chains: {chain_reason}")}
            return None, reasons
        reason = mlp_reverse.unavailable_reason(steps, training)
        if reason is None:
            reason = mlp_model.unavailable_reasons(model, x, steps)["reference"]
        reasons = {"dual": reason, "triton": why_triton,
                   "cpp": reason or mlp_reverse.cpp_unavailable_reason(x)}
        return steps, reasons
    why = f'the one-pass paths compute the forward or reverse estimator, not "{estimator}"'
    return steps, {"cpp": why, "triton": why, "dual": why}


def sharded_parameters(model) -> bool:
    """True when a parameter of ``model`` is a DTensor (sharded by FSDP2's ``fully_shard``)."""
    if not isinstance(model, nn.Module):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without torch.distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _homogeneous_chain(steps) -> bool:
    """A bias-free MLP chain of piecewise-linear activations: positively homogeneous, f(x) = J(x) x."""
    return steps is not None and all(
        not isinstance(s, mlp_model.LinearStep) or (s.linear.bias is None and s.act in PIECEWISE_LINEAR)
        for s in steps)


def make_plan(model, x: torch.Tensor, *, estimator: str, backend: str, num_probes: int, probes: str,
              squared: bool, generator: Optional[torch.Generator], warned: Optional[set] = None,
              offset: bool = False) -> Plan:
    """Choose the backend for ``model`` at ``x`` and bind its per-call function (see :class:`Plan`)."""
    check_backend(backend)
    steps, reasons = _chain_reasons(model, x, estimator)
    zero_offset = offset and _homogeneous_chain(steps)
    if offset and not zero_offset:
        why = "the fused ops do not compute the offset term f(x) - J x (the model has biases or smooth activations)"
        for name in ("cpp", "triton"):
            reasons[name] = reasons[name] or why
        if estimator != "forward":
            reasons["dual"] = reasons["dual"] or why
    reasons["reference"] = None
    if sharded_parameters(model):
        why = ("the model's parameters are sharded by FSDP (DTensor): only the dual-stream engine, which calls the "
               "model's own forward (where FSDP gathers them), serves it")
        reasons["cpp"] = reasons["cpp"] or why
        reasons["triton"] = reasons["triton"] or why
        reasons["reference"] = ("the reference estimators differentiate twice, and FSDP reshards the parameters after "
                                "the first backward; use estimator='forward' (the dual-stream engine: one forward, one "
                                "backward)")
        if estimator != "forward":
            reasons["dual"] = reasons["reference"]
    # Why the chain's fused C++ / Triton ops cannot serve (None: they do); else, for the forward
    # estimator, "cpp" and "triton" run the engine with their epilogues.
    chain_cpp, chain_triton = reasons["cpp"], reasons["triton"]
    if estimator == "forward":
        reasons["cpp"] = _backends.cpp_unavailable_reason(x.device)
        reasons["triton"] = _backends.triton_unavailable_reason(x.device)
    if backend == "auto":
        chosen = next((name for name in ORDER if reasons[name] is None
                       and not (name == "triton" and _backends.triton_interpreted())), None)
        if chosen is None:
            raise _backends.BackendUnavailableError(
                f"no backend can compute the {estimator!r} estimator for this model: "
                + "; ".join(f"{name}: {reasons[name]}" for name in ORDER))
    else:
        if reasons[backend] is not None:
            raise _backends.BackendUnavailableError(
                f"backend={backend!r} cannot compute the {estimator!r} estimator for this model: {reasons[backend]}")
        chosen = backend
    with_offset = offset and not zero_offset
    run, description = _runner(model, x, steps, estimator, chosen, num_probes, probes, squared, generator,
                               set() if warned is None else warned, with_offset, chain_cpp, chain_triton)
    if not with_offset:
        base = run

        def run(x, index=None, scale=1.0):
            out, values = base(x, index, scale)
            return out, values, (values.new_zeros(values.shape) if zero_offset else None)

        run.counts = getattr(base, "counts", {})
        if zero_offset:
            description += "; offset 0 (a bias-free piecewise-linear MLP: f(x) = J x)"
    plan = Plan(estimator, chosen, reasons, run, description)
    plan.counts = getattr(run, "counts", {})
    return plan


def _runner(model, x, steps, estimator, backend, K, probes, squared, generator, warned, offset=False,
            chain_cpp=None, chain_triton=None):
    """``(run, description)``; ``run`` returns ``(out, values)``, or with ``offset``
    ``(out, values, offset)`` (the reference path and the engine compute the offset). ``chain_cpp``,
    ``chain_triton``: why the MLP chain's fused C++ / Triton ops cannot serve the forward estimator
    (None: they do), so that ``"cpp"`` / ``"triton"`` run the engine with their epilogues."""
    root = not squared
    dtype, device = x.dtype, x.device
    in_shape = tuple(x.shape[1:])

    def finish(est, scale):
        values = safe_sqrt(est) if root else est
        return values if scale == 1.0 else values * scale

    def rows(x, index):
        return x.shape[0] if index is None else index.shape[0]

    if backend == "reference":
        def run(x, index=None, scale=1.0):
            res = penalty_estimate(model, x, index, estimator=estimator, num_probes=K, probes=probes,
                                   generator=generator, offset=offset)
            return (res[0], finish(res[1], scale)) + tuple(res[2:])

        return run, f"the {estimator} estimator by autograd / torch.func (jacobian.penalty_estimate)"

    if estimator == "reverse":
        C = [s for s in steps if isinstance(s, mlp_model.LinearStep)][-1].linear.out_features
        draw = drawer(resolve_probes(probes, "reverse"), K, (C,), C, dtype=dtype, device=device, generator=generator)
        if backend == "cpp":
            op = whole_mlp.whole_mlp_runner("reverse_mlp", steps)

            def run(x, index=None, scale=1.0):
                return op(x, draw(rows(x, index)), index, root, scale)

            return run, "grokalign::reverse_mlp (one op for the whole MLP)"

        def run(x, index=None, scale=1.0):
            out, est = mlp_reverse.reverse_forward(steps, x, draw(rows(x, index)), index, implementation="python")
            return out, finish(est, scale)

        return run, "the one-pass output-space MLP path in plain PyTorch"

    if is_token_input(x):
        in_shape = output_shape(model, x)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()) \
            if isinstance(model, nn.Module) else torch.get_default_dtype()
    draw = drawer(resolve_probes(probes, "forward"), K, in_shape, math.prod(in_shape), dtype=dtype, device=device,
                  generator=generator)
    training = bool(getattr(model, "training", False))
    fused = (backend == "triton" and chain_triton is None) or (backend == "cpp" and chain_cpp is None)
    if fused and backend == "cpp" and whole_mlp.whole_mlp_reason(steps, training, x) is None:
        op = whole_mlp.whole_mlp_runner("dual_mlp_sqnorm", steps)

        def run(x, index=None, scale=1.0):
            return op(x, draw(rows(x, index)), index, root, scale)

        return run, "grokalign::dual_mlp_sqnorm (one op for the whole MLP)"
    if fused:
        def run(x, index=None, scale=1.0):
            out, est = mlp_model.dual_forward(steps, x, draw(rows(x, index)), index=index, training=training,
                                              backend=backend, checked=True)
            return out, finish(est, scale)

        return run, f"the per-layer {backend} ops grokalign::dual_linear*"

    counts: Dict[str, int] = {}
    kernels = backend if backend in ("cpp", "triton") else "torch"

    # The engine recognises its dual values by identity and patches modules while it runs: dynamo
    # does not trace that faithfully (it lost bias gradients in a test), so under torch.compile the
    # engine runs eagerly, a graph break on each side of it.
    @torch.compiler.disable
    def run(x, index=None, scale=1.0):
        res = engine.run(model, x, draw(rows(x, index)), index, warned=warned, kernels=kernels, jx=offset)
        out, est, calls = res[:3]
        counts.clear()
        counts.update(calls)
        if not offset:
            return out, finish(est, scale)
        y_rows = out if index is None else out.index_select(0, index)
        return out, finish(est, scale), (y_rows - res[3]).pow(2).flatten(1).sum(1)

    run.counts = counts
    if kernels == "torch":
        return run, "the dual-stream engine (grokalign_fast.dual.engine), its rules in plain PyTorch"
    if kernels == "triton":
        return run, ("the dual-stream engine (grokalign_fast.dual.engine) with the Triton epilogues where they "
                     f"apply (the per-layer Triton MLP ops: {chain_triton})")
    return run, ("the dual-stream engine (grokalign_fast.dual.engine) with the extension's epilogues where they "
                 f"apply (the fused MLP ops: {chain_cpp})")
