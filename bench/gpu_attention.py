"""The JVP attention op on a GPU against FlashAttention's forward and the public JVP kernels.

    .venv/bin/python bench/gpu_attention.py [--reps 50] [--out /tmp/gpu_attention.md]
    TRITON_INTERPRET=1 .venv/bin/python bench/gpu_attention.py --device cpu --quick --reps 1   # dry run

1. Check, before any timing: ``attention_jvp`` of each fast backend (``triton``; ``cpp``, the CUDA
   kernel of csrc/cuda) against the reference formula in float64, values and the gradients of all
   six inputs, causal and not, P = 1 and 3, odd sizes; 1e-10 required.
2. Time (CUDA events, medians of --reps calls), B = 4, H = 8, d = 64, T in {1024, 4096}, not causal,
   in bfloat16 and float32 (TF32 off):
   - ``sdpa``: ``F.scaled_dot_product_attention`` forward (PyTorch's fastest kernel for the dtype:
     FlashAttention-2 for bfloat16, memory-efficient attention for float32), the yardstick;
   - ``ours P=1`` / ``ours P=4``: ``attention_jvp(..., backend=...)`` forward (o and all P tangents);
   - ``jvp-flash-attention``: ``torch.func.jvp`` of ``jvp_flash_attention.jvp_attention.attention``
     (PyPI ``jvp_flash_attention``; its JVP kernel has no gradient through the tangent), P = 1, when
     installed;
   - the same forward + backward (the gradients of every input through ``o`` and ``o_t``) for sdpa
     and ours.
   Targets (T = 4096, d = 64): ``ours P=1`` forward at most 2.5x ``sdpa``'s forward, and faster
   than jvp-flash-attention on the same inputs.

Writes a markdown table (stdout, and appended to --out). FLOPs per forward: sdpa 4 B H T^2 d; ours
with P tangents (2 + 5 P) B H T^2 d (s, s_t's two products, p v, p s_t v, p v_t), 3.5x sdpa at P = 1.
"""
import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_layers import median_ms  # noqa: E402
from providers import emit  # noqa: E402

from grokalign_fast import _backends  # noqa: E402
from grokalign_fast.ops.attention_jvp import attention_jvp, reference, unavailable_reasons  # noqa: E402

SEQS = (1024, 4096)
QUICK_SEQS = (37,)
B, H, D = 4, 8, 64


def inputs(b, h, T, S, d, P, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(  # noqa: E731
        device=device, dtype=dtype).requires_grad_()
    prim = [make(b, h, T, d), make(b, h, S, d), make(b, h, S, d + 3 if d % 2 else d)]
    tang = [make(P, b, h, T, d), make(P, b, h, S, d), make(P, *prim[2].shape)]
    return prim, tang


def check(backend, device):
    """Max relative error of o, o_t and the six gradients against the reference, float64."""
    worst = 0.0
    for causal in (False, True):
        for P in (1, 3):
            prim, tang = inputs(2, 3, 19, 23 if not causal else 19, 11, P, torch.float64, device, seed=P)
            results = {}
            for name in (backend, "reference"):
                if name == "reference":
                    o, o_t = reference(*prim, *tang, causal=causal)
                else:
                    o, o_t = attention_jvp(*prim, *tang, causal=causal, backend=name)
                seeds = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device).view_as(t) for t in (o, o_t)]
                loss = (o * seeds[0]).sum() + (o_t * seeds[1]).sum()
                results[name] = [o, o_t] + list(torch.autograd.grad(loss, prim + tang))
            for a, r in zip(results[backend], results["reference"]):
                worst = max(worst, ((a - r).abs().max() / (r.abs().max() + 1e-30)).item())
    return worst


def jvp_flash():
    """jvp_flash_attention's attention function, or None when the package is not installed."""
    try:
        from jvp_flash_attention.jvp_attention import attention
    except ImportError:
        return None
    return attention


