"""grokalign::dual_layer_norm: the dual-stream engine's layer norm / RMS norm / group norm as one op,
against its plain-PyTorch reference (autograd through the statistics: the second-order terms of the
primal rows' gradient), float64 values and the gradients of rows, weight and bias to 1e-10 (odd n, one
and three primal rows, with and without index, with and without weight and bias, no tangent rows),
the primal rows against F.layer_norm / F.rms_norm and the tangent rows against torch.func.jvp,
grouped parameters (group norm) against F.group_norm, gradcheck, opcheck, float32, float16 / bfloat16
by the 2x rule, and errors. The op inside the engine: tests/test_dual_rules.py and
tests/test_dual_engine.py."""
import pytest
import torch
import torch.nn.functional as F

from grokalign_fast.ops import dual_layer_norm as D
from grokalign_fast.ops._stacked_rows import source_rows

from utils import DEVICES, F64, REL32, assert_within_twice_plain_error, max_rel_err, outputs_and_grads

REASON = D.unavailable_reason(torch.zeros(1))
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

EPS = 1e-3
# (P, index, T): primal rows, the tangent rows' index, tangent rows.
LAYOUTS = [(1, None, 0), (1, None, 3), (1, [0, 0], 4), (3, None, 0), (3, None, 6), (3, [2, 0, 2, 2], 8)]
LAYOUT_IDS = ["P1-T0", "P1-T3", "P1-index", "P3-T0", "P3-T6", "P3-index-repeated"]
AFFINE = ["weight-bias", "weight", "bias", "none"]


def _case(P, T, n, affine="weight-bias", groups=None, dtype=torch.float64, param_dtype=None, device="cpu", seed=0):
    """(rows [P + T, n], weight, bias): rows shifted and scaled per row (statistics far from 0 and 1),
    parameters away from 1 and 0; ``[groups, n]`` parameters with ``groups``."""
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(P + T, n, generator=g, dtype=torch.float64) + torch.linspace(-3, 3, P + T).view(-1, 1)
    shape = (n,) if groups is None else (groups, n)
    weight = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(shape, generator=g, dtype=torch.float64)
    param_dtype = param_dtype or dtype

    def leaf(v, dt):
        return v.to(dtype=dt, device=device).requires_grad_()

    return (leaf(s, dtype), leaf(weight, param_dtype) if affine in ("weight-bias", "weight") else None,
            leaf(bias, param_dtype) if affine in ("weight-bias", "bias") else None)


def _index(index, device="cpu"):
    return None if index is None else torch.tensor(index, device=device)


