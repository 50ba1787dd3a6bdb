"""Interleaved timing of one MLP training step per provider; medians and ratios to plain.

    .venv/bin/python bench/interleaved.py [--rounds 60] [--shapes all|paper|fast|wide] [--providers a,b]
                                          [--out bench/RESULTS.md]

Each round runs every provider once, in a fresh random order, so slow drifts of
a shared machine hit all providers alike. Reports the median step time, its
ratio to the plain step's median, and the bytes saved for backward in one step.
"""
import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from check import check_fused_matches_reference  # noqa: E402
from providers import make_batch, make_model, make_step, providers, saved_bytes, time_interleaved  # noqa: E402
from shapes import SHAPES  # noqa: E402


# The exact norm of a 4096-output model takes 4096 VJPs per step: left out there.
SKIP = {"4096x4": ("exact",)}


def run_shape(shape, rounds, warmup=3, only=None):
    model = make_model(shape.sizes, shape.dtype, shape.bias)
    x, y = make_batch(shape.sizes, shape.batch, shape.dtype)
    table = {k: v for k, v in providers(model, x).items()
             if k not in SKIP.get(shape.name, ()) and (only is None or k == "plain" or k in only)}
    for name in table:
        if name in ("fused_cpp", "fused_triton"):
            check_fused_matches_reference(model, x, name.split("_")[1],
                                          rtol=1e-10 if shape.dtype == torch.float64 else 1e-4)
    steps = {name: make_step(*v, y) for name, v in table.items()}
    mem = {name: saved_bytes(step) for name, step in steps.items()}
    med = time_interleaved(steps, rounds, warmup=1 if shape.name == "4096x4" else warmup)
    return [(name, med[name] * 1e3, med[name] / med["plain"], mem[name] / 2**20) for name in steps]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--shapes", default="fast", choices=["all", "fast", "paper", "wide"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    ap.add_argument("--providers", default=None,
                    help="comma-separated providers to time (plain is always timed); default: all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = None if args.providers is None else set(args.providers.split(","))
    shapes = SHAPES
    if args.shapes == "fast":
        shapes = [s for s in SHAPES if s.name != "4096x4"]
    elif args.shapes == "wide":
        shapes = [s for s in SHAPES if s.name == "4096x4"]
    elif args.shapes == "paper":
        shapes = [s for s in SHAPES if s.name == "784-200-200-10"]
    lines = [
        f"Command: `{' '.join(['python'] + sys.argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds, medians.",
        "",
        "| shape | provider | median ms | x plain | saved for backward (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for shape in shapes:
        rounds = max(5, args.rounds // 6) if shape.name == "4096x4" else args.rounds
        rows = [f"| {shape.id} | {name} | {ms:.2f} | {ratio:.2f} | {mib:.1f} |"
                for name, ms, ratio, mib in run_shape(shape, rounds, only=only)]
        print("\n".join(rows), flush=True)
        lines += rows
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
