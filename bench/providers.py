"""Training-step providers: the autograd baselines and our paths.

Every provider returns ``step()`` doing one full training step (forward,
penalty, backward, AdamW) of its own copy of the model, and
``penalty_value()`` for the correctness check that runs before any timing.
"""
from __future__ import annotations

import copy
import random
import statistics
import time
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from grokalign_fast import GrokAlign, _backends
from grokalign_fast.jacobian import safe_sqrt
from grokalign_fast.models import mlp
from grokalign_fast.ops.mlp import model as mlp_model
from grokalign_fast.ops.mlp import reverse_mlp
from grokalign_fast.probes import draw_probes

LAMBDA = 1e-4


def make_model(sizes, dtype, bias=False, seed=0) -> nn.Sequential:
    """The benchmarks' ReLU MLP: :func:`grokalign_fast.models.mlp` with PyTorch's default init."""
    return mlp(sizes, act=nn.ReLU, bias=bias, dtype=dtype, seed=seed)


def make_batch(sizes, batch, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], generator=g, dtype=dtype)
    y = F.one_hot(torch.randint(0, sizes[-1], (batch,), generator=g), sizes[-1]).to(dtype)
    return x, y


def authors_penalty(model, x):
    """The authors' GrokAlign: an extra forward, one output-space projection with
    create_graph, per-sample sqrt(max(C ||u^T J||^2, 1e-8)), batch mean."""
    xg = x.detach().requires_grad_(True)
    out = model(xg)
    C = out.shape[1]
    u = torch.randn_like(out)
    u = u / u.norm(dim=1, keepdim=True)
    (g,) = torch.autograd.grad(out, xg, u, create_graph=True)
    est = C * g.pow(2).sum(dim=1)
    return torch.sqrt(torch.clamp(est, min=1e-8)).mean()


def _dual_reference_forward(model, x, gen):
    steps, _ = mlp_model.plan(model)
    V = torch.randn((1,) + tuple(x.shape), generator=gen, dtype=x.dtype)
    out, sq = mlp_model.dual_forward(steps, x, V, backend="reference")
    return out, sq


def providers(model0: nn.Module, x: torch.Tensor) -> Dict[str, Tuple[Callable, Callable]]:
    """name -> (make_step(y), penalty_fn) for every provider that can run here."""
    table = {}

    def add(name, forward_factory):
        model = copy.deepcopy(model0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        forward = forward_factory(model)
        table[name] = (model, opt, forward)

    add("plain", lambda m: (lambda: (m(x), torch.zeros((), dtype=x.dtype))))
    add("authors", lambda m: (lambda: (m(x), LAMBDA * authors_penalty(m, x))))
    def reg(**kw):
        def factory(m):
            r = GrokAlign(m, LAMBDA, **kw)
            return lambda: r(x)

        return factory

    add("hoffman_vjp", reg(estimator="reverse", backend="reference"))
    add("func_jvp", reg(estimator="forward", backend="reference"))
    add("exact", reg(estimator="exact", backend="reference"))

    def dual_ref(m):
        gen = torch.Generator().manual_seed(0)

        def fwd():
            out, sq = _dual_reference_forward(m, x, gen)
            return out, LAMBDA * sq.sqrt().mean()

        return fwd

    add("dual_reference", dual_ref)

    def reverse_py(m):
        steps, _ = mlp_model.plan(m)
        gen = torch.Generator().manual_seed(0)
        C = [s for s in steps if isinstance(s, mlp_model.LinearStep)][-1].linear.out_features

        def fwd():
            U = draw_probes("sphere", 1, x.shape[0], (C,), dtype=x.dtype, device=x.device, generator=gen)
            out, est = reverse_mlp.reverse_forward(steps, x, U, implementation="python")
            return out, LAMBDA * safe_sqrt(est).mean()

        return fwd

    add("reverse_py", reverse_py)
    fused = []
    if _backends.cpp_unavailable_reason(x.device) is None and hasattr(torch.ops.grokalign, "dual_linear"):
        fused.append("cpp")
    if reverse_mlp.cpp_unavailable_reason(x) is None:
        add("reverse_cpp", reg(estimator="reverse", backend="cpp"))
        add("reverse_cpp_sub0.25", reg(estimator="reverse", backend="cpp", subsample=0.25))
    if x.device.type == "cuda" and _backends.triton_unavailable_reason(x.device) is None:
        fused.append("triton")
    for be in fused:
        add(f"fused_{be}", reg(estimator="forward", backend=be))
        add(f"fused_{be}_sub0.25", reg(estimator="forward", backend=be, subsample=0.25))
        add(f"fused_{be}_every4", reg(estimator="forward", backend=be, every=4))
    return table


def make_step(model, opt, forward, y) -> Callable[[], None]:
    def step():
        out, pen = forward()
        loss = F.mse_loss(out, y) + pen
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of tensors saved for backward during one step (a device-independent memory measure)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total[0]


def peak_allocated_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes held by torch's CPU allocator during one call of ``step``, counted from the
    call's start (tensors that exist before it are not counted), from the allocation and free events
    the profiler records (``profile_memory=True``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def time_interleaved(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int = 3) -> Dict[str, float]:
    """Median seconds per call of each step: ``warmup`` calls each first, then ``rounds`` rounds
    that call every step once, in a fresh random order (seeded) each round, so that slow drifts of
    a shared machine hit all steps alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    rng = random.Random(0)
    names = list(steps)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def ratio_table(med: Dict[str, float], names, header: str = "variant", digits: int = 2) -> str:
    """Markdown rows ``| name | median ms | x plain |`` for ``names``, from :func:`time_interleaved`'s medians."""
    plain = med["plain"]
    rows = [f"| {header} | median ms | x plain |", "|---|---:|---:|"]
    rows += [f"| {name} | {med[name] * 1e3:.{digits}f} | {med[name] / plain:.2f} |" for name in names]
    return "\n".join(rows)


def emit(lines, out=None) -> None:
    """Print the markdown ``lines`` and append them to the file ``out`` when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")
