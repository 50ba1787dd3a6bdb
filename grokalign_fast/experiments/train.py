"""The experiments' training loop: batches, optimiser step, GrokAlign / Grokfast / input-noise hooks,
evaluation schedule with an early stop, training-step timing, GrokMonitor and a progress bar.

An experiment supplies the model, the optimiser, the data and an ``evaluate`` callback; :func:`train`
runs the steps and returns a :class:`Run` (the log, the step count, the timing)::

    run = train(model, opt, x, y, F.cross_entropy, steps=1000, eval_every=50,
                evaluate=lambda run: dict(test_acc=accuracy(model, x_test, y_test)),
                regularizer=GrokAlign(model, 1e-3), batches=random_batches(len(x), 100, gen))

One training step (the only code the clock times) is
``xb = embed(x[idx]); xb = noise(xb); out, pen = regularizer(xb)`` (or ``forward(xb), None``);
``loss(out, y[idx]) + pen``; ``zero_grad``; ``backward``; ``grokfast.apply()``; ``optimizer.step()``.
The batch indices are drawn before it, evaluation and monitoring after it, untimed.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from . import common
from ..monitor import GrokMonitor


class Stopwatch:
    """Accumulates wall (perf_counter) and CPU (thread_time) seconds over ``with sw:`` blocks."""

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.thread_time() - self._c
        return False


class InputNoise:
    """Gaussian input noise of size ``sigma = max(scale * (1 - train_acc), floor)``.

    ``train_acc`` is the training accuracy of the latest logged evaluation (0 before the first; :func:`train`
    sets it); ``sigma`` is the size used by the latest call (None before the first).
    """

    def __init__(self, scale: float, floor: float, generator: torch.Generator):
        self.scale, self.floor, self.generator = float(scale), float(floor), generator
        self.train_acc = 0.0
        self.sigma: Optional[float] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sigma = max(self.scale * (1.0 - self.train_acc), self.floor)
        return x + self.sigma * torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


def shuffled_batches(n: int, batch: int, generator: torch.Generator) -> Callable[[int], torch.Tensor]:
    """Batch indices for step ``s``: epochs of ``max(1, n // batch)`` batches, each epoch a fresh permutation
    of ``range(n)`` (a remainder of fewer than ``batch`` samples is left out of that epoch)."""
    per_epoch = max(1, n // batch)
    perm = torch.empty(0, dtype=torch.long)

    def indices(step: int) -> torch.Tensor:
        nonlocal perm
        k = step % per_epoch
        if k == 0:
            perm = torch.randperm(n, generator=generator)
        return perm[k * batch: (k + 1) * batch]

    return indices


def random_batches(n: int, batch: int, generator: torch.Generator) -> Callable[[int], torch.Tensor]:
    """Batch indices for any step: ``batch`` indices drawn uniformly from ``range(n)`` with replacement."""
    return lambda step: torch.randint(0, n, (batch,), generator=generator)


def first_row(log: Sequence[Dict], key: str, level: float) -> Optional[Dict]:
    """The first row of ``log`` with ``row[key] >= level``; None if there is none."""
    return next((row for row in log if row[key] >= level), None)


def first_step(log: Sequence[Dict], key: str, level: float) -> Optional[int]:
    """The step of :func:`first_row`; None if there is none."""
    row = first_row(log, key, level)
    return row["step"] if row is not None else None


class Run:
    """The state of :func:`train`, handed to ``evaluate`` and returned at the end.

    Attributes: ``step`` (training steps taken), ``log`` (the logged evaluation rows),
    ``stopped`` (the stop condition held at the last evaluation), ``clock`` (the :class:`Stopwatch`
    of the training steps).
    """

    def __init__(self):
        self.step = 0
        self.log: List[Dict] = []
        self.stopped = False
        self.clock = Stopwatch()
        self._loss: Optional[torch.Tensor] = None
        self._penalty: Optional[torch.Tensor] = None
        self._penalty_norm: Optional[torch.Tensor] = None

    @property
    def seconds(self) -> float:
        """Wall seconds of the training steps so far."""
        return self.clock.wall

    @property
    def cpu_seconds(self) -> float:
        """CPU (thread) seconds of the training steps so far."""
        return self.clock.cpu

    @property
    def loss(self) -> float:
        """The task loss (without the penalty) of the latest step; nan before the first."""
        return float(self._loss.detach()) if self._loss is not None else math.nan

    @property
    def penalty(self) -> float:
        """The weighted penalty of the latest step that computed one; nan before any."""
        return float(self._penalty) if self._penalty is not None else math.nan

    @property
    def penalty_norm(self) -> float:
        """The regulariser's ``last_norm`` at that step; nan before any."""
        return float(self._penalty_norm) if self._penalty_norm is not None else math.nan


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    steps: int,
    eval_every,
    evaluate: Callable[[Run], Dict],
    batches: Optional[Callable[[int], torch.Tensor]] = None,
    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    regularizer: Optional[Callable] = None,
    grokfast: Optional[common.Grokfast] = None,
    noise: Optional[InputNoise] = None,
    stop: Optional[Callable[[Dict], bool]] = None,
    log_start: bool = True,
    monitor: Optional[GrokMonitor] = None,
    monitor_every: Optional[int] = None,
    monitor_extra: Sequence[str] = (),
    monitor_columns: Optional[Mapping[str, str]] = None,
    progress: Optional[str] = None,
) -> Run:
    """Train ``model`` for up to ``steps`` steps; returns the :class:`Run`.

    Args:
        model: the network; in eval mode during evaluations, its mode restored after.
        optimizer: steps the parameters.
        x, y: the training inputs and the targets ``loss`` compares the output with.
        loss: ``loss(out, y_batch) -> scalar`` (the task loss, without the penalty).
        steps: the step cap.
        eval_every: evaluate after every ``eval_every``-th step (or, a callable, after each step for
            which ``eval_every(step)`` is true) and after the last; also at step 0.
        evaluate: ``evaluate(run) -> dict``, the row for ``run.step`` (``step`` is put first by the loop).
        batches: ``batches(step) -> indices`` of the step's batch; None: the full batch every step.
        forward: the function trained when there is no regularizer (default: ``model``).
        embed: applied to the batch inputs inside the step (e.g. a token embedding), before ``noise``.
        regularizer: ``regularizer(xb) -> (out, penalty)`` (a :class:`~grokalign_fast.GrokAlign`);
            its latest computed penalty and ``last_norm`` are kept for ``run.penalty`` / ``run.penalty_norm``.
        grokfast: a :class:`common.Grokfast` filter applied between backward and the optimiser step.
        noise: an :class:`InputNoise` added to the inputs; fed each logged row's ``train_acc``.
        stop: ``stop(row) -> bool`` on each logged row; the run ends at the first True.
        log_start: log the step-0 evaluation; if False it only feeds the monitor (no log row,
            no stop test, no noise update).
        monitor: a GrokMonitor called (forced) at evaluations: every one if ``monitor_every`` is None,
            else at steps that are multiples of ``monitor_every`` and at the stop.
        monitor_extra: row keys passed to the monitor as extra values.
        monitor_columns: ``{row key: monitor record key}`` copied from the record into the row.
        progress: a tqdm bar with this description (total ``steps``), updated at each logged row.
    """
    if steps < 0 or (not callable(eval_every) and eval_every < 1):
        raise ValueError(f"need steps >= 0 and eval_every >= 1, got steps={steps}, eval_every={eval_every}")
    due = eval_every if callable(eval_every) else (lambda step: step % eval_every == 0)
    forward = forward if forward is not None else model
    columns = dict(monitor_columns or {})
    run = Run()
    bar = common.tqdm_bar(total=steps, desc=progress, leave=False) if progress is not None else None

    def checkpoint() -> None:
        logged = log_start or run.step > 0
        was_training = model.training
        model.eval()
        try:
            row = {"step": run.step, **evaluate(run)}
            if logged and stop is not None:
                run.stopped = bool(stop(row))
            if monitor is not None and (monitor_every is None or run.step % monitor_every == 0 or run.stopped):
                rec = monitor(run.step, force=True, **{k: row[k] for k in monitor_extra})
                row.update({k: rec[v] for k, v in columns.items()})
        finally:
            model.train(was_training)
        if not logged:
            return
        run.log.append(row)
        if noise is not None:
            noise.train_acc = row["train_acc"]
        if bar is not None:
            bar.update(run.step - bar.n)
            bar.set_postfix({name: f"{row[k]:.3f}" for k, name in (("train_acc", "train"), ("test_acc", "test"))
                             if k in row})

    try:
        checkpoint()
        while run.step < steps and not run.stopped:
            idx = batches(run.step) if batches is not None else None
            with run.clock:
                xb = x if idx is None else x[idx]
                if embed is not None:
                    xb = embed(xb)
                if noise is not None:
                    xb = noise(xb)
                out, pen = regularizer(xb) if regularizer is not None else (forward(xb), None)
                task = loss(out, y if idx is None else y[idx])
                total = task + pen if pen is not None else task
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if grokfast is not None:
                    grokfast.apply()
                optimizer.step()
            run.step += 1
            run._loss = task
            if regularizer is not None and regularizer.last_norm is not None:
                run._penalty, run._penalty_norm = pen.detach(), regularizer.last_norm  # read at evaluation
            if due(run.step) or run.step == steps:
                checkpoint()
    finally:
        if bar is not None:
            bar.close()
    return run


def grok_record(run: "Run", method: str, seed: int, train_level: float, **extra) -> Dict:
    """The record of a run that stops once grokked (``stop=`` of :func:`train`): the grokked step and
    seconds (None when capped), the memorisation step (train accuracy above ``train_level``), the
    phase between the two, the final accuracies, the log, and ``extra``."""
    grokked = run.stopped
    mem = first_row(run.log, "train_acc", train_level)
    return dict(method=method, seed=seed, grokked=grokked, steps_run=run.step, log=run.log,
                grok_step=run.step if grokked else None, grok_seconds=run.seconds if grokked else None,
                grok_cpu_seconds=run.cpu_seconds if grokked else None,
                mem_step=mem["step"] if mem is not None else None,
                phase_steps=(max(0, run.step - mem["step"]) if mem is not None else 0) if grokked else None,
                phase_seconds=(max(0.0, run.seconds - mem["seconds"]) if mem is not None else 0.0) if grokked else None,
                final_train_acc=run.log[-1]["train_acc"] if run.log else None,
                final_test_acc=run.log[-1]["test_acc"] if run.log else None, **extra)
