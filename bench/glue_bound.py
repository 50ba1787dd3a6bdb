"""How much of a `subsample=0.25` training step is the op, and how much the calls around it.

    .venv/bin/python bench/glue_bound.py [--sizes 784-200-200-10] [--batch 200] [--dtype float32] [--rounds 100]

Interleaved training steps (forward, penalty, backward, AdamW) of one MLP, ratios to a plain step:
- `plain`: no penalty;
- `GrokAlign`: `GrokAlign(estimator="forward", backend="cpp", subsample=0.25)` (squared=False);
- `op only`: `grokalign::dual_mlp_sqnorm(root=True, scale=lambda / R)` called directly, on probes and
  subsets drawn once before timing (8 of each, in turn), penalty = the sum of its values (what
  GrokAlign's C++ path computes);
- `op + draws`: the same, with the probes (`probes.draw_checked`) and the subset
  (`torch.randperm`) drawn inside each step.

`GrokAlign` minus `op + draws` is the regulariser's own Python (checks, the path cache, the
level, the finite check); `op + draws` minus `op only` is the cost of the two draws.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from providers import LAMBDA, make_batch, make_model, make_step, providers, ratio_table, time_interleaved  # noqa: E402

from grokalign_fast import _backends  # noqa: E402
from grokalign_fast.ops.mlp import model as mlp_model  # noqa: E402
from grokalign_fast.ops.mlp import whole_mlp  # noqa: E402
from grokalign_fast.probes import draw_checked  # noqa: E402


def op_step(model0, x, y, rows, draws: bool):
    model = copy.deepcopy(model0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    steps, _ = mlp_model.plan(model)
    args = whole_mlp.whole_mlp_op_args(steps)
    n, B = x.shape[1], x.shape[0]
    g = torch.Generator().manual_seed(0)
    pre_v = [draw_checked("rademacher", 1, rows, (n,), n, dtype=x.dtype, device=x.device, generator=g)
             for _ in range(8)]
    pre_i = [torch.randperm(B, generator=g)[:rows] for _ in range(8)]
    count = [0]

    def step():
        i = count[0] % 8
        count[0] += 1
        if draws:
            v = draw_checked("rademacher", 1, rows, (n,), n, dtype=x.dtype, device=x.device, generator=g)
            idx = torch.randperm(B, generator=g)[:rows]
        else:
            v, idx = pre_v[i], pre_i[i]
        out, norm, _ = torch.ops.grokalign.dual_mlp_sqnorm(x, v, idx, *args, True, LAMBDA / rows)
        loss = F.mse_loss(out, y) + norm.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="784-200-200-10")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    reason = _backends.extension_ops_reason(("dual_mlp_sqnorm",))
    if reason is not None:
        sys.exit(f"glue_bound needs the C++ extension: {reason}")
    torch.set_num_threads(args.threads)
    sizes = tuple(int(s) for s in args.sizes.split("-"))
    dtype = getattr(torch, args.dtype)
    model = make_model(sizes, dtype)
    x, y = make_batch(sizes, args.batch, dtype)
    table = providers(model, x)
    steps = {"plain": make_step(*table["plain"], y), "GrokAlign": make_step(*table["fused_cpp_sub0.25"], y)}
    rows = max(1, int(round(0.25 * args.batch)))
    steps["op only"] = op_step(model, x, y, rows, draws=False)
    steps["op + draws"] = op_step(model, x, y, rows, draws=True)
    med = time_interleaved(steps, args.rounds, warmup=5)
    print(f"{args.sizes} batch {args.batch} {args.dtype}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(ratio_table(med, steps, header="step"))

if __name__ == "__main__":
    main()
