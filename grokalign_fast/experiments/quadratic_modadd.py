"""quadratic-modadd: modular addition with a one-hidden-layer quadratic network (Gromov 2023), one of
the authors' newer benchmarks.

Data: every pair ``(a, b)`` of ``Z_p``; input the one-hot codes of ``a`` and ``b`` side by side
(``2p``), label ``(a + b) mod p``; a random split (``train_frac`` of the pairs for training, fixed by
``split_seed``). Model: ``W2 (W1 x)^2`` (no biases), width ``width``; MSE against the one-hot label;
full batch; AdamW. "Grokked" = train accuracy > 99% and test accuracy > 90%, checked every
``eval_every`` steps.

Methods: ``baseline`` (weight decay only); ``grokalign`` (``GrokAlign(model, lam,
estimator="forward")``: one input-space probe on the dual-stream engine, one pass; the network is
no MLP chain, so the output-space estimator would run the reference's double backward);
``grokalign-offset`` (``offset=lam``, forward estimator: for this network,
homogeneous of degree 2, ``f(x) = J x / 2``, so the offset ``f - J x = -f`` and the offset term
penalises the output's norm); ``grokfast`` (EMA alpha 0.8, lambda 0.1); ``orthograd`` (AdamW in
:class:`grokalign_fast.optim.OrthoGrad`).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import common, summary, train
from ..optim import OrthoGrad
from ..regularizer import GrokAlign

NAME = "quadratic-modadd"
HELP = "modular addition with a quadratic one-hidden-layer network: GrokAlign, its offset form, Grokfast, OrthoGrad"
METHODS = ("baseline", "grokalign", "grokalign-offset", "grokfast", "orthograd")


@dataclass
class Config:
    p: int = 97
    width: int = 512
    train_frac: float = 0.3
    split_seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.1
    lam: float = 1e-3
    max_steps: int = 5000
    eval_every: int = 25
    train_level: float = 0.99
    test_level: float = 0.90


QUICK = dict(p=11, width=32, max_steps=40, eval_every=10)


class QuadraticNet(nn.Module):
    """``x -> W2 (W1 x)^2``: one hidden layer with the square activation, no biases."""

    def __init__(self, inputs: int, width: int, outputs: int):
        super().__init__()
        self.hidden = nn.Linear(inputs, width, bias=False)
        self.out = nn.Linear(width, outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x).square())


def pairs(cfg: Config):
    """``(x_train, y_train, x_test, y_test)``: one-hot pairs ``[N, 2p]`` and labels ``(a + b) mod p``."""
    p = cfg.p
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(cfg.split_seed))
    n = int(round(cfg.train_frac * p * p))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def run_one(cfg: Config, method: str, seed: int) -> Dict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    xtr, ytr, xte, yte = pairs(cfg)
    common.seed_everything(seed)
    model = QuadraticNet(2 * cfg.p, cfg.width, cfg.p)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt = OrthoGrad(model.parameters(), torch.optim.AdamW, **kw) if method == "orthograd" else \
        torch.optim.AdamW(model.parameters(), **kw)
    gen = torch.Generator().manual_seed(10_000 + seed)
    reg = {
        "grokalign": lambda: GrokAlign(model, cfg.lam, estimator="forward", generator=gen),
        "grokalign-offset": lambda: GrokAlign(model, cfg.lam, offset=cfg.lam, estimator="forward", generator=gen),
    }.get(method, lambda: None)()
    gf = common.Grokfast(model, 0.8, 0.1) if method == "grokfast" else None

    def loss(out, y):
        return F.mse_loss(out, F.one_hot(y, cfg.p).to(out.dtype))

    def evaluate(run: train.Run) -> Dict:
        return dict(train_acc=common.accuracy(model, xtr, ytr), test_acc=common.accuracy(model, xte, yte),
                    seconds=run.seconds, cpu_seconds=run.cpu_seconds)

    run = train.train(model, opt, xtr, ytr, loss, steps=cfg.max_steps, eval_every=cfg.eval_every,
                      evaluate=evaluate, regularizer=reg, grokfast=gf, log_start=False,
                      stop=lambda row: row["train_acc"] > cfg.train_level and row["test_acc"] > cfg.test_level)
    return train.grok_record(run, method, seed, cfg.train_level, backend=getattr(reg, "last_backend", None))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--max-steps", dest="max_steps", type=int, default=None)
    p.add_argument("--p", type=int, default=None, help="the modulus (default 97)")


def main(args) -> Dict:
    t0 = time.perf_counter()
    cfg = common.config_from_args(Config, QUICK, args, ("max_steps", "p"))
    return summary.compare_methods(NAME, args, cfg, t0, METHODS, run_one, unit="steps", plot_title=f"quadratic modadd p={cfg.p}",
                                   title=f"{NAME}: p={cfg.p}, width {cfg.width}, {cfg.train_frac:.0%} of the pairs, "
                                         f"cap {cfg.max_steps} steps ('not grokked' = capped)")
