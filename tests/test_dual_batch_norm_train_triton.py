"""The Triton kernels of the dual-stream engine's train-mode batch norm
(grokalign_fast.ops.dual_batch_norm_train.triton) against the op's plain-PyTorch reference (autograd through
the statistics) and the engine's ATen version (``_BatchNormTrain``): float64 values, the gradients of rows,
weight and bias, and the running statistics (against ``F.batch_norm`` on the primal rows), for 2-d, 1-d and
length-1 rows, with no, fewer and more tangent rows than primal ones; gradcheck, low precision with the
rows' and float32 parameters, empty shapes and the argument errors; on every device present (the CPU
under Triton's interpreter). Inside the engine: tests/test_dual_rules.py and tests/test_dual_engine.py."""
import pytest
import torch
import torch.nn.functional as F

from grokalign_fast.dual.rules.norm import _BatchNormTrain
from grokalign_fast.ops import dual_batch_norm_train as D
from grokalign_fast.ops.dual_batch_norm_train import triton as T

from utils import F64, assert_within_twice_plain_error, max_rel_err, outputs_and_grads, triton_devices

DEVICES = triton_devices()
MOMENTUM, EPS = 0.3, 1e-3


def _case(shape, P, n_tangent, affine=True, dtype=torch.float64, param_dtype=None, device="cpu", seed=0):
    """(rows [P + n_tangent, *shape], weight, bias, running_mean, running_var): shifted and scaled
    rows, so the statistics are far from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    C = shape[0]
    view = (1, C) + (1,) * (len(shape) - 1)
    s = 3 * torch.randn((P + n_tangent,) + shape, generator=g, dtype=torch.float64) + \
        torch.linspace(-2, 2, C, dtype=torch.float64).view(view) * 10
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
    copy of the case's running statistics, and those statistics after the call (all on the CPU)."""
    s, weight, bias, rm, rv = case
    rm, rv = rm.clone(), rv.clone()
    out = fn(s, weight, bias, rm, rv, P, MOMENTUM, EPS)
    return [v.cpu() for v in outputs_and_grads([out], [s, weight, bias]) + [rm, rv]]


def _on_cpu(case):
    return [None if v is None else v.detach().cpu().requires_grad_(v.requires_grad) for v in case]


def _aten_version(s, weight, bias, rm, rv, P, momentum, eps):
    return _BatchNormTrain.apply(s, weight, bias, rm, rv, momentum, eps, P)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4, 5), (7,), (2, 19)], ids=["2d", "1d-no-length", "1d"])
@pytest.mark.parametrize("n_tangent", [0, 2, 10], ids=["no-tangents", "fewer-tangents", "more-tangents"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_equals_reference_and_the_aten_version(device, shape, n_tangent, affine):
    """out, the gradients of rows, weight and bias, float64 to 1e-10 against the reference and
    _BatchNormTrain; the running statistics as F.batch_norm updates them on the primal rows. The
    channel means are far from 0 (up to 20 standard deviations): the shifted sums keep the variance."""
    P = 5
    case = _case(shape, P, n_tangent, affine=affine, device=device)
    got = _run(T.dual_batch_norm_train, case, P)
    cpu = _on_cpu(case)
    for want in (_run(D.reference, cpu, P), _run(_aten_version, cpu, P)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert max_rel_err(a, b) < F64["rtol"]
    rm, rv = cpu[3].clone(), cpu[4].clone()
    plain = F.batch_norm(cpu[0][:P].detach(), rm, rv, cpu[1], cpu[2], True, MOMENTUM, EPS)
    assert max_rel_err(got[0][:P], plain) < F64["rtol"]
    assert max_rel_err(got[-2], rm) < F64["rtol"] and max_rel_err(got[-1], rv) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
def test_int64_indices(device, monkeypatch):
    """The kernels' int64 flat indices (taken where they can pass 2^31) give the same numbers."""
    monkeypatch.setattr(T, "_INT32_MAX", 0)
    P = 5
    case = _case((3, 4, 5), P, 7, device=device)
    got = _run(T.dual_batch_norm_train, case, P)
    for a, b in zip(got, _run(D.reference, _on_cpu(case), P)):
        assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
def test_untracked_running_statistics_and_empty_rows(device):
    s, weight, bias, _, _ = _case((3, 4), 4, 4, device=device)
    out = T.dual_batch_norm_train(s, weight, bias, None, None, 4, MOMENTUM, EPS)
    assert max_rel_err(out, D.reference(s, weight, bias, None, None, 4, MOMENTUM, EPS)) < F64["rtol"]
    empty = torch.zeros(3, 2, 0, dtype=torch.float64, device=device, requires_grad=True)
    out = T.dual_batch_norm_train(empty, None, None, None, None, 2, MOMENTUM, EPS)
    assert out.shape == empty.shape
    (grad,) = torch.autograd.grad(out.sum(), empty)
    assert grad.shape == empty.shape


def test_noncontiguous_rows():
    s, weight, bias, rm, rv = _case((4, 6), 3, 3)
    strided = s.detach().transpose(1, 2).contiguous().transpose(1, 2)
    got = T.dual_batch_norm_train(strided, weight, bias, rm.clone(), rv.clone(), 3, MOMENTUM, EPS)
    assert max_rel_err(got, D.reference(s, weight, bias, rm.clone(), rv.clone(), 3, MOMENTUM, EPS)) < F64["rtol"]


def test_gradcheck():
    s, weight, bias, _, _ = _case((2, 3), 3, 2)
    torch.autograd.gradcheck(lambda a, w, b: T.dual_batch_norm_train(a, w, b, None, None, 3, MOMENTUM, EPS),
                             (s, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["same-params", "float32-params"])
def test_low_precision_within_twice_plain_pytorch(device, dtype, param_dtype):
    """Statistics and sums in float32: at most twice the plain reference's error with everything in the
    rows' dtype. With float32 weight, bias and running statistics (mixed precision) the output keeps
    the rows' dtype and the parameters' gradients and statistics theirs."""
    param_dtype = dtype if param_dtype == "same" else param_dtype
    case = _case((3, 16), 8, 8, dtype=dtype, param_dtype=param_dtype, device=device)
    cpu = _on_cpu(case)
    low = [cpu[0]] + [v.detach().to(dtype).requires_grad_() for v in cpu[1:3]] + [v.to(dtype) for v in cpu[3:]]
    exact = [v.detach().double().requires_grad_() for v in cpu[:3]] + [v.double() for v in cpu[3:]]
    ours = _run(T.dual_batch_norm_train, case, 8)
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
        ((torch.ones(4), None, None, 2), r"s \(the stacked rows\) must be \[N, C, \*spatial\]"),
        ((torch.ones(4, 2, 3), None, None, 5), r"primal_rows must be an int in \[1, 4\]"),
        ((torch.ones(4, 2, 3), torch.ones(3), None, 2), r"weight must be a floating-point \[C=2\] tensor"),
        ((torch.ones(4, 2, 3), None, torch.ones(2, dtype=torch.long), 2), r"bias must be a floating-point \[C=2\]"),
        ((torch.ones(4, 2, 3, dtype=torch.long), None, None, 2), r"s must be float16, bfloat16, float32 or float64"),
    ],
)
def test_bad_arguments_are_named(args, match):
    s, weight, bias, P = args
    with pytest.raises((ValueError, TypeError), match=match):
        T.dual_batch_norm_train(s, weight, bias, None, None, P, MOMENTUM, EPS)
