"""xor: delayed robustness on XOR cluster data, seen through the centroid alignment (the paper's Fig. 4).

Data (Xu et al.): p-dim inputs whose first two coordinates are +-1 and carry the label
(their product); the other p - 2 are noise in {+-eps}. A two-layer scalar ReLU net
``f(x) = a^T relu(W x)`` (no bias) is trained full batch with SGD (lr 0.1, weight decay
0.01) on the logistic loss, with and without GrokAlign (lambda 0.1; for a scalar output
the "reverse" estimator is exact). Defaults: p = 1000, eps = 0.3, 100 training points,
width 512: with so few points in so many dimensions weight decay memorises the noise
coordinates first and generalises slowly. (The paper's width 2048, weight decay 0.1
and lambda 1.0 gave, here, either an easy problem that both runs solve at once (small
p) or a network collapsed to zero by the penalty (lambda 1.0); see docs/experiments.md.) Logged against steps: train / test accuracy,
accuracy on the test set under Gaussian input noise of growing size, and the centroid
alignment ``cos(x, c(x))`` (and ``||c(x)||``) of one training point.

Reported per run: the first logged step at which the test accuracy reaches ``gen_level``
(70%) and at which the accuracy under noise ``sigma_ref`` (0.25) reaches ``robust_level``
(60%), the final alignment and accuracies; a level never reached within the steps is
reported as not reached.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from . import common, data, plotting, summary, train
from ..centroids import centroid, cosine
from ..regularizer import GrokAlign

NAME = "xor"
HELP = "XOR clusters, two-layer scalar ReLU net: delayed robustness and centroid alignment, +- GrokAlign"


@dataclass
class Config:
    p: int = 1000
    n_train: int = 100
    n_test: int = 1000
    eps: float = 0.3
    width: int = 512
    init_scale: float = 1.0
    lr: float = 0.1
    weight_decay: float = 0.01
    lam: float = 0.1
    steps: int = 3000
    log_every: int = 50
    sigmas: tuple = (0.25, 0.5, 1.0)
    sigma_ref: float = 0.25
    gen_level: float = 0.7
    robust_level: float = 0.6


QUICK = dict(p=200, n_train=40, n_test=300, width=128, steps=200, log_every=10)


@torch.no_grad()
def _noisy_accuracy(model, x, y, sigma, noise):
    return common.accuracy(model, x + sigma * noise, y)


def run_one(cfg: Config, seed: int, lam: float) -> Dict:
    gen = common.seed_everything(seed)
    xtr, ytr = data.xor_clusters(cfg.n_train, cfg.p, cfg.eps, generator=gen)
    xte, yte = data.xor_clusters(cfg.n_test, cfg.p, cfg.eps, generator=gen)
    noise = torch.randn(xte.shape, generator=gen)
    model = common.ScalarTwoLayer(cfg.p, cfg.width, init_scale=cfg.init_scale)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    reg = GrokAlign(model, lam, generator=torch.Generator().manual_seed(seed)) if lam > 0 else None
    point = xtr[ytr > 0][:1]  # a training point of label +1 (so c(x) should point along x)

    def evaluate(run: train.Run) -> Dict:
        c = centroid(model, point, create_graph=False)
        row = dict(train_acc=common.accuracy(model, xtr, ytr), test_acc=common.accuracy(model, xte, yte),
                   alignment=float(cosine(point, c)[0]), centroid_norm=float(c.norm()), seconds=run.seconds)
        for s in cfg.sigmas:
            row[f"acc_sigma_{s:g}"] = _noisy_accuracy(model, xte, yte, s, noise)
        return row

    run = train.train(model, opt, xtr, ytr, lambda out, y: F.softplus(-y * out).mean(), steps=cfg.steps,
                      eval_every=cfg.log_every, evaluate=evaluate, regularizer=reg)
    ref = f"acc_sigma_{cfg.sigma_ref:g}"
    return dict(seed=seed, lam=lam, method="grokalign" if lam > 0 else "weight decay",
                generalised_step=train.first_step(run.log, "test_acc", cfg.gen_level),
                robust_step=train.first_step(run.log, ref, cfg.robust_level),
                final=run.log[-1], log=run.log, train_seconds=run.seconds)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lam", type=float, default=None, help="GrokAlign weight (default 0.1)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--p", type=int, default=None, help="input dimension")
    p.add_argument("--eps", type=float, default=None, help="noise coordinate size")


def main(args) -> Dict:
    t0 = time.perf_counter()
    cfg = common.config_from_args(Config, QUICK, args, ("lam", "steps", "p", "eps"))
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    out = common.out_dir(args.out, NAME)
    runs = common.run_each(NAME, lambda seed, lam: run_one(cfg, seed, lam),
                           [(seed, lam) for seed in range(seeds) for lam in (0.0, cfg.lam)])
    methods = ["weight decay", "grokalign"]
    ref = f"acc_sigma_{cfg.sigma_ref:g}"
    stats, rows = {}, []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        g = [r["generalised_step"] for r in rs]
        rb = [r["robust_step"] for r in rs]
        al = [r["final"]["alignment"] for r in rs]
        stats[m] = dict(generalised_step=g, robust_step=rb, final_alignment=al,
                        final_test_acc=[r["final"]["test_acc"] for r in rs],
                        final_noisy_acc=[r["final"][ref] for r in rs],
                        generalised_reached=sum(v is not None for v in g), robust_reached=sum(v is not None for v in rb),
                        robust_step_mean=common.mean_std(rb)[0], final_alignment_mean=common.mean_std(al)[0])
        rows.append([m, f"{stats[m]['generalised_reached']}/{len(rs)}",
                     summary.fmt_ms(*common.mean_std(g)), f"{stats[m]['robust_reached']}/{len(rs)}",
                     summary.fmt_ms(*common.mean_std(rb)), f"{common.mean_std(al)[0]:.3f}",
                     f"{common.mean_std(stats[m]['final_noisy_acc'])[0]:.3f}"])
    table = common.print_table(
        ["method", "generalised", f"step (test>={cfg.gen_level:g})", "robust",
         f"step (acc@sigma {cfg.sigma_ref:g} >= {cfg.robust_level:g})",
         "final alignment", f"final acc@sigma {cfg.sigma_ref:g}"], rows,
        title=f"{NAME}: p={cfg.p}, eps={cfg.eps}, n={cfg.n_train}, width={cfg.width}, lambda={cfg.lam} "
              f"('not grokked' = level not reached within {cfg.steps} steps)")
    common.write_csv(os.path.join(out, "log.csv"), common.log_rows(runs))
    specs = []
    for i, m in enumerate(methods):
        rs = [dict(log=r["log"]) for r in runs if r["method"] == m]
        series = plotting.per_seed_series(rs, "step", "train_acc", "train", plotting.color(0))
        series += plotting.per_seed_series(rs, "step", "test_acc", "test", plotting.color(1))
        for j, s in enumerate(cfg.sigmas):
            series += plotting.per_seed_series(rs, "step", f"acc_sigma_{s:g}", f"test, noise sigma={s:g}",
                                               plotting.color(2 + j))
        specs.append(dict(title=f"{m}: accuracy", xlabel="step", ylabel="accuracy", series=series))
        specs.append(dict(title=f"{m}: centroid alignment of a training point", xlabel="step",
                          ylabel="cos(x, c(x))",
                          series=plotting.per_seed_series(rs, "step", "alignment", "alignment", plotting.color(3))))
    png = plotting.panels(os.path.join(out, "curves.png"), specs, title="xor: delayed robustness")
    return common.finish(NAME, out, args, cfg, t0, ("log.csv", "curves.png"), seeds=seeds, summary=stats,
                         table=table, plots=[png])
