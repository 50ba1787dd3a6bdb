"""The benchmark scripts still run: each on its smallest setting, in a subprocess. No timing is
asserted (timings live in bench/RESULTS.md); a script that breaks, or a fused path that stops
matching the reference inside bench/gpu_layers.py's check, fails here."""
import os
import subprocess
import sys

import pytest

import grokalign_fast._backends as backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP = backends.extension_ops_reason(("dual_linear", "dual_mlp_sqnorm")) is None


def _run(*args, **extra_env):
    env = dict(os.environ, OMP_NUM_THREADS="2", TRITON_INTERPRET="1", **extra_env)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_gpu_layers_dry_run_on_the_cpu():
    out = _run("bench/gpu_layers.py", "--device", "cpu", "--quick", "--reps", "1")
    assert "ok   cpp relu" in out and "ok   cpp gelu_tanh" in out
    assert out.count("| cpp |") == 4  # float32 and bfloat16, two activations
    if backends.triton_unavailable_reason() is None:  # the Triton kernels, under the interpreter
        assert "ok   triton relu" in out and out.count("| triton |") == 4


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_glue_bound_runs():
    out = _run("bench/glue_bound.py", "--sizes", "20-9-7-3", "--batch", "16", "--rounds", "2")
    for row in ("| plain |", "| GrokAlign |", "| op only |", "| op + draws |"):
        assert row in out


def test_interleaved_conv_runs():
    """The convolutional models' benchmark on its smallest setting: it checks the engine against the
    reference (float64, 1e-10) before timing, so a broken rule fails here too."""
    out = _run("bench/interleaved_conv.py", "--rounds", "1", "--width", "2", "--providers", "dual,cpp,func_jvp")
    for row in ("| cnn6-w2-b128 | dual |", "| resnet18-w2-b64 | func_jvp |"):
        assert row in out
    assert ("| resnet18-w2-b64 | cpp |" in out) == CPP


def test_interleaved_attention_runs():
    out = _run("bench/interleaved_attention.py", "--rounds", "1", "--seqs", "16", "--probes", "1,2", "--small",
               "--peak-at", "32")
    assert "| 16 | 2 | reference |" in out and "| 16 | 2 | func_jvp |" in out and "| 32 | plain |" in out
    assert ("| 32 | cpp |" in out) == CPP
    assert "| ours_sub0.25 |" in out and "gpt step" in out and "modadd step" in out


def test_bench_attention_runs():
    """The pytest-benchmark file of the op and the steps, each benchmark called once on tiny sizes
    (``--benchmark-disable``); the op's providers are checked against the reference first."""
    out = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_attention.py", "--benchmark-disable",
               BENCH_SEQS="16", BENCH_SMALL="1", BENCH_ROUNDS="1")
    assert " failed" not in out and " passed" in out, out[-2000:]
    # 2 probes x 2 phases x (plain, func_jvp, reference, and cpp / triton where they serve) + 10 steps
    served = 3 + CPP + (backends.triton_unavailable_reason() is None)
    assert f"{4 * served + 10} passed" in out, out[-2000:]


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_interleaved_norm_runs():
    """The norm benchmark on tiny shapes: it checks the op's rule against the ATen rule (float64,
    1e-10) before timing, and that the GPT step runs the op only where it is switched on."""
    out = _run("bench/interleaved_norm.py", "--rounds", "1", "--batch", "2", "--seq", "4", "--width", "8",
               "--steps", "1")
    for row in ("| cpp |", "| rms_aten |", "| ours |", "| ours_aten_norm |"):
        assert row in out


def test_long_run_memory_runs():
    out = _run("bench/long_run_memory.py", "--steps", "40", "--every", "20", "--warmup", "20")
    assert "| 40 |" in out and "Largest change after step 20" in out


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert "passed" in text and "| cpp | float32 | relu |" in text
    assert "| float32 | 37 | cpp P=1 |" in text and "| float32 | 37 | triton P=4 |" in text
    assert text.count("| gpt |") == 2  # float32 and bfloat16 steps


def test_digits_levers_runs():
    """The script runs a scheduled variant to its step cap and prints the capped run as not grokked (None)."""
    out = _run("bench/digits_levers.py", "decay:50:0.5", "--seeds", "0", "--max-steps", "100")
    assert out.strip().splitlines()[-1] == "decay:50:0.5 [(None, None)]"


def test_smooth_act_bench_runs():
    out = _run("bench/smooth_act.py", "--reps", "1", "--rows", "4", "--features", "5", "--subsample", "0.5")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| act")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "elu", "softplus",
                                                     "aten (gelu, primal rows only)"]


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_max_pool_argmax_bench_runs():
    """The argmax benchmark checks the op's indices equal ATen's before timing."""
    out = _run("bench/max_pool_argmax.py", "--reps", "1")
    assert out.count("x |") == 3
