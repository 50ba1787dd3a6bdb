"""inhibit: holding the Jacobian norm high prevents generalisation; minimising it brings it (the paper's Fig. 7).

The grok-digits network (MLP 64-200-200-10, ReLU, no bias, weights x8 at init, AdamW
lr 1e-3, weight decay 0.01, batch 200, MSE on one-hot) trained three ways:

- ``grokalign``: ``GrokAlign(model, lam)``, the plain mean Jacobian norm (minimised);
- ``target``: ``GrokAlign(model, lam, target=level)``, the penalty
  ``lam * |level - mean ||J||_F|`` that holds the norm near ``level`` (default: the
  norm at initialisation, measured exactly on the training data);
- ``weight decay``: no penalty (the grok-digits baseline; it groks only after ~40k
  steps, so within this experiment's steps it has not yet).

Logged against steps: train / test accuracy, the exact mean Jacobian norm and the
centroid norm and alignment on 32 training points (``GrokMonitor``).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from . import common, data, plotting, train
from .. import models
from ..jacobian import jacobian_norm
from ..monitor import GrokMonitor
from ..regularizer import GrokAlign

NAME = "inhibit"
HELP = "GrokAlign(target=level) holds the Jacobian norm high and prevents generalisation; plain GrokAlign groks"


@dataclass
class Config:
    lam: float = 0.1
    target_factor: float = 1.0
    steps: int = 8000
    init_scale: float = 8.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch: int = 200
    log_every: int = 250
    threshold: float = 0.89


QUICK = dict(steps=100, log_every=50)
METHODS = ("weight decay", "grokalign", "target")


def run_one(cfg: Config, split: data.Split, seed: int, method: str) -> Dict:
    gen = common.seed_everything(seed)
    xtr, ytr, xte, yte = split.x_train, split.y_train, split.x_test, split.y_test
    model = models.mlp((xtr.shape[1], 200, 200, 10), init_scale=cfg.init_scale)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    level = float(jacobian_norm(model, xtr, estimator="exact").detach()) * cfg.target_factor
    reg = None
    if method == "grokalign":
        reg = GrokAlign(model, cfg.lam, generator=torch.Generator().manual_seed(seed))
    elif method == "target":
        reg = GrokAlign(model, cfg.lam, target=level, generator=torch.Generator().manual_seed(seed))
    monitor = GrokMonitor(model, xtr[:32], every=cfg.log_every, max_probe=32)

    def evaluate(run: train.Run) -> Dict:
        return dict(train_acc=common.accuracy(model, xtr, ytr), test_acc=common.accuracy(model, xte, yte))

    run = train.train(model, opt, xtr, F.one_hot(ytr, 10).float(), F.mse_loss, steps=cfg.steps,
                      eval_every=cfg.log_every, evaluate=evaluate, regularizer=reg,
                      batches=train.random_batches(len(xtr), cfg.batch, gen), monitor=monitor,
                      monitor_extra=("train_acc", "test_acc"),
                      monitor_columns=dict(jacobian_norm="jacobian_norm", centroid_norm="centroid_norm",
                                           alignment="centroid_alignment", phase="phase"))
    log = run.log
    grok_step = train.first_step(log, "test_acc", cfg.threshold)
    return dict(seed=seed, method=method, level=level, grok_step=grok_step, log=log, final=log[-1],
                best_test_acc=max(r["test_acc"] for r in log))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lam", type=float, default=None, help="GrokAlign weight for both penalties (default 0.1)")
    p.add_argument("--target-factor", type=float, default=None, help="level = factor x initial norm (default 1)")
    p.add_argument("--steps", type=int, default=None)


def main(args) -> Dict:
    t0 = time.perf_counter()
    cfg = common.config_from_args(Config, QUICK, args, ("lam", "target_factor", "steps"))
    seeds = args.seeds if args.seeds is not None else 1
    split = data.digits(1000)
    out = common.out_dir(args.out, NAME)
    runs = common.run_each(NAME, lambda seed, m: run_one(cfg, split, seed, m),
                           [(seed, m) for seed in range(seeds) for m in METHODS])
    stats, rows = {}, []
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        stats[m] = dict(grok_step=[r["grok_step"] for r in rs], final_test_acc=[r["final"]["test_acc"] for r in rs],
                        best_test_acc=[r["best_test_acc"] for r in rs],
                        final_jacobian_norm=[r["final"]["jacobian_norm"] for r in rs],
                        initial_jacobian_norm=[r["log"][0]["jacobian_norm"] for r in rs],
                        final_alignment=[r["final"]["alignment"] for r in rs], level=[r["level"] for r in rs])
        g = [v for v in stats[m]["grok_step"] if v is not None]
        rows.append([m, f"{len(g)}/{len(rs)}", f"{common.mean_std(g)[0]:.0f}" if g else "not grokked",
                     f"{common.mean_std(stats[m]['final_test_acc'])[0]:.3f}",
                     f"{common.mean_std(stats[m]['initial_jacobian_norm'])[0]:.1f} -> "
                     f"{common.mean_std(stats[m]['final_jacobian_norm'])[0]:.1f}",
                     f"{common.mean_std(stats[m]['final_alignment'])[0]:.3f}"])
    table = common.print_table(["method", "grokked", f"step (test >= {cfg.threshold})", "final test acc",
                                "Jacobian norm (start -> end)", "final alignment"], rows,
                               title=f"{NAME}: {cfg.steps} steps, lambda {cfg.lam}, target = {cfg.target_factor} x initial norm")
    common.write_csv(os.path.join(out, "log.csv"), common.log_rows(runs))
    specs = [dict(title=title, xlabel="step", ylabel=key, series=plotting.method_series(runs, METHODS, key), logy=logy,
                  hline=cfg.threshold if key == "test_acc" else None)
             for key, title, logy in [("test_acc", "test accuracy", False), ("train_acc", "train accuracy", False),
                                      ("jacobian_norm", "Jacobian norm (32 train points)", True),
                                      ("centroid_norm", "centroid norm", True),
                                      ("alignment", "centroid alignment", False)]]
    png = plotting.panels(os.path.join(out, "curves.png"), specs, title="inhibit: target-level vs plain GrokAlign")
    return common.finish(NAME, out, args, cfg, t0, ("log.csv", "curves.png"), seeds=seeds, summary=stats,
                         table=table, plots=[png])
