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
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from . import common, data, plotting
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
    model = common.mlp((xtr.shape[1], 200, 200, 10), init_scale=cfg.init_scale)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    level = float(jacobian_norm(model, xtr, estimator="exact").detach()) * cfg.target_factor
    reg = None
    if method == "grokalign":
        reg = GrokAlign(model, cfg.lam, generator=torch.Generator().manual_seed(seed))
    elif method == "target":
        reg = GrokAlign(model, cfg.lam, target=level, generator=torch.Generator().manual_seed(seed))
    monitor = GrokMonitor(model, xtr[:32], every=cfg.log_every, max_probe=32)
    onehot = F.one_hot(ytr, 10).float()
    log: List[Dict] = []
    grok_step = None
    for step in range(cfg.steps + 1):
        if step % cfg.log_every == 0 or step == cfg.steps:
            tr, te = common.accuracy(model, xtr, ytr), common.accuracy(model, xte, yte)
            rec = monitor(step, force=True, train_acc=tr, test_acc=te)
            log.append(dict(step=step, train_acc=tr, test_acc=te, jacobian_norm=rec["jacobian_norm"],
                            centroid_norm=rec["centroid_norm"], alignment=rec["centroid_alignment"],
                            phase=rec["phase"]))
            if grok_step is None and te >= cfg.threshold:
                grok_step = step
        if step == cfg.steps:
            break
        idx = torch.randint(0, len(xtr), (cfg.batch,), generator=gen)
        out, pen = reg(xtr[idx]) if reg is not None else (model(xtr[idx]), None)
        loss = F.mse_loss(out, onehot[idx]) + (pen if pen is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return dict(seed=seed, method=method, level=level, grok_step=grok_step, log=log, final=log[-1],
                best_test_acc=max(r["test_acc"] for r in log))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lam", type=float, default=None, help="GrokAlign weight for both penalties (default 0.1)")
    p.add_argument("--target-factor", type=float, default=None, help="level = factor x initial norm (default 1)")
    p.add_argument("--steps", type=int, default=None)


def main(args) -> Dict:
    t0 = time.perf_counter()
    cfg = Config(**QUICK) if args.quick else Config()
    for k in ("lam", "target_factor", "steps"):
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    seeds = args.seeds if args.seeds is not None else 1
    split = data.digits(1000)
    out = common.out_dir(args.out, NAME)
    runs = []
    bar = common.tqdm_bar(total=len(METHODS) * seeds, desc=NAME, unit="run")
    for seed in range(seeds):
        for m in METHODS:
            runs.append(run_one(cfg, split, seed, m))
            bar.update(1)
    bar.close()
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
    common.write_csv(os.path.join(out, "log.csv"),
                     [dict(method=r["method"], seed=r["seed"], **row) for r in runs for row in r["log"]])
    specs = []
    for key, title, logy in [("test_acc", "test accuracy", False), ("train_acc", "train accuracy", False),
                             ("jacobian_norm", "Jacobian norm (32 train points)", True),
                             ("centroid_norm", "centroid norm", True), ("alignment", "centroid alignment", False)]:
        series = []
        for i, m in enumerate(METHODS):
            series += plotting.per_seed_series([r for r in runs if r["method"] == m], "step", key, m, plotting.color(i))
        specs.append(dict(title=title, xlabel="step", ylabel=key, series=series, logy=logy,
                          hline=cfg.threshold if key == "test_acc" else None))
    png = plotting.panels(os.path.join(out, "curves.png"), specs, title="inhibit: target-level vs plain GrokAlign")
    result = dict(experiment=NAME, quick=bool(args.quick), config=asdict(cfg), seeds=seeds, summary=stats,
                  table=table, plots=[png], wall_seconds=time.perf_counter() - t0)
    common.write_json(os.path.join(out, "summary.json"), result)
    print(f"[{NAME}] wrote {out}/summary.json, log.csv, curves.png", flush=True)
    return result