def _run(fn, case, P, index, rms, seed=1):
    """outputs_and_grads of ``fn(s, weight, bias, P, index, EPS, rms)``: out, then the gradients of s,
    weight and bias (those given)."""
    s, weight, bias = case
    return outputs_and_grads([fn(s, weight, bias, P, index, EPS, rms)], [s, weight, bias], seed=seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P,index,T", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_op_equals_reference(device, P, index, T, affine, rms):
    """out and the gradients of rows, weight and bias, float64 to 1e-10 against autograd of the reference."""
    case = _case(P, T, 37, affine, device=device)
    idx = _index(index, device)
    got, want = _run(D.dual_layer_norm, case, P, idx, rms), _run(D.reference, case, P, idx, rms)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("P,index,T", LAYOUTS[1:3] + LAYOUTS[4:], ids=LAYOUT_IDS[1:3] + LAYOUT_IDS[4:])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_reference_is_the_norm_and_its_jvp(P, index, T, rms):
    """The specification itself, independently of the op: primal rows = F.layer_norm / F.rms_norm,
    tangent row j = torch.func.jvp of it at primal row src(j) along t_j."""
    s, weight, bias = (v.detach() for v in _case(P, T, 37))
    bias = None if rms else bias
    idx = _index(index)
    out = D.reference(s, weight, bias, P, idx, EPS, rms)

    def norm(z):
        return F.rms_norm(z, (37,), weight, EPS) if rms else F.layer_norm(z, (37,), weight, bias, EPS)

    src = source_rows(P + T, P, idx)
    _, jvp = torch.func.jvp(norm, (s[:P][src],), (s[P:],))
    assert max_rel_err(out[:P], norm(s[:P])) < F64["rtol"]
    assert max_rel_err(out[P:], jvp) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", AFFINE)
def test_grouped_parameters_are_group_norm(device, affine):
    """weight / bias [G, n]: row p takes row p mod G, a tangent row its source row's. Against the
    reference (values and gradients), and the primal rows against F.group_norm of samples [C, L]
    whose G groups of C/G channels are the rows."""
    B, C, L, G = 2, 6, 5, 3
    P, n, idx = B * G, C // G * L, _index([5, 0, 3, 3], device)
    case = _case(P, 8, n, affine, groups=G, device=device)
    got, want = _run(D.dual_layer_norm, case, P, idx, False), _run(D.reference, case, P, idx, False)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]
    # The same affine per channel: a [C] parameter expanded over each channel's L values.
    per_channel = torch.linspace(0.5, 1.5, C, dtype=torch.float64, device=device)
    grouped = per_channel.view(G, C // G, 1).expand(-1, -1, L).reshape(G, n)
    s = case[0].detach()
    out = D.dual_layer_norm(s, grouped, -grouped, P, idx, EPS)
    plain = F.group_norm(s[:P].reshape(B, C, L), G, per_channel, -per_channel, EPS)
    assert max_rel_err(out[:P], plain.reshape(P, n)) < F64["rtol"]


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, True, False),
                                  (False, False, True)], ids=["rows", "params", "weight", "bias"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_only_the_gradients_asked_for(need, rms):
    """With only some inputs requiring a gradient, those gradients equal the reference's."""
    case = _case(3, 8, 37)
    case = tuple(v.detach().requires_grad_(r) for v, r in zip(case, need))
    idx = _index([2, 0, 2, 2])
    leaves = [v for v in case if v.requires_grad]
    got = outputs_and_grads([D.dual_layer_norm(*case, 3, idx, EPS, rms)], leaves)
    want = outputs_and_grads([D.reference(*case, 3, idx, EPS, rms)], leaves)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


def test_noncontiguous_rows_and_one_feature():
    s, weight, bias = _case(3, 6, 7)
    strided = s.detach().t().contiguous().t()
    assert not strided.is_contiguous()
    got = D.dual_layer_norm(strided, weight, bias, 3, None, EPS)
    assert max_rel_err(got, D.reference(s, weight, bias, 3, None, EPS)) < F64["rtol"]
    s1, w1, b1 = _case(2, 4, 1)
    got, want = _run(D.dual_layer_norm, (s1, w1, b1), 2, None, False), _run(D.reference, (s1, w1, b1), 2, None, False)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < F64["atol"] + F64["rtol"] * b.abs().max()


def test_many_rows_over_threads():
    """Rows split over two threads (the CPU kernel's per-thread partial sums of grad_weight and
    grad_bias): equal to the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = _case(512, 1024, 64, groups=2)
        idx = _index(list(range(511, -1, -2)))
        got, want = _run(D.dual_layer_norm, case, 512, idx, False), _run(D.reference, case, 512, idx, False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gradcheck(rms):
    s, weight, bias = _case(2, 6, 5)
    idx = _index([1, 1, 0])
    torch.autograd.gradcheck(lambda a, w, b: D.dual_layer_norm(a, w, b, 2, idx, EPS, rms), (s, weight, bias))
    s, weight, bias = _case(2, 4, 5, groups=2)
    torch.autograd.gradcheck(lambda a, w, b: D.dual_layer_norm(a, w, b, 2, None, EPS, rms), (s, weight, bias))


def test_opcheck():
    s, weight, bias = _case(3, 12, 6)
    idx = _index([2, 0, 2, 2])
    op = torch.ops.grokalign.dual_layer_norm.default
    torch.library.opcheck(op, (s, weight, bias, 3, idx, EPS, False))
    torch.library.opcheck(op, (s, None, None, 3, None, EPS, True))
    torch.library.opcheck(op, (s.detach(), weight, None, 3, idx, EPS, True))
    sg, wg, bg = _case(4, 4, 6, groups=2)
    torch.library.opcheck(op, (sg, wg, bg, 4, None, EPS, False))
    out, mean, rstd = op(s, weight, bias, 3, idx, EPS, False)
    grad = torch.randn_like(out)
    back = torch.ops.grokalign.dual_layer_norm_backward.default
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(back, (grad, s.detach(), weight.detach(), mean, rstd, 3, idx, False, 1, mask))


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_float32_against_float64(rms):
    case = _case(3, 8, 37, dtype=torch.float32)
    exact = tuple(v.detach().double().requires_grad_() for v in case)
    idx = _index([2, 0, 2, 2])
    got, want = _run(D.dual_layer_norm, case, 3, idx, rms), _run(D.reference, exact, 3, idx, rms)
    assert all(a.dtype == torch.float32 for a in got)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < REL32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["same-params", "float32-params"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_low_precision_within_twice_plain_pytorch(dtype, param_dtype, rms):
    """Statistics and sums in float: at most twice the plain reference's error with everything in the
    rows' dtype. With float32 weight and bias (mixed precision) the output keeps the rows' dtype and
    the parameters' gradients theirs."""
    param_dtype = dtype if param_dtype == "same" else param_dtype
    case = _case(4, 8, 64, dtype=dtype, param_dtype=param_dtype)
    low = (case[0],) + tuple(v.detach().to(dtype).requires_grad_() for v in case[1:])
    exact = tuple(v.detach().double().requires_grad_() for v in case)
    idx = _index([3, 0, 3, 1])
    ours, plain = _run(D.dual_layer_norm, case, 4, idx, rms), _run(D.reference, low, 4, idx, rms)
    want = _run(D.reference, exact, 4, idx, rms)
    assert ours[0].dtype == ours[1].dtype == dtype and ours[2].dtype == ours[3].dtype == param_dtype
    assert_within_twice_plain_error(ours[:2], plain[:2], want[:2], names=["out", "grad rows"])
    for name, o, p, e in zip(["grad weight", "grad bias"], ours[2:], plain[2:], want[2:]):
        err, err_plain = max_rel_err(o, e), max_rel_err(p, e)
        assert err <= 2 * err_plain + torch.finfo(dtype).eps / 2, (name, err, err_plain)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(4), None, None, 2, None, EPS, False), r"the rows must be \[N, n\]"),
        ((torch.ones(4, 0), None, None, 2, None, EPS, False), r"n >= 1 features"),
        ((torch.ones(4, 3, dtype=torch.long), None, None, 2, None, EPS, False), r"the rows must be floating point"),
        ((torch.ones(4, 3), None, None, 5, None, EPS, False), r"primal_rows must be in \[1, 4\]"),
        ((torch.ones(5, 3), None, None, 2, None, EPS, False), r"not a whole number of streams of 2"),
        ((torch.ones(4, 3), torch.ones(4), None, 2, None, EPS, False), r"weight and bias must be floating point \[n=3"),
        ((torch.ones(4, 3), None, torch.ones(3, dtype=torch.long), 2, None, EPS, False), r"weight and bias must be"),
        ((torch.ones(4, 3), torch.ones(3), torch.ones(1, 3), 2, None, EPS, False), r"must have one shape"),
        ((torch.ones(6, 3), torch.ones(2, 3), None, 3, None, EPS, False), r"primal_rows \(3\) must be a multiple of"),
        ((torch.ones(4, 3), None, None, 2, torch.tensor([0, 2]), EPS, False), r"index\[1\] = 2 is out of range"),
        ((torch.ones(4, 3), None, None, 2, torch.tensor([[0]]), EPS, False), r"index must be a non-empty 1-D long"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.grokalign.dual_layer_norm(*args)


def test_backward_refuses_mismatched_state():
    s = torch.ones(4, 3, dtype=torch.float64)
    stats = torch.ones(2, dtype=torch.float64)
    back = torch.ops.grokalign.dual_layer_norm_backward
    with pytest.raises(RuntimeError, match=r"mean and rstd must be Double \[P=2\]"):
        back(s, s, None, torch.ones(2), torch.ones(2), 2, None, False, 1, [True, False, False])
    with pytest.raises(RuntimeError, match=r"grad must match s"):
        back(s[:3], s, None, stats, stats, 2, None, False, 1, [True, False, False])
    with pytest.raises(RuntimeError, match=r"groups must be >= 1 and divide primal_rows \(2\), got 3"):
        back(s, s, None, stats, stats, 2, None, False, 3, [True, False, False])
    with pytest.raises(RuntimeError, match=r"weight must have groups \* n = 6 values"):
        back(s, s, torch.ones(3, dtype=torch.float64), stats, stats, 2, None, False, 2, [True, True, False])
