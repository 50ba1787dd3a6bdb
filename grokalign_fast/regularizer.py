r"""GrokAlign: the Jacobian-norm regulariser as a drop-in ``nn.Module``.

``out, penalty = reg(x)`` runs the model once and returns its output and the
weighted penalty ``weight * mean_b ||J(x_b)||_F`` (or the squared norm with
``squared=True``), differentiable with respect to the model's parameters::

    reg = GrokAlign(model, weight=1e-4)
    out, penalty = reg(x)
    loss = F.mse_loss(out, y) + penalty
    loss.backward()

With ``target=level`` the penalty is the paper's ``weight * |level - mean_b ||J(x_b)||_F|``
(keeping the norm near a level, which inhibits generalisation). In eval mode or with
``weight=0`` it does no penalty work and returns a zero penalty.

Cheaper schedules: ``subsample=s`` computes the penalty on a random fraction s
of the batch (the batch mean is estimated without bias); ``every=n`` computes
it on every n-th training call and scales it by n (lazy regularisation, as in
StyleGAN2's path-length penalty), so its expectation per step is unchanged.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

from . import _backends
from ._validation import (
    check_batch_input,
    check_choice,
    check_finite,
    check_generator,
    check_nonnegative_number,
    check_num_probes,
)
from .jacobian import ESTIMATORS, safe_sqrt, sq_norm_estimate
from .ops.mlp import model as mlp_model
from .ops.mlp import reverse as mlp_reverse
from .probes import PROBES, drawer, resolve_probes


class GrokAlign(nn.Module):
    """Wrap ``model`` so one call returns ``(model(x), penalty)``.

    Args:
        model: maps ``[B, ...]`` to ``[B, ...]`` with samples independent.
        weight: lambda >= 0 (the paper: 1e-4 for MSE, 1e-3 for cross-entropy).
        estimator: ``"reverse"`` (default; output-space probes, VJPs reusing the
            forward), ``"forward"`` (input-space Hutchinson, JVPs), ``"exact"``, or
            ``"auto"``: reverse when the model has no more outputs than inputs,
            else forward (the lower-variance choice at equal cost; resolved at the
            first training call and kept in ``self.estimator``).
        num_probes: probes per sample (k >= 1).
        probes: probe distribution (see :mod:`grokalign_fast.probes`); ``"auto"``:
            sphere for the reverse estimator, Rademacher for the forward one.
        squared: penalise ``||J||_F^2`` (Hoffman et al.) instead of ``||J||_F``.
        target: if given, penalise ``|target - mean ||J||_F|`` instead.
        subsample: fraction in (0, 1] of the batch that carries the penalty.
        every: compute the penalty every n-th training call, scaled by n.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``. On an
            ``nn.Sequential`` MLP, ``"cpp"`` runs the fused ops: for the forward
            estimator the dual-stream ops (one whole-MLP op when every activation is
            piecewise linear), for the reverse estimator the one-pass op
            ``grokalign::reverse_mlp`` (piecewise-linear MLPs). ``"triton"`` runs the
            forward estimator's kernels. ``"auto"`` takes the first that can serve.
        generator: ``torch.Generator`` for probes and subsampling.
        check_finite_values: raise on a non-finite Jacobian norm.

    Attributes after a call: ``last_norm`` (detached mean per-sample norm, or
    squared norm with ``squared=True``, of the last computed penalty; None if
    no penalty was computed), ``last_backend`` (the backend that ran).
    """

    def __init__(
        self,
        model: nn.Module,
        weight: float,
        *,
        estimator: str = "reverse",
        num_probes: int = 1,
        probes: str = "auto",
        squared: bool = False,
        target: Optional[float] = None,
        subsample: Optional[float] = None,
        every: int = 1,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        check_finite_values: bool = True,
    ):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
        self.model = model
        self.weight = check_nonnegative_number(weight, "weight")
        self.estimator = check_choice(estimator, "estimator", ESTIMATORS + ("auto",))
        self.requested_estimator = self.estimator
        self.num_probes = check_num_probes(num_probes)
        self.probes = check_choice(probes, "probes", PROBES + ("auto",))
        if not isinstance(squared, bool):
            raise TypeError(f"squared must be a bool, got {squared!r}")
        self.squared = squared
        self.target = None if target is None else check_nonnegative_number(target, "target")
        if subsample is not None:
            if isinstance(subsample, bool) or not isinstance(subsample, (int, float)) or not (0 < subsample <= 1):
                raise ValueError(f"subsample must be a fraction in (0, 1] or None, got {subsample!r}")
            subsample = float(subsample)
        self.subsample = subsample
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = every
        self.backend = _backends.check_backend_name(backend)
        check_generator(generator)
        self.generator = generator
        self.check_finite_values = check_finite_values
        self.step = 0
        self._last_norm = None  # see the last_norm property
        self.last_backend: Optional[str] = None
        # (signature, path, compute, folds) for the last signature (see _path_signature, _make_compute).
        self._path_cache = None

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, estimator={self.estimator!r}, num_probes={self.num_probes}, "
            f"probes={self.probes!r}, squared={self.squared}, target={self.target}, "
            f"subsample={self.subsample}, every={self.every}, backend={self.backend!r}"
        )

    def _penalty_active(self) -> bool:
        return self.training and self.weight > 0 and torch.is_grad_enabled()

    def _subsample_index(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        if self.subsample is None or self.subsample >= 1.0:
            return None
        m = max(1, int(round(self.subsample * batch)))
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        idx = torch.randperm(batch, generator=self.generator, device=gen_device)[:m]
        return idx if gen_device == device else idx.to(device)

    def __getstate__(self):
        # The path cache (a plan and a runner bound to this model's parameters) is rebuilt on
        # the next call: pickles and deep copies carry none of it.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_path_cache"] = None
        return state

    @property
    def last_norm(self) -> Optional[torch.Tensor]:
        """Detached mean per-sample norm (or squared norm with ``squared=True``) of the last computed
        penalty; None if the last call computed none."""
        value = self.__dict__.get("_last_norm")
        if isinstance(value, tuple):
            # (the penalty, the weight it carries): where the op folds the weight into its epilogue,
            # the level is divided out on first access, not on every step.
            value = value[0] / value[1]
            self.__dict__["_last_norm"] = value
        return value

    def _set_plain(self, **values) -> None:
        """Set plain attributes (step, _last_norm, last_backend) on the training path without
        nn.Module.__setattr__'s parameter / buffer / module checks (~5 us per attribute); these
        names are never parameters, buffers or modules."""
        self.__dict__.update(values)

    def forward(self, x: torch.Tensor):
        if not self._penalty_active():
            self._set_plain(_last_norm=None)
            out = self.model(x)
            return out, out.new_zeros(())
        step = self.step
        self._set_plain(step=step + 1)
        if step % self.every != 0:
            self._set_plain(_last_norm=None)
            out = self.model(x)
            return out, out.new_zeros(())
        check_batch_input(x)
        if self.estimator == "auto":
            self.estimator = self._auto_estimator(x)
        idx = self._subsample_index(x.shape[0], x.device)
        path, compute, folds = self._cached_path(x)
        self._set_plain(last_backend=path)
        factor = self.weight * self.every
        if folds and self.target is None:
            # The whole-MLP ops take the weight in their epilogue: values[r] = factor / R * norm[r],
            # so the penalty is their sum (no mean, no scaling op, no extra autograd nodes).
            rows = x.shape[0] if idx is None else idx.shape[0]
            scale = factor / rows
            out, values = compute(x, idx, scale)
            penalty = values.sum()
            detached = penalty.detach()
            if self.check_finite_values and not math.isfinite(float(detached)):
                self._raise_nonfinite(values, scale)
            self._set_plain(_last_norm=(detached, factor))
            return out, penalty
        out, values = compute(x, idx)
        level = values.mean()
        penalty = factor * ((level - self.target).abs() if self.target is not None else level)
        # A nan or inf estimate makes the penalty non-finite (safe_sqrt keeps nan), so one host read
        # serves as the check; the per-sample check runs only when it fails.
        if self.check_finite_values and not math.isfinite(float(penalty.detach())):
            self._raise_nonfinite(values)
        self._set_plain(_last_norm=level.detach())
        return out, penalty

    def _raise_nonfinite(self, values: torch.Tensor, scale: float = 1.0) -> None:
        """Raise for a non-finite penalty. ``values``: the per-sample norms, times ``scale`` where the
        op folded the weight in (a factor <= 1 cannot turn a finite norm into inf or nan)."""
        bad = (~torch.isfinite(values.detach())).nonzero()[:, 0].tolist()
        if not bad:
            raise FloatingPointError(
                f"the penalty overflowed {values.dtype}: every per-sample Jacobian norm is finite but their "
                f"weighted mean is not (weight={self.weight}, every={self.every}); lower the weight or use a "
                "wider dtype"
            )
        if scale <= 1.0:
            check_finite(values, "the Jacobian norm of the model at x")
        raise FloatingPointError(
            f"the penalty is not finite in {values.dtype} (samples {bad[:8]}): the Jacobian norm there is not "
            f"finite, or weight * every / rows = {scale:g} makes it overflow; lower the weight or use a wider dtype"
        )

    def _auto_estimator(self, x: torch.Tensor) -> str:
        """estimator="auto": "reverse" when the model has no more outputs than inputs per sample, else "forward".

        Both cost one extra pass per probe (the fused forward path and the one-pass
        reverse path are at the same FLOPs), so the choice is the one with the
        lower variance. For probes uniform on the sphere of radius sqrt(n) the
        variance of the estimate of ||J||_F^2 = tr(A) is
        2 n/(n+2) (||A||_F^2 - tr(A)^2 / n), with A = J J^T (n = C outputs,
        reverse) or J^T J (n = D inputs, forward): ||A||_F and tr(A) are the same
        for both, so the smaller space subtracts more. Measured on the paper's
        784-200-200-10 MLP (bench/estimator_noise.py): one output-space probe gives
        several times less penalty-gradient noise than one input-space probe.
        """
        steps, reason = mlp_model.plan(self.model)
        if reason is None:
            C = [s for s in steps if isinstance(s, mlp_model.LinearStep)][-1].linear.out_features
        else:
            with torch.no_grad():
                C = self.model(x[:1]).numel()
        return "reverse" if C <= x[0].numel() else "forward"

    def fused_unavailable_reasons(self, x: torch.Tensor) -> Dict[str, Optional[str]]:
        """Why each one-pass path cannot run this model on ``x`` (None: it can).

        Keys: "cpp" (forward estimator: the fused dual-stream MLP ops; reverse
        estimator: the one-pass output-space op ``grokalign::reverse_mlp``), "triton"
        (the fused forward-mode kernels) and "reverse_mlp" (the one-pass output-space
        estimator in Python, for piecewise-linear MLPs).
        """
        steps, reason = mlp_model.plan(self.model)
        if self.estimator == "forward" and reason is None:
            reasons = mlp_model.unavailable_reasons(self.model, x, steps)
            reasons = {"cpp": reasons["cpp"], "triton": reasons["triton"]}
        elif self.estimator == "reverse":
            why = f'the Triton kernels compute the forward (input-space) estimator, not "{self.estimator}"'
            reasons = {"cpp": None, "triton": reason or why}
        else:
            why = reason or f'the fused kernels compute the forward or reverse estimator, not "{self.estimator}"'
            reasons = {"cpp": why, "triton": why}
        if self.estimator != "reverse":
            reasons["reverse_mlp"] = f'the one-pass reverse path computes estimator="reverse", not "{self.estimator}"'
        elif reason is not None:
            reasons["reverse_mlp"] = reason
        else:
            reasons["reverse_mlp"] = mlp_reverse.unavailable_reason(steps, self.model.training)
            if reasons["reverse_mlp"] is None:
                shape_reason = mlp_model.unavailable_reasons(self.model, x, steps)["reference"]
                reasons["reverse_mlp"] = shape_reason
        if self.estimator == "reverse":
            reasons["cpp"] = reasons["reverse_mlp"] or mlp_reverse.cpp_unavailable_reason(x)
        return reasons

    def _path_signature(self, x: torch.Tensor):
        """Everything the path choice and its per-call function depend on: the input's per-sample
        shape, dtype and device, the estimator settings (estimator, backend, probes, num_probes,
        squared, generator), the train/eval mode, and the module tree with each parameter's
        identity, dtype, device and requires_grad. Equal signatures reuse the cached path
        (choosing again costs ~70 us per call)."""
        # One flat list (ids, not the objects: comparing tensors with == would compare values); ~3.5 us
        # for a 3-layer MLP where a tuple per parameter and a filtered generator took ~7 us.
        model = self.model
        tree = []
        if isinstance(model, nn.Module):
            stack = [model]
            while stack:
                m = stack.pop()
                if m is None:
                    continue
                tree.append(id(m))
                for p in m._parameters.values():
                    if p is not None:
                        tree += (id(p), p.dtype, p.device, p.requires_grad)
                stack.extend(m._modules.values())
        else:
            tree.append(id(model))
        return (x.shape[1:], x.dtype, x.device, self.estimator, self.backend, self.probes, self.num_probes,
                self.squared, id(self.generator), getattr(model, "training", None), tree)

    def _cached_path(self, x: torch.Tensor):
        """``(path, compute, folds)``: the path of :meth:`_choose_path` and its per-call function,
        built once per signature by :meth:`_make_compute`."""
        sig = self._path_signature(x)
        cache = self._path_cache
        if cache is not None and cache[0] == sig:
            return cache[1], cache[2], cache[3]
        path = self._choose_path(x)
        compute, folds = self._make_compute(path, x)
        self._path_cache = (sig, path, compute, folds)
        return path, compute, folds

    def _make_compute(self, path: str, x: torch.Tensor):
        """``(compute, folds)`` for ``path``: ``compute(x, idx) -> (model(x), values)``, where
        ``values[r]`` is the estimate of ||J||_F^2 at ``x[idx[r]]`` (all rows if idx is None) with
        ``squared=True``, else its safe square root (the whole-MLP ops take it in the same pass).
        It binds the plan, the probe drawer (:func:`~grokalign_fast.probes.drawer`) and, where one
        C++ op computes output and estimate, its
        :func:`~grokalign_fast.ops.mlp.model.whole_mlp_runner` (layer arguments gathered once).
        ``folds``: compute takes a third argument, a scale the op applies to the values in its
        epilogue and backward seed (the C++ whole-MLP ops), so the penalty is their sum."""
        root = not self.squared
        finish = safe_sqrt if root else (lambda est: est)
        K, generator, dtype, device = self.num_probes, self.generator, x.dtype, x.device

        def rows(x, idx):
            return x.shape[0] if idx is None else idx.shape[0]

        if path in ("cpp", "triton", "reverse_mlp"):
            steps = mlp_model.plan(self.model)[0]
            if path == "reverse_mlp" or self.estimator == "reverse":
                C = [s for s in steps if isinstance(s, mlp_model.LinearStep)][-1].linear.out_features
                draw = drawer(resolve_probes(self.probes, "reverse"), K, (C,), C, dtype=dtype, device=device,
                              generator=generator)
                if path == "cpp":
                    run = mlp_model.whole_mlp_runner("reverse_mlp", steps)
                    return (lambda x, idx, scale=1.0: run(x, draw(rows(x, idx)), idx, root, scale)), True

                def compute(x, idx):
                    out, est = mlp_reverse.reverse_forward(steps, x, draw(rows(x, idx)), idx, implementation="python")
                    return out, finish(est)

                return compute, False
            shape = tuple(x.shape[1:])
            draw = drawer(resolve_probes(self.probes, "forward"), K, shape, math.prod(shape), dtype=dtype,
                          device=device, generator=generator)
            if path == "cpp" and mlp_model.whole_mlp_reason(steps, self.model.training, x) is None:
                run = mlp_model.whole_mlp_runner("dual_mlp_sqnorm", steps)
                return (lambda x, idx, scale=1.0: run(x, draw(rows(x, idx)), idx, root, scale)), True
            training = self.model.training

            def compute(x, idx):
                out, est = mlp_model.dual_forward(steps, x, draw(rows(x, idx)), index=idx, training=training,
                                                  backend=path, generator=None, checked=True)
                return out, finish(est)

            return compute, False
        model, estimator, probes = self.model, self.estimator, self.probes

        def compute(x, idx):
            kw = dict(estimator=estimator, num_probes=K, probes=probes, generator=generator, backend="auto",
                      create_graph=True)
            if idx is None:
                out, est = sq_norm_estimate(model, x, **kw)
                return out, finish(est)
            # Output on the whole batch; penalty on the random subset (an extra, smaller forward).
            out = model(x)
            _, est = sq_norm_estimate(model, x.index_select(0, idx), **kw)
            return out, finish(est)

        return compute, False

    def _choose_path(self, x: torch.Tensor) -> str:
        """"cpp" (fused forward-mode MLP ops, or the one-pass output-space op for the reverse
        estimator), "triton" (fused forward-mode MLP kernels), "reverse_mlp" (one-pass
        output-space MLP in Python) or "reference" (autograd / torch.func)."""
        if self.backend == "reference":
            return "reference"
        reasons = self.fused_unavailable_reasons(x)
        if self.backend == "auto":
            for name in ("cpp", "triton", "reverse_mlp"):
                if reasons[name] is None and not (name == "triton" and _backends.triton_interpreted()):
                    return name
            return "reference"
        if reasons[self.backend] is not None:
            raise _backends.BackendUnavailableError(
                f"backend={self.backend!r} cannot run this model: {reasons[self.backend]}"
            )
        return self.backend
