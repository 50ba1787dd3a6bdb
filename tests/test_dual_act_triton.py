"""The Triton kernels of the dual-stream engine's ReLU / leaky ReLU (grokalign_fast.ops.dual_act.triton)
against the op's plain-PyTorch reference: values, mask and gradient in float64 (every row and a repeated
subset, tangent rows riding on no row, several programs along both axes), empty shapes, gradcheck, low
precision and the argument errors; on every device present (the CPU under Triton's interpreter). Inside
the engine: tests/test_dual_rules.py and tests/test_dual_engine.py."""
import os

import pytest
import torch

from grokalign_fast import _backends
from grokalign_fast.ops import dual_act as D
from grokalign_fast.ops.dual_act import triton as T

from utils import F64, max_rel_err, triton_devices

DEVICES = triton_devices()


def _rows(P, K, R, n, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(P + K * R, n, generator=g, dtype=torch.float64)
    if s.numel():
        s[0, 0] = 0.0  # the boundary: z = 0 is not positive
    return s.to(dtype=dtype, device=device).requires_grad_()


def _check(s, P, index, act, alpha=0.3):
    out, mask = T.dual_act(s, P, index, act, alpha)
    ref_s = s.detach().cpu().requires_grad_()
    ref_index = None if index is None else index.cpu()
    ref, ref_mask = D.reference(ref_s, P, ref_index, act, alpha)
    assert out.shape == ref.shape and mask.dtype == torch.uint8 and torch.equal(mask.cpu(), ref_mask)
    assert max_rel_err(out, ref) < F64["rtol"]
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(s.dtype)
    (got,) = torch.autograd.grad(out, s, g.to(s.device))
    (want,) = torch.autograd.grad(ref, ref_s, g)
    assert max_rel_err(got, want) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("index,K", [(None, 1), ([4, 0, 4], 3), ([1], 2)], ids=["all-K1", "repeated-K3", "one-K2"])
def test_equals_reference(device, act, index, K):
    """P = 5 primal rows (two row blocks under the interpreter), n = 19 (two column blocks); with
    [4, 0, 4] row 4 carries two riders per stream and rows 1-3 none."""
    P, n = 5, 19
    idx = None if index is None else torch.tensor(index, device=device)
    _check(_rows(P, K, P if index is None else len(index), n, device=device), P, idx, act)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 0, 3, 5), (2, 1, 2, 0)], ids=["no-tangent-rows", "no-features"])
def test_empty(device, shape):
    P, K, R, n = shape
    _check(_rows(P, K, R, n, device=device), P, None, "leaky_relu")


def test_gradcheck():
    s = _rows(3, 2, 2, 5)
    with torch.no_grad():
        s[s.abs() < 0.05] = 0.5  # finite differences across the kink would not match
    torch.autograd.gradcheck(lambda v: T.dual_act(v, 3, torch.tensor([2, 0]), "leaky_relu", 0.2)[0], (s,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_is_exact(device, dtype):
    """out = s * d with d in {0, 1, alpha} and alpha = 0.25: every product is exact, as in the reference."""
    s = _rows(4, 2, 3, 9, dtype=dtype, device=device)
    index = torch.tensor([3, 1, 3], device=device)
    out, mask = T.dual_act(s, 4, index, "leaky_relu", 0.25)
    ref, ref_mask = D.reference(s.detach().cpu(), 4, index.cpu(), "leaky_relu", 0.25)
    assert out.dtype == dtype and torch.equal(out.cpu(), ref) and torch.equal(mask.cpu(), ref_mask)


def test_unavailable_reasons(monkeypatch):
    """On the CPU the kernels need the interpreter; integer rows are refused, naming the dtype."""
    if _backends.triton_unavailable_reason() is not None:
        pytest.skip(_backends.triton_unavailable_reason())
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    assert "CUDA" in T.unavailable_reason(torch.zeros(2, 3))
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    assert T.unavailable_reason(torch.zeros(2, 3)) is None
    assert "not torch.int64" in T.unavailable_reason(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(4), 2, None, "relu"), r"s \(the stacked rows\) must be \[N, n\]"),
        ((torch.ones(4, 3), 0, None, "relu"), r"primal_rows must be an int in \[1, 4\]"),
        ((torch.ones(4, 3), 2, None, "gelu"), r"act must be one of \('relu', 'leaky_relu'\)"),
        ((torch.ones(5, 3), 2, None, "relu"), r"the 3 tangent rows of s are not a whole number of streams of 2 rows"),
        ((torch.ones(4, 3), 2, torch.tensor([0, 5]), "relu"), r"index\[1\] = 5 is out of range for 2 primal rows"),
        ((torch.ones(4, 3), 2, torch.tensor([[0, 1]]), "relu"), r"index must be a non-empty 1-D long tensor"),
        ((torch.ones(4, 3, dtype=torch.long), 2, None, "relu"), r"s must be float16, bfloat16, float32 or float64"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        T.dual_act(*args)
