"""Data-parallel training with GrokAlign: DDP over processes launched by torchrun, on the digits
data that ships with the package (CPU processes on gloo here; on GPUs use the nccl backend and one
device per process).

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py [--steps 300]

Every process seeds the same probe generator: GrokAlign then draws the whole batch's probes on each
process and keeps its own rows, so the gradients equal single-process training on the whole batch
(``GrokAlign(distributed=...)``). FSDP2 works the same way with ``fully_shard`` on the layers and
the root and ``estimator="forward"``.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from grokalign_fast import GrokAlign
from grokalign_fast.experiments import data
from grokalign_fast.models import mlp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128, help="the whole batch, split over the processes")
    ap.add_argument("--lam", type=float, default=1e-3)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must split evenly over {world} processes")
    split = data.digits(1000)
    model = mlp([64, 200, 200, 10], bias=True, seed=0)
    reg = DDP(GrokAlign(model, args.lam, estimator="forward", generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(1)  # the same batches on every process
    share = args.batch // world
    for step in range(args.steps):
        rows = torch.randperm(split.x_train.shape[0], generator=order)[: args.batch]
        mine = rows[rank * share:(rank + 1) * share]
        out, penalty = reg(split.x_train[mine])
        loss = F.cross_entropy(out, split.y_train[mine]) + penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            with torch.no_grad():
                acc = (model(split.x_test).argmax(1) == split.y_test).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  penalty {penalty.item():.5f}  test acc {acc:.3f}")
    dist.barrier()  # no process tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
