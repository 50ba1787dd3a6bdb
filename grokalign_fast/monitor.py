r"""GrokMonitor: centroid-alignment monitoring for any training loop.

::

    monitor = GrokMonitor(model, x_probe, every=100)
    for step in range(steps):
        ...                                   # your training step
        monitor(step, train_acc=acc)          # logs every 100 steps; extra values are stored too
        if monitor.phase == "plateau":
            break                             # more training is unlikely to help
    monitor.to_csv("monitor.csv")

Every ``every`` steps it measures, on a fixed probe batch of at most ``max_probe``
points (the first rows of ``x_probe``), with the model in eval mode and no
parameter gradients (the cost is bounded and does not grow with training):

- ``centroid_alignment``: mean of ``cos(x, c(x))`` with ``c(x) = J(x)^T 1``;
- ``centroid_norm``: mean ``||c(x)||``; ``centroid_inner_product``: mean ``<x, c(x)>``;
- ``jacobian_norm``: mean ``||J(x)||_F``;
- ``pc1`` (``s_1^2 / sum_i s_i^2``) and ``effective_rank`` of the Jacobian, from
  its singular values (``rank=True``, the default: the exact Jacobian by C
  vector-Jacobian products, C the number of outputs; with ``rank=False``
  one VJP for the centroid and ``jacobian_probes`` output-space probes for the
  norm, and no rank);
- ``phase``: the training phase read from the alignment trend (below);
- ``monitor_seconds``: the wall time of this measurement;
- anything passed as keyword arguments to :meth:`step` (e.g. accuracies).

The phase rule (``phase_from_alignment``), from the logged alignments
``a_0, ..., a_t``:

1. the *rise* is the least-squares slope of the last ``window`` alignments
   times the window's span in records (the trend's change across the window);
2. ``"aligning"`` if rise > ``rise_tol`` (alignment is still increasing);
3. otherwise ``"plateau"`` if the alignment has already risen by at least
   ``min_gain`` from an earlier low (``max_i (a_i - min_{j <= i} a_j) >= min_gain``;
   the lowest point, not the first record, because a large init can start
   with some alignment that training first destroys): it rose and has stopped
   rising, so more training is unlikely to help;
4. otherwise ``"memorising"``: the alignment has not moved (the network fits
   the training data without aligning; the paper's first phase). With fewer
   than two records the phase is ``"memorising"``.

The first ``ignore_first`` records (default 1: the record at step 0, a random
network whose alignment, +-0.1 or so for a large init, the first steps reset)
are logged but left out of the rule. The defaults (window 5, rise_tol 0.01,
min_gain 0.05) are in units of the cosine, with ``every`` chosen so a window
spans a few percent of the run.
"""
from __future__ import annotations

import csv
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .centroids import centroid, cosine
from .jacobian import jacobian, jacobian_norm
from .metrics import effective_rank_from_singular_values, pc1_from_singular_values

PHASES = ("memorising", "aligning", "plateau")


