"""The Triton kernels of the dual-stream engine's layer norm / RMS norm / group norm
(grokalign_fast.ops.dual_layer_norm.triton) against the op's plain-PyTorch reference (autograd through the
statistics): float64 values and the gradients of rows, weight and bias to 1e-10 for both modes, with and
without weight and bias, no / fewer / more tangent rows, with and without index, grouped parameters
(group norm), odd widths that cross the interpreter's 16-column blocks, one and several backward programs,
only some gradients asked for, primal rows far from zero mean; gradcheck, float32, float16 / bfloat16 by the 2x
rule and the argument errors; on every device present (the CPU under Triton's interpreter). The cases and
parameters are the C++ op's (tests/test_dual_layer_norm.py). Inside the engine: tests/test_dual_rules.py and
tests/test_dual_engine.py; compiled for sm_90: tests/sm90_compile_epilogues.py."""
import pytest
import torch
import torch.nn.functional as F

from grokalign_fast.ops import dual_layer_norm as D
from grokalign_fast.ops.dual_layer_norm import triton as T

from test_dual_layer_norm import AFFINE, EPS, LAYOUT_IDS, LAYOUTS, _case, _index, _run  # the C++ op's cases
from utils import F64, REL32, assert_within_twice_plain_error, max_rel_err, outputs_and_grads, triton_devices

DEVICES = triton_devices()


def _on_cpu(case, dtype=None):
    return tuple(None if v is None else v.detach().cpu().to(dtype or v.dtype).requires_grad_(v.requires_grad)
                 for v in case)


def _both(case, P, index, rms, ref_dtype=None):
    """_run of the kernels on ``case`` and of the reference on a CPU copy (in ``ref_dtype``)."""
    got = _run(T.dual_layer_norm, case, P, index, rms)
    want = _run(D.reference, _on_cpu(case, ref_dtype), P, None if index is None else index.cpu(), rms)
    return [v.cpu() for v in got], want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P,index,T", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_equals_reference(device, P, index, T, affine, rms):
    """out and the gradients of rows, weight and bias, float64 to 1e-10 (n = 37: three column blocks
    under the interpreter)."""
    case = _case(P, T, 37, affine, device=device)
    got, want = _both(case, P, _index(index, device), rms)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 17, 130])
