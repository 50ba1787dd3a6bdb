"""Interleaved timing of the engine's layer norm: the one-pass op ``grokalign::dual_layer_norm`` against
the ATen rule it replaces, and GPT training steps with and without it.

    .venv/bin/python bench/interleaved_norm.py [--rounds 30] [--batch 8] [--seq 256] [--width 256]
                                               [--steps 5] [--threads 2] [--out /tmp/norm.md]

**The rule** (``grokalign_fast.dual.rules.norm.layer_norm`` on stacked rows ``[2B, T, d]``: B primal
samples and one tangent stream, so ``2 B T`` rows of ``d`` features, half of them primal; float32),
forward + backward of a loss on its output, weight and bias requiring gradients:
- ``aten``: the rule in ATen ops (``kernels="torch"``: F.layer_norm on the primal rows, var_mean, the
  centred tangent, two means, the affine and a join);
- ``cpp``: the same rule with the extension's op (``kernels="cpp"``).
RMS norm the same way (``rms_aten`` / ``rms_cpp``). Before timing, both paths' outputs and gradients
are checked against each other in float64. The byte floor: the forward reads the rows and writes
the output (8 bytes per float32 entry), the backward reads rows and cotangent and writes the
gradient (12 bytes per entry); the table gives the time that memory traffic takes at the measured
copy bandwidth (``copy``: a ``clone`` of the rows, 8 bytes per entry).

**GPT steps** (:class:`grokalign_fast.models.GPT`, 4 layers, d_model ``--width``, 4 heads, T ``--seq``,
vocab 256, batch ``--batch``; AdamW, next-token loss, ``GrokAlign(estimator="forward")``): ``plain``
(no penalty), ``ours`` (the engine with the extension's kernels, the norm op included) and
``ours_aten_norm`` (the same with the norm rules on ATen ops), interleaved in one process.
"""
import argparse
import contextlib
import copy
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
from providers import emit, time_interleaved  # noqa: E402

from grokalign_fast import GrokAlign  # noqa: E402
from grokalign_fast.dual.rules import norm as norm_rules  # noqa: E402
from grokalign_fast.dual.streams import Streams  # noqa: E402
from grokalign_fast.ops import dual_layer_norm as op  # noqa: E402


def rule_inputs(B, T, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * B, T, d, generator=g, dtype=dtype).requires_grad_()
    w = (torch.rand(d, generator=g, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(d, generator=g, dtype=dtype).requires_grad_()
    return z, w, b


def rule_call(kernels, rms, z, w, b):
    """The engine's rule on z [2B, T, d] (B primal samples, one tangent stream) with ``kernels``."""
    B = z.shape[0] // 2
    ctx = Streams(B, 1, B, None)
    ctx.kernels = kernels
    ctx.mark(z)
    if rms:
        out = norm_rules.rms_norm(ctx, F.rms_norm, (z, (z.shape[-1],), w, 1e-5), {})
    else:
        out = norm_rules.layer_norm(ctx, F.layer_norm, (z, (z.shape[-1],), w, b, 1e-5), {})
    assert ctx.kernel == ("cpp" if kernels == "cpp" else None)
    return out


def check_rules():
    """Both paths of both rules agree in float64 (output and every gradient) to 1e-10."""
    for rms in (False, True):
        z, w, b = rule_inputs(3, 5, 37, torch.float64, seed=1)
        got = []
        for kernels in ("torch", "cpp"):
            out = rule_call(kernels, rms, z, w, b)
            grads = torch.autograd.grad(out, [z, w] + ([] if rms else [b]), torch.ones_like(out) + out.detach())
            got.append([out.detach(), *grads])
        for a, c in zip(*got):
            assert torch.allclose(a, c, rtol=1e-10, atol=1e-12), (rms, (a - c).abs().max())


def rule_rows(B, T, d, rounds):
    z, w, b = rule_inputs(B, T, d, torch.float32)
    cot = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    steps = {}
    for rms in (False, True):
        for kernels in ("torch", "cpp"):
            def step(kernels=kernels, rms=rms):
                out = rule_call(kernels, rms, z, w, b)
                torch.autograd.backward(out, cot)
                z.grad = w.grad = b.grad = None

            steps[("rms_" if rms else "") + ("aten" if kernels == "torch" else "cpp")] = step
    zc = z.detach()
    steps["copy"] = lambda: zc.clone()
    med = time_interleaved(steps, rounds, warmup=3)
    entries = z.numel()
    bandwidth = 8 * entries / med["copy"]  # bytes per second of a read + write
    floor = 20 * entries / bandwidth  # forward 8 bytes per entry + backward 12
    rows = [f"Rule at [{2 * B}, {T}, {d}] float32 ({2 * B * T} rows of {d}, half primal); copy bandwidth "
            f"{bandwidth / 1e9:.1f} GB/s, so the forward + backward byte floor is {floor * 1e3:.2f} ms.", "",
            "| rule | median ms (fwd + bwd) | x floor | x its ATen rule |", "|---|---:|---:|---:|"]
    for name in ("aten", "cpp", "rms_aten", "rms_cpp"):
        aten = med["rms_aten" if name.startswith("rms") else "aten"]
        rows.append(f"| {name} | {med[name] * 1e3:.2f} | {med[name] / floor:.1f} | {med[name] / aten:.2f} |")
    return rows


@contextlib.contextmanager
def norm_op_off():
    """The norm rules on ATen ops: the op reports itself unavailable."""
    saved = op.unavailable_reason
    op.unavailable_reason = lambda s: "switched off by the benchmark"
    try:
        yield
    finally:
        op.unavailable_reason = saved


def gpt_steps(B, T, d):
    from grokalign_fast.models import GPT

    torch.manual_seed(0)
    model0 = GPT(256, d_model=d, layers=4, heads=4, context=T)
    tokens = torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    table = {}

    def add(label, penalty, off=False):
        m = copy.deepcopy(model0)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        reg = GrokAlign(m, 1e-3, estimator="forward", generator=torch.Generator().manual_seed(0)) if penalty else None

        def step():
            with norm_op_off() if off else contextlib.nullcontext():
                out, pen = (m(x), 0.0) if reg is None else reg(x)
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)) + pen
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if reg is not None:
                counts = reg.last_plan.counts
                assert ("layer_norm[cpp]" in counts) != off, counts

        table[label] = step

    add("plain", False)
    add("ours", True)
    add("ours_aten_norm", True, off=True)
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds of the rule")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="interleaved rounds of the GPT step (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the markdown tables to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reason = op.unavailable_reason(torch.zeros(1))
    if reason is not None:
        sys.exit(f"grokalign::dual_layer_norm cannot run: {reason}")
    check_rules()
    lines = [f"Command: `{' '.join(['python'] + sys.argv)}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{args.threads} threads, medians of interleaved rounds.", ""]
    lines += rule_rows(args.batch, args.seq, args.width, args.rounds) + [""]
    if args.steps:
        steps = gpt_steps(args.batch, args.seq, args.width)
        med = time_interleaved(steps, args.steps, warmup=1)
        lines += [f"GPT step ({args.steps} rounds)", "", "| provider | median ms | x plain |", "|---|---:|---:|"]
        lines += [f"| {p} | {med[p] * 1e3:.1f} | {med[p] / med['plain']:.2f} |" for p in steps] + [""]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
