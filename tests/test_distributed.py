"""Data-parallel training: GrokAlign under DDP and FSDP2 (``fully_shard`` per layer and on the
root), two CPU processes on gloo launched by torchrun (``tests/dist/data_parallel_step.py``).

The loss, the penalty and every parameter gradient of one step equal those of one process on the
whole batch with the same generator seed, in float64 to 1e-10: every process draws the whole
batch's probes (and subsample rows) and keeps its own (:mod:`grokalign_fast._shard`), so the
result does not depend on the number of processes.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from utils import F64

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "dist"))
import data_parallel_step as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "dist", "data_parallel_step.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


def _single_process(case):
    model = worker.make_model(case["model"])
    x, y = worker.batch(case["model"])
    reg = worker.regulariser(model, case)
    assert reg._world() is None
    loss, pen = worker.step(reg, x, y)
    return dict(loss=loss, penalty=pen, grads=[p.grad for p in model.parameters()]), reg.last_backend


@pytest.mark.parametrize("name", list(worker.CASES))
def test_data_parallel_step_equals_one_process_on_the_whole_batch(name, distributed_results):
    got = distributed_results[name]
    want, backend = _single_process(worker.CASES[name])
    assert want["penalty"] > 0
    torch.testing.assert_close(got["loss"], want["loss"], **F64)
    torch.testing.assert_close(got["penalty"], want["penalty"], **F64)
    assert len(got["grads"]) == len(want["grads"])
    for a, b in zip(got["grads"], want["grads"]):
        torch.testing.assert_close(a, b, **F64)


def test_fsdp_refuses_a_double_backward_estimator_and_names_the_one_that_works(distributed_results):
    message = distributed_results["fsdp-reverse-error"]
    assert message is not None and "estimator='forward'" in message and "FSDP" in message


def test_the_row_shard_gives_each_row_its_whole_batch_probe():
    from grokalign_fast._shard import RowShard
    from grokalign_fast.probes import drawer

    whole = drawer("rademacher", 2, (5,), 5, dtype=torch.float64, device=torch.device("cpu"),
                   generator=torch.Generator().manual_seed(0))(6)
    shard = RowShard(torch.Generator().manual_seed(0))
    shard.set(6, torch.tensor([4, 1]))
    part = drawer("rademacher", 2, (5,), 5, dtype=torch.float64, device=torch.device("cpu"), generator=shard)(2)
    torch.testing.assert_close(part, whole[:, [4, 1]], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="3 rows asked for, 2 set"):
        drawer("gaussian", 1, (5,), 5, dtype=torch.float64, device=torch.device("cpu"), generator=shard)(3)


def test_the_ddp_example_trains(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "..", "examples", "ddp_train.py"), "--steps", "3", "--batch", "16"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["0", "2"]
