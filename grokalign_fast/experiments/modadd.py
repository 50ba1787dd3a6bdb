"""modadd: modular addition with a one-layer transformer, with and without GrokAlign (the paper's Figs. 8, 9).

Nanda et al.'s task: tokens ``[a, b, =]``, label ``(a + b) mod p``, p = 113, a random 30%
of the p^2 pairs for training. Model (plain PyTorch): token embedding ``W_E [p+1, d]`` and
learned positions; one causal attention layer (4 heads, written with matmul + softmax so
``torch.func.jvp`` works, unlike ``F.scaled_dot_product_attention`` on the CPU); a ReLU MLP
(d_mlp 512); unembedding ``W_U [d, p]`` read at the last position; d = 128; no biases and
no LayerNorm. AdamW lr 1e-3, betas (0.9, 0.98), weight decay 1.0, full batch.

GrokAlign regularises the Jacobian with respect to the embeddings: the regularised part
is ``body(emb: [B, 3, d]) -> logits [B, p]`` and ``GrokAlign(body, lam)`` is called on
``W_E[tokens]`` (lambda 1e-3, the paper's value). ``--frozen-embedding`` keeps ``W_E``
at its random init (the paper's Fig. 9, where GrokAlign groks earlier). Logged: train /
test accuracy, the Fourier Gini coefficients of ``W_E`` (tokens 0..p-1) and ``W_U``
(``metrics.fourier_gini``) and the centroid alignment at the embeddings of 16
training pairs (``GrokMonitor``, output-space probes for the norm).

Cost on one CPU thread (measured on a shared 2-core machine): ~0.4 s per full-batch
step without the penalty, ~0.9 s with it. Grokking here takes ~10k+ full-batch steps
(Nanda et al.), i.e. hours; the default 1000 steps (~20-40 minutes for the four runs)
show the early dynamics only; raise ``--steps`` for the full curve, or lower the cost
with ``--frozen-embedding yes`` (two runs). "grokked" = test accuracy >= 95%.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import common, data, plotting, train
from ..metrics import fourier_gini
from ..monitor import GrokMonitor
from ..regularizer import GrokAlign

NAME = "modadd"
HELP = "modular addition (p=113), one-layer transformer: GrokAlign on the embeddings, Fourier Gini"


@dataclass
class Config:
    p: int = 113
    train_frac: float = 0.3
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    lr: float = 1e-3
    weight_decay: float = 1.0
    lam: float = 1e-3
    estimator: str = "reverse"
    steps: int = 1000
    log_every: int = 50
    threshold: float = 0.95


QUICK = dict(p=23, d_model=32, n_heads=4, d_mlp=64, steps=40, log_every=10)


class Body(nn.Module):
    """The transformer after the token embedding: ``emb [B, T, d] -> logits [B, p]`` (last position)."""

    def __init__(self, p: int, d: int, heads: int, d_mlp: int, seq: int = 3):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} must be divisible by n_heads {heads}")
        self.h, self.dh = heads, d // heads
        s = 1.0 / math.sqrt(d)
        self.W_pos = nn.Parameter(torch.randn(seq, d) * s)
        self.W_Q = nn.Parameter(torch.randn(d, d) * s)
        self.W_K = nn.Parameter(torch.randn(d, d) * s)
        self.W_V = nn.Parameter(torch.randn(d, d) * s)
        self.W_O = nn.Parameter(torch.randn(d, d) * s)
        self.W_in = nn.Parameter(torch.randn(d, d_mlp) * s)
        self.W_out = nn.Parameter(torch.randn(d_mlp, d) / math.sqrt(d_mlp))
        self.W_U = nn.Parameter(torch.randn(d, p) * s)
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq, dtype=torch.bool)), persistent=False)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        B, T, d = emb.shape
        x = emb + self.W_pos[:T]
        q = (x @ self.W_Q).reshape(B, T, self.h, self.dh).transpose(1, 2)  # [B, h, T, dh]
        k = (x @ self.W_K).reshape(B, T, self.h, self.dh).transpose(1, 2)
        v = (x @ self.W_V).reshape(B, T, self.h, self.dh).transpose(1, 2)
        # Only the last position is read out, so only its query is needed (causal: it sees all T).
        o = F.scaled_dot_product_attention(q[:, :, -1:], k, v)  # [B, h, 1, dh]
        o = o.transpose(1, 2).reshape(B, d)  # [B, d]
        x_last = x[:, -1] + o @ self.W_O
        x_last = x_last + torch.relu(x_last @ self.W_in) @ self.W_out
        return x_last @ self.W_U


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.W_E = nn.Parameter(torch.randn(cfg.p + 1, cfg.d_model) / math.sqrt(cfg.d_model))
        self.body = Body(cfg.p, cfg.d_model, cfg.n_heads, cfg.d_mlp)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.W_E[tokens]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(tokens))


def run_one(cfg: Config, seed: int, lam: float, frozen: bool) -> Dict:
    common.seed_everything(seed)
    ttr, ytr, tte, yte = data.modular_addition(cfg.p, cfg.train_frac, seed=seed)
    model = Transformer(cfg)
    if frozen:
        model.W_E.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    reg = (GrokAlign(model.body, lam, estimator=cfg.estimator, generator=torch.Generator().manual_seed(seed))
           if lam > 0 else None)
    # The probe is the embedding of fixed training pairs, which moves as W_E trains: it is renewed before
    # each measurement, so the evaluation calls the monitor itself.
    monitor = GrokMonitor(model, model.embed(ttr[:16]), every=cfg.log_every, f=model.body, rank=False, max_probe=16)

    def evaluate(run: train.Run) -> Dict:
        with torch.no_grad():
            tr = float((model(ttr).argmax(1) == ytr).float().mean())
            te = float((model(tte).argmax(1) == yte).float().mean())
            monitor.set_probe(model.embed(ttr[:16]))
        rec = monitor(run.step, force=True)
        return dict(train_acc=tr, test_acc=te, alignment=rec["centroid_alignment"],
                    jacobian_norm=rec["jacobian_norm"], centroid_norm=rec["centroid_norm"],
                    gini_W_E=float(fourier_gini(model.W_E.detach()[: cfg.p], dim=0)),
                    gini_W_U=float(fourier_gini(model.body.W_U.detach(), dim=1)), seconds=run.seconds)

    run = train.train(model, opt, ttr, ytr, F.cross_entropy, steps=cfg.steps, eval_every=cfg.log_every,
                      evaluate=evaluate, embed=model.embed, forward=model.body, regularizer=reg)
    log = run.log
    grok_step = train.first_step(log, "test_acc", cfg.threshold)
    name = ("grokalign" if lam > 0 else "weight decay") + (" (frozen W_E)" if frozen else "")
    return dict(seed=seed, method=name, grok_step=grok_step, log=log, final=log[-1], train_seconds=run.seconds)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lam", type=float, default=None, help="GrokAlign weight (default 1e-3)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--estimator", choices=("reverse", "forward", "exact"), default="reverse",
                   help="GrokAlign's estimator; forward (torch.func.jvp) works: attention is matmul + softmax")
    p.add_argument("--frozen-embedding", choices=("both", "yes", "no"), default="both",
                   help="train with W_E frozen at init, trained, or both (default)")


def main(args) -> Dict:
    t0 = time.perf_counter()
    cfg = common.config_from_args(Config, QUICK, args, ("lam", "steps", "estimator"))
    seeds = args.seeds if args.seeds is not None else 1
    frozen_opts = {"both": (False, True), "yes": (True,), "no": (False,)}[args.frozen_embedding]
    out = common.out_dir(args.out, NAME)
    runs = common.run_each(NAME, lambda seed, lam, frozen: run_one(cfg, seed, lam, frozen),
                           [(seed, lam, frozen) for seed in range(seeds) for frozen in frozen_opts
                            for lam in (0.0, cfg.lam)])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    stats, rows = {}, []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        stats[m] = dict(grok_step=[r["grok_step"] for r in rs], final_test_acc=[r["final"]["test_acc"] for r in rs],
                        final_train_acc=[r["final"]["train_acc"] for r in rs],
                        final_gini_W_E=[r["final"]["gini_W_E"] for r in rs],
                        final_gini_W_U=[r["final"]["gini_W_U"] for r in rs],
                        final_alignment=[r["final"]["alignment"] for r in rs],
                        train_seconds=[r["train_seconds"] for r in rs])
        g = [v for v in stats[m]["grok_step"] if v is not None]
        mean = lambda k: f"{common.mean_std(stats[m][k])[0]:.3f}"  # noqa: E731
        rows.append([m, f"{len(g)}/{len(rs)}", f"{common.mean_std(g)[0]:.0f}" if g else "not grokked",
                     mean("final_train_acc"), mean("final_test_acc"), mean("final_gini_W_E"), mean("final_gini_W_U"),
                     mean("final_alignment")])
    table = common.print_table(["method", "grokked", f"step (test >= {cfg.threshold})", "train acc", "test acc",
                                "Gini W_E", "Gini W_U", "alignment"], rows,
                               title=f"{NAME}: p={cfg.p}, {cfg.steps} full-batch steps, lambda {cfg.lam}")
    common.write_csv(os.path.join(out, "log.csv"), common.log_rows(runs))
    specs = [dict(title=title, xlabel="step", ylabel=key, series=plotting.method_series(runs, methods, key))
             for key, title in [("train_acc", "train accuracy"), ("test_acc", "test accuracy"),
                                ("gini_W_E", "Fourier Gini of W_E"), ("gini_W_U", "Fourier Gini of W_U"),
                                ("alignment", "centroid alignment at the embeddings"),
                                ("jacobian_norm", "Jacobian norm")]]
    png = plotting.panels(os.path.join(out, "curves.png"), specs, title=f"modadd p={cfg.p}", ncols=3)
    return common.finish(NAME, out, args, cfg, t0, ("log.csv", "curves.png"), seeds=seeds, summary=stats,
                         table=table, plots=[png])
