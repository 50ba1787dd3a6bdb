"""grokalign::dual_batch_norm_train: the dual-stream engine's train-mode batch norm as one op, against its
plain-PyTorch reference (autograd through the statistics) and the engine's ATen version
(``_BatchNormTrain``), float64 values, gradients (rows, weight, bias) and running statistics (against
``F.batch_norm`` on the primal rows), gradcheck, opcheck, low precision, odd shapes and errors. The
op inside the engine: tests/test_dual_rules.py and tests/test_dual_engine.py."""
import pytest
import torch
import torch.nn.functional as F

from grokalign_fast.dual.rules.norm import _BatchNormTrain
from grokalign_fast.ops import dual_batch_norm_train as D

from utils import DEVICES, F64, assert_within_twice_plain_error, max_rel_err, outputs_and_grads

REASON = D.unavailable_reason(torch.zeros(1))
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

MOMENTUM, EPS = 0.3, 1e-3


def _case(shape, P, T, affine=True, dtype=torch.float64, param_dtype=None, device="cpu", seed=0):
    """(rows [P + T, *shape], weight, bias, running_mean, running_var): shifted and scaled rows, so
    the statistics are far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    C = shape[0]
    view = (1, C) + (1,) * (len(shape) - 1)
    s = (3 * torch.randn((P + T,) + shape, generator=g, dtype=torch.float64) + torch.linspace(-2, 2, C).view(view))
    param_dtype = param_dtype or dtype
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    stats = torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64) + 0.5

    def put(v, dt):
        return v.to(dtype=dt, device=device)

    leaves = [put(s, dtype).requires_grad_()] + ([put(weight, param_dtype).requires_grad_(),
                                                  put(bias, param_dtype).requires_grad_()] if affine else [None, None])
    return leaves + [put(v, param_dtype) for v in stats]


def _run(fn, case, P):
    """outputs_and_grads of ``fn(s, weight, bias, running_mean, running_var, P, momentum, eps)`` on a
    copy of the case's running statistics, and those statistics after the call."""
    s, weight, bias, rm, rv = case
    rm, rv = rm.clone(), rv.clone()
    out = fn(s, weight, bias, rm, rv, P, MOMENTUM, EPS)
    return outputs_and_grads([out], [s, weight, bias]) + [rm, rv]


def _aten_version(s, weight, bias, rm, rv, P, momentum, eps):
    return _BatchNormTrain.apply(s, weight, bias, rm, rv, momentum, eps, P)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4, 5), (7,), (2, 9)], ids=["2d", "1d-no-length", "1d"])
@pytest.mark.parametrize("T", [0, 2, 10], ids=["no-tangents", "fewer-tangents", "more-tangents"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_op_equals_reference_and_the_aten_version(device, shape, T, affine):
    """out, the gradients of rows, weight and bias, float64 to 1e-10 against the reference and
    _BatchNormTrain; the running statistics as F.batch_norm updates them on the primal rows."""
    P = 5
    case = _case(shape, P, T, affine=affine, device=device)
    got = _run(D.dual_batch_norm_train, case, P)
    for want in (_run(D.reference, case, P), _run(_aten_version, case, P)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert max_rel_err(a, b) < F64["rtol"]
    rm, rv = case[3].clone(), case[4].clone()
    plain = F.batch_norm(case[0][:P].detach(), rm, rv, case[1], case[2], True, MOMENTUM, EPS)
    assert max_rel_err(got[0][:P], plain) < F64["rtol"]
    assert max_rel_err(got[-2], rm) < F64["rtol"] and max_rel_err(got[-1], rv) < F64["rtol"]


def test_untracked_running_statistics():
    s, weight, bias, _, _ = _case((3, 4), 4, 4)
    out = D.dual_batch_norm_train(s, weight, bias, None, None, 4, MOMENTUM, EPS)
    assert max_rel_err(out, D.reference(s, weight, bias, None, None, 4, MOMENTUM, EPS)) < F64["rtol"]


def test_noncontiguous_rows():
    s, weight, bias, rm, rv = _case((4, 6), 3, 3)
    strided = s.detach().transpose(1, 2).contiguous().transpose(1, 2)
    got = D.dual_batch_norm_train(strided, weight, bias, rm.clone(), rv.clone(), 3, MOMENTUM, EPS)
    assert max_rel_err(got, D.reference(s, weight, bias, rm.clone(), rv.clone(), 3, MOMENTUM, EPS)) < F64["rtol"]


def test_gradcheck():
    s, weight, bias, _, _ = _case((2, 3), 3, 2)
    torch.autograd.gradcheck(lambda a, w, b: D.dual_batch_norm_train(a, w, b, None, None, 3, MOMENTUM, EPS),
                             (s, weight, bias))


def test_opcheck():
    s, weight, bias, _, _ = _case((3, 4), 4, 6)
    torch.library.opcheck(torch.ops.grokalign.dual_batch_norm_train, (s, weight, bias, 4, EPS))
    torch.library.opcheck(torch.ops.grokalign.dual_batch_norm_train, (s, None, None, 4, EPS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["same-params", "float32-params"])
def test_low_precision_within_twice_plain_pytorch(dtype, param_dtype):
    """Statistics and sums in float: at most twice the plain reference's error with everything in the
    rows' dtype. With float32 weight, bias and running statistics (mixed precision) the output keeps
    the rows' dtype and the parameters' gradients and statistics theirs."""
    param_dtype = dtype if param_dtype == "same" else param_dtype
    case = _case((3, 16), 8, 8, dtype=dtype, param_dtype=param_dtype)
    low = [case[0]] + [v.detach().to(dtype).requires_grad_() for v in case[1:3]] + [v.to(dtype) for v in case[3:]]
    exact = [v.detach().double().requires_grad_() for v in case[:3]] + [v.double() for v in case[3:]]
    ours = _run(D.dual_batch_norm_train, case, 8)
    plain = _run(D.reference, low, 8)
    want = _run(D.reference, exact, 8)
    assert ours[0].dtype == ours[1].dtype == dtype
    assert all(v.dtype == param_dtype for v in ours[2:])
    assert_within_twice_plain_error(ours[:2], plain[:2], want[:2], names=["out", "grad rows"])
    names = ["grad weight", "grad bias", "running mean", "running var"]
    for name, o, p, e in zip(names, ours[2:], plain[2:], want[2:]):
        err, err_plain = max_rel_err(o, e), max_rel_err(p, e)
        assert err <= 2 * err_plain + torch.finfo(dtype).eps / 2, (name, err, err_plain)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(4, 2), None, None, 2, EPS), r"the rows must be \[N, C, L\]"),
        ((torch.ones(4, 2, 3), None, None, 5, EPS), r"primal_rows must be in \[1, 4\]"),
        ((torch.ones(4, 2, 3), torch.ones(3), None, 2, EPS), r"weight and bias must be floating point \[C=2\]"),
        ((torch.ones(4, 2, 3), None, torch.ones(2, dtype=torch.long), 2, EPS), r"weight and bias must be floating"),
        ((torch.ones(4, 2, 3, dtype=torch.long), None, None, 2, EPS), r"the rows must be floating point"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.grokalign.dual_batch_norm_train(*args)


def test_backward_refuses_statistics_of_another_dtype():
    s = torch.ones(4, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"mean and var must be Double \[C=2\]"):
        torch.ops.grokalign.dual_batch_norm_train_backward(s, s, None, torch.ones(2), torch.ones(2), 2, EPS,
                                                           [True, False, False])
