"""Cost of one GrokAlign training step on the grok-digits model, as ratios to a plain step.

    .venv/bin/python bench/digits_step.py [--rounds 300]

The model and optimiser of `make demo` (64-200-200-10, ReLU, no bias, x8 init, fused AdamW,
batch 200, MSE, one thread). Every variant computes the penalty on each step; all variants are
interleaved in one process, one step each in a fresh random order each round; medians. Then make
demo's own setting (every=4) against plain steps in steady state: blocks of 20 steps each.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from grokalign_fast import GrokAlign
from grokalign_fast.models import mlp

sys.path.insert(0, os.path.dirname(__file__))
from providers import ratio_table, time_interleaved  # noqa: E402

VARIANTS = {  # name -> GrokAlign kwargs (None: plain step)
    "plain": None,
    "reverse, cpp (one-pass op)": dict(estimator="reverse", backend="cpp"),
    "reverse, cpp, subsample 0.25": dict(estimator="reverse", backend="cpp", subsample=0.25),
    "reverse, cpp, subsample 0.5": dict(estimator="reverse", backend="cpp", subsample=0.5),
    "reverse, reference (autograd double backward)": dict(estimator="reverse", backend="reference"),
    "forward, cpp (fused dual-stream)": dict(estimator="forward", backend="cpp"),
    "forward, cpp, subsample 0.25": dict(estimator="forward", backend="cpp", subsample=0.25),
}
DEMO = dict(estimator="reverse", backend="cpp", subsample=0.25, every=4)  # make demo's GrokAlign setting


def make_step(kwargs, x, y):
    torch.manual_seed(0)
    model = mlp((64, 200, 200, 10), init_scale=8.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    reg = None if kwargs is None else GrokAlign(model, 5e-3, squared=True,
                                                generator=torch.Generator().manual_seed(1), **kwargs)

    def one():
        out, pen = (model(x), 0.0) if reg is None else reg(x)
        loss = F.mse_loss(out, y) + pen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return one


def steady_state(x, y, rounds: int, block: int = 20):
    """Per-step ms of plain training and of make demo's setting, each timed as blocks of ``block``
    consecutive steps (alternating, medians): caches stay warm as in a training run, and every=4
    is averaged over its penalised and plain steps."""
    steps = {"plain": make_step(None, x, y), "demo": make_step(DEMO, x, y)}
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(block):
                step()
            times[name].append((time.perf_counter() - t0) / block)
    return {name: statistics.median(v) for name, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 64, generator=g), torch.randn(200, 10, generator=g)
    steps = {name: make_step(kw, x, y) for name, kw in VARIANTS.items()}
    med = time_interleaved(steps, args.rounds, warmup=20)
    print(f"Command: `python bench/digits_step.py --rounds {args.rounds}` (torch {torch.__version__}, 1 thread)\n")
    print(ratio_table(med, VARIANTS, digits=3))
    steady = steady_state(x, y, max(10, args.rounds // 6))
    print(f"\nSteady state, blocks of 20 steps: plain {steady['plain'] * 1e3:.3f} ms per step, make demo's setting "
          f"(reverse, cpp, subsample 0.25, every 4) {steady['demo'] * 1e3:.3f} ms per step: "
          f"{steady['demo'] / steady['plain']:.2f}x")


if __name__ == "__main__":
    main()
