"""pytest-benchmark: one MLP training step (forward, penalty, backward, AdamW) per provider.

    .venv/bin/python -m pytest bench/bench_mlp.py --benchmark-only --benchmark-group-by=param:shape

Ratios between providers are better measured interleaved in one process:
``python bench/interleaved.py`` (writes the table in bench/RESULTS.md).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from check import check_fused_matches_reference  # noqa: E402
from providers import make_batch, make_model, make_step, providers  # noqa: E402
from shapes import SHAPES  # noqa: E402

FAST = [s for s in SHAPES if s.name != "4096x4"]
NAMES = ["plain", "authors", "hoffman_vjp", "func_jvp", "exact", "dual_reference", "reverse_py", "reverse_cpp",
         "reverse_cpp_sub0.25", "fused_cpp", "fused_cpp_sub0.25", "fused_cpp_every4"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", FAST, ids=lambda s: s.id)
def test_mlp_train_step(benchmark, shape, name):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = make_model(shape.sizes, shape.dtype, shape.bias)
    x, y = make_batch(shape.sizes, shape.batch, shape.dtype)
    table = providers(model, x)
    if name not in table:
        pytest.skip(f"{name} is not available here")
    if name.startswith("fused_") and "_" not in name[len("fused_"):]:
        backend = name[len("fused_"):]
        check_fused_matches_reference(model, x, backend, rtol=1e-10 if shape.dtype == torch.float64 else 1e-4)
    step = make_step(*table[name], y)
    step()
    benchmark.extra_info.update(shape=shape.id, provider=name)
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=3)
