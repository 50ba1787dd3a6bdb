r"""ntk: the centroid inner product <x, c(x)> moves with the empirical NTK (the paper's Theorem 9, Fig. 3).

Two-class digits (3 vs 8, labels +-1, inputs / 16), a two-layer scalar ReLU net
``f(x) = a^T relu(W x)`` of width 64 without bias, full-batch gradient descent on
``L = 1/(2n) sum_i (f(x_i) - y_i)^2`` (no weight decay, so one step is exactly a
gradient step). For a bias-free ReLU net ``f(x) = <x, c(x)>`` with ``c(x) = J(x)^T``,
so to first order one step changes the centroid inner product at any point x by

    Delta <x, c(x)>  ~=  -(lr / n) sum_i Theta(x, x_i) (f(x_i) - y_i),

with ``Theta`` the empirical NTK (``grokalign_fast.metrics.empirical_ntk``). Every
``log_every`` steps we compute this prediction on probe points (training and test),
take one step, and measure the actual change of ``<x, c(x)>``
(``grokalign_fast.centroid_inner_product``). Reported: the correlation and the
relative error of measured against predicted changes, the NTK's relative drift from
its initial value (feature learning), and the centroid alignment against steps.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from . import common, data, plotting
from ..centroids import centroid_alignment, centroid_inner_product
from ..metrics import empirical_ntk

NAME = "ntk"
HELP = "two-class digits, scalar two-layer ReLU net: the change of <x, c(x)> against the empirical NTK"


@dataclass
class Config:
    classes: tuple = (3, 8)
    n_train: int = 200
    width: int = 64
    init_scale: float = 1.0
    lr: float = 0.2
    steps: int = 1000
    log_every: int = 10
    n_probe: int = 32


QUICK = dict(n_train=80, steps=60, log_every=10, n_probe=12)


def run_one(cfg: Config, seed: int) -> Dict:
    common.seed_everything(seed)
    split = data.digits(cfg.n_train, split_seed=seed, classes=cfg.classes)
    to_pm = lambda y: y.float() * 2 - 1  # noqa: E731  (class 0 -> -1, class 1 -> +1)
    xtr, ytr = split.x_train, to_pm(split.y_train)
    xte, yte = split.x_test, to_pm(split.y_test)
    half = cfg.n_probe // 2
    probes = torch.cat([xtr[:half], xte[: cfg.n_probe - half]])
    probe_y = torch.cat([ytr[:half], yte[: cfg.n_probe - half]])
    model = common.ScalarTwoLayer(xtr.shape[1], cfg.width, init_scale=cfg.init_scale)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    n = len(xtr)
    theta0 = None
    log: List[Dict] = []
    pairs: List[Dict] = []
    for step in range(cfg.steps + 1):
        logging = step % cfg.log_every == 0 or step == cfg.steps
        if logging:
            with torch.no_grad():
                resid = model(xtr) - ytr  # [n]
            theta = empirical_ntk(model, probes, xtr, reduction="trace")  # [P, n]
            theta_pp = empirical_ntk(model, xtr[:half], reduction="trace")
            if theta0 is None:
                theta0 = theta_pp
            predicted = -(cfg.lr / n) * (theta @ resid)  # [P]
            with torch.no_grad():
                ip_before = centroid_inner_product(model, probes)
                align = centroid_alignment(model, probes) * probe_y  # label-signed: +1 = c(x) along y x
            log.append(dict(step=step, train_acc=common.accuracy(model, xtr, ytr),
                            test_acc=common.accuracy(model, xte, yte),
                            loss=float(0.5 * (resid ** 2).mean()),
                            alignment_train=float(align[:half].mean()), alignment_test=float(align[half:].mean()),
                            inner_product_train=float((ip_before * probe_y)[:half].mean()),  # label-signed
                            ntk_drift=float((theta_pp - theta0).norm() / theta0.norm())))
        if step == cfg.steps:
            break
        out = model(xtr)
        loss = 0.5 * ((out - ytr) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if logging:
            with torch.no_grad():
                measured = centroid_inner_product(model, probes) - ip_before
            for i in range(len(probes)):
                pairs.append(dict(step=step, probe=i, split="train" if i < half else "test",
                                  predicted=float(predicted[i]), measured=float(measured[i])))
    pr = np.array([p["predicted"] for p in pairs])
    me = np.array([p["measured"] for p in pairs])
    corr = float(np.corrcoef(pr, me)[0, 1]) if len(pr) > 1 and pr.std() > 0 and me.std() > 0 else None
    rel = float(np.linalg.norm(me - pr) / max(np.linalg.norm(me), 1e-30))
    return dict(seed=seed, log=log, pairs=pairs, correlation=corr, relative_error=rel,
                final=log[-1], max_ntk_drift=max(r["ntk_drift"] for r in log))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--init-scale", type=float, default=None)


def main(args) -> Dict:
    t0 = time.perf_counter()
    cfg = common.config_from_args(Config, QUICK, args, ("steps", "lr", "init_scale"))
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    out = common.out_dir(args.out, NAME)
    runs = common.run_each(NAME, lambda seed: run_one(cfg, seed), [(seed,) for seed in range(seeds)])
    rows = [[r["seed"], "-" if r["correlation"] is None else f"{r['correlation']:.4f}", f"{r['relative_error']:.3f}",
             f"{r['max_ntk_drift']:.3f}", f"{r['log'][0]['alignment_train']:.3f} -> {r['final']['alignment_train']:.3f}",
             f"{r['final']['test_acc']:.3f}"] for r in runs]
    table = common.print_table(["seed", "corr(measured, NTK-predicted)", "relative error", "max NTK drift",
                                "alignment (train probes)", "final test acc"], rows,
                               title=f"{NAME}: one-step change of <x, c(x)> vs -(lr/n) sum_i Theta(x, x_i) r_i")
    common.write_csv(os.path.join(out, "log.csv"), common.log_rows(runs, ids=("seed",)))
    common.write_csv(os.path.join(out, "pairs.csv"), common.log_rows(runs, "pairs", ids=("seed",)))
    r0 = runs[0]
    tr = [p for p in r0["pairs"] if p["split"] == "train"]
    te = [p for p in r0["pairs"] if p["split"] == "test"]
    specs = [
        dict(title="one-step change of <x, c(x)>: measured vs NTK prediction", xlabel="predicted (NTK)",
             ylabel="measured", scatter=True, diagonal=True,
             series=[dict(x=[p["predicted"] for p in tr], y=[p["measured"] for p in tr], label="train probes",
                          color=plotting.color(0), alpha=0.5),
                     dict(x=[p["predicted"] for p in te], y=[p["measured"] for p in te], label="test probes",
                          color=plotting.color(1), alpha=0.5)]),
        dict(title="label-signed centroid alignment y cos(x, c(x))", xlabel="step", ylabel="alignment",
             series=plotting.per_seed_series(runs, "step", "alignment_train", "train probes", plotting.color(0))
             + plotting.per_seed_series(runs, "step", "alignment_test", "test probes", plotting.color(1))),
        dict(title="NTK relative drift ||Theta_t - Theta_0|| / ||Theta_0||", xlabel="step", ylabel="drift",
             series=plotting.per_seed_series(runs, "step", "ntk_drift", "drift", plotting.color(2))),
        dict(title="accuracy", xlabel="step", ylabel="accuracy",
             series=plotting.per_seed_series(runs, "step", "train_acc", "train", plotting.color(0))
             + plotting.per_seed_series(runs, "step", "test_acc", "test", plotting.color(1))),
    ]
    png = plotting.panels(os.path.join(out, "ntk.png"), specs, title="ntk: <x, c(x)> moves with the empirical NTK")
    stats = dict(correlation=[r["correlation"] for r in runs], relative_error=[r["relative_error"] for r in runs],
                 max_ntk_drift=[r["max_ntk_drift"] for r in runs],
                 final_alignment_train=[r["final"]["alignment_train"] for r in runs],
                 final_test_acc=[r["final"]["test_acc"] for r in runs])
    return common.finish(NAME, out, args, cfg, t0, ("log.csv", "pairs.csv", "ntk.png"), seeds=seeds, summary=stats,
                         table=table, plots=[png])
