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
from typing import Optional, Tuple

import torch
from torch import nn

from ._shard import RowShard
from ._validation import check_batch_input, check_choice, check_finite, check_generator, check_nonnegative_number, \
    check_num_probes
from .dual import plan as planning
from .dual.embedding import is_token_input
from .jacobian import ESTIMATORS
from .probes import PROBES


def _check_input(x) -> None:
    """A floating-point batch ``[B, ...]``, or integer tokens ``[B, ...]`` (the Jacobian is then taken
    at their embedding, :mod:`grokalign_fast.dual.embedding`)."""
    if is_token_input(x):
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch of tokens [B, ...], got shape {list(x.shape)}")
        return
    check_batch_input(x)


class GrokAlign(nn.Module):
    """Wrap ``model`` so one call returns ``(model(x), penalty)``.

    Args:
        model: maps ``[B, ...]`` to ``[B, ...]`` with samples independent. For integer tokens the
            Jacobian is taken at their (first) embedding lookup. BatchNorm in train mode
            and dropout are taken per sample, with the batch's statistics and masks held constant
            (:mod:`grokalign_fast.dual.rules.norm`).
        weight: lambda >= 0 (the paper: 1e-4 for MSE, 1e-3 for cross-entropy).
        estimator: ``"reverse"`` (default; output-space probes, VJPs reusing the forward),
            ``"forward"`` (input-space Hutchinson, JVPs: the dual-stream path for any model),
            ``"exact"``, or ``"auto"``: reverse when the model has no more outputs than inputs,
            else forward (the lower-variance choice at equal cost; resolved at the first training
            call and kept in ``self.estimator``).
        num_probes: probes per sample (k >= 1).
        probes: probe distribution (see :mod:`grokalign_fast.probes`); ``"auto"``: sphere for the
            reverse estimator, Rademacher for the forward one.
        squared: penalise ``||J||_F^2`` (Hoffman et al.) instead of ``||J||_F``.
        target: if given, penalise ``|target - mean ||J||_F|`` instead.
        offset: ``mu >= 0``: add ``mu * mean_b ||f(x_b) - J(x_b) x_b||^2``, the squared offset of the
            local affine map (the authors' newer penalty is ``offset=weight`` with ``squared=False``).
            ``J x`` is one more tangent stream on the dual-stream engine (forward estimator), a
            ``torch.func.jvp`` along ``x`` on the reference path; for a bias-free MLP of
            piecewise-linear activations (ReLU, leaky ReLU) ``f(x) = J x`` and nothing is computed.
            Floating-point inputs only.
        subsample: fraction in (0, 1] of the batch that carries the penalty.
        every: compute the penalty every n-th training call, scaled by n.
        backend: ``"auto"``, ``"reference"``, ``"dual"``, ``"cpp"`` or ``"triton"``
            (:mod:`grokalign_fast.dual.plan` says what each runs: ``"cpp"`` and ``"triton"`` run
            MLP chains as fused ops and any other model on the dual-stream engine with their
            epilogue kernels). ``"auto"`` takes the fastest that can serve (never Triton's CPU
            interpreter); a backend named explicitly raises
            :class:`~grokalign_fast.BackendUnavailableError` with the reason when it cannot.
        generator: ``torch.Generator`` for probes and subsampling.
        check_finite_values: raise ``FloatingPointError`` on a non-finite penalty.
        check_every: how often the finite check reads the penalty on the host. Reading a CUDA
            tensor blocks the host until the device catches up, so a training step does no host
            read: the penalties are summed on the device (a non-finite one makes the sum non-finite)
            and the sum is read at the first computed penalty and then every ``check_every``-th
            one. The error names the steps between two checks; ``check_every=1`` stops at the
            step itself and names its samples. Inside ``torch.compile`` the check is a device-side
            assert on every penalty (``torch._assert_async``: no host read, no graph break).

        distributed: data-parallel training (DDP, FSDP) where each process holds an equal share of
            the batch. ``None`` (default): on when ``torch.distributed`` is initialised with more than
            one process. Every process then draws the probes (and the ``subsample`` rows) of the
            whole batch from the same ``generator`` state (the same seed on every process) and keeps
            its own rows, and weights its penalty so that the processes' average (the gradient
            averaging of DDP and FSDP) is the whole batch's penalty: the gradients equal
            single-process training on the whole batch, whatever the number of processes. With
            ``subsample`` a process can hold no penalty rows in a step (its penalty is 0 then), and
            finding its rows reads their count on the host. ``target`` and ``last_norm`` are per
            process.

    Under ``torch.compile``: ``every`` must be 1 (its Python step counter would be a guard, a
    recompile per step), and probes drawn from an explicit ``generator`` break the graph (dynamo
    does not trace a user's generator): leave ``generator=None`` to draw from the global RNG.

    Attributes after a call: ``last_norm`` (detached mean per-sample norm, or squared norm with
    ``squared=True``, of the last computed penalty; None if no penalty was computed), ``last_offset``
    (detached mean ``||f(x) - J x||^2`` with ``offset > 0``, else None),
    ``last_backend`` (the backend that ran), ``last_plan`` (the :class:`~grokalign_fast.dual.plan.Plan`:
    backend, the reasons the faster ones could not serve, a description).
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
        offset: float = 0.0,
        subsample: Optional[float] = None,
        every: int = 1,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        check_finite_values: bool = True,
        check_every: int = 100,
        distributed: Optional[bool] = None,
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
        self.offset = check_nonnegative_number(offset, "offset")
        if subsample is not None:
            if isinstance(subsample, bool) or not isinstance(subsample, (int, float)) or not (0 < subsample <= 1):
                raise ValueError(f"subsample must be a fraction in (0, 1] or None, got {subsample!r}")
            subsample = float(subsample)
        self.subsample = subsample
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.every = every
        self.backend = planning.check_backend(backend)
        check_generator(generator)
        self.generator = generator
        self.check_finite_values = check_finite_values
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        self.check_every = check_every
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be None (auto), True or False, got {distributed!r}")
        self.distributed = distributed
        self._shard = RowShard(generator)
        self._unchecked: Optional[torch.Tensor] = None  # the penalties summed since the last check
        self._unchecked_count = 0
        self._unchecked_since = 0
        self.step = 0
        self.last_norm: Optional[torch.Tensor] = None
        self.last_offset: Optional[torch.Tensor] = None
        self.last_plan: Optional[planning.Plan] = None
        self._planner: Optional[planning.Planner] = None

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, estimator={self.estimator!r}, num_probes={self.num_probes}, "
            f"probes={self.probes!r}, squared={self.squared}, target={self.target}, offset={self.offset}, "
            f"subsample={self.subsample}, every={self.every}, backend={self.backend!r}"
        )

    def __getstate__(self):
        # A planner holds plans bound to this model's parameters: pickles and deep copies make their own.
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_planner"] = None
        state["last_plan"] = None
        return state

    @property
    def last_backend(self) -> Optional[str]:
        """The backend of the last computed penalty's plan (None before any)."""
        return None if self.last_plan is None else self.last_plan.backend

    def _penalty_active(self) -> bool:
        return self.training and self.weight > 0 and torch.is_grad_enabled()

    def _subsample_index(self, batch: int, device: torch.device) -> Optional[torch.Tensor]:
        if self.subsample is None or self.subsample >= 1.0:
            return None
        m = max(1, int(round(self.subsample * batch)))
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        idx = torch.randperm(batch, generator=self.generator, device=gen_device)[:m]
        return idx if gen_device == device else idx.to(device)

    def _world(self) -> Optional[Tuple[int, int]]:
        """``(rank, world size)`` when the penalty is distributed (see ``distributed``), else None."""
        if self.distributed is False:
            return None
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank(), dist.get_world_size()
        if self.distributed:
            raise RuntimeError("distributed=True needs torch.distributed initialised with more than one process")
        return None

    def _shard_rows(self, batch: int, device: torch.device, rank: int, world: int):
        """This process's penalty rows ``(index or None, rows of the whole batch's penalty)``, with the
        probes' row shard set: the whole batch is ``world * batch`` rows, this process's are
        ``[rank * batch, (rank + 1) * batch)``."""
        total = world * batch
        self._shard.generator = self.generator
        gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
        if self.subsample is None or self.subsample >= 1.0:
            self._shard.set(total, torch.arange(rank * batch, (rank + 1) * batch, device=gen_device))
            return None, total
        m = max(1, int(round(self.subsample * total)))
        chosen = torch.randperm(total, generator=self.generator, device=gen_device)[:m]
        mine = ((chosen >= rank * batch) & (chosen < (rank + 1) * batch)).nonzero()[:, 0]
        self._shard.set(m, mine)
        return (chosen[mine] - rank * batch).to(device), m

    def planner(self, x: torch.Tensor, world: Optional[Tuple[int, int]] = None) -> planning.Planner:
        """The planner for the current settings (a new one when a setting changed since the last call);
        ``world``: :meth:`_world`'s ``(rank, size)`` when the penalty is distributed."""
        if self.estimator == "auto":
            self.estimator = planning.auto_estimator(self.model, x)
        generator = self.generator if world is None else self._shard
        settings = (self.estimator, self.backend, self.num_probes, self.probes, self.squared, id(generator),
                    self.offset > 0)
        planner = self._planner
        if planner is None or planner.settings != settings:
            planner = planning.Planner(self.model, estimator=self.estimator, backend=self.backend,
                                       num_probes=self.num_probes, probes=self.probes, squared=self.squared,
                                       generator=generator, offset=self.offset > 0)
            self._planner = planner
        return planner

    def explain(self, x: torch.Tensor) -> planning.Plan:
        """The plan a training call on ``x`` runs: its backend, a description, and per backend the
        reason it cannot serve (None: it can)."""
        _check_input(x)
        return self.planner(x, self._world()).plan(x)

    def forward(self, x: torch.Tensor):
        if not self._penalty_active():
            self.last_norm = self.last_offset = None
            out = self.model(x)
            return out, out.new_zeros(())
        compiling = torch.compiler.is_compiling()
        if compiling:
            # Inside a compiled graph a Python counter would be a guard (a recompile per step):
            # the schedule's counter stays, so ``every`` must be 1.
            if self.every != 1:
                raise ValueError(f"every={self.every} schedules the penalty by a Python step counter, which "
                                 "torch.compile would recompile for at every step: use every=1 under torch.compile")
            step = self.step
        else:
            step = self.step
            self.step = step + 1
            if step % self.every != 0:
                self.last_norm = self.last_offset = None
                out = self.model(x)
                return out, out.new_zeros(())
        _check_input(x)
        world = self._world()
        plan = self.planner(x, world).plan(x)
        self.last_plan = plan
        factor = self.weight * self.every
        if world is None:
            idx = self._subsample_index(x.shape[0], x.device)
            rows = x.shape[0] if idx is None else idx.shape[0]
        else:
            idx, rows = self._shard_rows(x.shape[0], x.device, *world)
            if idx is not None and idx.numel() == 0:  # none of the penalty's rows are this process's
                self.last_norm = self.last_offset = None
                out = self.model(x)
                return out, out.new_zeros(())
        # Distributed: each process's share of the whole batch's penalty, times the number of
        # processes, so that the gradient averaging over the processes gives the whole batch's.
        share = 1 if world is None else world[1]
        if self.target is None:
            # values[r] = scale * norm[r]: the penalty is their sum (the fused ops apply the scale in
            # their epilogue and backward seed).
            scale = factor * share / rows
            out, values, offset = plan.run(x, idx, scale)
            penalty = values.sum()
            level = penalty.detach() / (scale * values.shape[0])
        else:
            out, values, offset = plan.run(x, idx, 1.0)
            level = values.mean()
            penalty = factor * (level - self.target).abs()
            level = level.detach()
        if offset is not None:
            mean_offset = offset.mean() if world is None else offset.sum() * (share / rows)
            penalty = penalty + (self.offset * self.every) * mean_offset
            self.last_offset = mean_offset.detach()
        else:
            self.last_offset = None
        if self.check_finite_values:
            if compiling:
                # No host read inside a compiled graph: a device-side assert (asynchronous on CUDA).
                torch._assert_async(torch.isfinite(penalty.detach()),
                                    "GrokAlign: the penalty is not finite (rerun eagerly with check_every=1 to name "
                                    "the samples)")
            else:
                self._check_finite(penalty, values, step)
        self.last_norm = level
        return out, penalty

    def _check_finite(self, penalty: torch.Tensor, values: torch.Tensor, step: int) -> None:
        """Sum the penalty on the device; read the sum on the host at the first computed penalty and
        every ``check_every``-th one after it (see the class doc)."""
        detached = penalty.detach()
        if self._unchecked is None:
            self._unchecked, self._unchecked_since = detached, step
        else:
            self._unchecked = self._unchecked + detached
        count = self._unchecked_count
        self._unchecked_count = count + 1
        if count % self.check_every != 0:
            return
        total, since = self._unchecked, self._unchecked_since
        self._unchecked = None
        if math.isfinite(float(total)):
            return
        if not math.isfinite(float(detached)):
            self._raise_nonfinite(values)
        raise FloatingPointError(
            f"the penalty was not finite at a training call between calls {since} and {step} (the finite check "
            f"reads every {self.check_every} penalties); rerun with check_every=1 to stop at that call and name "
            "its samples")

    def _raise_nonfinite(self, values: torch.Tensor) -> None:
        """Raise for a non-finite penalty, naming the samples whose norm is not finite, or the weight
        when every norm is finite and their weighted sum overflows."""
        bad = (~torch.isfinite(values.detach())).nonzero()[:, 0].tolist()
        if not bad:
            raise FloatingPointError(
                f"the penalty overflowed {values.dtype}: every per-sample Jacobian norm is finite but their "
                f"weighted mean is not (weight={self.weight}, every={self.every}); lower the weight or use a "
                "wider dtype"
            )
        if self.weight * self.every <= 1.0 or self.target is not None:
            check_finite(values, "the Jacobian norm of the model at x")
        raise FloatingPointError(
            f"the penalty is not finite in {values.dtype} (samples {bad[:8]}): the Jacobian norm there is not "
            f"finite, or weight * every = {self.weight * self.every:g} makes it overflow; lower the weight or "
            "use a wider dtype"
        )
