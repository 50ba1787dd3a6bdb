"""Interleaved timing of one training step of the convolutional models, per provider.

    .venv/bin/python bench/interleaved_conv.py [--rounds 10] [--models cnn6,resnet18] [--providers a,b]
                                               [--out /tmp/conv.md]

Models (``grokalign_fast.models``, CIFAR-sized inputs 3x32x32, cross-entropy, AdamW, train mode):
the 6-convolution CNN at batch 128 and ResNet-18 (BatchNorm in train mode) at batch 64.

Providers:
- ``plain``: no penalty;
- ``authors``: the authors' estimator, an extra forward and one output-space VJP with
  ``create_graph``, per sample ``sqrt(max(C ||u^T J||^2, 1e-8))``;
- ``hoffman_vjp``: one output-space VJP reusing the forward (``GrokAlign(estimator="reverse",
  backend="reference")``);
- ``func_jvp``: ``torch.func.jvp`` with one input-space probe, the same probes as ours
  (``GrokAlign(estimator="forward", backend="reference")``);
- ``dual``: the dual-stream engine, its rules in plain PyTorch (``GrokAlign(estimator="forward",
  backend="dual")``);
- ``dual_sub0.25``: the same with ``subsample=0.25``;
- ``cpp``, ``cpp_sub0.25``: the engine with the extension's epilogues (``backend="cpp"``), where the
  extension is built.

Before timing, ``dual`` and ``cpp`` are checked against ``func_jvp`` on the same probes (float64, 1e-10).
Each round runs every provider once in a fresh random order; medians, ratios to ``plain``, and
the bytes saved for backward in one step.
"""
import argparse
import copy
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from providers import saved_bytes, time_interleaved  # noqa: E402

from grokalign_fast import GrokAlign, available_backends  # noqa: E402
from grokalign_fast.models import ResNet18, cnn6  # noqa: E402

LAMBDA = 1e-3
CPP = available_backends()["cpp"]
MODELS = {
    "cnn6": (lambda width: cnn6(width=width), 128, 32),
    "resnet18": (lambda width: ResNet18(width=width), 64, 64),
}


def authors_penalty(model, x):
    """The authors' estimator: an extra forward, one unit output-space probe per sample through a
    ``create_graph`` VJP, per sample ``sqrt(max(C ||u^T J||^2, 1e-8))``, batch mean."""
    xg = x.detach().requires_grad_(True)
    out = model(xg)
    u = torch.randn_like(out)
    u = u / u.norm(dim=1, keepdim=True)
    (g,) = torch.autograd.grad(out, xg, u, create_graph=True)
    est = out.shape[1] * g.pow(2).flatten(1).sum(dim=1)
    return torch.sqrt(torch.clamp(est, min=1e-8)).mean()


def providers(model0, x, y, only=None):
    """name -> step() for every provider (each with its own copy of the model and optimiser)."""
    table = {}

    def add(name, forward):
        if only is not None and name != "plain" and name not in only:
            return
        model = copy.deepcopy(model0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        fwd = forward(model)

        def step():
            out, pen = fwd()
            loss = F.cross_entropy(out, y) + pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        table[name] = step

    def reg(**kw):
        def forward(m):
            r = GrokAlign(m, LAMBDA, generator=torch.Generator().manual_seed(0), **kw)
            return lambda: r(x)

        return forward

    add("plain", lambda m: (lambda: (m(x), x.new_zeros(()))))
    add("authors", lambda m: (lambda: (m(x), LAMBDA * authors_penalty(m, x))))
    add("hoffman_vjp", reg(estimator="reverse", backend="reference"))
    add("func_jvp", reg(estimator="forward", backend="reference"))
    add("dual", reg(estimator="forward", backend="dual"))
    add("dual_sub0.25", reg(estimator="forward", backend="dual", subsample=0.25))
    if CPP is None:
        add("cpp", reg(estimator="forward", backend="cpp"))
        add("cpp_sub0.25", reg(estimator="forward", backend="cpp", subsample=0.25))
    return table


def check_dual_matches_reference(make, batch):
    """The engine's penalty and every parameter gradient (plain rules, and the extension's epilogues
    where built) equal the reference's in float64 (1e-10)."""
    torch.manual_seed(0)
    model = make().double().train()
    x = torch.randn(min(batch, 4), 3, 32, 32, dtype=torch.float64)

    def step(backend):
        m = copy.deepcopy(model)
        reg = GrokAlign(m, 1.0, estimator="forward", backend=backend, squared=True,
                        generator=torch.Generator().manual_seed(1))
        out, pen = reg(x)
        return pen.detach(), torch.autograd.grad(out.sum() + pen, list(m.parameters()))

    p1, g1 = step("reference")
    for backend in ("dual",) + (("cpp",) if CPP is None else ()):
        p0, g0 = step(backend)
        assert torch.allclose(p0, p1, rtol=1e-10, atol=0), (backend, p0, p1)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max())), (backend, (a - b).abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--models", default="cnn6,resnet18")
    ap.add_argument("--providers", default=None, help="comma-separated (plain is always timed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=0, help="override the models' width (0: cnn6 32, resnet18 64)")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = None if args.providers is None else set(args.providers.split(","))
    lines = [
        f"Command: `{' '.join(['python'] + sys.argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds, medians.",
        "",
        "| model | provider | median ms | x plain | saved for backward (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for name in args.models.split(","):
        build, batch, width = MODELS[name]
        width = args.width or width
        make = lambda: build(width)  # noqa: E731
        check_dual_matches_reference(lambda: build(4), batch)
        torch.manual_seed(0)
        model = make()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        steps = providers(model, x, y, only)
        mem = {k: saved_bytes(s) for k, s in steps.items()}
        med = time_interleaved(steps, args.rounds, warmup=1)
        label = f"{name}-w{width}-b{batch}"
        rows = [f"| {label} | {k} | {med[k] * 1e3:.0f} | {med[k] / med['plain']:.2f} | {mem[k] / 2**20:.0f} |"
                for k in steps]
        print("\n".join(rows), flush=True)
        lines += rows
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
