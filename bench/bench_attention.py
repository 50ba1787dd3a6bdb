"""pytest-benchmark: the JVP attention op and the transformer training steps, per provider.

    .venv/bin/python -m pytest bench/bench_attention.py --benchmark-only --benchmark-group-by=param:T,param:P,param:phase

**The op** (B = 1, H = 4, d = 64, float32, no mask) for T in ``BENCH_SEQS`` (default 128,1024,4096)
and P in {1, 4}, two phases: ``forward`` (the training forward: inputs that require grad, so each
provider also saves what its backward needs) and ``forward_backward`` (a loss on o and o_t, the
gradients of all six inputs). Providers are those of ``bench/interleaved_attention.py``: ``plain``
(explicit attention without tangents), ``func_jvp`` (``torch.func.jvp`` through the explicit formula,
once per probe), ``reference`` and the ``cpp`` / ``triton`` backends where they serve. Each
benchmark's ``extra_info`` holds the peak bytes allocated during one call (``peak_mib``). Every
provider's o_t is checked against the reference in float64 before timing.

**The steps** (``gpt``, ``modadd``; one probe, AdamW, train mode): ``plain``, ``hoffman_vjp``,
``func_jvp``, ``ours`` and ``ours_sub0.25`` as in ``bench/interleaved_attention.py``.

``BENCH_ROUNDS`` (default 5) sets the rounds, ``BENCH_THREADS`` (default 2) the threads,
``BENCH_SMALL=1`` shrinks the transformers (a smoke test). The ratios in ``bench/RESULTS.md`` come
from ``bench/interleaved_attention.py``, which interleaves the providers in one process.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from interleaved_attention import (D, H, check_ops, op_forwards, op_inputs, op_providers,  # noqa: E402
                                   step_providers)
from providers import peak_allocated_bytes  # noqa: E402

SEQS = [int(t) for t in os.environ.get("BENCH_SEQS", "128,1024,4096").split(",") if t]
PROVIDERS = ["plain", "func_jvp", "reference", "cpp", "triton"]
STEPS = ["plain", "hoffman_vjp", "func_jvp", "ours", "ours_sub0.25"]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def _threads():
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))


@pytest.mark.parametrize("phase", ["forward", "forward_backward"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("P", [1, 4])
@pytest.mark.parametrize("T", SEQS)
def test_attention_op(benchmark, T, P, provider, phase):
    _threads()
    prim, tang = op_inputs(T, P)
    forwards = op_forwards(prim, tang)
    if provider not in forwards:
        pytest.skip(f"{provider} cannot serve these inputs")
    if provider != "plain":
        check_ops({provider: (None, forwards[provider])})
    if phase == "forward":
        def step():
            forwards[provider](prim, tang)
    else:
        step = op_providers(T, P)[provider][0]
    step()
    benchmark.extra_info.update(T=T, P=P, H=H, d=D, provider=provider, phase=phase,
                                peak_mib=round(peak_allocated_bytes(step) / 2**20, 1))
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", STEPS)
@pytest.mark.parametrize("model", ["gpt", "modadd"])
def test_transformer_step(benchmark, model, provider):
    _threads()
    step = step_providers(model, small=os.environ.get("BENCH_SMALL") == "1")[provider]
    step()
    benchmark.extra_info.update(model=model, provider=provider)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
