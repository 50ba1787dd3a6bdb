"""Timing sanity check (not a test) of the C++ dual-stream MLP layers on the CPU.

The paper's MLP (784-200-200-10, ReLU, no bias), batch 200, one input-space
probe (K = 1) over the whole batch, 2 threads. One training step (forward +
backward w.r.t. the weights) of

  * plain:       the MLP alone, no tangents (the baseline);
  * fused_cpp:   grokalign_fast.ops.mlp.cpp dual_linear x2 + dual_linear_sqnorm,
                 loss = CE(logits) + lam * mean(sq);
  * torch_dual:  the same penalty in plain PyTorch, primal and tangent rows
                 stacked along the batch (one GEMM per layer, ReLU mask from the
                 primal), for context.

The GEMM FLOPs of a dual step are exactly 2x a plain step; the target is a
ratio <= 2.0x. Providers are timed interleaved (each repetition runs every
provider once, in rotating order) and the medians reported. A correctness
check against the reference backend runs first. The probe is drawn once
(drawing it costs the same for every estimator and is timed separately).

    python bench/sanity_mlp_cpp.py [--reps 300] [--threads 2] [--clock wall|cpu]

On a shared, oversubscribed machine, OpenMP's spinning threads make 2-thread
wall-clock times pathological (medians of ~180 ms for a ~3 ms step were seen at
load 4 on 2 cores): run with ``OMP_WAIT_POLICY=PASSIVE`` there, or use
``--threads 1 --clock cpu`` (process CPU time of one thread), which measures the
work itself.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from grokalign_fast.ops.mlp import cpp, reference

SIZES = (784, 200, 200, 10)
BATCH = 200
LAM = 0.1


def make_problem(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, SIZES[0], generator=g, dtype=dtype)
    labels = torch.randint(0, SIZES[-1], (BATCH,), generator=g)
    weights = [
        (torch.randn(o, i, generator=g, dtype=dtype) / i**0.5).requires_grad_()
        for i, o in zip(SIZES[:-1], SIZES[1:])
    ]
    probe = torch.randn(1, BATCH, SIZES[0], generator=g, dtype=dtype)
    return x, labels, weights, probe


def plain_step(x, labels, weights, probe):
    h = x
    for w in weights[:-1]:
        h = torch.relu(h @ w.t())
    loss = F.cross_entropy(h @ weights[-1].t(), labels)
    return torch.autograd.grad(loss, weights)


def fused_step(x, labels, weights, probe, module=cpp):
    h, t = x, probe
    for w in weights[:-1]:
        h, t = module.dual_linear(h, t, w, None, "relu")
    logits, sq = module.dual_linear_sqnorm(h, t, weights[-1], None, "identity")
    loss = F.cross_entropy(logits, labels) + LAM * sq.mean()
    return torch.autograd.grad(loss, weights)


def torch_dual_step(x, labels, weights, probe):
    B = x.shape[0]
    h = torch.cat([x, probe[0]])
    for w in weights[:-1]:
        z = h @ w.t()
        mask = (z[:B] > 0).to(z.dtype)
        h = torch.cat([z[:B] * mask, z[B:] * mask])
    z = h @ weights[-1].t()
    loss = F.cross_entropy(z[:B], labels) + LAM * z[B:].pow(2).sum(1).mean()
    return torch.autograd.grad(loss, weights)


PROVIDERS = {"plain": plain_step, "fused_cpp": fused_step, "torch_dual": torch_dual_step}


def check(problem):
    got = fused_step(*problem)
    exp = fused_step(*problem, module=reference)
    alt = torch_dual_step(*problem)
    for g, e, a in zip(got, exp, alt):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    problem = make_problem()
    check(problem)

    names = list(PROVIDERS)
    times = {n: [] for n in names}
    for _ in range(args.warmup):
        for n in names:
            PROVIDERS[n](*problem)
    for i in range(args.reps):
        for j in range(len(names)):
            n = names[(i + j) % len(names)]
            t0 = clock()
            PROVIDERS[n](*problem)
            times[n].append(clock() - t0)
    t0 = time.perf_counter()
    for _ in range(50):
        torch.randn(1, BATCH, SIZES[0])
    probe_ms = (time.perf_counter() - t0) / 50 * 1e3

    base = statistics.median(times["plain"])
    print(f"MLP {'-'.join(map(str, SIZES))}, batch {BATCH}, K=1, ReLU, no bias, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, {args.reps} interleaved reps")
    for n in names:
        med = statistics.median(times[n])
        q1, _, q3 = statistics.quantiles(times[n], n=4)
        print(
            f"  {n:11s} median {med * 1e3:8.3f} ms (IQR {q1 * 1e3:.3f}-{q3 * 1e3:.3f}, min {min(times[n]) * 1e3:.3f})"
            f"  median ratio to plain {med / base:5.2f}x, min ratio {min(times[n]) / min(times['plain']):5.2f}x"
        )
    print(f"  drawing the Gaussian probe: {probe_ms:.3f} ms per step (not included above)")


if __name__ == "__main__":
    main()
