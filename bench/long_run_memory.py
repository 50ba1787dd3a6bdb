"""Resident memory over a long GrokAlign training run: the digits model of ``grok-digits``
(MLP 64-200-200-10, init scale 8, MSE, AdamW, batch 200, the demo's GrokAlign settings), sampled
every ``--every`` steps.

    .venv/bin/python bench/long_run_memory.py [--steps 20000] [--every 1000] [--out /tmp/mem.md]

Prints one markdown row per sample (step, RSS in MiB, change from the first sample after warm-up)
and the largest change after warm-up; the run holds its memory flat when that stays within a few
percent (a growing cache, a kept graph or an accumulating list would climb with the steps).
"""
import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from providers import emit  # noqa: E402

from grokalign_fast import GrokAlign  # noqa: E402
from grokalign_fast.experiments import data  # noqa: E402
from grokalign_fast.experiments.grok_digits import DEFAULT_GROKALIGN  # noqa: E402
from grokalign_fast.models import mlp  # noqa: E402


def rss_mib() -> float:
    """The process's resident set size (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=1000, help="steps before the baseline sample")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = data.digits(1000)
    model = mlp([64, 200, 200, 10], bias=True, init_scale=8.0, seed=0)
    kw = {k: v for k, v in DEFAULT_GROKALIGN.items() if k != "weight"}
    reg = GrokAlign(model, DEFAULT_GROKALIGN["weight"], generator=torch.Generator().manual_seed(0), **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    order = torch.Generator().manual_seed(1)
    y_all = F.one_hot(split.y_train, 10).float()
    samples = []
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, split.x_train.shape[0], (200,), generator=order)
        out, pen = reg(split.x_train[rows])
        loss = F.mse_loss(out, y_all[rows]) + pen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.warmup:
            samples.append((step, rss_mib()))
    base = next((m for s, m in samples if s >= args.warmup), samples[0][1])
    lines = [f"Command: `{' '.join(['python'] + sys.argv)}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; path "
             f"{reg.last_backend}.", "", "| step | RSS (MiB) | vs step " + str(args.warmup) + " |", "|---:|---:|---:|"]
    lines += [f"| {s} | {m:.1f} | {100 * (m - base) / base:+.2f}% |" for s, m in samples]
    drift = max(abs(m - base) / base for s, m in samples if s >= args.warmup)
    lines += ["", f"Largest change after step {args.warmup}: {100 * drift:.2f}%"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
