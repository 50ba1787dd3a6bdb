"""Shared pieces of the experiments: the scalar two-layer net, accuracy, the Grokfast filter, seeding, CSV/JSON output."""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..models import scale_


def setup_torch(threads: int = 1) -> None:
    """One intra-op thread per process (the experiments run seeds in parallel processes instead)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def out_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def config_from_args(cls, quick: Dict, args, names: Sequence[str]):
    """``cls()`` (``cls(**quick)`` under ``--quick``), then each ``args.<name>`` that is not None."""
    cfg = cls(**quick) if args.quick else cls()
    for name in names:
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    return cfg


def run_each(desc: str, fn: Callable[..., Dict], tasks: Sequence[Sequence]) -> List[Dict]:
    """``[fn(*task) for task in tasks]``, with a progress bar over the runs."""
    runs = []
    bar = tqdm_bar(total=len(tasks), desc=desc, unit="run")
    try:
        for task in tasks:
            runs.append(fn(*task))
            bar.update(1)
    finally:
        bar.close()
    return runs


# ------------------------------------------------------------------ models


class ScalarTwoLayer(nn.Module):
    """``f(x) = a^T relu(W x)``: the two-layer scalar-output ReLU net of the paper (no bias). Output ``[B]``."""

    def __init__(self, d_in: int, width: int, *, init_scale: float = 1.0):
        super().__init__()
        self.hidden = nn.Linear(d_in, width, bias=False)
        self.out = nn.Linear(width, 1, bias=False)
        scale_(self, init_scale)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x))).squeeze(-1)


def weight_norm(model: nn.Module) -> float:
    with torch.no_grad():
        return float(torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters())))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Classification accuracy; a scalar output ``[B]`` is read as the sign of a +-1 label."""
    correct = 0
    for i in range(0, len(x), batch):
        out = model(x[i: i + batch])
        if out.dim() == 1:
            correct += int((torch.sign(out) == y[i: i + batch]).sum())
        else:
            correct += int((out.argmax(dim=1) == y[i: i + batch]).sum())
    return correct / max(1, len(x))


class Grokfast:
    """Grokfast-EMA (Lee et al. 2024): after ``backward()``, ``ema = a*ema + (1-a)*g; g += l*ema``.

    Call :meth:`apply` between ``loss.backward()`` and ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module, alpha: float = 0.8, lamb: float = 0.1):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.alpha, self.lamb = float(alpha), float(lamb)
        self.ema: Optional[List[torch.Tensor]] = None

    @torch.no_grad()
    def apply(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if len(grads) != len(self.params):
            return
        if self.ema is None:
            self.ema = [g.detach().clone() for g in grads]
        else:
            torch._foreach_mul_(self.ema, self.alpha)
            torch._foreach_add_(self.ema, grads, alpha=1.0 - self.alpha)
        torch._foreach_add_(grads, self.ema, alpha=self.lamb)


# ------------------------------------------------------------------ output


def write_csv(path: str, rows: Iterable[Dict], fieldnames: Optional[Sequence[str]] = None) -> str:
    rows = list(rows)
    if fieldnames is None:
        fieldnames = []
        for r in rows:
            for k in r:
                if k not in fieldnames:
                    fieldnames.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fieldnames})
    return path


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json(path: str, obj) -> str:
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")
    return path


def log_rows(runs: Sequence[Dict], key: str = "log", ids: Sequence[str] = ("method", "seed")) -> List[Dict]:
    """Every row of every ``run[key]``, prefixed with the run's ``ids`` (one CSV of all runs)."""
    return [dict({k: r[k] for k in ids}, **row) for r in runs for row in r[key]]


def finish(name: str, out: str, args, cfg, t0: float, files: Sequence[str], **fields) -> Dict:
    """Write ``out/summary.json`` (experiment, quick, config, ``fields``, wall_seconds since ``t0``) and say what
    was written (``summary.json`` and ``files``); returns the summary."""
    result = dict(experiment=name, quick=bool(args.quick), config=asdict(cfg), **fields,
                  wall_seconds=time.perf_counter() - t0)
    write_json(os.path.join(out, "summary.json"), result)
    print(f"[{name}] wrote {out}/summary.json, {', '.join(files)}", flush=True)
    return result


def mean_std(values: Sequence[float]):
    """Mean and sample std (ddof=1; 0 for one value) of the non-None values; (None, None) if none."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def print_table(headers: Sequence[str], rows: Sequence[Sequence], title: Optional[str] = None) -> str:
    """Print (and return) a plain-text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(cells[0], widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def tqdm_bar(**kw):
    """tqdm progress bar (stderr); disabled with GROKALIGN_NO_TQDM=1."""
    from tqdm.auto import tqdm

    kw.setdefault("disable", os.environ.get("GROKALIGN_NO_TQDM", "0") == "1")
    kw.setdefault("dynamic_ncols", True)
    return tqdm(**kw)
