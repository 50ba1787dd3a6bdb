"""C++ backend of the dual-stream Linear(+bias) + activation against the
specification (grokalign_fast/ops/mlp/reference.py), on the same inputs.

Skipped as a whole only when the extension is not built (the reason is shown).
"""
import math

import pytest
import torch

from grokalign_fast import _backends
from grokalign_fast.ops.mlp import reference
from grokalign_fast.ops.mlp.reference import ACTIVATIONS

_REASON = _backends.cpp_unavailable_reason(torch.device("cpu"))
if _REASON is None:
    from grokalign_fast.ops.mlp import cpp

    _REASON = cpp._ops_reason()
if _REASON is not None:
    pytest.skip(f"C++ extension unavailable: {_REASON}", allow_module_level=True)

from grokalign_fast.ops.mlp import function  # noqa: E402

# Deliberately odd sizes; INDEX is a subset of the B primal rows with repeats.
B, IN, OUT = 7, 13, 11
INDEX = [5, 0, 5, 3, 6]
ALPHA = 0.07
VARIANTS = ("dual_linear", "dual_linear_sqnorm")


def make_inputs(K, bias, index, dtype=torch.float64, seed=0, requires_grad=True, b=B, n_in=IN, n_out=OUT):
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(INDEX, dtype=torch.long) if index else None
    R = len(INDEX) if index else b
    x = torch.randn(b, n_in, generator=g, dtype=torch.float64)
    t = torch.randn(K, R, n_in, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
    bb = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None
    tensors = [v.to(dtype).requires_grad_(requires_grad) if v is not None else None for v in (x, t, w, bb)]
    return (*tensors, idx)


def run(module, variant, x, t, w, b, act, idx):
    return getattr(module, variant)(x, t, w, b, act, ALPHA, idx)


def grads(outputs, inputs, seed=1):
    """Gradients of a random combination of the outputs w.r.t. the inputs present
    (zeros for an input the outputs do not depend on)."""
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outputs]
    present = [v for v in inputs if v is not None]
    return torch.autograd.grad(outputs, present, cot, allow_unused=True, materialize_grads=True)


