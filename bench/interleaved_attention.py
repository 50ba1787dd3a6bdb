"""Interleaved timing of the JVP attention op and of transformer training steps, per provider.

    .venv/bin/python bench/interleaved_attention.py [--rounds 5] [--seqs 128,1024,4096] [--probes 1,4]
                                                     [--steps gpt,modadd] [--peak-at 8192] [--out /tmp/attn.md]

**The op** (B = 1, H = 4, d = 64, float32, self-attention without mask), forward + backward of a loss
on ``o`` and ``o_t`` (the tangents' gradients included), for T in ``--seqs`` and P in ``--probes``:
- ``plain``: explicit attention forward + backward, no tangent (the yardstick);
- ``func_jvp``: ``torch.func.jvp`` through the explicit formula, once per probe, then the backward;
- ``reference``: :mod:`grokalign_fast.ops.attention_jvp.reference` (the explicit formula, all probes
  in one batched call);
- ``cpp`` / ``triton``: ``attention_jvp(..., backend=...)`` where that backend can serve.
Before timing, every provider's ``o_t`` is checked against the reference in float64. Memory: the
bytes saved for backward (:func:`providers.saved_bytes`).

**Peak memory** (``--peak-at T``): the C++ op's peak allocation during one forward + backward at
that T (B = 1, H = 4, d = 64, P = 1, float32), counted from the call's start (the inputs and the
cotangents exist before), and the same for ``plain`` (explicit attention, its ``[T, T]`` matrices).

**Training steps** (AdamW, cross-entropy, train mode, one probe):
- ``gpt``: :class:`grokalign_fast.models.GPT` (4 layers, d_model 256, 4 heads, T = 256, vocab 256) at
  batch 8, next-token loss;
- ``modadd``: the one-layer modular-addition transformer (p = 113, d_model 128, 4 heads, d_mlp 512)
  on all 3830 training pairs.
Providers: ``plain``, ``hoffman_vjp`` (``estimator="reverse"``, the reference: an output-space VJP
with a double backward), ``func_jvp`` (``estimator="forward", backend="reference"``), ``ours``
(``estimator="forward"``, the dual-stream engine with the fused attention) and ``ours_sub0.25``.
"""
import argparse
import copy
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from providers import emit, peak_allocated_bytes, saved_bytes, time_interleaved  # noqa: E402

from grokalign_fast import GrokAlign  # noqa: E402
from grokalign_fast.ops.attention_jvp import attention_jvp, reference, unavailable_reasons  # noqa: E402

H, D = 4, 64