def time_seq(backends, device, dtype, T, reps, b=B, h=H, d=D):
    prim1, tang1 = inputs(b, h, T, T, d, 1, dtype, device)
    prim4, tang4 = inputs(b, h, T, T, d, 4, dtype, device, seed=1)
    go = torch.randn_like(prim1[0])
    gt1, gt4 = torch.randn_like(tang1[0]), torch.randn_like(tang4[0])
    q, k, v = (p.detach() for p in prim1)
    ms = {}

    def sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    def sdpa_fb():
        o = F.scaled_dot_product_attention(*prim1)
        torch.autograd.grad(o, prim1, go)

    ms["sdpa fwd"] = median_ms(sdpa, reps, device)
    ms["sdpa fwd+bwd"] = median_ms(sdpa_fb, reps, device)
    for name in backends:
        for P, prim, tang, gt in ((1, prim1, tang1, gt1), (4, prim4, tang4, gt4)):
            def fwd(prim=prim, tang=tang):
                with torch.no_grad():
                    return attention_jvp(*prim, *tang, backend=name)

            def fb(prim=prim, tang=tang, gt=gt):
                o, o_t = attention_jvp(*prim, *tang, backend=name)
                torch.autograd.grad([o, o_t], prim + tang, [go, gt])

            ms[f"{name} P={P} fwd"] = median_ms(fwd, reps, device)
            ms[f"{name} P={P} fwd+bwd"] = median_ms(fb, reps, device)
    attention = jvp_flash()
    if attention is not None:
        qt, kt, vt = (t[0].detach() for t in tang1)

        def other():
            with torch.no_grad():
                return torch.func.jvp(attention, (q, k, v), (qt, kt, vt))

        ms["jvp-flash-attention P=1 fwd"] = median_ms(other, reps, device)
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="one small shape (a dry run of the script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_attention: no CUDA device here (use --device cpu --quick for a dry run)")
    torch.backends.cuda.matmul.allow_tf32 = False
    prim, tang = inputs(1, 1, 2, 2, 8, 1, torch.float32, device)
    reasons = unavailable_reasons(*prim, *tang)
    backends = []
    for name in ("triton", "cpp"):
        if name == "triton" and device.type == "cpu" and not (args.quick and _backends.triton_interpreted()):
            print("skip triton: on the CPU it runs only under TRITON_INTERPRET=1, with --quick")
            continue
        if reasons.get(name) is None:
            backends.append(name)
        else:
            print(f"skip {name}: {reasons[name]}")
    if not backends:
        sys.exit("gpu_attention: no fast backend can run here")
    failed = False
    for name in backends:
        err = check(name, device)
        failed |= not err <= 1e-10
        print(f"{'ok  ' if err <= 1e-10 else 'FAIL'} {name}: max relative error vs reference (float64) {err:.2e}")
    if failed:
        sys.exit("gpu_attention: a backend does not match the reference; no timing")
    if jvp_flash() is None:
        print("jvp-flash-attention: not installed (pip install jvp_flash_attention), its column is left out")
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    b, h, d = (1, 2, 16) if args.quick else (B, H, D)
    lines = [f"Command: `python {' '.join(sys.argv)}`  ",
             f"Device: {dev}, torch {torch.__version__}, TF32 off, {args.reps} reps, medians (ms); "
             f"B = {b}, H = {h}, d = {d}, not causal.", "",
             "| dtype | T | provider | fwd | x sdpa fwd | fwd+bwd | x sdpa fwd+bwd |",
             "|---|---:|---|---:|---:|---:|---:|"]
    # The interpreter's kernels take float32 / float64 only: a CPU dry run times float32.
    for dtype in ((torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)):
        for T in (QUICK_SEQS if args.quick else SEQS):
            ms = time_seq(backends, device, dtype, T, args.reps, b, h, d)
            names = ["sdpa"] + [f"{n} P={P}" for n in backends for P in (1, 4)] + ["jvp-flash-attention P=1"]
            for name in names:
                fwd, fb = ms.get(f"{name} fwd"), ms.get(f"{name} fwd+bwd")
                if fwd is None:
                    continue
                fb_cells = "- | -" if fb is None else f"{fb:.3f} | {fb / ms['sdpa fwd+bwd']:.2f}"
                lines.append(f"| {str(dtype).replace('torch.', '')} | {T} | {name} | {fwd:.3f} "
                             f"| {fwd / ms['sdpa fwd']:.2f} | {fb_cells} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