def max_rel_err(a, ref):
    scale = ref.abs().max().clamp_min(1e-30)
    return ((a.double() - ref.double()).abs().max() / scale).item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("index", [False, True], ids=["all_rows", "index"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_float64_values_and_grads_match_reference(act, bias, index, K, variant):
    x, t, w, b, idx = make_inputs(K, bias, index)
    out = run(cpp, variant, x, t, w, b, act, idx)
    ref = run(reference, variant, x, t, w, b, act, idx)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    got = grads(out, (x, t, w, b))
    exp = grads(ref, (x, t, w, b))
    for name, gg, ge in zip(("x", "t", "weight", "bias"), got, exp):
        torch.testing.assert_close(gg, ge, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_float32_within_1e5_of_float64_reference(act, variant):
    x, t, w, b, idx = make_inputs(3, True, True)
    ref = run(reference, variant, x, t, w, b, act, idx)
    ref_g = grads(ref, (x, t, w, b))
    x32, t32, w32, b32 = (v.detach().float().requires_grad_() for v in (x, t, w, b))
    out = run(cpp, variant, x32, t32, w32, b32, act, idx)
    out_g = grads(out, (x32, t32, w32, b32))
    for o, r in zip((*out, *out_g), (*ref, *ref_g)):
        assert o.dtype == torch.float32
        assert max_rel_err(o, r) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["relu", "gelu_tanh", "sigmoid"])
def test_low_precision_at_most_twice_plain_pytorch_error(act, dtype, variant):
    """flash-attention's rule: our error against the float64 reference is at most
    twice the reference's own error when run in the same low precision."""
    x, t, w, b, _ = make_inputs(2, True, False, b=16, n_in=32, n_out=24, seed=3)
    idx = torch.tensor([3, 15, 3, 0, 9, 9, 1])
    t = torch.randn(2, len(idx), 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    exact = run(reference, variant, x, t, w, b, act, idx)
    exact_g = grads(exact, (x, t, w, b))
    low = [v.detach().to(dtype).requires_grad_() for v in (x, t, w, b)]
    ref_low = run(reference, variant, *low, act, idx)
    ref_low_g = grads(ref_low, low)
    low2 = [v.detach().clone().requires_grad_() for v in low]
    out = run(cpp, variant, *low2, act, idx)
    out_g = grads(out, low2)
    for o, r, e in zip((*out, *out_g), (*ref_low, *ref_low_g), (*exact, *exact_g)):
        assert o.dtype == dtype
        err = (o.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        assert err <= 2 * err_ref + 1e-3 * e.abs().max().item()


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", [0, 1], ids=["only_y", "only_tangent"])
def test_gradient_through_one_output(act, variant, which):
    """An unused output reaches the backward as None (grads are not materialised)."""
    x, t, w, b, idx = make_inputs(2, True, True)
    out = run(cpp, variant, x, t, w, b, act, idx)[which]
    ref = run(reference, variant, x, t, w, b, act, idx)[which]
    for gg, ge in zip(grads((out,), (x, t, w, b)), grads((ref,), (x, t, w, b))):
        torch.testing.assert_close(gg, ge, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ["leaky_relu", "gelu"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_first_layer_inputs_without_grad(act, variant):
    """x and t of the first layer need no gradient: only weight and bias get one."""
    x, t, w, b, idx = make_inputs(3, True, False)
    x, t = x.detach(), t.detach()
    got = grads(run(cpp, variant, x, t, w, b, act, idx), (w, b))
    exp = grads(run(reference, variant, x, t, w, b, act, idx), (w, b))
    for gg, ge in zip(got, exp):
        torch.testing.assert_close(gg, ge, rtol=1e-10, atol=1e-10)


def test_non_contiguous_inputs():
    x, t, w, b, idx = make_inputs(2, True, True)
    x_nc = x.detach().t().contiguous().t().requires_grad_()  # column-major
    t_nc = t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    w_nc = w.detach().t().contiguous().t().requires_grad_()
    assert not (x_nc.is_contiguous() or t_nc.is_contiguous() or w_nc.is_contiguous())
    for variant in VARIANTS:
        out = run(cpp, variant, x_nc, t_nc, w_nc, b, "tanh", idx)
        ref = run(reference, variant, x, t, w, b, "tanh", idx)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
        for gg, ge in zip(grads(out, (x_nc, t_nc, w_nc, b)), grads(ref, (x, t, w, b))):
            torch.testing.assert_close(gg, ge, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ["leaky_relu", "silu"])
def test_many_rows_split_across_threads(act):
    """Large enough for at::parallel_for to split the rows into several chunks;
    random repeated indices, so some chunks own many tangent rows and some none."""
    g = torch.Generator().manual_seed(21)
    b, n_in, n_out, K = 300, 17, 64, 2
    idx = torch.randint(0, b, (250,), generator=g)
    x = torch.randn(b, n_in, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(K, len(idx), n_in, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(n_out, n_in, dtype=torch.float64, generator=g).requires_grad_()
    bb = torch.randn(n_out, dtype=torch.float64, generator=g).requires_grad_()
    for variant in VARIANTS:
        out = run(cpp, variant, x, t, w, bb, act, idx)
        ref = run(reference, variant, x, t, w, bb, act, idx)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
        for gg, ge in zip(grads(out, (x, t, w, bb)), grads(ref, (x, t, w, bb))):
            torch.testing.assert_close(gg, ge, rtol=1e-10, atol=1e-10)


def test_no_tangent_rows():
    """R = 0 (an empty index): y as usual, empty tangents, zero tangent terms."""
    x, _, w, b, _ = make_inputs(1, True, False)
    t = torch.zeros(2, 0, IN, dtype=torch.float64, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.long)
    for variant in VARIANTS:
        out = run(cpp, variant, x, t, w, b, "gelu", idx)
        ref = run(reference, variant, x, t, w, b, "gelu", idx)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
        for gg, ge in zip(grads(out, (x, t, w, b)), grads(ref, (x, t, w, b))):
            torch.testing.assert_close(gg, ge, rtol=1e-10, atol=1e-10)


def test_nothing_saved_without_grad():
    x, t, w, b, idx = make_inputs(2, True, True, requires_grad=False)
    for act in ("relu", "gelu"):
        _, _, mask, zu = torch.ops.grokalign.dual_linear(x, t, w, b, idx, reference.ACT_CODE[act], ALPHA, False)
        assert mask.numel() == 0 and zu.numel() == 0
    # relu saves a compact uint8 mask, smooth activations the GEMM output, identity nothing.
    _, _, mask, zu = torch.ops.grokalign.dual_linear(x, t, w, b, idx, reference.ACT_CODE["relu"], ALPHA, True)
    assert mask.dtype == torch.uint8 and mask.shape == (B, OUT) and zu.numel() == 0
    _, _, mask, zu = torch.ops.grokalign.dual_linear(x, t, w, b, idx, reference.ACT_CODE["silu"], ALPHA, True)
    assert mask.numel() == 0 and zu.shape == (B + 2 * len(INDEX), OUT)
    _, _, mask, zu = torch.ops.grokalign.dual_linear(x, t, w, b, idx, reference.ACT_CODE["identity"], ALPHA, True)
    assert mask.numel() == 0 and zu.numel() == 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck(act, variant):
    x, t, w, b, idx = make_inputs(2, True, True, b=6, n_in=4, n_out=3, seed=5)
    idx = torch.tensor([2, 0, 2, 5, 1])
    t = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    fn = getattr(cpp, variant)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, act, ALPHA, idx), (x, t, w, b))


def _op_samples():
    out = []
    for act, bias, index in (("relu", False, True), ("gelu", True, False), ("identity", True, True)):
        x, t, w, b, idx = make_inputs(2, bias, index, seed=7)
        out.append((x, t, w, b, idx, reference.ACT_CODE[act]))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_forward_ops(variant):
    op = getattr(torch.ops.grokalign, variant).default
    for x, t, w, b, idx, code in _op_samples():
        torch.library.opcheck(op, (x, t, w, b, idx, code, ALPHA, True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_backward_ops(variant):
    op = getattr(torch.ops.grokalign, variant + "_backward").default
    for x, t, w, b, idx, code in _op_samples():
        x, t, w = (v.detach() for v in (x, t, w))
        fwd = getattr(torch.ops.grokalign, variant)(x, t, w, b.detach() if b is not None else None, idx, code, ALPHA, True)
        K, R = t.shape[:2]
        dims = [B, K, R, IN, OUT]
        gy = torch.randn(B, OUT, dtype=torch.float64)
        gtan = torch.randn(R, dtype=torch.float64) if variant.endswith("sqnorm") else torch.randn(K, R, OUT, dtype=torch.float64)
        state = (fwd[2],) if variant.endswith("sqnorm") else (fwd[2], fwd[3])
        for mask in ([True, True, True, b is not None], [False, False, True, False], [True, False, False, False]):
            torch.library.opcheck(op, (gy, gtan, x, t, w, *state, idx, dims, code, ALPHA, mask))
        torch.library.opcheck(op, (None, gtan, x, t, w, *state, idx, dims, code, ALPHA, [False, True, True, False]))


def test_torch_compile_two_layer_forward_backward():
    """A 2-layer fused network compiled with fullgraph=True; forward and the
    AOT-compiled backward match eager reference autograd."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 6, dtype=torch.float64, generator=g)
    idx = torch.tensor([4, 1, 4, 8])
    t = torch.randn(2, 4, 6, dtype=torch.float64, generator=g)
    w1 = (torch.randn(5, 6, dtype=torch.float64, generator=g) / 3).requires_grad_()
    b1 = torch.randn(5, dtype=torch.float64, generator=g).requires_grad_()
    w2 = (torch.randn(3, 5, dtype=torch.float64, generator=g) / 3).requires_grad_()

    def step(module, x, t, w1, b1, w2):
        h, th = module.dual_linear(x, t, w1, b1, "gelu_tanh", ALPHA, idx)
        out, sq = module.dual_linear_sqnorm(h, th, w2, None, "identity", ALPHA, idx)
        return out.pow(2).mean() + 0.1 * sq.mean()

    compiled = torch.compile(lambda *a: step(cpp, *a), fullgraph=True)
    loss = compiled(x, t, w1, b1, w2)
    got = torch.autograd.grad(loss, (w1, b1, w2))
    ref_loss = step(reference, x, t, w1, b1, w2)
    exp = torch.autograd.grad(ref_loss, (w1, b1, w2))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    for gg, ge in zip(got, exp):
        torch.testing.assert_close(gg, ge, rtol=1e-10, atol=1e-10)


def test_public_function_selects_cpp():
    x, t, w, b, idx = make_inputs(1, True, True)
    y, tt = function.dual_linear(x, t, w, b, "silu", ALPHA, idx, backend="cpp")
    ry, rt = reference.dual_linear(x, t, w, b, "silu", ALPHA, idx)
    torch.testing.assert_close(y, ry, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tt, rt, rtol=1e-10, atol=1e-10)


def test_unsupported_dtype_reason_and_errors():
    x = torch.ones(3, 4, dtype=torch.int32)
    t = torch.ones(1, 3, 4, dtype=torch.int32)
    w = torch.ones(2, 4, dtype=torch.int32)
    reason = cpp.unavailable_reason(x, t, w, None, "relu", None)
    assert reason is not None and "dtype" in reason
    with pytest.raises(_backends.BackendUnavailableError, match="dtype"):
        function.dual_linear(x, t, w, act="relu", backend="cpp")
    # The op itself refuses too, naming the problem.
    with pytest.raises(RuntimeError, match="not supported"):
        torch.ops.grokalign.dual_linear(x, t, w, None, None, 1, ALPHA, False)
    xf, tf, wf, _, _ = make_inputs(1, False, False, requires_grad=False)
    assert cpp.unavailable_reason(xf, tf, wf, None, "relu", None) is None
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.grokalign.dual_linear(xf, tf[:, :2], wf, None, torch.tensor([0, B]), 1, ALPHA, False)
    with pytest.raises(RuntimeError, match="activation code"):
        torch.ops.grokalign.dual_linear(xf, tf, wf, None, None, len(ACTIVATIONS), ALPHA, False)
    # A backward without the saved state (forward run with save=False) is refused.
    y, t_out, mask, zu = torch.ops.grokalign.dual_linear(xf, tf, wf, None, None, 1, ALPHA, False)
    with pytest.raises(RuntimeError, match="save=True"):
        torch.ops.grokalign.dual_linear_backward(
            torch.ones_like(y), None, xf, tf, wf, mask, zu, None, [B, 1, B, IN, OUT], 1, ALPHA, [True, False, False, False]
        )


_CUDA_REASON = (
    "no CUDA device"
    if not torch.cuda.is_available()
    else (_backends.cpp_unavailable_reason(torch.device("cuda")) if _REASON is None else _REASON)
)


@pytest.mark.skipif(_CUDA_REASON is not None, reason=f"CUDA kernels: {_CUDA_REASON}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_cuda_matches_reference(act, variant, dtype):
    """The CUDA kernels against the float64 reference (1e-10 in float64, 1e-5 relative in float32)."""
    for K, bias, index in ((1, False, False), (3, True, True)):
        x, t, w, b, idx = make_inputs(K, bias, index)
        ref = run(reference, variant, x, t, w, b, act, idx)
        ref_g = grads(ref, (x, t, w, b))
        dev = [v.detach().to("cuda", dtype).requires_grad_() if v is not None else None for v in (x, t, w, b)]
        out = run(cpp, variant, *dev, act, idx.cuda() if idx is not None else None)
        out_g = grads(out, dev)
        for o, r in zip((*out, *out_g), (*ref, *ref_g)):
            assert o.is_cuda and o.dtype == dtype
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            assert max_rel_err(o.cpu(), r) <= tol
