"""grokalign::dual_max_pool: the dual-stream engine's max-pool gather as one op, against its plain-PyTorch
reference and ATen's max pools (the primal rows' maxima), float64 values and gradients (the scatter-add
of overlapping windows), gradcheck, opcheck, low precision, odd shapes and errors. The op inside the
engine: tests/test_dual_rules.py and tests/test_dual_engine.py."""
import pytest
import torch
import torch.nn.functional as F

from grokalign_fast.ops import dual_max_pool as D

from utils import DEVICES, F64, assert_within_twice_plain_error, max_rel_err, outputs_and_grads

REASON = D.unavailable_reason(torch.zeros(1))
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

# (name, pool of the primal rows with return_indices=True, per-sample shape)
POOLS = [
    ("max_pool1d", lambda z: F.max_pool1d(z, 3, 2, return_indices=True), (3, 11)),
    ("max_pool2d_overlap_pad", lambda z: F.max_pool2d(z, 3, stride=1, padding=1, return_indices=True), (2, 5, 6)),
    ("max_pool3d", lambda z: F.max_pool3d(z, 2, return_indices=True), (2, 4, 3, 5)),
    ("adaptive_max_pool2d", lambda z: F.adaptive_max_pool2d(z, (2, 3), return_indices=True), (3, 5, 7)),
]


