"""The Triton kernels of the dual-stream engine's max pool (grokalign_fast.ops.dual_max_pool.triton) against
the op's plain-PyTorch reference, on the C++ op's cases (tests/test_dual_max_pool.py): float64 values and
gradients (the scatter-add of overlapping windows) for 1-d, 2-d, 3-d and adaptive pools, every row and a
repeated subset, one and three streams, several programs along both axes; the primal rows' maxima as
ATen's pool gives them; odd and empty shapes, int64 columns, non-contiguous rows, gradcheck, low
precision and the argument errors; on every device present (the CPU under Triton's interpreter).
Inside the engine: tests/test_dual_rules.py and tests/test_dual_engine.py."""
import os

import pytest
import torch

from grokalign_fast import _backends
from grokalign_fast.ops import dual_max_pool as D
from grokalign_fast.ops.dual_max_pool import triton as T

from test_dual_max_pool import BAD_ARGS, ODD_IDS, ODD_SHAPES, POOLS, _case  # the C++ op's cases
from utils import F64, assert_within_twice_plain_error, max_rel_err, outputs_and_grads, triton_devices

DEVICES = triton_devices()


def _both(rows, idx, index):
    """outputs_and_grads of the kernels and of the reference (on the CPU) on the same rows."""
    ref_rows = rows.detach().cpu().requires_grad_()
    got = outputs_and_grads([T.dual_max_pool(rows, idx, index)], [rows])
    want = outputs_and_grads([D.reference(ref_rows, idx.cpu(), None if index is None else index.cpu())], [ref_rows])
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,pool,shape", POOLS, ids=[p[0] for p in POOLS])
@pytest.mark.parametrize("index", [None, [4, 0, 4]], ids=["all", "subset-repeated"])
@pytest.mark.parametrize("K", [1, 3])
def test_equals_reference(device, name, pool, shape, index, K):
    """out and the gradient of a random cotangent, float64, 1e-10: P = 5 primal rows (two row blocks
    under the interpreter), up to 60 output columns (four column blocks); with [4, 0, 4] row 4 carries
    two riders per stream and rows 1-3 none. The overlapping 3x3 pool adds up to nine outputs into one
    entry."""
    rows, idx, index, pooled = _case(pool, shape, 5, K, index, device=device)
    got, want = _both(rows, idx, index)
    assert torch.equal(got[0][:5].cpu(), pooled.cpu())  # the primal rows' maxima, as ATen's pool gives them
    for a, b in zip(got, want):
        assert a.shape == b.shape and max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P,K,index", ODD_SHAPES, ids=ODD_IDS)
def test_odd_shapes(device, P, K, index):
    rows, idx, index, _ = _case(POOLS[1][1], (1, 3, 1), P, K, index, device=device)
    for a, b in zip(*_both(rows, idx, index)):
        assert a.shape == b.shape and max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    """No channels, and rows of length 0 pooled to nothing: empty outputs and gradients of z's shape."""
    for z_shape, idx_shape in (((4, 0, 5), (2, 0, 2)), ((4, 2, 0), (2, 2, 0))):
        z = torch.zeros(z_shape, dtype=torch.float64, device=device, requires_grad=True)
        out = T.dual_max_pool(z, torch.zeros(idx_shape, dtype=torch.long, device=device), None)
        assert out.shape == (4,) + idx_shape[1:]
        (grad,) = torch.autograd.grad(out.sum(), z)
        assert grad.shape == z.shape and not grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_int64_columns(device, monkeypatch):
    """The kernel's int64 columns (taken where C Lout can pass 2^31) give the same numbers."""
    monkeypatch.setattr(T, "_INT32_MAX", 0)
    rows, idx, index, _ = _case(POOLS[1][1], POOLS[1][2], 5, 2, [4, 0, 4], device=device)
    for a, b in zip(*_both(rows, idx, index)):
        assert max_rel_err(a, b) < F64["rtol"]


def test_noncontiguous_rows():
    rows, idx, _, _ = _case(POOLS[0][1], (3, 11), 4, 2, None)
    wide = torch.cat([rows.detach(), rows.detach()], dim=1)[:, ::2]  # strided in the channel dimension
    assert torch.equal(T.dual_max_pool(wide, idx, None), D.reference(wide, idx, None))


def test_gradcheck():
    rows, idx, index, _ = _case(POOLS[1][1], (2, 3, 4), 3, 2, [2, 0, 2])
    torch.autograd.gradcheck(lambda v: T.dual_max_pool(v, idx, index), (rows,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_plain_pytorch(device, dtype):
    """The gather is exact; the backward adds overlapping windows in float32: at most twice the plain
    scatter-add's error in the same dtype."""
    rows, idx, index, _ = _case(POOLS[1][1], (2, 5, 6), 4, 2, [3, 0], dtype=dtype, device=device)
    ours, plain = _both(rows, idx, index)
    exact = _both(rows.detach().double().requires_grad_(), idx, index)[1]
    assert ours[0].dtype == ours[1].dtype == dtype
    assert torch.equal(ours[0].cpu(), plain[0])
    assert_within_twice_plain_error([ours[1].cpu()], plain[1:], exact[1:], names=["grad"])


def test_unavailable_reasons(monkeypatch):
    """On the CPU the kernels need the interpreter; integer rows are refused, naming the dtype."""
    if _backends.triton_unavailable_reason() is not None:
        pytest.skip(_backends.triton_unavailable_reason())
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    assert "CUDA" in T.unavailable_reason(torch.zeros(2, 3, 4))
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    assert T.unavailable_reason(torch.zeros(2, 3, 4)) is None
    assert "not torch.int64" in T.unavailable_reason(torch.zeros(2, 3, 4, dtype=torch.long))


@pytest.mark.parametrize("args,match", BAD_ARGS + [
    ((torch.ones(4, 2, 5), torch.zeros(5, 2, 2, dtype=torch.long), None), r"idx must be long .* with P in \[1, 4\]"),
    ((torch.ones(4, 2, 5), torch.full((2, 2, 2), -1), None), r"idx must lie in \[0, 5\), got values in \[-1, -1\]"),
    ((torch.ones(4, 2, 5, dtype=torch.long), torch.zeros(2, 2, 2, dtype=torch.long), None),
     r"z must be float16, bfloat16, float32 or float64"),
    ((torch.ones(4, 2, 5), torch.zeros(2, 2, 2, dtype=torch.long), torch.tensor([[0, 1]])),
     r"index must be a non-empty 1-D long tensor"),
])
def test_bad_arguments_are_named(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        T.dual_max_pool(*args)
