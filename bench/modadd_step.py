"""One full-batch training step of the modular-addition transformer (``experiments/modadd.py``:
p = 113, d_model 128, 4 heads, d_mlp 512, 30% of the pairs = 3830 samples) with GrokAlign on the
embeddings, per path; interleaved rounds, medians, ratios to a plain step.

    .venv/bin/python bench/modadd_step.py [--rounds 5] [--threads 2]

Paths: ``reverse`` (the experiment's default estimator; on this hand-written body the reference
autograd path), ``forward`` (the dual-stream engine), ``forward_sub0.25`` and ``forward_reference``
(``torch.func.jvp``, the same probes as the engine).
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from providers import ratio_table, time_interleaved  # noqa: E402

from grokalign_fast import GrokAlign  # noqa: E402
from grokalign_fast.experiments import data  # noqa: E402
from grokalign_fast.experiments.modadd import Config, Transformer  # noqa: E402

VARIANTS = {
    "plain": None,
    "reverse": dict(estimator="reverse"),
    "forward": dict(estimator="forward"),
    "forward_sub0.25": dict(estimator="forward", subsample=0.25),
    "forward_reference": dict(estimator="forward", backend="reference"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config()
    torch.manual_seed(0)
    model = Transformer(cfg)
    x, y, _, _ = data.modular_addition(cfg.p, cfg.train_frac, seed=0)

    def make(kw):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        reg = None if kw is None else GrokAlign(m.body, cfg.lam, generator=torch.Generator().manual_seed(0), **kw)

        def step():
            e = m.embed(x)
            out, pen = (m.body(e), 0.0) if reg is None else reg(e)
            loss = F.cross_entropy(out, y) + pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, reg

    steps, regs = {}, {}
    for name, kw in VARIANTS.items():
        steps[name], regs[name] = make(kw)
        steps[name]()
    med = time_interleaved(steps, args.rounds, warmup=1)
    print(f"modadd p={cfg.p}, {x.shape[0]} samples, torch {torch.__version__}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds")
    print("backends:", {k: (r.last_backend if r is not None else "-") for k, r in regs.items()})
    print(ratio_table(med, list(VARIANTS), header="path", digits=0))


if __name__ == "__main__":
    main()