def _case(pool, shape, P, K, index, dtype=torch.float64, device="cpu", seed=0):
    """(rows [N, C, L], idx [P, C, Lout], index, the primal rows' pooled values [P, C, Lout])."""
    g = torch.Generator().manual_seed(seed)
    R = P if index is None else len(index)
    z = torch.randn((P + K * R,) + shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    pooled, idx = pool(z[:P])
    C = shape[0]
    rows = z.reshape(z.shape[0], C, -1).requires_grad_()
    idx = idx.reshape(P, C, -1)
    index = None if index is None else torch.tensor(index, device=device)
    return rows, idx, index, pooled.reshape(P, C, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,pool,shape", POOLS, ids=[p[0] for p in POOLS])
@pytest.mark.parametrize("index", [None, [4, 0, 4]], ids=["all", "subset-repeated"])
@pytest.mark.parametrize("K", [1, 3])
def test_op_equals_reference(device, name, pool, shape, index, K):
    rows, idx, index, pooled = _case(pool, shape, 5, K, index, device=device)
    got = outputs_and_grads([D.dual_max_pool(rows, idx, index)], [rows])
    want = outputs_and_grads([D.reference(rows, idx, index)], [rows])
    assert torch.equal(got[0][:5], pooled)  # the primal rows' maxima, as ATen's pool gives them
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


# (P, K, index) on one-channel rows of length 3: no tangent rows, one-row streams, more tangent rows
# per stream than primal rows.
ODD_SHAPES = [(1, 0, None), (3, 2, [2]), (2, 1, [1, 1, 0, 0])]
ODD_IDS = ["no-tangent-rows", "one-row-streams", "more-rows-than-primal"]


@pytest.mark.parametrize("P,K,index", ODD_SHAPES, ids=ODD_IDS)
def test_odd_shapes(P, K, index):
    rows, idx, index, _ = _case(POOLS[1][1], (1, 3, 1), P, K, index)
    got = outputs_and_grads([D.dual_max_pool(rows, idx, index)], [rows])
    want = outputs_and_grads([D.reference(rows, idx, index)], [rows])
    for a, b in zip(got, want):
        assert a.shape == b.shape and max_rel_err(a, b) < F64["rtol"]


def test_noncontiguous_rows():
    rows, idx, _, _ = _case(POOLS[0][1], (3, 11), 4, 2, None)
    wide = torch.cat([rows.detach(), rows.detach()], dim=1)[:, ::2]  # strided in the channel dimension
    assert torch.equal(D.dual_max_pool(wide, idx, None), D.reference(wide, idx, None))


def test_gradcheck():
    rows, idx, index, _ = _case(POOLS[1][1], (2, 3, 4), 3, 2, [2, 0, 2])
    torch.autograd.gradcheck(lambda v: D.dual_max_pool(v, idx, index), (rows,))


def test_opcheck():
    rows, idx, index, _ = _case(POOLS[1][1], (2, 3, 4), 3, 2, [2, 0])
    torch.library.opcheck(torch.ops.grokalign.dual_max_pool, (rows, idx, index))
    rows, idx, _, _ = _case(POOLS[0][1], (3, 11), 4, 1, None)
    torch.library.opcheck(torch.ops.grokalign.dual_max_pool, (rows, idx, None))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_plain_pytorch(dtype):
    """The gather is exact; the backward adds overlapping windows in float: at most twice the plain
    scatter-add's error in the same dtype."""
    rows, idx, index, _ = _case(POOLS[1][1], (2, 5, 6), 4, 2, [3, 0], dtype=dtype)
    exact_rows = rows.detach().double().requires_grad_()
    ours = outputs_and_grads([D.dual_max_pool(rows, idx, index)], [rows])
    plain = outputs_and_grads([D.reference(rows, idx, index)], [rows])
    exact = outputs_and_grads([D.reference(exact_rows, idx, index)], [exact_rows])
    assert torch.equal(ours[0], plain[0])
    assert_within_twice_plain_error(ours[1:], plain[1:], exact[1:], names=["grad"])


# (z, idx, index) and the error's pattern: each names the argument.
BAD_ARGS = [
    ((torch.ones(4, 2, 5), torch.zeros(2, 3, 2, dtype=torch.long), None), r"idx must be long \[P, C=2, Lout\]"),
    ((torch.ones(4, 2, 5), torch.zeros(2, 2, 2), None), r"idx must be long"),
    ((torch.ones(4, 2, 5), torch.full((2, 2, 2), 5), None), r"idx must lie in \[0, 5\)"),
    ((torch.ones(5, 2, 5), torch.zeros(2, 2, 2, dtype=torch.long), None), r"not a whole number of streams of 2"),
    ((torch.ones(4, 2, 5), torch.zeros(2, 2, 2, dtype=torch.long), torch.tensor([2])), r"index\[0\] = 2 is out"),
    ((torch.ones(4, 10), torch.zeros(2, 2, 2, dtype=torch.long), None), r"the rows must be \[N, C, L\]"),
]


@pytest.mark.parametrize("args,match", BAD_ARGS)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.grokalign.dual_max_pool(*args)


def test_backward_refuses_a_cotangent_of_another_width():
    with pytest.raises(RuntimeError, match=r"grad must be \[N, C, Lout=2\]"):
        torch.ops.grokalign.dual_max_pool_backward(torch.ones(4, 2, 3), torch.zeros(2, 2, 2, dtype=torch.long), None, 5)


# grokalign::max_pool2d_argmax: the primal rows' argmax the engine's rule takes, against ATen's indices.
ARGMAX_SETTINGS = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, stride=2, dilation=2),
    dict(kernel_size=2, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
]


def _argmax_input(kind, shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "ties":  # ReLU outputs rounded: most windows hold equal entries
        z = torch.relu(z).mul(2).round()
    elif kind == "nonfinite":  # NaN and +-inf entries, whole windows of -inf
        z.view(-1)[::7] = float("nan")
        z.view(-1)[3::11] = float("inf")
        z[..., :2, :2] = float("-inf")
        z.view(-1)[5::13] = float("-inf")
    return z.to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", ARGMAX_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("kind", ["random", "ties", "nonfinite"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_argmax_equals_aten(device, setting, kind, dtype):
    """The indices equal ATen's max_pool2d(return_indices=True) exactly: odd sizes (7 x 9 and 5 x 6,
    every window position against each border), overlapping, padded, strided and dilated windows,
    ceil mode, and the scan's rules for ties (the first entry), NaN (the last NaN) and windows of -inf."""
    if D.argmax_unavailable_reason(torch.zeros(1, device=device)) is not None:
        pytest.skip(D.argmax_unavailable_reason(torch.zeros(1, device=device)))
    for shape in [(3, 4, 7, 9), (2, 3, 5, 6)]:
        z = _argmax_input(kind, shape, dtype, device)
        got = D.max_pool2d_argmax(z, **setting)
        want = F.max_pool2d(z, return_indices=True, **setting)[1]
        assert got.dtype == torch.long and torch.equal(got, want), (shape, (got != want).sum().item())


def test_argmax_noncontiguous_and_empty():
    z = torch.randn(3, 8, 6, 10, dtype=torch.float64)[:, ::2, :, ::2]
    assert torch.equal(D.max_pool2d_argmax(z, 2), F.max_pool2d(z, 2, return_indices=True)[1])
    e = torch.zeros(0, 3, 4, 4)
    assert D.max_pool2d_argmax(e, 2).shape == (0, 3, 2, 2)


def test_argmax_opcheck_and_compile():
    z = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.grokalign.max_pool2d_argmax, (z, [3, 2], [2, 1], [1, 0], [1, 1], True))
    f = torch.compile(lambda x: D.max_pool2d_argmax(x, 3, 2, 1, ceil_mode=True), fullgraph=True, backend="eager")
    assert torch.equal(f(z), F.max_pool2d(z, 3, 2, 1, ceil_mode=True, return_indices=True)[1])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(kernel_size=0), r"kernel_size must be positive"),
        (dict(kernel_size=2, stride=0), r"stride must be positive"),
        (dict(kernel_size=2, dilation=0), r"dilation must be positive"),
        (dict(kernel_size=2, padding=2), r"padding must be non-negative and at most half of kernel_size"),
        (dict(kernel_size=9), r"too small for the kernel"),
    ],
)
def test_argmax_bad_arguments_are_named(kw, match):
    with pytest.raises(RuntimeError, match=match):
        D.max_pool2d_argmax(torch.zeros(1, 2, 4, 4), **kw)
    with pytest.raises(RuntimeError, match=r"z must be \[N, C, H, W\]"):
        D.max_pool2d_argmax(torch.zeros(2, 4, 4), 2)
