"""grokalign::dual_smooth_act: the dual-stream engine's smooth-activation epilogue as one op, against its
plain-PyTorch reference (values and gradient, float64), gradcheck, opcheck, low precision, odd shapes
and errors. The op inside the engine: tests/test_dual_rules.py and tests/test_dual_engine.py."""
import pytest
import torch

from grokalign_fast.ops import dual_smooth_act as D

from utils import DEVICES, F64, assert_within_twice_plain_error, max_rel_err, outputs_and_grads

REASON = D.unavailable_reason(torch.zeros(1))
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

PARAMS = dict(alpha=0.7, beta=2.0, threshold=1.5)  # elu's alpha; softplus's beta and threshold (crossed below)


def _rows(P, K, R, n, dtype=torch.float64, device="cpu", seed=0, switch_points=True):
    """[P + K R, n] rows; with ``switch_points`` the first primal row starts at elu's and softplus's
    switch points (each side takes the branch torch takes there)."""
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(P + K * R, n, generator=g, dtype=torch.float64)
    if switch_points and n >= 2:
        s[0, :2] = torch.tensor([0.0, PARAMS["threshold"] / PARAMS["beta"]])
    return s.to(dtype=dtype, device=device).requires_grad_()


def _both(s, P, index, act, dtype=None):
    """outputs_and_grads of the op and of the reference on the same rows (``dtype``: the reference's)."""
    ref_s = s.detach().to(dtype or s.dtype).cpu().requires_grad_()
    ref_index = None if index is None else index.cpu()
    got = outputs_and_grads([D.dual_smooth_act(s, P, index, act, **PARAMS)], [s])
    want = outputs_and_grads([D.reference(ref_s, P, ref_index, act, **PARAMS)], [ref_s])
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", list(D.ACT))
@pytest.mark.parametrize("index", [None, [4, 0, 4]], ids=["all", "subset-repeated"])
@pytest.mark.parametrize("K", [1, 3])
def test_op_equals_reference(device, act, index, K):
    """out and the gradient of a random cotangent, float64, 1e-10: the primal rows' gradient carries
    the riders' s'' term (with a repeated index row: two riders per stream)."""
    P, n = 5, 13
    idx = None if index is None else torch.tensor(index, device=device)
    s = _rows(P, K, P if index is None else len(index), n, device=device)
    got, want = _both(s, P, idx, act)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("shape", [(1, 0, 1, 7), (3, 2, 3, 1), (4, 1, 2, 131), (2, 2, 2, 0)],
                         ids=["no-tangent-rows", "one-feature", "wide", "no-features"])
def test_odd_shapes(shape):
    P, K, R, n = shape
    index = torch.tensor([P - 1, 0][:R]) if R != P else None
    s = _rows(P, K, R, n)
    got, want = _both(s, P, index, "gelu")
    for a, b in zip(got, want):
        assert a.shape == b.shape and max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("act", list(D.ACT))
@pytest.mark.parametrize("P,n", [(2, 20011), (701, 37)], ids=["rows-longer-than-a-tile", "tiles-across-rows"])
def test_tiles(act, P, n):
    """The CPU kernel walks the primal entries in tiles of 2^14 (a row split over tiles, or a tile over
    many rows, split between threads): values and gradient still equal the reference, float64, with a
    subsample riding on the first and last rows."""
    index = torch.tensor([P - 1, 0, P - 1])
    s = _rows(P, 2, 3, n)
    got, want = _both(s, P, index, act)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


def test_noncontiguous_rows():
    s = _rows(4, 2, 4, 10)
    rows = s[:, ::2]
    out = D.dual_smooth_act(rows, 4, None, "silu")
    assert max_rel_err(out, D.reference(rows, 4, None, "silu")) < F64["rtol"]


@pytest.mark.parametrize("act", ["gelu_tanh", "softplus", "elu"])
def test_gradcheck(act):
    s = _rows(3, 2, 2, 4, switch_points=False)  # finite differences across a kink would not match
    torch.autograd.gradcheck(lambda v: D.dual_smooth_act(v, 3, torch.tensor([2, 0]), act, **PARAMS), (s,))


@pytest.mark.parametrize("act", ["gelu", "softplus"])
def test_opcheck(act):
    code = D.ACT[act]
    args = (PARAMS["alpha"], PARAMS["beta"], PARAMS["threshold"])
    torch.library.opcheck(torch.ops.grokalign.dual_smooth_act, (_rows(5, 2, 3, 7), 5, torch.tensor([1, 4, 0]), code,
                                                                *args))
    torch.library.opcheck(torch.ops.grokalign.dual_smooth_act, (_rows(5, 2, 5, 7), 5, None, code, *args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", list(D.ACT))
def test_low_precision_within_twice_plain_pytorch(dtype, act):
    """The op accumulates in float: at most twice the plain rule's error in the same dtype."""
    s = _rows(6, 2, 3, 33, dtype=dtype)
    index = torch.tensor([5, 0, 2])
    ours, plain = _both(s, 6, index, act)
    exact = _both(s, 6, index, act, dtype=torch.float64)[1]
    assert_within_twice_plain_error(ours, plain, exact, names=["out", "grad"])


@pytest.mark.parametrize("act", list(D.ACT))
@pytest.mark.parametrize("P,n", [(7, 61), (2, 20011)], ids=["rows", "rows-longer-than-a-tile"])
def test_float32_within_twice_plain_pytorch(act, P, n):
    """float32 rows: gelu, gelu_tanh, silu, tanh and sigmoid run on the CPU with float exp / erf / tanh
    of their own (csrc/cpu/simd_math.h; their error bounds: tests/cpp/test_simd_math.cpp). Values and
    gradient at most twice plain PyTorch's float32 error (+ u) against float64, over arguments from
    -30 to 30, with primal rows that carry no tangent rows (the forward's y-only and the backward's
    s'-only forms) and rows that carry two."""
    g = torch.Generator().manual_seed(3)
    s = 3 * torch.randn(P + 4, n, generator=g, dtype=torch.float64)
    s[0, : min(n, 61)] = torch.linspace(-30, 30, min(n, 61), dtype=torch.float64)
    s = s.float().requires_grad_()
    index = torch.tensor([P - 1, 0])
    ours, plain = _both(s, P, index, act)
    exact = _both(s, P, index, act, dtype=torch.float64)[1]
    assert_within_twice_plain_error(ours, plain, exact, names=["out", "grad"])


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(4, 3), 0, None, 3, 1.0, 1.0, 20.0), r"primal_rows must be in \[1, 4\]"),
        ((torch.ones(4, 3), 2, None, 1, 1.0, 1.0, 20.0), r"act must be a smooth activation code in \[3, 10\)"),
        ((torch.ones(5, 3), 2, None, 3, 1.0, 1.0, 20.0), r"not a whole number of streams of 2 rows"),
        ((torch.ones(4, 3), 2, torch.tensor([0, 5]), 3, 1.0, 1.0, 20.0), r"index\[1\] = 5 is out of range"),
        ((torch.ones(4), 2, None, 3, 1.0, 1.0, 20.0), r"the rows must be \[N, n\]"),
        ((torch.ones(4, 3, dtype=torch.long), 2, None, 3, 1.0, 1.0, 20.0), r"the rows must be floating point"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.grokalign.dual_smooth_act(*args)


def test_backward_refuses_a_cotangent_of_another_shape():
    with pytest.raises(RuntimeError, match=r"grad must match s"):
        torch.ops.grokalign.dual_smooth_act_backward(torch.ones(4, 2), torch.ones(4, 3), 2, None, 3, 1.0, 1.0, 20.0)
