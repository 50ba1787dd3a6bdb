"""Forward + backward of ``grokalign::dual_smooth_act`` per activation on the CPU.

    .venv/bin/python bench/smooth_act.py [--threads 1] [--reps 15] [--rows 2048] [--features 1024]

Stacked rows ``[2 * rows, features]`` float32 (``rows`` primal rows, one tangent row each), the op
and its backward called through ``torch.ops.grokalign``; medians of ``--reps`` after 3 warm-ups.
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    P, n = args.rows, args.features
    fwd, bwd = torch.ops.grokalign.dual_smooth_act, torch.ops.grokalign.dual_smooth_act_backward
    print(f"`python bench/smooth_act.py --threads {args.threads} --reps {args.reps} --rows {P} --features {n}`, "
          f"torch {torch.__version__}\n\n| act | fwd + bwd median ms |\n|---|---:|")
    for act, code in op.ACT.items():
        s, g = torch.randn(2 * P, n), torch.randn(2 * P, n)

        def call():
            fwd(s, P, None, code, 1.0, 1.0, 20.0)
            bwd(g, s, P, None, code, 1.0, 1.0, 20.0)

        for _ in range(3):
            call()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        print(f"| {act} | {statistics.median(times) * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
