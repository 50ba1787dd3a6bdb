"""The argmax of a 2-d max pool: ``grokalign::max_pool2d_argmax`` against ATen's
``max_pool2d_with_indices`` (what the engine's max-pool rule would call for the primal rows' argmax).

    .venv/bin/python bench/max_pool_argmax.py [--threads 1] [--reps 15]

float32 inputs of the 6-convolution CNN's pools (2 x 2 windows, stride 2) at batch 128, and a 3 x 3
window with stride 2 and padding 1 (ResNet's stem pool) over [64, 64, 32, 32]; interleaved, medians
of ``--reps`` after 3 warm-ups. Both outputs are checked equal first.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from grokalign_fast.ops import dual_max_pool as op

CASES = [((128, 32, 32, 32), dict(kernel_size=2)), ((128, 64, 16, 16), dict(kernel_size=2)),
         ((64, 64, 32, 32), dict(kernel_size=3, stride=2, padding=1))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"`python bench/max_pool_argmax.py --threads {args.threads} --reps {args.reps}`, torch {torch.__version__}\n")
    print("| input | window | ATen max_pool2d_with_indices ms | max_pool2d_argmax ms | ratio |\n|---|---|---:|---:|---:|")
    for shape, kw in CASES:
        z = torch.relu(torch.randn(shape))  # after a ReLU, as in the models: ties at 0

        def aten():
            return F.max_pool2d(z, return_indices=True, **kw)[1]

        def ours():
            return op.max_pool2d_argmax(z, **kw)

        assert torch.equal(aten(), ours())
        times = {"aten": [], "ours": []}
        for _ in range(3):
            aten(), ours()
        for _ in range(args.reps):
            for name, f in (("aten", aten), ("ours", ours)):
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        a, o = (statistics.median(times[k]) * 1e3 for k in ("aten", "ours"))
        print(f"| {list(shape)} | {kw} | {a:.2f} | {o:.2f} | {a / o:.1f}x |")


if __name__ == "__main__":
    main()
