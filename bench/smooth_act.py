"""Forward + backward of ``grokalign::dual_smooth_act`` per activation on the CPU.

    .venv/bin/python bench/smooth_act.py [--threads 1] [--reps 15] [--rows 2048] [--features 1024]
                                         [--subsample 1.0]

Stacked rows ``[rows + R, features]`` float32: ``rows`` primal rows and one tangent row on each of
``R = subsample * rows`` of them (evenly spaced, through ``index``; ``--subsample 1``: every row, no
index), the op and its backward called through ``torch.ops.grokalign``; medians of ``--reps`` after
10 warm-ups. The ``aten`` row is ATen's GELU forward + backward on the primal rows alone (the plain
model's activation), timed interleaved with the op.
To compare two builds of the extension, run the script once per build in alternating processes
(``PYTHONPATH`` pointing at each tree).
"""
import argparse
import statistics
import time

import torch

from grokalign_fast.ops import dual_smooth_act as op


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--subsample", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    P, n = args.rows, args.features
    fwd, bwd = torch.ops.grokalign.dual_smooth_act, torch.ops.grokalign.dual_smooth_act_backward
    R = max(1, round(args.subsample * P))
    index = None if R == P else torch.linspace(0, P - 1, R).round().long()
    print(f"`python bench/smooth_act.py --threads {args.threads} --reps {args.reps} --rows {P} --features {n} "
          f"--subsample {args.subsample}`, torch {torch.__version__}\n\n| act | fwd + bwd median ms |\n|---|---:|")
    z, gz = torch.randn(P, n), torch.randn(P, n)
    aten_times = []
    for act, code in op.ACT.items():
        s, g = torch.randn(P + R, n), torch.randn(P + R, n)

        def call():
            fwd(s, P, index, code, 1.0, 1.0, 20.0)
            bwd(g, s, P, index, code, 1.0, 1.0, 20.0)

        def aten():
            torch.nn.functional.gelu(z)
            torch.ops.aten.gelu_backward(gz, z)

        for _ in range(10):
            call()
            aten()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            aten()
            aten_times.append(time.perf_counter() - t0)
        print(f"| {act} | {statistics.median(times) * 1e3:.1f} |", flush=True)
    print(f"| aten (gelu, primal rows only) | {statistics.median(aten_times) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
