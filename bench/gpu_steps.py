"""Whole training steps with GrokAlign against plain steps, on one device (a GPU where there is one).

    .venv/bin/python bench/gpu_steps.py [--device cuda] [--rounds 30] [--out /tmp/steps.md]
    TRITON_INTERPRET=1 .venv/bin/python bench/gpu_steps.py --device cpu --quick --rounds 1   # dry run

Models: the paper's MLP 784-200-200-10 at batch 128 (ReLU, MSE), ``cnn6`` at batch 128 (3x32x32,
cross-entropy) and the GPT of ``grokalign_fast.models`` (4 layers, d_model 256, T = 256) at batch
8; AdamW; ``--dtype`` float32 or bfloat16 autocast. Providers: ``plain``, ``ours`` (one probe,
``estimator="forward"``: the fused path ``auto`` picks), ``ours_sub0.25`` and, where Triton runs on
the device, ``triton`` (``backend="triton"``: the per-layer Triton MLP ops for the MLP, the
dual-stream engine with the Triton epilogues for the others). Before timing, each model's fused
penalty and gradients (``auto``'s and ``triton``'s) are checked against the reference in float64. Each round runs
every provider once in a fresh random order, each step ending in a device synchronisation; medians
and ratios to plain.
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
from providers import emit, time_interleaved  # noqa: E402

from grokalign_fast import GrokAlign, _backends  # noqa: E402
from grokalign_fast.models import GPT, cnn6, mlp  # noqa: E402


def models(quick):
    """name -> (model, x, loss(out) function)."""
    g = torch.Generator().manual_seed(1)
    if quick:
        mlp_sizes, cnn_kw, gpt_kw, b, T = [20, 16, 16, 10], dict(width=4, size=8), dict(d_model=16, layers=1, heads=2,
                                                                                       context=8), 4, 8
    else:
        mlp_sizes, cnn_kw, gpt_kw, b, T = [784, 200, 200, 10], dict(width=32, size=32), dict(context=256), 128, 256
    size = cnn_kw["size"]
    x_mlp, y_mlp = torch.randn(b, mlp_sizes[0], generator=g), torch.randn(b, 10, generator=g)
    x_cnn, y_cnn = torch.randn(b, 3, size, size, generator=g), torch.randint(0, 10, (b,), generator=g)
    tokens = torch.randint(0, 256, (max(2, b // 16), T + 1), generator=g)
    torch.manual_seed(0)
    return {
        "mlp": (mlp(mlp_sizes, seed=0), x_mlp, lambda out: F.mse_loss(out, y_mlp)),
        "cnn6": (cnn6(**cnn_kw), x_cnn, lambda out: F.cross_entropy(out, y_cnn)),
        "gpt": (GPT(256, **gpt_kw), tokens[:, :-1],
                lambda out: F.cross_entropy(out.reshape(-1, 256), tokens[:, 1:].reshape(-1))),
    }


def check(model, x, device, backend="auto"):
    """The fused penalty and parameter gradients of ``backend`` equal the reference's in float64
    (1e-10); returns the backend that ran."""
    x = x[:4].to(device)
    x = x.double() if x.is_floating_point() else x
    res = []
    for backend in (backend, "reference"):
        m = copy.deepcopy(model).double().to(device)
        reg = GrokAlign(m, 1.0, estimator="forward", backend=backend, generator=torch.Generator().manual_seed(0))
        out, pen = reg(x)
        grads = torch.autograd.grad(out.float().pow(2).mean() + pen, list(m.parameters()))
        res.append((pen.detach(), grads, reg.last_backend))
    (p0, g0, b0), (p1, g1, _) = res
    assert torch.allclose(p0, p1, rtol=1e-10), (b0, p0, p1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max())), (b0, (a - b).abs().max())
    return b0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--models", default="mlp,cnn6,gpt")
    ap.add_argument("--quick", action="store_true", help="tiny models (a dry run of the script)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    lines = [f"Command: `{' '.join(['python'] + sys.argv)}`  ",
             f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
             f", torch {torch.__version__}, {args.dtype}, {args.rounds} interleaved rounds, medians.", "",
             "| model | path | plain ms | ours ms | x plain | ours sub0.25 ms | x plain | triton ms | x plain |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    table = models(args.quick)
    triton = _backends.triton_unavailable_reason(device) is None
    for name in args.models.split(","):
        model0, x, loss_of = table[name]
        path = check(model0, x, device)
        providers = [("plain", None), ("ours", dict()), ("ours_sub0.25", dict(subsample=0.25))]
        if triton:
            check(model0, x, device, "triton")
            providers.append(("triton", dict(backend="triton")))
        x = x.to(device)
        steps = {}
        for label, kw in providers:
            m = copy.deepcopy(model0).to(device)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            reg = None if kw is None else GrokAlign(m, 1e-3, estimator="forward", **kw)

            def step(m=m, opt=opt, reg=reg):
                amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" \
                    else contextlib.nullcontext()
                with amp:
                    out, pen = (m(x), 0.0) if reg is None else reg(x)
                    loss = loss_of(out.float()) + pen
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()

            steps[label] = step
        med = time_interleaved(steps, args.rounds, warmup=2)
        p = med["plain"]
        tri = f"{med['triton'] * 1e3:.2f} | {med['triton'] / p:.2f}" if triton else "- | -"
        lines.append(f"| {name} | {path} | {p * 1e3:.2f} | {med['ours'] * 1e3:.2f} | {med['ours'] / p:.2f} | "
                     f"{med['ours_sub0.25'] * 1e3:.2f} | {med['ours_sub0.25'] / p:.2f} | {tri} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
