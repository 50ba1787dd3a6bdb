"""cnn-robustness: GrokAlign raises centroid alignment and robustness of a CNN, lowers its Jacobian rank (Fig. 5).

The paper's 6-convolution CNN (``grokalign_fast.models.cnn6``, bias-free, ReLU, three stages of
two 3x3 convolutions and a 2x2 max-pool, one linear layer) on the 8x8 digits ([N, 1, 8, 8],
inputs / 16; 1000 train, the rest test), or on CIFAR-10 when ``--data-dir`` holds
``cifar-10-batches-py`` (5000 train / 1000 test images, 32x32). Adam (lr 1e-3, weight decay
1e-4), cross-entropy, batch 100, with and without GrokAlign (lambda 1e-3, the paper's
cross-entropy value, on the plain norm), computed on the dual-stream path (the forward
estimator, one Rademacher probe). Logged against steps: train / test accuracy; centroid
alignment ``cos(x, c(x))`` and Jacobian PC1 (``s_1^2 / sum s_i^2``) on 16 test images
(``GrokMonitor``); accuracy under our own L-inf PGD (random start, ``pgd_steps`` steps of
size 2.5 eps / steps, inputs clipped to [0, 1]) at growing eps on ``n_attack`` test images.
This PGD is a short attack of our own, not AutoAttack: its robust accuracies are upper bounds.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import common, data, plotting, train
from ..models import cnn6
from ..monitor import GrokMonitor
from ..regularizer import GrokAlign

NAME = "cnn-robustness"
HELP = "small CNN on the digits (or CIFAR-10): alignment, Jacobian PC1 and PGD accuracy, +- GrokAlign"


@dataclass
class Config:
    lam: float = 1e-3
    squared: bool = False
    steps: int = 3000
    batch: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    log_every: int = 250
    width: int = 16  # channels of the CNN's first stage (then 2x and 4x)
    eps: tuple = (0.05, 0.1, 0.2)
    pgd_steps: int = 10
    n_attack: int = 200
    n_probe: int = 16


QUICK = dict(steps=60, log_every=30, width=4, n_attack=32, pgd_steps=3, n_probe=4)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                 generator: torch.Generator) -> float:
    """Accuracy under an L-inf PGD attack on the cross-entropy (random start, step 2.5 eps / steps, clip to [0, 1])."""
    if eps <= 0:
        return common.accuracy(model, x, y)
    alpha = 2.5 * eps / steps
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (g,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
    return common.accuracy(model, (x + delta).clamp(0, 1), y)


def load(args_data_dir, quick: bool) -> data.Split:
    if data.cifar10_available(args_data_dir):
        return data.cifar10(args_data_dir, 500 if quick else 5000, 200 if quick else 1000)
    return data.digits(1000, flatten=False)


def run_one(cfg: Config, split: data.Split, seed: int, lam: float) -> Dict:
    gen = common.seed_everything(seed)
    model = cnn6(split.input_shape[0], split.num_classes, width=cfg.width, size=split.input_shape[1], bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    reg = GrokAlign(model, lam, squared=cfg.squared, estimator="forward",
                    generator=torch.Generator().manual_seed(seed)) if lam > 0 else None
    monitor = GrokMonitor(model, split.x_test[: cfg.n_probe], every=cfg.log_every, max_probe=cfg.n_probe)
    xa, ya = split.x_test[: cfg.n_attack], split.y_test[: cfg.n_attack]
    attack_gen = torch.Generator().manual_seed(1234)

    def evaluate(run: train.Run) -> Dict:
        row = dict(train_acc=common.accuracy(model, split.x_train, split.y_train),
                   test_acc=common.accuracy(model, split.x_test, split.y_test), seconds=run.seconds)
        for e in cfg.eps:
            row[f"pgd_acc_eps_{e:g}"] = pgd_accuracy(model, xa, ya, e, cfg.pgd_steps, attack_gen)
        return row

    run = train.train(model, opt, split.x_train, split.y_train, F.cross_entropy, steps=cfg.steps,
                      eval_every=cfg.log_every, evaluate=evaluate, regularizer=reg,
                      batches=train.random_batches(len(split.x_train), cfg.batch, gen), monitor=monitor,
                      monitor_columns=dict(alignment="centroid_alignment", pc1="pc1", effective_rank="effective_rank",
                                           jacobian_norm="jacobian_norm", phase="phase"))
    return dict(seed=seed, method="grokalign" if lam > 0 else "weight decay", log=run.log, final=run.log[-1],
                train_seconds=run.seconds)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lam", type=float, default=None, help="GrokAlign weight (default 1e-3)")
    p.add_argument("--steps", type=int, default=None)


def main(args) -> Dict:
    t0 = time.perf_counter()
    cfg = common.config_from_args(Config, QUICK, args, ("lam", "steps"))
    seeds = args.seeds if args.seeds is not None else 1
    split = load(args.data_dir, args.quick)
    out = common.out_dir(args.out, NAME)
    runs = common.run_each(NAME, lambda seed, lam: run_one(cfg, split, seed, lam),
                           [(seed, lam) for seed in range(seeds) for lam in (0.0, cfg.lam)])
    methods = ["weight decay", "grokalign"]
    keys = ["test_acc"] + [f"pgd_acc_eps_{e:g}" for e in cfg.eps] + ["alignment", "pc1", "effective_rank", "jacobian_norm"]
    stats, rows = {}, []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        stats[m] = {k: [r["final"][k] for r in rs] for k in keys}
        stats[m]["train_seconds"] = [r["train_seconds"] for r in rs]
        rows.append([m] + [f"{common.mean_std(stats[m][k])[0]:.3f}" for k in keys])
    table = common.print_table(["method"] + keys, rows,
                               title=f"{NAME} ({split.name}, {cfg.steps} steps): final values, mean over {seeds} seed(s); "
                                     f"PGD: {cfg.pgd_steps} steps on {cfg.n_attack} test images")
    common.write_csv(os.path.join(out, "log.csv"), common.log_rows(runs))
    specs = [dict(title=title, xlabel="step", ylabel=key, series=plotting.method_series(runs, methods, key),
                  logy=key == "jacobian_norm")
             for key, title in [("test_acc", "clean test accuracy"), ("alignment", "centroid alignment (16 test images)"),
                                ("pc1", "Jacobian PC1 s1^2 / sum s^2"), ("jacobian_norm", "Jacobian norm")]]
    series = []
    for i, m in enumerate(methods):
        for j, e in enumerate(cfg.eps):
            series += plotting.per_seed_series([r for r in runs if r["method"] == m], "step", f"pgd_acc_eps_{e:g}",
                                               f"{m}, eps {e:g}", plotting.color(i), alpha=1.0 - 0.25 * j)
    specs.append(dict(title="accuracy under PGD", xlabel="step", ylabel="accuracy", series=series))
    png = plotting.panels(os.path.join(out, "curves.png"), specs, title=f"cnn-robustness on {split.name}")
    return common.finish(NAME, out, args, cfg, t0, ("log.csv", "curves.png"), data=split.name, seeds=seeds,
                         summary=stats, table=table, plots=[png])
