"""One training step of GrokAlign under DDP or FSDP2, launched by torchrun (CPU processes, gloo):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist/data_parallel_step.py OUT.pt

Each process takes its equal share of one fixed batch; every case of :data:`CASES` runs one step
(a seeded generator on every process) and rank 0 saves each case's loss, penalty and full parameter
gradients to OUT.pt. ``tests/test_distributed.py`` compares them with one process on the whole batch.
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from grokalign_fast import BackendUnavailableError, GrokAlign

CASES = {
    "ddp-mlp-reverse": dict(wrap="ddp", model="mlp", estimator="reverse"),
    "ddp-mlp-forward": dict(wrap="ddp", model="mlp", estimator="forward"),
    "ddp-mlp-forward-sub": dict(wrap="ddp", model="mlp", estimator="forward", subsample=0.5),
    "ddp-cnn-forward": dict(wrap="ddp", model="cnn", estimator="forward"),
    "ddp-mlp-offset": dict(wrap="ddp", model="mlp", estimator="forward", offset=0.2),
    "fsdp-mlp-forward": dict(wrap="fsdp", model="mlp", estimator="forward"),
    "fsdp-cnn-forward-sub": dict(wrap="fsdp", model="cnn", estimator="forward", subsample=0.5),
}
BATCH, CLASSES = 8, 3


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, CLASSES)).double()
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 2 * 3, CLASSES)).double()


def batch(kind: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64) if kind == "mlp" else \
        torch.randn(BATCH, 1, 4, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (BATCH,), generator=g)


def regulariser(model: nn.Module, case: dict) -> GrokAlign:
    kw = {k: v for k, v in case.items() if k in ("estimator", "subsample", "offset")}
    return GrokAlign(model, 0.5, generator=torch.Generator().manual_seed(3), **kw)


def step(module, x, y):
    """(loss, penalty) of one step; gradients accumulate in the parameters."""
    out, pen = module(x)
    loss = F.cross_entropy(out, y) + pen
    loss.backward()
    return loss.detach(), pen.detach()


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, case in CASES.items():
        model = make_model(case["model"])
        x, y = batch(case["model"])
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        if case["wrap"] == "ddp":
            module = DDP(regulariser(model, case))
        else:
            for layer in model:
                if any(p.requires_grad for p in layer.parameters(recurse=False)):
                    fully_shard(layer)
            fully_shard(model)
            module = regulariser(model, case)
        loss, pen = step(module, x[share], y[share])
        for t in (loss, pen):  # the whole batch's: the processes' average
            dist.all_reduce(t)
            t /= world
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]
        results[name] = dict(loss=loss, penalty=pen, grads=[g.detach().clone() for g in grads])
    # Estimators that differentiate twice cannot run under FSDP: the error names the one that can.
    model = make_model("mlp")
    fully_shard(model)
    try:
        GrokAlign(model, 0.5, estimator="reverse")(batch("mlp")[0][:2])
        results["fsdp-reverse-error"] = None
    except BackendUnavailableError as exc:
        results["fsdp-reverse-error"] = str(exc)
    if rank == 0:
        torch.save(results, path)
    dist.barrier()  # no process tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