def _rise(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` (per record) times ``len(values) - 1``."""
    n = len(values)
    if n < 2:
        return 0.0
    xm = (n - 1) / 2.0
    ym = sum(values) / n
    num = sum((i - xm) * (v - ym) for i, v in enumerate(values))
    den = sum((i - xm) ** 2 for i in range(n))
    return num / den * (n - 1)


def _gain(values: Sequence[float]) -> float:
    """The largest rise from a running minimum: ``max_i (a_i - min_{j <= i} a_j)``."""
    best, low = 0.0, float("inf")
    for v in values:
        low = min(low, v)
        best = max(best, v - low)
    return best


def phase_from_alignment(
    alignments: Sequence[float], *, window: int = 5, rise_tol: float = 0.01, min_gain: float = 0.05
) -> str:
    """The phase named by the alignment history ``alignments`` (oldest first); see the module doc."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    a = [float(v) for v in alignments]
    if len(a) < 2:
        return "memorising"
    if _rise(a[-window:]) > rise_tol:
        return "aligning"
    if _gain(a) >= min_gain:
        return "plateau"
    return "memorising"


class GrokMonitor:
    """Log centroid alignment, Jacobian norm and rank of ``model`` every ``every`` steps.

    Args:
        model: the network (``nn.Module``: switched to eval mode while measuring,
            then restored) or any callable ``[B, ...] -> [B, ...]``.
        x_probe: ``[N, ...]`` fixed probe inputs (e.g. a few training points);
            only the first ``max_probe`` rows are used.
        every: log when ``step % every == 0``.
        f: the function whose Jacobian is measured, if not ``model`` itself
            (e.g. a transformer body taking embeddings).
        max_probe: at most this many probe points.
        rank: compute PC1 / effective rank from the exact Jacobian (C VJPs).
        jacobian_probes: output-space probes for the norm when ``rank=False``.
        window, rise_tol, min_gain, ignore_first: the phase rule (see the module doc).

    Attributes: ``history`` (list of dicts, one per logged step), ``phase``
    (the latest phase, or None before the first log), ``total_seconds``.
    """

    def __init__(
        self,
        model: Callable,
        x_probe: torch.Tensor,
        every: int = 100,
        *,
        f: Optional[Callable] = None,
        max_probe: int = 64,
        rank: bool = True,
        jacobian_probes: int = 4,
        window: int = 5,
        rise_tol: float = 0.01,
        min_gain: float = 0.05,
        ignore_first: int = 1,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not isinstance(x_probe, torch.Tensor) or x_probe.dim() < 2 or len(x_probe) == 0:
            raise ValueError("x_probe must be a nonempty tensor [N, ...] of probe inputs")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if max_probe < 1:
            raise ValueError(f"max_probe must be >= 1, got {max_probe}")
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.model = model
        self.f = f if f is not None else model
        self.max_probe = int(max_probe)
        self.x_probe = x_probe[:max_probe].detach().clone()
        self.every = every
        self.rank = bool(rank)
        self.jacobian_probes = int(jacobian_probes)
        if isinstance(ignore_first, bool) or not isinstance(ignore_first, int) or ignore_first < 0:
            raise ValueError(f"ignore_first must be an int >= 0, got {ignore_first!r}")
        self.window, self.rise_tol, self.min_gain = int(window), float(rise_tol), float(min_gain)
        self.ignore_first = ignore_first
        self.history: List[Dict] = []
        self.total_seconds = 0.0
        self._gen = torch.Generator(device=self.x_probe.device).manual_seed(0)

    def set_probe(self, x_probe: torch.Tensor) -> None:
        """Replace the probe batch (e.g. the current embeddings of fixed tokens); at most ``max_probe`` rows kept."""
        if not isinstance(x_probe, torch.Tensor) or x_probe.dim() < 2 or len(x_probe) == 0:
            raise ValueError("x_probe must be a nonempty tensor [N, ...] of probe inputs")
        self.x_probe = x_probe[: self.max_probe].detach().clone()

    # ------------------------------------------------------------------ measuring

    def measure(self) -> Dict[str, float]:
        """The metrics at the current parameters (no history, no phase)."""
        model = self.model
        was_training = model.training if isinstance(model, nn.Module) else None
        if was_training:
            model.eval()
        try:
            with torch.no_grad():
                x = self.x_probe
                if self.rank:
                    J = jacobian(self.f, x, create_graph=False)  # [B, C, D]
                    c = J.sum(dim=1).reshape(x.shape)
                    s = torch.linalg.svdvals(J)
                    jn = s.pow(2).sum(dim=-1).sqrt()
                    extra = {
                        "pc1": float(pc1_from_singular_values(s).mean()),
                        "effective_rank": float(effective_rank_from_singular_values(s).mean()),
                    }
                else:
                    c = centroid(self.f, x, create_graph=False)
                    jn = jacobian_norm(self.f, x, estimator="reverse", num_probes=self.jacobian_probes,
                                       reduction="none", generator=self._gen)
                    extra = {}
                xf, cf = x.reshape(len(x), -1), c.reshape(len(x), -1)
                out = {
                    "centroid_alignment": float(cosine(xf, cf).mean()),
                    "centroid_norm": float(cf.norm(dim=1).mean()),
                    "centroid_inner_product": float((xf * cf).sum(dim=1).mean()),
                    "jacobian_norm": float(jn.mean()),
                }
                out.update(extra)
        finally:
            if was_training:
                model.train()
        return out

    def step(self, step: int, *, force: bool = False, **extra) -> Optional[Dict]:
        """Log at ``step`` if ``step % every == 0`` (or ``force``); returns the record or None."""
        if not force and step % self.every != 0:
            return None
        t0 = time.perf_counter()
        rec: Dict = {"step": int(step)}
        rec.update(self.measure())
        alignments = [r["centroid_alignment"] for r in self.history] + [rec["centroid_alignment"]]
        rec["phase"] = phase_from_alignment(alignments[self.ignore_first:], window=self.window, rise_tol=self.rise_tol,
                                            min_gain=self.min_gain)
        rec["monitor_seconds"] = time.perf_counter() - t0
        self.total_seconds += rec["monitor_seconds"]
        for k, v in extra.items():
            rec[k] = float(v) if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool) else v
        self.history.append(rec)
        return rec

    __call__ = step

    @property
    def phase(self) -> Optional[str]:
        return self.history[-1]["phase"] if self.history else None

    def column(self, key: str) -> List:
        return [r.get(key) for r in self.history]

    def to_csv(self, path: str) -> str:
        keys: List[str] = []
        for r in self.history:
            for k in r:
                if k not in keys:
                    keys.append(k)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in self.history:
                w.writerow(r)
        return path
