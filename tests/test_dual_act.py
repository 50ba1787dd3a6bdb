"""grokalign::dual_act: the dual-stream engine's ReLU / leaky-ReLU epilogue as one op, against its
plain-PyTorch reference (values, mask, gradient), opcheck, errors, and inside the engine."""
import pytest
import torch
import torch.nn.functional as F

from grokalign_fast.dual import run
from grokalign_fast.ops import dual_act as D

from utils import DEVICES, F64, max_rel_err

REASON = D.unavailable_reason(torch.zeros(1))
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def _rows(P, K, R, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(P + K * R, n, generator=g, dtype=torch.float64)
    s[0, 0] = 0.0  # the boundary: z = 0 is not positive
    return s.to(dtype=dtype, device=device).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("index", [None, [4, 0, 4]], ids=["all", "subset"])
@pytest.mark.parametrize("K", [1, 3])
def test_op_equals_reference(device, act, index, K):
    P, n = 5, 13
    R = P if index is None else len(index)
    idx = None if index is None else torch.tensor(index, device=device)
    s = _rows(P, K, R, n, torch.float64, device)
    out, mask = D.dual_act(s, P, idx, act, 0.3)
    ref, ref_mask = D.reference(s.cpu(), P, None if idx is None else idx.cpu(), act, 0.3)
    assert torch.equal(mask.cpu(), ref_mask)
    assert max_rel_err(out, ref) < F64["rtol"]
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)).to(device)
    (ga,) = torch.autograd.grad(out, s, g)
    s_ref = s.detach().cpu().requires_grad_()
    (gr,) = torch.autograd.grad(D.reference(s_ref, P, None if idx is None else idx.cpu(), act, 0.3)[0], s_ref, g.cpu())
    assert max_rel_err(ga, gr) < F64["rtol"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_is_exact_up_to_one_rounding(dtype):
    """out = s * d with d in {0, 1, alpha}: one product per entry, as the reference computes it."""
    s = _rows(4, 2, 4, 9, dtype, "cpu")
    out, _ = D.dual_act(s, 4, None, "leaky_relu", 0.25)
    ref, _ = D.reference(s, 4, None, "leaky_relu", 0.25)
    assert torch.equal(out, ref)


def test_opcheck():
    s = _rows(5, 2, 3, 7, torch.float64, "cpu")
    torch.library.opcheck(torch.ops.grokalign.dual_act, (s, 5, torch.tensor([1, 4, 0]), 1, 0.0))
    torch.library.opcheck(torch.ops.grokalign.dual_act, (_rows(5, 2, 5, 7, torch.float64, "cpu"), 5, None, 2, 0.1))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(4, 3), 0, None, 1, 0.0), r"primal_rows must be in \[1, 4\]"),
        ((torch.ones(4, 3), 2, None, 3, 0.0), r"act must be 1 \(relu\) or 2 \(leaky_relu\)"),
        ((torch.ones(5, 3), 2, None, 1, 0.0), r"not a whole number of streams of 2 rows"),
        ((torch.ones(4, 3), 2, torch.tensor([0, 5]), 1, 0.0), r"index\[1\] = 5 is out of range"),
        ((torch.ones(4), 2, None, 1, 0.0), r"the rows must be \[N, n\]"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.grokalign.dual_act(*args)


@pytest.mark.parametrize("index", [None, [2, 0]], ids=["all", "subset"])
def test_engine_with_the_kernel_equals_the_aten_rules(index):
    """cnn-like block: conv -> relu -> leaky_relu, engine with and without the op: same numbers, and
    the calls are counted as the kernel's."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1).double()

    def model(x):
        return F.leaky_relu(torch.relu(conv(x)), 0.1).flatten(1)

    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    idx = None if index is None else torch.tensor(index)
    V = torch.randn(2, 4 if index is None else len(index), 2, 5, 5, dtype=torch.float64)
    results = []
    for kernels in ("cpp", "torch"):
        y, est, counts = run(model, x, V, idx, kernels=kernels)
        grads = torch.autograd.grad(y.sum() + est.sum(), list(conv.parameters()))
        results.append((y, est, grads, counts))
    (y1, e1, g1, c1), (y0, e0, g0, c0) = results
    assert c1["relu[cpp]"] == 1 and c1["leaky_relu[cpp]"] == 1 and c0["relu"] == 1 and c0["leaky_relu"] == 1
    assert max_rel_err(y1, y0) < F64["rtol"] and max_rel_err(e1, e0) < F64["rtol"]
    for a, b in zip(g1, g0):
        assert max_rel_err(a, b) < F64["rtol"]