def explicit(q, k, v):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def op_inputs(T, P, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    prim = [torch.randn(1, H, T, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]
    tang = [torch.randn(P, 1, H, T, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]
    return prim, tang


def op_forwards(prim, tang):
    """name -> forward(prim, tang) -> (o, o_t) for every provider that can serve these inputs
    (``plain``: explicit attention without tangents, its o_t None)."""
    def plain(prim, tang):
        return explicit(*prim), None

    def func_jvp_ot(prim, tang):
        outs = [torch.func.jvp(explicit, tuple(prim), tuple(t[p] for t in tang)) for p in range(tang[0].shape[0])]
        return outs[0][0], torch.stack([o_t for _, o_t in outs])

    table = {"plain": plain, "func_jvp": func_jvp_ot, "reference": lambda p, t: reference(*p, *t)}
    reasons = unavailable_reasons(*[x.detach() for x in prim], *[x.detach() for x in tang])
    for name in ("cpp", "triton"):
        if reasons.get(name) is None:
            table[name] = (lambda name: lambda p, t: attention_jvp(*p, *t, backend=name))(name)
    return table


def op_providers(T, P):
    """name -> (step, o_t function) for the op benchmark at sequence length T with P probes: the step
    is forward + backward of a loss on o and o_t."""
    prim, tang = op_inputs(T, P)
    go = torch.randn(1, H, T, D)
    gt = torch.randn(P, 1, H, T, D)
    table = {}

    def by(fn):
        def step():
            o, o_t = fn(prim, tang)
            torch.autograd.backward([o] if o_t is None else [o, o_t], [go] if o_t is None else [go, gt])

        return step

    for name, fn in op_forwards(prim, tang).items():
        table[name] = (by(fn), None if name == "plain" else fn)
    return table


def check_ops(table):
    """Every provider's o_t equals the reference's in float64 (1e-10), at T = 37, P = 2."""
    prim, tang = op_inputs(37, 2, dtype=torch.float64, seed=1)
    want = reference(*prim, *tang)[1]
    for name, (_, fn) in table.items():
        if fn is not None:
            got = fn(prim, tang)[1]
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (name, (got - want).abs().max())


def op_rows(seqs, probes, rounds):
    rows = ["| T | P | provider | median ms | x plain | saved for backward (MiB) |", "|---:|---:|---|---:|---:|---:|"]
    for T in seqs:
        for P in probes:
            table = op_providers(T, P)
            check_ops(table)
            steps = {name: step for name, (step, _) in table.items()}
            med = time_interleaved(steps, rounds, warmup=1)
            for name, step in steps.items():
                mib = saved_bytes(step) / 2**20
                rows.append(f"| {T} | {P} | {name} | {med[name] * 1e3:.1f} | {med[name] / med['plain']:.2f} | "
                            f"{mib:.1f} |")
    return rows


def peak_rows(T):
    """Peak allocation (MiB) of one forward + backward of the C++ op and of plain explicit attention."""
    table = op_providers(T, 1)
    rows = [f"| T | provider | peak allocated during forward + backward (MiB) |", "|---:|---|---:|"]
    for name in ("cpp", "plain"):
        if name in table:
            rows.append(f"| {T} | {name} | {peak_allocated_bytes(table[name][0]) / 2**20:.1f} |")
    return rows


def step_providers(name, small=False):
    """name -> step() for a transformer training step (``small``: tiny models, for the smoke test)."""
    if name == "gpt":
        from grokalign_fast.models import GPT

        torch.manual_seed(0)
        vocab, d, layers, T, batch = (32, 32, 1, 16, 2) if small else (256, 256, 4, 256, 8)
        model0 = GPT(vocab, d_model=d, layers=layers, heads=4, context=T)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, vocab, (batch, T + 1), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]

        def loss_of(out):
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

        def body(m):
            return m
    else:
        from grokalign_fast.experiments import data
        from grokalign_fast.experiments.modadd import QUICK, Config, Transformer

        cfg = Config(**{k: v for k, v in QUICK.items() if k in ("p", "d_model", "n_heads", "d_mlp")}) if small \
            else Config()
        torch.manual_seed(0)
        model0 = Transformer(cfg)
        x, y, _, _ = data.modular_addition(cfg.p, cfg.train_frac, seed=0)

        def loss_of(out):
            return F.cross_entropy(out, y)

        def body(m):
            return m.body

    table = {}

    def add(label, kw):
        m = copy.deepcopy(model0)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        reg = None if kw is None else GrokAlign(body(m), 1e-3, generator=torch.Generator().manual_seed(0), **kw)

        def step():
            inp = x if name == "gpt" else m.embed(x)
            out, pen = (body(m)(inp), 0.0) if reg is None else reg(inp)
            loss = loss_of(out) + pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        table[label] = step

    add("plain", None)
    add("hoffman_vjp", dict(estimator="reverse", backend="reference"))
    add("func_jvp", dict(estimator="forward", backend="reference"))
    add("ours", dict(estimator="forward"))
    add("ours_sub0.25", dict(estimator="forward", subsample=0.25))
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seqs", default="128,1024,4096")
    ap.add_argument("--probes", default="1,4")
    ap.add_argument("--steps", default="gpt,modadd", help="transformer steps to time ('' for none)")
    ap.add_argument("--peak-at", default="", help="sequence lengths at which to measure the op's peak allocation")
    ap.add_argument("--small", action="store_true", help="tiny transformers (a smoke test of the script)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the markdown tables to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"Command: `{' '.join(['python'] + sys.argv)}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{args.threads} threads, {args.rounds} interleaved rounds, medians.", ""]
    seqs = [int(s) for s in args.seqs.split(",") if s]
    if seqs:
        lines += op_rows(seqs, [int(p) for p in args.probes.split(",")], args.rounds) + [""]
    for T in [int(t) for t in args.peak_at.split(",") if t]:
        lines += peak_rows(T) + [""]
    for name in [s for s in args.steps.split(",") if s]:
        steps = step_providers(name, args.small)
        med = time_interleaved(steps, args.rounds, warmup=1)
        lines += [f"| {name} step | median ms | x plain |", "|---|---:|---:|"]
        lines += [f"| {p} | {med[p] * 1e3:.1f} | {med[p] / med['plain']:.2f} |" for p in steps] + [""]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