@pytest.mark.parametrize("index", [None, [3, 0, 3, 1]], ids=["no-index", "index"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_odd_widths(device, n, index, rms):
    """Widths below, across and over many blocks, with [2, n] parameters (two groups): to 1e-10 of the
    largest value (for n = 1 the layer norm's output is the bias and its gradients vanish)."""
    case = _case(4, 8, n, groups=2, device=device)
    got, want = _both(case, 4, _index(index, device), rms)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= F64["atol"] + F64["rtol"] * b.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", AFFINE)
def test_grouped_parameters_are_group_norm(device, affine):
    """weight / bias [G, n]: row p takes row p mod G, a tangent row its source row's. Against the
    reference, and the primal rows against F.group_norm of samples [C, L] whose G groups are the rows."""
    B, C, L, G = 2, 6, 5, 3
    P, n, idx = B * G, C // G * L, _index([5, 0, 3, 3], device)
    case = _case(P, 8, n, affine, groups=G, device=device)
    got, want = _both(case, P, idx, False)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]
    per_channel = torch.linspace(0.5, 1.5, C, dtype=torch.float64, device=device)
    grouped = per_channel.view(G, C // G, 1).expand(-1, -1, L).reshape(G, n)
    s = case[0].detach()
    out = T.dual_layer_norm(s, grouped, -grouped, P, idx, EPS)
    plain = F.group_norm(s[:P].reshape(B, C, L), G, per_channel, -per_channel, EPS)
    assert max_rel_err(out[:P], plain.reshape(P, n)) < F64["rtol"]


@pytest.mark.parametrize("programs", [1, 2, 64], ids=["one-program", "two-programs", "a-program-per-row"])
@pytest.mark.parametrize("groups", [None, 2], ids=["[n]", "[G, n]"])
def test_backward_programs_and_their_partials(monkeypatch, programs, groups):
    """The backward's programs loop over primal rows of one group; their weight / bias partials are
    summed per group: the same gradients for any number of programs (six primal rows)."""
    monkeypatch.setattr(T, "_INTERPRETED_PROGRAMS", programs)
    case = _case(6, 12, 19, groups=groups)
    got, want = _both(case, 6, _index([5, 0, 2, 2, 3, 4]), False)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (False, True, False),
                                  (False, False, True)], ids=["rows", "params", "weight", "bias"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_only_the_gradients_asked_for(need, rms):
    case = tuple(v.detach().requires_grad_(r) for v, r in zip(_case(3, 8, 37), need))
    idx = _index([2, 0, 2, 2])
    leaves = [v for v in case if v.requires_grad]
    got = outputs_and_grads([T.dual_layer_norm(*case, 3, idx, EPS, rms)], leaves)
    want = outputs_and_grads([D.reference(*case, 3, idx, EPS, rms)], leaves)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


def test_noncontiguous_rows():
    s, weight, bias = _case(3, 6, 7)
    strided = s.detach().t().contiguous().t()
    assert not strided.is_contiguous()
    got = T.dual_layer_norm(strided, weight, bias, 3, None, EPS)
    assert max_rel_err(got, D.reference(s, weight, bias, 3, None, EPS)) < F64["rtol"]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gradcheck(rms):
    s, weight, bias = _case(2, 6, 5)
    idx = _index([1, 1, 0])
    torch.autograd.gradcheck(lambda a, w, b: T.dual_layer_norm(a, w, b, 2, idx, EPS, rms), (s, weight, bias))
    s, weight, bias = _case(2, 4, 19, groups=2)
    torch.autograd.gradcheck(lambda a, w, b: T.dual_layer_norm(a, w, b, 2, None, EPS, rms), (s, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_float32_against_float64(device, rms):
    case = _case(3, 8, 37, dtype=torch.float32, device=device)
    got, want = _both(case, 3, _index([2, 0, 2, 2], device), rms, ref_dtype=torch.float64)
    assert all(a.dtype == torch.float32 for a in got)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < REL32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_primal_rows_far_from_zero_mean(device, rms):
    """Primal rows of mean 1e5 and standard deviation 2 over 9 column blocks, float64 to 1e-10: the
    blocks' statistics merged by Chan's update keep the variance (``E[z^2] - E[z]^2`` would lose ten of
    its sixteen digits)."""
    s, weight, bias = _case(3, 6, 130, device=device)
    s = s.detach().clone()
    s[:3] += 1e5
    got, want = _both((s.requires_grad_(), weight, bias), 3, _index([2, 0, 2], device), rms)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["same-params", "float32-params"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_low_precision_within_twice_plain_pytorch(device, dtype, param_dtype, rms):
    """Statistics and sums in float32: at most twice the plain reference's error with everything in the
    rows' dtype. With float32 weight and bias the output keeps the rows' dtype and the parameters'
    gradients theirs."""
    param_dtype = dtype if param_dtype == "same" else param_dtype
    case = _case(4, 8, 64, dtype=dtype, param_dtype=param_dtype, device=device)
    cpu = _on_cpu(case)
    low = (cpu[0],) + tuple(v.detach().to(dtype).requires_grad_() for v in cpu[1:])
    idx = _index([3, 0, 3, 1], device)
    ours, exact = _both(case, 4, idx, rms, ref_dtype=torch.float64)
    plain = _run(D.reference, low, 4, idx.cpu(), rms)
    assert ours[0].dtype == ours[1].dtype == dtype and ours[2].dtype == ours[3].dtype == param_dtype
    assert_within_twice_plain_error(ours[:2], plain[:2], exact[:2], names=["out", "grad rows"])
    for name, o, p, e in zip(["grad weight", "grad bias"], ours[2:], plain[2:], exact[2:]):
        err, err_plain = max_rel_err(o, e), max_rel_err(p, e)
        assert err <= 2 * err_plain + torch.finfo(dtype).eps / 2, (name, err, err_plain)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.ones(4), None, None, 2, None), r"s \(the stacked rows\) must be \[N, n\]"),
        ((torch.ones(4, 0), None, None, 2, None), r"s must have n >= 1 features"),
        ((torch.ones(4, 3, dtype=torch.long), None, None, 2, None), r"s must be float16, bfloat16, float32 or float64"),
        ((torch.ones(4, 3), None, None, 5, None), r"primal_rows must be an int in \[1, 4\]"),
        ((torch.ones(5, 3), None, None, 2, None), r"not a whole number of streams of 2"),
        ((torch.ones(4, 3), torch.ones(4), None, 2, None), r"weight must be a floating-point \[n=3\] or \[G, n=3\]"),
        ((torch.ones(4, 3), None, torch.ones(3, dtype=torch.long), 2, None), r"bias must be a floating-point"),
        ((torch.ones(4, 3), torch.ones(3), torch.ones(1, 3), 2, None), r"weight and bias must have one shape"),
        ((torch.ones(6, 3), torch.ones(2, 3), None, 3, None), r"primal_rows \(3\) must be a multiple of the 2 groups"),
        ((torch.ones(4, 3), None, None, 2, torch.tensor([0, 2])), r"index\[1\] = 2 is out of range"),
        ((torch.ones(4, 3), None, None, 2, torch.tensor([[0]])), r"index must be a non-empty 1-D long"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        T.dual_layer_norm(*args, EPS)
