"""The fused dual-stream layers against cuBLAS GEMMs of the same stacked size, on a GPU.

    .venv/bin/python bench/gpu_layers.py [--reps 100] [--out /tmp/gpu_layers.md]
    TRITON_INTERPRET=1 .venv/bin/python bench/gpu_layers.py --device cpu --reps 1 --quick   # dry run

For each shape (B, IN, OUT) with K = 1 tangent stream over the whole batch and each fast backend
(`cpp`: the CUDA kernels of csrc/cuda; `triton`), on one device:

1. Check, before any timing: `dual_linear` and `dual_linear_sqnorm` (forward outputs and the
   gradients of x, t, weight, bias) against the reference (`ops/mlp/reference.py`) in float64
   on the same inputs, with a subset index; max relative error printed, 1e-10 required.
2. Time, float32 (TF32 off unless --tf32) and bfloat16, CUDA events, medians of --reps calls:
   - `gemm`: `torch.mm` of the stacked rows [(1 + K) B, IN] x [IN, OUT], cuBLAS alone;
   - `fused`: `dual_linear` forward (primal and tangents, bias, activation, masks saved);
   - `fused sqnorm`: `dual_linear_sqnorm` forward (the per-row norm, tangents not written);
   - `gemm fwd+bwd` and `fused fwd+bwd`: the same with the backward (grad of x, t, weight, bias);
     the GEMM baseline is the stacked forward mm plus its two backward mms.
   The target is `fused / gemm <= 1.15`.

Writes a markdown table (stdout, and appended to --out). Build the extension against the
machine's CUDA torch first (`pip install -e . --no-build-isolation`; `TORCH_CUDA_ARCH_LIST=9.0` for
an H100 / H200), then run this script (its check comes first) and `bench/interleaved.py` for whole
training steps.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from grokalign_fast import _backends  # noqa: E402
from grokalign_fast.ops.mlp import function as dual  # noqa: E402

SHAPES = [(256, 784, 200), (1024, 1024, 1024), (512, 4096, 4096), (4096, 4096, 4096)]
QUICK_SHAPES = [(33, 47, 29)]
ACTS = ["relu", "gelu_tanh"]


def inputs(B, IN, OUT, dtype, device, seed=0, index=False):
    g = torch.Generator().manual_seed(seed)
    R = B // 3 + 1 if index else B
    x = torch.randn(B, IN, generator=g, dtype=torch.float64)
    t = torch.randn(1, R, IN, generator=g, dtype=torch.float64)
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64) / IN ** 0.5
    b = torch.randn(OUT, generator=g, dtype=torch.float64)
    idx = torch.randint(0, B, (R,), generator=g) if index else None
    move = lambda v: v.to(device=device, dtype=dtype).requires_grad_(True)  # noqa: E731
    return move(x), move(t), move(w), move(b), (None if idx is None else idx.to(device))


def check(backend, device, act, B=37, IN=53, OUT=29):
    """Max relative error of outputs and gradients against the reference, float64."""
    worst = 0.0
    for fn_name in ("dual_linear", "dual_linear_sqnorm"):
        x, t, w, b, idx = inputs(B, IN, OUT, torch.float64, device, seed=1, index=True)
        results = {}
        for name in (backend, "reference"):
            fn = getattr(dual, fn_name)
            outs = fn(x, t, w, b, act, 0.01, idx, backend=name)
            seeds = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o) for o in outs]
            loss = sum((o * s).sum() for o, s in zip(outs, seeds))
            grads = torch.autograd.grad(loss, [x, t, w, b])
            results[name] = list(outs) + list(grads)
        for a, r in zip(results[backend], results["reference"]):
            worst = max(worst, ((a - r).abs().max() / (r.abs().max() + 1e-30)).item())
    return worst


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, reps, device):
    for _ in range(5):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_shape(backend, device, dtype, act, B, IN, OUT, reps):
    x, t, w, b, _ = inputs(B, IN, OUT, dtype, device)
    stacked = torch.cat([x.detach(), t.detach().reshape(-1, IN)])
    wt = w.detach().t()
    gy = torch.randn(stacked.shape[0], OUT, dtype=dtype, device=device)

    def gemm():
        return torch.mm(stacked, wt)

    def gemm_fb():
        z = torch.mm(stacked, wt)
        torch.mm(gy, w.detach())  # grad of the stacked input
        torch.mm(gy.t(), stacked)  # grad of the weight
        return z

    def fused():
        with torch.no_grad():
            return dual.dual_linear(x, t, w, b, act, 0.01, None, backend=backend)

    def fused_sq():
        with torch.no_grad():
            return dual.dual_linear_sqnorm(x, t, w, b, act, 0.01, None, backend=backend)

    def fused_fb():
        y, tout = dual.dual_linear(x, t, w, b, act, 0.01, None, backend=backend)
        torch.autograd.grad([y, tout], [x, t, w, b], [gy[:B], gy[B:].view_as(tout)])

    ms = {name: median_ms(fn, reps, device)
          for name, fn in (("gemm", gemm), ("fused", fused), ("fused sqnorm", fused_sq),
                           ("gemm fwd+bwd", gemm_fb), ("fused fwd+bwd", fused_fb))}
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in float32 GEMMs (both sides)")
    ap.add_argument("--quick", action="store_true", help="one small shape (a dry run of the script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_layers: no CUDA device here (use --device cpu for a dry run of the code paths)")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    probe = torch.zeros(2, 2, device=device)
    backends = []
    for name in ("cpp", "triton"):
        if name == "triton" and device.type == "cpu" and not (args.quick and _backends.triton_interpreted()):
            print("skip triton: on the CPU it runs only under TRITON_INTERPRET=1, with --quick")
            continue
        why = dual.unavailable_reasons(probe, probe.view(1, 2, 2), probe, None, "relu", None)[name]
        if why is None:
            backends.append(name)
        else:
            print(f"skip {name}: {why}")
    if not backends:
        sys.exit("gpu_layers: no fast backend can run here")
    failed = False
    for name in backends:
        for act in ACTS:
            err = check(name, device, act)
            ok = err <= 1e-10
            failed |= not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name} {act}: max relative error vs reference (float64) {err:.2e}")
    if failed:
        sys.exit("gpu_layers: a fused backend does not match the reference; no timing")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [f"Command: `python {' '.join(sys.argv)}`  ",
             f"Device: {name}, torch {torch.__version__}, TF32 {'on' if args.tf32 else 'off'}, "
             f"{args.reps} reps, medians (ms); K = 1 tangent stream over the whole batch.", "",
             "| backend | dtype | act | B x IN x OUT | gemm | fused | x gemm | fused sqnorm | x gemm "
             "| gemm fwd+bwd | fused fwd+bwd | x gemm |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend in backends:
        for dtype in (torch.float32, torch.bfloat16):
            for act in ACTS:
                for B, IN, OUT in (QUICK_SHAPES if args.quick else SHAPES):
                    ms = time_shape(backend, device, dtype, act, B, IN, OUT, args.reps)
                    row = (f"| {backend} | {str(dtype).replace('torch.', '')} | {act} | {B}x{IN}x{OUT} "
                           f"| {ms['gemm']:.3f} | {ms['fused']:.3f} | {ms['fused'] / ms['gemm']:.2f} "
                           f"| {ms['fused sqnorm']:.3f} | {ms['fused sqnorm'] / ms['gemm']:.2f} "
                           f"| {ms['gemm fwd+bwd']:.3f} | {ms['fused fwd+bwd']:.3f} "
                           f"| {ms['fused fwd+bwd'] / ms['gemm fwd+bwd']:.2f} |")
                    print(row, flush=True)
                    lines.append(row)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
