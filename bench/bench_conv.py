"""pytest-benchmark: one training step of the convolutional models per provider.

    .venv/bin/python -m pytest bench/bench_conv.py --benchmark-only --benchmark-group-by=param:model

Models and providers are those of ``bench/interleaved_conv.py`` (which measures the ratios in
``bench/RESULTS.md`` interleaved in one process); ``BENCH_WIDTH`` overrides the models' width
for a quick run. The engine is checked against the reference in float64 before any timing.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from interleaved_conv import MODELS, check_dual_matches_reference, providers  # noqa: E402

NAMES = ["plain", "authors", "hoffman_vjp", "func_jvp", "dual", "dual_sub0.25", "cpp", "cpp_sub0.25"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("model", list(MODELS))
def test_conv_train_step(benchmark, model, name):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    build, batch, width = MODELS[model]
    width = int(os.environ.get("BENCH_WIDTH", width))
    check_dual_matches_reference(lambda: build(4), batch)
    torch.manual_seed(0)
    net = build(width)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    table = providers(net, x, y, only={name})
    if name not in table:
        pytest.skip(f"{name}: the C++ extension is not built")
    step = table[name]
    step()
    benchmark.extra_info.update(model=f"{model}-w{width}-b{batch}", provider=name)
    benchmark.pedantic(step, rounds=int(os.environ.get("BENCH_ROUNDS", "5")), iterations=1, warmup_rounds=1)
