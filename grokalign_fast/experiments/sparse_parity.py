"""sparse-parity: the authors' newer benchmark, GrokAlign against its offset form computed their way.

Data: 3 parity bits and 40 noise bits in {0, 1}; label = the parity of the first 3; 2000 distinct
samples, a random 50/50 split. Model and training (PAPER.md, "The authors' newer penalty"): MLP
43-200-200-2, ReLU, with biases; full batch; AdamW lr 1e-2, betas (0.9, 0.99), eps 1e-25,
weight decay 0.1; cross-entropy; float32; up to 20000 epochs (one step each). "Grokked" = train
accuracy > 99% and test accuracy > 90%, checked every epoch below 100, every 10 below 1000, every
100 after.

Methods:
- ``baseline``: weight decay only;
- ``grokalign``: ``GrokAlign(model, 0.1)`` (the library's defaults: one output-space probe);
- ``grokalign-offset``: the authors' joint penalty computed the library's way,
  ``GrokAlign(model, 0.1, offset=0.1, estimator="forward")`` (``lambda (E ||J||_F + E ||f(x) - J x||^2)``):
  the probe's tangent and ``J x`` ride one dual-stream pass;
- ``grokalign-authors``: the same penalty computed as the authors' code computes it
  (:class:`AuthorsPenalty`: ``J x`` by ``torch.autograd.functional.jvp`` with ``create_graph``,
  ``||J||_F`` from one unit Gaussian output probe through a ``create_graph`` VJP times
  ``sqrt(C)``, per sample ``sqrt(max(., 1e-8))``);
- ``grokfast`` (EMA alpha 0.8, lambda 0.1) and ``orthograd`` (AdamW in
  :class:`grokalign_fast.optim.OrthoGrad`).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import common, summary, train
from .. import models
from ..optim import OrthoGrad
from ..regularizer import GrokAlign

NAME = "sparse-parity"
HELP = "sparse parity (3 of 43 bits): GrokAlign vs its offset form, the authors' way, Grokfast, OrthoGrad"
METHODS = ("baseline", "grokalign", "grokalign-offset", "grokalign-authors", "grokfast", "orthograd")


@dataclass
class Config:
    parity_bits: int = 3
    noise_bits: int = 40
    n_samples: int = 2000
    train_frac: float = 0.5
    hidden: tuple = (200, 200)
    lr: float = 1e-2
    weight_decay: float = 0.1
    lam: float = 0.1
    max_epochs: int = 20000
    train_level: float = 0.99
    test_level: float = 0.90


QUICK = dict(n_samples=200, hidden=(32, 32), max_epochs=30)


def parity_data(cfg: Config, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: distinct random bit vectors, label = parity of the first bits."""
    g = torch.Generator().manual_seed(seed)
    bits = cfg.parity_bits + cfg.noise_bits
    if cfg.n_samples > 2 ** min(bits, 62):
        raise ValueError(f"n_samples={cfg.n_samples} distinct samples need more than {bits} bits")
    seen, rows = set(), []
    while len(rows) < cfg.n_samples:
        v = torch.randint(0, 2, (bits,), generator=g)
        key = tuple(v.tolist())
        if key not in seen:
            seen.add(key)
            rows.append(v)
    x = torch.stack(rows).float()
    y = x[:, : cfg.parity_bits].sum(1).long() % 2
    perm = torch.randperm(cfg.n_samples, generator=g)
    n = int(cfg.train_frac * cfg.n_samples)
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def evaluation_due(step: int) -> bool:
    """Every epoch below 100, every 10 below 1000, every 100 after."""
    return step < 100 or (step < 1000 and step % 10 == 0) or step % 100 == 0


class AuthorsPenalty(nn.Module):
    """The authors' joint penalty, their way: ``lam * (mean_b sqrt(max(C ||J_b^T v_b||^2, 1e-8)) + mean_b
    ||f(x_b) - J_b x_b||^2)`` with ``J x`` from ``torch.autograd.functional.jvp(model, x, x,
    create_graph=True)`` and ``v_b`` a unit Gaussian output vector through a ``create_graph`` VJP.
    ``(out, penalty) = penalty(x)``; ``last_norm`` as :class:`~grokalign_fast.GrokAlign` has it."""

    def __init__(self, model: nn.Module, lam: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.model, self.lam, self.generator = model, lam, generator
        self.last_norm: Optional[torch.Tensor] = None

    def forward(self, x):
        out, jx = torch.autograd.functional.jvp(self.model, x, x, create_graph=True)
        xg = x.detach().requires_grad_(True)
        out2 = self.model(xg)
        v = torch.randn(out2.shape, generator=self.generator, dtype=out2.dtype)
        v = v / v.norm(dim=1, keepdim=True)
        (g,) = torch.autograd.grad(out2, xg, v, create_graph=True)
        norm = torch.sqrt(torch.clamp(out2.shape[1] * g.pow(2).sum(1), min=1e-8)).mean()
        offset = (out - jx).pow(2).sum(1).mean()
        self.last_norm = norm.detach()
        return out, self.lam * (norm + offset)


def run_one(cfg: Config, method: str, seed: int) -> Dict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    xtr, ytr, xte, yte = parity_data(cfg, seed=0)
    common.seed_everything(seed)
    model = models.mlp((xtr.shape[1],) + tuple(cfg.hidden) + (2,), bias=True)
    kw = dict(lr=cfg.lr, betas=(0.9, 0.99), eps=1e-25, weight_decay=cfg.weight_decay)
    opt = OrthoGrad(model.parameters(), torch.optim.AdamW, **kw) if method == "orthograd" else \
        torch.optim.AdamW(model.parameters(), **kw)
    gen = torch.Generator().manual_seed(10_000 + seed)
    reg = {
        "grokalign": lambda: GrokAlign(model, cfg.lam, generator=gen),
        "grokalign-offset": lambda: GrokAlign(model, cfg.lam, offset=cfg.lam, estimator="forward", generator=gen),
        "grokalign-authors": lambda: AuthorsPenalty(model, cfg.lam, generator=gen),
    }.get(method, lambda: None)()
    gf = common.Grokfast(model, 0.8, 0.1) if method == "grokfast" else None

    def evaluate(run: train.Run) -> Dict:
        return dict(train_acc=common.accuracy(model, xtr, ytr), test_acc=common.accuracy(model, xte, yte),
                    seconds=run.seconds, cpu_seconds=run.cpu_seconds)

    run = train.train(model, opt, xtr, ytr, F.cross_entropy, steps=cfg.max_epochs, eval_every=evaluation_due,
                      evaluate=evaluate, regularizer=reg, grokfast=gf, log_start=False,
                      stop=lambda row: row["train_acc"] > cfg.train_level and row["test_acc"] > cfg.test_level)
    return train.grok_record(run, method, seed, cfg.train_level)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--max-epochs", dest="max_epochs", type=int, default=None)


def main(args) -> Dict:
    t0 = time.perf_counter()
    cfg = common.config_from_args(Config, QUICK, args, ("max_epochs",))
    return summary.compare_methods(NAME, args, cfg, t0, METHODS, run_one, unit="epochs", plot_title="sparse parity",
                                   title=f"{NAME}: {cfg.parity_bits} parity + {cfg.noise_bits} noise bits, "
                                         f"{cfg.n_samples} samples, cap {cfg.max_epochs} epochs ('not grokked' = capped)")
