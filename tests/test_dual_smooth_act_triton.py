"""The Triton kernels of the dual-stream engine's smooth activations (grokalign_fast.ops.dual_smooth_act.triton)
against the op's plain-PyTorch reference: values and gradients in float64 for every activation (every row
and a repeated subset, so that the primal rows' gradient carries the riders' s'' term, and rows with no
riders), odd and empty shapes, gradcheck, low precision by the twice-plain rule, non-contiguous rows and
the argument errors; on every device present (the CPU under Triton's interpreter). Inside the engine:
tests/test_dual_rules.py and tests/test_dual_engine.py. Compiled for sm_90 (every epilogue family, the
max pool's and the sum of squares' too): test_the_epilogue_kernels_compile_for_sm90."""
import json
import os
import subprocess
import sys

import pytest
import torch

from grokalign_fast.ops import dual_smooth_act as D
from grokalign_fast.ops.dual_smooth_act import triton as T

from test_dual_smooth_act import PARAMS, _rows  # the same rows and parameters as the C++ op's tests
from utils import F64, assert_within_twice_plain_error, max_rel_err, outputs_and_grads, triton_devices

DEVICES = triton_devices()


def _both(s, P, index, act, dtype=None):
    """outputs_and_grads of the kernels and of the reference on the same rows (``dtype``: the reference's)."""
    ref_s = s.detach().to(dtype or s.dtype).cpu().requires_grad_()
    ref_index = None if index is None else index.cpu()
    got = outputs_and_grads([T.dual_smooth_act(s, P, index, act, **PARAMS)], [s])
    want = outputs_and_grads([D.reference(ref_s, P, ref_index, act, **PARAMS)], [ref_s])
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(D.ACT))
@pytest.mark.parametrize("index,K", [(None, 1), ([4, 0, 4], 3)], ids=["all-K1", "repeated-K3"])
def test_equals_reference(device, act, index, K):
    """out and the gradient of a random cotangent, float64, 1e-10; P = 5, n = 19 span two programs
    along each axis under the interpreter."""
    P, n = 5, 19
    idx = None if index is None else torch.tensor(index, device=device)
    got, want = _both(_rows(P, K, P if index is None else len(index), n, device=device), P, idx, act)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 0, 1, 7), (3, 2, 3, 1), (4, 1, 2, 37), (2, 2, 2, 0)],
                         ids=["no-tangent-rows", "one-feature", "wide", "no-features"])
def test_odd_shapes(device, shape):
    P, K, R, n = shape
    index = torch.tensor([P - 1, 0][:R], device=device) if R != P else None
    got, want = _both(_rows(P, K, R, n, device=device), P, index, "gelu")
    for a, b in zip(got, want):
        assert a.shape == b.shape and max_rel_err(a, b) < F64["rtol"]


def test_noncontiguous_rows():
    rows = _rows(4, 2, 4, 10)[:, ::2]
    assert max_rel_err(T.dual_smooth_act(rows, 4, None, "silu"), D.reference(rows, 4, None, "silu")) < F64["rtol"]


@pytest.mark.parametrize("act", ["gelu_tanh", "softplus"])
def test_gradcheck(act):
    s = _rows(3, 2, 2, 4, switch_points=False)  # finite differences across a kink would not match
    torch.autograd.gradcheck(lambda v: T.dual_smooth_act(v, 3, torch.tensor([2, 0]), act, **PARAMS), (s,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "softplus"])
def test_low_precision_within_twice_plain_pytorch(device, dtype, act):
    """The kernels compute in float32: at most twice the plain rule's error in the same dtype."""
    s = _rows(6, 2, 3, 33, dtype=dtype, device=device)
    index = torch.tensor([5, 0, 2], device=device)
    ours, plain = _both(s, 6, index, act)
    exact = _both(s, 6, index, act, dtype=torch.float64)[1]
    assert ours[0].dtype == ours[1].dtype == dtype
    assert_within_twice_plain_error(ours, plain, exact, names=["out", "grad"])


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(4, 3), 0, None, "gelu"), r"primal_rows must be an int in \[1, 4\]"),
        ((torch.ones(4, 3), 2, None, "relu"), r"act must be one of \('gelu'"),
        ((torch.ones(5, 3), 2, None, "gelu"), r"the 3 tangent rows of s are not a whole number of streams of 2"),
        ((torch.ones(4, 3), 2, torch.tensor([0, 5]), "gelu"), r"index\[1\] = 5 is out of range"),
        ((torch.ones(4), 2, None, "gelu"), r"s \(the stacked rows\) must be \[N, n\]"),
        ((torch.ones(4, 3, dtype=torch.long), 2, None, "gelu"), r"s must be float16, bfloat16, float32 or float64"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        T.dual_smooth_act(*args)


@pytest.mark.slow
def test_the_epilogue_kernels_compile_for_sm90():
    """Every Triton epilogue kernel (dual_act, dual_smooth_act for every activation, the max pool's
    gather and scatter-add, the batch norm's three, the layer norm's two, the sum of squares' two)
    compiles for an H100/H200 (sm_90) as a GPU compiles it, in bfloat16 and float64, with and without
    an index, to a cubin within the 227 KB of shared memory a block may use
    (tests/sm90_compile_epilogues.py, in a process without the interpreter; no GPU needed)."""
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile_epilogues.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    kernels = {row["kernel"].split(" ")[0] + " " + row["kernel"].split(" ")[1] for row in rows}
    assert len(rows) == 60 and len(kernels) == 13, kernels
    assert {row["kernel"].split(" ")[2] for row in rows if row["kernel"].startswith("dual_smooth_act")} == set(D.ACT)
    for row in rows:
        assert "error" not in row and row["cubin"], row
        assert row["shared"] <= 227 * 1024, row
