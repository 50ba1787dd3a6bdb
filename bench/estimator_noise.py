"""Penalty-gradient noise of one probe: forward (input space) vs reverse (output space).

    .venv/bin/python bench/estimator_noise.py [--draws 100] [--out bench/RESULTS.md]

For each model, the exact gradient of mean_b ||J_b||_F^2 with respect to the
weights is compared with one-probe estimates (float64); the relative noise is
E||g_est - g||^2 / ||g||^2 over independent draws, and "noise x time" multiplies
it by the median time of one GrokAlign training step with that estimator
(forward: the fused path when available; reverse: the one-pass MLP path).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from providers import make_batch, make_model  # noqa: E402

from grokalign_fast import GrokAlign  # noqa: E402

MODELS = [("784-200-200-10 (C=10)", (784, 200, 200, 10), 200), ("226-200-113 (C=113)", (226, 200, 113), 200)]


def grads(model, x, estimator, probes, gen):
    model.zero_grad(set_to_none=True)
    reg = GrokAlign(model, 1.0, estimator=estimator, squared=True, probes=probes, generator=gen)
    _, pen = reg(x)
    pen.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), reg.last_backend


def step_time(model, x, y, estimator, probes, reps=20):
    reg = GrokAlign(model, 1e-4, estimator=estimator, probes=probes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ts = []
    for i in range(reps + 3):
        t0 = time.perf_counter()
        out, pen = reg(x)
        loss = F.mse_loss(out, y) + pen
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts), reg.last_backend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             "| model | estimator (probes) | path | relative gradient noise, 1 probe | step ms (float32) | noise x time |",
             "|---|---|---|---:|---:|---:|"]
    for name, sizes, batch in MODELS:
        model = make_model(sizes, torch.float64)
        x, _ = make_batch(sizes, batch, torch.float64)
        exact, _ = grads(model, x, "exact", "sphere", None)
        model32 = make_model(sizes, torch.float32)
        x32, y32 = make_batch(sizes, batch, torch.float32)
        for estimator, probes in (("forward", "rademacher"), ("forward", "sphere"), ("reverse", "sphere")):
            gen = torch.Generator().manual_seed(0)
            errs = []
            for _ in range(args.draws):
                g, path = grads(model, x, estimator, probes, gen)
                errs.append(((g - exact).pow(2).sum() / exact.pow(2).sum()).item())
            noise = statistics.mean(errs)
            ms, path32 = step_time(model32, x32, y32, estimator, probes)
            lines.append(f"| {name} | {estimator} ({probes}) | {path32} | {noise:.3f} | {ms * 1e3:.2f} | {noise * ms * 1e3:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
