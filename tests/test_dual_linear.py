"""The ops dual_linear / dual_linear_sqnorm (Linear(+bias) + activation on a primal and K tangent
streams): each fast backend against the specification grokalign_fast/ops/mlp/reference.py on the
same inputs, on every device.

The shared tests run per backend ("cpp": the C++/CUDA op ``torch.ops.grokalign.*``; "triton": the
Triton kernels, on the CPU under ``TRITON_INTERPRET=1``) and device; where a backend cannot run
there, the test is skipped with the backend's own reason. The reference always runs in float64 on
the CPU: float64 must match to :data:`utils.F64`, float32 to :data:`utils.REL32`, float16 and
bfloat16 by the 2x rule. Backend-specific tests (the C++ ops' saved state, opcheck and
torch.compile; Triton's tiling) follow.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from grokalign_fast import _backends
from grokalign_fast.ops.mlp import function, reference
from grokalign_fast.ops.mlp import triton as triton_mlp
from grokalign_fast.ops.mlp.reference import ACT_CODE, ACTIVATIONS
from utils import (DEVICES, REL32, assert_close_all, assert_within_twice_plain_error, gen, max_rel_err,
                   outputs_and_grads)

BACKENDS = ("cpp", "triton")
VARIANTS = ("dual_linear", "dual_linear_sqnorm")
ALPHA = 0.07  # leaky ReLU slope (not a power of two: exercises its float64 exactness)
SMALL = (7, 13, 11)  # (B, IN, OUT), deliberately odd
# Spans several Triton tiles in every dimension (BK = 32 steps, two OUT tiles) under the block caps.
TILED = (33, 80, 70)
REPEATS = [5, 0, 5, 3, 6]  # a subset of the B rows, out of order, with a repeat
NAMES = ("y", "t' or sq", "grad x", "grad t", "grad W", "grad b")


def fast_backend(backend, device="cpu", dtype=torch.float64):
    """The backend's module; skips the test, with the backend's reason, where it cannot run."""
    module = function.backend_module(backend)
    x = torch.zeros(1, 1, dtype=dtype, device=device)
    reason = module.unavailable_reason(x, x[None], x, None, "relu", None)
    if reason is not None:
        pytest.skip(f"{backend} on {device}: {reason}")
    return module


def inputs(shape=SMALL, K=2, bias=True, index=REPEATS, seed=0):
    """Float64 CPU leaves ``[x [B, IN], t [K, R, IN], W [OUT, IN], b [OUT] or None]`` and ``index``
    (long [R], its values taken modulo B; None: R = B)."""
    B, IN, OUT = shape
    g = gen(seed)
    idx = None if index is None else torch.tensor(index, dtype=torch.long) % B
    R = B if idx is None else len(idx)
    leaves = [torch.randn(B, IN, generator=g, dtype=torch.float64),
              torch.randn(K, R, IN, generator=g, dtype=torch.float64),
              torch.randn(OUT, IN, generator=g, dtype=torch.float64) / IN ** 0.5,
              torch.randn(OUT, generator=g, dtype=torch.float64) if bias else None]
    return leaves, idx


def evaluate(module, variant, leaves, act, idx, device="cpu", dtype=torch.float64, use=None, wanted=(0, 1, 2, 3)):
    """``[y, t' or sq, *grads]`` of ``module.<variant>`` on copies of the leaves cast to (device,
    dtype); gradients (with respect to the leaves whose positions are in ``wanted``) of a fixed
    random combination of the used outputs."""
    vs = [None if v is None else v.detach().to(device, dtype).requires_grad_(i in wanted) for i, v in enumerate(leaves)]
    outs = getattr(module, variant)(*vs, act, ALPHA, None if idx is None else idx.to(device))
    assert all(o.device.type == torch.device(device).type and o.dtype == dtype for o in outs)
    return outputs_and_grads(outs, [v for i, v in enumerate(vs) if i in wanted], use=use)


def check_float64(backend, device, variant, leaves, idx, act, **kw):
    """The backend on ``device`` against the reference, float64: outputs and gradients to F64."""
    got = evaluate(fast_backend(backend, device), variant, leaves, act, idx, device, **kw)
    want = evaluate(reference, variant, leaves, act, idx, **kw)
    assert_close_all(got, want, NAMES if len(got) == len(NAMES) else None)


def per_backend(cases, triton_cases, name):
    """``(backend, *case)``: every case for the C++ op (cheap); for the Triton kernels, whose launches
    cost ~10 ms each under the interpreter, the subset ``triton_cases``. ``name(case)`` -> test id."""
    params = [("cpp", *c) for c in cases] + [("triton", *c) for c in triton_cases]
    return dict(argvalues=params, ids=[f"{p[0]}-{name(p[1:])}" for p in params])


def _index_id(index):
    return "all_rows" if index is None else "index"


# ------------------------------------------------------------------ every backend, every device


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("index", [None, REPEATS], ids=["all_rows", "index"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_values_and_grads_match_reference(backend, device, act, bias, index, K, variant):
    leaves, idx = inputs(K=K, bias=bias, index=index)
    check_float64(backend, device, variant, leaves, idx, act)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("index", [None, REPEATS], ids=["all_rows", "index"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_close_to_float64_reference(backend, device, act, bias, index, variant):
    leaves, idx = inputs(K=2, bias=bias, index=index)
    got = evaluate(fast_backend(backend, device, torch.float32), variant, leaves, act, idx, device, torch.float32)
    want = evaluate(reference, variant, leaves, act, idx)
    for name, a, r in zip(NAMES, got, want):
        assert max_rel_err(a, r) <= REL32, name


# (shape, act, index, variant): two cases spanning several Triton tiles, and every activation kind
# with both variants at a small shape.
LOW_PRECISION = [(TILED, "gelu", None, "dual_linear"), (TILED, "relu", REPEATS, "dual_linear_sqnorm")]
LOW_PRECISION_ALL = LOW_PRECISION + [((16, 32, 24), act, REPEATS, v) for act in ("relu", "gelu_tanh", "sigmoid")
                                     for v in VARIANTS]


@pytest.mark.parametrize("backend,shape,act,index,variant",
                         **per_backend(LOW_PRECISION_ALL, LOW_PRECISION, lambda c: f"B{c[0][0]}-{c[1]}-{c[3]}"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_at_most_twice_plain_pytorch_error(device, dtype, backend, shape, act, index, variant):
    module = fast_backend(backend, device, dtype)
    leaves, idx = inputs(shape, bias=True, index=index, seed=5)
    leaves = [v.to(dtype).double() for v in leaves]  # the low-precision values, exactly
    exact = evaluate(reference, variant, leaves, act, idx)
    plain = evaluate(reference, variant, leaves, act, idx, device, dtype)
    ours = evaluate(module, variant, leaves, act, idx, device, dtype)
    assert_within_twice_plain_error(ours, plain, exact, NAMES)


# (act, index, variant)
ONE_OUTPUT = [("tanh", REPEATS, "dual_linear"), ("gelu_tanh", None, "dual_linear_sqnorm"),
              ("relu", None, "dual_linear")]
ONE_OUTPUT_ALL = ONE_OUTPUT + [(act, REPEATS, v) for act in ("relu", "silu") for v in VARIANTS]


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["only_y", "only_tangent"])
@pytest.mark.parametrize("backend,act,index,variant",
                         **per_backend(ONE_OUTPUT_ALL, ONE_OUTPUT, lambda c: f"{c[0]}-{_index_id(c[1])}-{c[2]}"))
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_one_output(device, backend, act, index, variant, use):
    """An unused output reaches the backward as None (its gradient is not materialised)."""
    leaves, idx = inputs(index=index, seed=1)
    check_float64(backend, device, variant, leaves, idx, act, use=use)


# (wanted, act, variant): which of (x, t, W, b) need a gradient: each alone and t+W, and a first
# layer (W and b only: its x and t need none) with a piecewise-linear and a smooth activation.
PARTIAL = [(w, "silu", "dual_linear") for w in ((0,), (1,), (2,), (3,), (1, 2))]
PARTIAL_ALL = PARTIAL + [((2, 3), act, v) for act in ("leaky_relu", "gelu") for v in VARIANTS]


@pytest.mark.parametrize("backend,wanted,act,variant",
                         **per_backend(PARTIAL_ALL, PARTIAL,
                                       lambda c: "+".join("xtWb"[i] for i in c[0]) + f"-{c[1]}-{c[2]}"))
@pytest.mark.parametrize("device", DEVICES)
def test_partial_requires_grad(device, backend, wanted, act, variant):
    """Only some inputs need a gradient; y is constant when only t varies."""
    leaves, idx = inputs(index=REPEATS, seed=1)
    check_float64(backend, device, variant, leaves, idx, act, wanted=wanted)


# (act, index, variant)
NON_CONTIGUOUS = [("sigmoid", None, "dual_linear")]
NON_CONTIGUOUS_ALL = [(act, index, v) for act, index in (("tanh", REPEATS), ("sigmoid", None)) for v in VARIANTS]


@pytest.mark.parametrize("backend,act,index,variant",
                         **per_backend(NON_CONTIGUOUS_ALL, NON_CONTIGUOUS,
                                       lambda c: f"{c[0]}-{_index_id(c[1])}-{c[2]}"))
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, backend, act, index, variant):
    module = fast_backend(backend, device)
    leaves, idx = inputs(index=index, seed=3)
    x, t, w, b = (v.to(device) for v in leaves)
    # x and W column-major; t with the stream stride below the row stride
    nc = [x.t().contiguous().t(), t.transpose(0, 1).contiguous().transpose(0, 1), w.t().contiguous().t(), b.clone()]
    assert not any(v.is_contiguous() for v in nc[:3])
    nc = [v.requires_grad_() for v in nc]
    got = outputs_and_grads(getattr(module, variant)(*nc, act, ALPHA, None if idx is None else idx.to(device)), nc)
    assert_close_all(got, evaluate(reference, variant, leaves, act, idx), NAMES)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tangent_rows(backend, device, variant):
    """R = 0 (an empty index): y as usual, empty tangents, zero tangent terms in the gradients."""
    leaves, idx = inputs(index=[], seed=2)
    check_float64(backend, device, variant, leaves, idx, "gelu")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_matches_reference_and_builds_no_graph(backend, device, variant):
    module = fast_backend(backend, device)
    leaves, idx = inputs(seed=2)
    dev = [v.detach().to(device).requires_grad_() for v in leaves]
    with torch.no_grad():
        outs = getattr(module, variant)(*dev, "gelu", ALPHA, idx.to(device))
    assert all(o.grad_fn is None for o in outs)
    assert_close_all(outs, getattr(reference, variant)(*leaves, "gelu", ALPHA, idx))


@pytest.mark.parametrize("backend,act", **per_backend([(a,) for a in ACTIVATIONS], [("gelu_tanh",)], lambda c: c[0]))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, variant, backend, act):
    """Finite differences against the backward, float64 (the Triton kernels in gradcheck's fast mode)."""
    fn = getattr(fast_backend(backend, device), variant)
    leaves, idx = inputs((6, 4, 3), K=2, index=[2, 0, 2, 5, 1], seed=5)
    vs = [v.to(device).requires_grad_() for v in leaves]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, act, ALPHA, idx.to(device)), vs, atol=1e-8,
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_public_function_selects_the_backend(backend, device):
    fast_backend(backend, device)
    leaves, idx = inputs(K=1, seed=6)
    dev = [v.to(device) for v in leaves]
    for variant in VARIANTS:
        got = getattr(function, variant)(*dev, "silu", ALPHA, idx.to(device), backend=backend)
        assert_close_all(got, getattr(reference, variant)(*leaves, "silu", ALPHA, idx))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_dtype_has_a_reason_and_is_refused(backend):
    module = fast_backend(backend)
    x, t, w = (torch.ones(shape, dtype=torch.int32) for shape in ((3, 4), (1, 3, 4), (2, 4)))
    assert "int32" in module.unavailable_reason(x, t, w, None, "relu", None)
    with pytest.raises(_backends.BackendUnavailableError, match="int32"):
        function.dual_linear(x, t, w, act="relu", backend=backend)
    (xf, tf, wf, _), _ = inputs(K=1, bias=False, index=None)
    assert module.unavailable_reason(xf, tf, wf, None, "relu", None) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_index_out_of_range_raises(backend, device):
    module = fast_backend(backend, device)
    (x, t, w, _), _ = inputs(K=1, bias=False, index=None, seed=7)
    with pytest.raises(RuntimeError, match="index"):
        module.dual_linear(x.to(device), t[:, :2].to(device), w.to(device), None, "relu", ALPHA,
                           torch.tensor([0, SMALL[0]], device=device))
        if device == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------- C++ only


def test_cpp_many_rows_split_across_threads():
    """Large enough for at::parallel_for to split the rows into several chunks; random repeated
    indices, so some chunks own many tangent rows and some none."""
    fast_backend("cpp")
    idx = torch.randint(0, 300, (250,), generator=gen(21))
    leaves, _ = inputs((300, 17, 64), K=2, index=idx.tolist(), seed=21)
    for variant in VARIANTS:
        for act in ("leaky_relu", "silu"):
            check_float64("cpp", "cpu", variant, leaves, idx, act)


def test_cpp_saves_only_what_the_backward_needs():
    fast_backend("cpp")
    (x, t, w, b), idx = inputs()
    B, OUT = x.shape[0], w.shape[0]
    op = torch.ops.grokalign.dual_linear
    for act in ("relu", "gelu"):
        _, _, mask, zu = op(x, t, w, b, idx, ACT_CODE[act], ALPHA, False)
        assert mask.numel() == 0 and zu.numel() == 0
    # relu saves a compact uint8 mask, smooth activations the GEMM output, identity nothing.
    _, _, mask, zu = op(x, t, w, b, idx, ACT_CODE["relu"], ALPHA, True)
    assert mask.dtype == torch.uint8 and mask.shape == (B, OUT) and zu.numel() == 0
    _, _, mask, zu = op(x, t, w, b, idx, ACT_CODE["silu"], ALPHA, True)
    assert mask.numel() == 0 and zu.shape == (B + t.shape[0] * t.shape[1], OUT)
    _, _, mask, zu = op(x, t, w, b, idx, ACT_CODE["identity"], ALPHA, True)
    assert mask.numel() == 0 and zu.numel() == 0


def _op_samples():
    out = []
    for act, bias, index in (("relu", False, REPEATS), ("gelu", True, None), ("identity", True, REPEATS)):
        (x, t, w, b), idx = inputs(bias=bias, index=index, seed=7)
        out.append((x, t, w, b, idx, ACT_CODE[act]))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpp_opcheck_forward_ops(variant):
    fast_backend("cpp")
    op = getattr(torch.ops.grokalign, variant).default
    for x, t, w, b, idx, code in _op_samples():
        args = [v if v is None else v.requires_grad_() for v in (x, t, w, b)]
        torch.library.opcheck(op, (*args, idx, code, ALPHA, True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpp_opcheck_backward_ops(variant):
    fast_backend("cpp")
    op = getattr(torch.ops.grokalign, variant + "_backward").default
    sqnorm = variant.endswith("sqnorm")
    for x, t, w, b, idx, code in _op_samples():
        fwd = getattr(torch.ops.grokalign, variant)(x, t, w, b, idx, code, ALPHA, True)
        (B, IN), (K, R), OUT = x.shape, t.shape[:2], w.shape[0]
        gy = torch.randn(B, OUT, dtype=torch.float64)
        gtan = torch.randn(R, dtype=torch.float64) if sqnorm else torch.randn(K, R, OUT, dtype=torch.float64)
        state = (fwd[2],) if sqnorm else (fwd[2], fwd[3])
        rest = (idx, [B, K, R, IN, OUT], code, ALPHA)
        for mask in ([True, True, True, b is not None], [False, False, True, False], [True, False, False, False]):
            torch.library.opcheck(op, (gy, gtan, x, t, w, *state, *rest, mask))
        torch.library.opcheck(op, (None, gtan, x, t, w, *state, *rest, [False, True, True, False]))


def test_cpp_torch_compile_two_layer_forward_backward():
    """A 2-layer fused network compiled with fullgraph=True; forward and the AOT-compiled backward
    match eager reference autograd."""
    cpp = fast_backend("cpp")
    torch._dynamo.reset()
    (x, t, w1, b1), idx = inputs((9, 6, 5), index=[4, 1, 4, 8], seed=11)
    w2 = (torch.randn(3, 5, dtype=torch.float64, generator=gen(12)) / 3).requires_grad_()
    w1.requires_grad_()
    b1.requires_grad_()

    def step(module, x, t, w1, b1, w2):
        h, th = module.dual_linear(x, t, w1, b1, "gelu_tanh", ALPHA, idx)
        out, sq = module.dual_linear_sqnorm(h, th, w2, None, "identity", ALPHA, idx)
        return out.pow(2).mean() + 0.1 * sq.mean()

    compiled = torch.compile(lambda *a: step(cpp, *a), fullgraph=True)
    got = outputs_and_grads([compiled(x, t, w1, b1, w2)], (w1, b1, w2))
    assert_close_all(got, outputs_and_grads([step(reference, x, t, w1, b1, w2)], (w1, b1, w2)))


def test_cpp_op_errors_name_the_problem():
    fast_backend("cpp")
    x = torch.ones(3, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not supported"):
        torch.ops.grokalign.dual_linear(x, x[None], torch.ones(2, 4, dtype=torch.int32), None, None, 1, ALPHA, False)
    (x, t, w, _), _ = inputs(K=1, bias=False, index=None)
    B, IN, OUT = SMALL
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.grokalign.dual_linear(x, t[:, :2], w, None, torch.tensor([0, B]), 1, ALPHA, False)
    with pytest.raises(RuntimeError, match="activation code"):
        torch.ops.grokalign.dual_linear(x, t, w, None, None, len(ACTIVATIONS), ALPHA, False)
    # A backward without the saved state (forward run with save=False) is refused.
    y, _, mask, zu = torch.ops.grokalign.dual_linear(x, t, w, None, None, 1, ALPHA, False)
    with pytest.raises(RuntimeError, match="save=True"):
        torch.ops.grokalign.dual_linear_backward(
            torch.ones_like(y), None, x, t, w, mask, zu, None, [B, 1, B, IN, OUT], 1, ALPHA, [True, False, False, False]
        )


# ------------------------------------------------------------------------------- Triton only

TILED_CASES = [
    # (act, index, K, variant): K = 3 pads the stream chunk (KC = 4), K = 9 takes two chunks
    ("gelu", None, 3, "dual_linear"),
    ("relu", REPEATS, 3, "dual_linear_sqnorm"),
    ("silu", None, 9, "dual_linear_sqnorm"),
    ("leaky_relu", REPEATS, 9, "dual_linear"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act,index,K,variant", TILED_CASES,
                         ids=[f"{a}-{'index' if i else 'all_rows'}-K{k}-{v}" for a, i, k, v in TILED_CASES])
def test_triton_multi_tile(device, act, index, K, variant):
    leaves, idx = inputs(TILED, K=K, index=index)
    check_float64("triton", device, variant, leaves, idx, act)


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    module = fast_backend("triton")
    (x, t, w, b), idx = inputs()
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    assert "CUDA" in module.unavailable_reason(x, t, w, b, "tanh", idx)


def triton_module():
    """The Triton backend's module for checks that launch nothing; skips where triton is missing."""
    reason = _backends.triton_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return triton_mlp


# (K, index, use, SPLIT_ROWS) for SPLIT_SHAPE (B = 34): the weight gradient reduces over the B + K R
# stacked rows (B alone when only y is used), in 3 splits of SPLIT_ROWS rows (the last shorter).
SPLIT_SHAPE = (34, 80, 70)
SPLIT_CASES = {
    "all_rows-K1": (1, None, None, 23),  # 68 rows: boundaries 23 (primal segment) and 46 (tangent)
    "all_rows-K3": (3, None, None, 46),  # 136 rows: boundaries 46 and 92, both in the tangent segment
    "index-K5": (5, REPEATS, None, 20),  # 59 rows: boundaries 20 (primal) and 40 (tangent)
    "index-K3": (3, REPEATS, None, 17),  # 49 rows: boundaries 17 and 34 = B (where the segments meet)
    "only_y": (2, None, (True, False), 12),  # 34 rows, all primal: boundaries 12 and 24
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_triton_split_weight_gradient(case):
    """The weight gradient (and the bias gradient fused with it) split along its stacked rows into
    the interpreter's SPLIT = 3 float partials, the row count not divisible by 3; float64 against
    the reference."""
    module = fast_backend("triton")
    K, index, use, split_rows = SPLIT_CASES[case]
    B, IN, OUT = SPLIT_SHAPE
    leaves, idx = inputs(SPLIT_SHAPE, K=K, index=index, seed=13)
    rows = B if use else B + K * (B if idx is None else len(idx))
    assert rows % 3 and module._weight_split(rows, OUT, IN, None) == (3, split_rows)
    for variant in VARIANTS:
        check_float64("triton", "cpu", variant, leaves, idx, "gelu", use=use)


def test_triton_split_weight_gradient_on_cuda():
    """The same on a GPU, where the split count follows the SM count: 2100 stacked rows of a
    40 x 30 layer make 4 splits of 640 rows (the last 180), the first boundary inside the primal
    segment (B = 700)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (on the CPU: test_triton_split_weight_gradient)")
    module = fast_backend("triton", "cuda")
    leaves, idx = inputs((700, 30, 40), K=2, index=None, seed=14)
    assert module._weight_split(2100, 40, 30, module._sm_count(torch.device("cuda", 0))) == (4, 640)
    for variant in VARIANTS:
        check_float64("triton", "cuda", variant, leaves, idx, "gelu")


def test_triton_weight_split_count():
    """On a GPU (132 SMs): a small layer over many rows splits until the programs fill the SMs about
    twice, each split a multiple of 128 rows and at least 512; a large layer, or few rows, does not.
    Under the interpreter: 3 splits, fewer only for fewer rows."""
    module = triton_module()
    split, split_rows = module._weight_split(20000, 200, 200, 132)  # 16 output tiles of 64 x 64
    assert 8 <= split <= 2 * 132 // 16 + 1 and split_rows % 128 == 0 and split_rows >= 512
    assert split_rows * (split - 1) < 20000 <= split_rows * split
    assert module._weight_split(20000, 4096, 4096, 132) == (1, 20096)
    assert module._weight_split(900, 200, 200, 132) == (1, 1024)
    assert module._weight_split(0, 200, 200, 132) == (1, 1)
    assert module._weight_split(17, 200, 200, None) == (3, 6)
    assert module._weight_split(2, 200, 200, None) == (2, 1)


if triton_mlp.tl is not None:
    tl = triton_mlp.tl

    @triton_mlp._jit
    def _span_offsets_kernel(out_ptr, stride, BLOCK: tl.constexpr):
        """out[r] = r * stride for the rows r of this program's span, as the kernels form offsets."""
        rows = triton_mlp._span(tl.program_id(0) * BLOCK, BLOCK)
        tl.store(out_ptr + rows, rows * stride)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_offsets_are_int64(device):
    """Row indices from _span times a stride that fits int32 (so Triton passes it as int32) give
    offsets past 2^31 exactly, where int32 arithmetic would wrap."""
    fast_backend("triton", device)
    stride = 2 ** 30 + 3
    out = torch.zeros(8, dtype=torch.int64, device=device)
    _span_offsets_kernel[(2,)](out, stride, BLOCK=4)
    assert out.cpu().tolist() == [r * stride for r in range(8)]


def test_triton_rows_past_int32_offsets_on_cuda():
    """x's rows and t's streams a stride of 2^30 + 16 elements apart, so that row 2 and stream 2
    start past element 2^31 of one storage: forward and every gradient against the float64 reference.
    Needs that storage (8.6 GB of float32) on a CUDA device; on the CPU the offsets are checked by
    test_triton_offsets_are_int64."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device with 10 GB free (a view past 2^31 elements of one storage)")
    module = fast_backend("triton", "cuda", torch.float32)
    stride = 2 ** 30 + 16
    if torch.cuda.mem_get_info()[0] < (2 * stride + 64) * 4 + 2 ** 30:
        pytest.skip("needs 10 GB of free CUDA memory")
    leaves, idx = inputs((3, 16, 24), K=3, index=None, seed=8)
    base = torch.zeros(2 * stride + 64, device="cuda")
    x = base.as_strided((3, 16), (stride, 1))  # x[b, i] at b * stride + i
    t = base.as_strided((3, 3, 16), (stride, 16, 1), 16)  # t[k, r, i] at k * stride + 16 + 16 r + i
    x.copy_(leaves[0])
    t.copy_(leaves[1])
    vs = [x.detach().requires_grad_(), t.detach().requires_grad_()] + [v.cuda().float().requires_grad_()
                                                                       for v in leaves[2:]]
    for variant in VARIANTS:
        got = outputs_and_grads(getattr(module, variant)(*vs, "gelu", ALPHA, None), vs)
        want = evaluate(reference, variant, leaves, "gelu", idx)
        for name, a, r in zip(NAMES, got, want):
            assert max_rel_err(a, r) <= REL32, name


def test_triton_upcasts_bfloat16_only_under_the_interpreter(monkeypatch):
    """Compiled (on a GPU), bfloat16 tiles go into tl.dot as bfloat16 (UPCAST false); only the
    interpreter, whose bfloat16 tl.dot is wrong, upcasts them. float16 is never upcast."""
    module = triton_module()
    x = torch.zeros(2, 2, dtype=torch.bfloat16)
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    assert module._precision(x) == (False, True, "ieee")
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    assert module._precision(x) == (False, False, "ieee")
    assert module._precision(x.half()) == (False, False, "ieee")


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_with_bfloat16_mma():
    """Every GPU tuning-table entry of the forward, GEMM and weight-gradient kernels (and the
    backward epilogue) compiles for an H100/H200 (sm_90) as a GPU compiles it, with bfloat16
    inputs: to a cubin within the 227 KB of shared memory a block may use, each tl.dot an MMA on
    bfloat16 operands accumulating in float32 (tests/sm90_compile.py, in a process without the
    interpreter; no GPU needed)."""
    module = triton_module()
    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    tables = (module._FWD_TUNING, module._MM_TUNING, module._W_TUNING)
    assert len(rows) == 2 * len(tables[0]) + len(tables[1]) + len(tables[2]) + 2
    for row in rows:
        assert "error" not in row and row["cubin"], row
        assert row["shared"] <= 227 * 1024, row
        if not row["kernel"].startswith("epilogue"):
            assert row["mma"] and all("f32.bf16.bf16" in op for op in row["mma"]), row


# (kernel name, GPU table name, launch arguments of a tiny problem, of a large one)
PRUNING = [
    ("_dual_linear_fwd_kernel", "_FWD_TUNING", dict(M=7, IN=13, OUT=11, KC=2), dict(M=4096, IN=1024, OUT=1024, KC=1)),
    ("_matmul_kernel", "_MM_TUNING", dict(M=21, N=13, KD=11), dict(M=8192, N=1024, KD=1024)),
    ("_dual_linear_bwd_weight_kernel", "_W_TUNING", dict(OUT=11, IN=13, SPLIT_ROWS=7),
     dict(OUT=1024, IN=1024, SPLIT_ROWS=1024)),
]


def test_triton_gpu_tables_pruned_by_size():
    """Each GPU table starts with its all-smallest entry, within the H100/H200 ranges (tiles 64-128,
    reduction steps 32-64, 4 or 8 warps, 3 or 4 stages); its pruning keeps only that entry for a
    tiny problem and every entry for a large one."""
    module = triton_module()
    for kernel, table, tiny, large in PRUNING:
        kernel, table = getattr(module, kernel), getattr(module, table)
        first = table[0][0]
        assert all(first[name] == module._smallest(table, name) for name in first)
        assert all(b in (32, 64, 128) and w in (4, 8) and s in (3, 4) for e, w, s in table for b in e.values())
        configs = module._as_configs(table)
        assert [c.kwargs for c in kernel.early_config_prune(configs, tiny)] == [first]
        assert kernel.early_config_prune(configs, large) == configs


def test_triton_one_config_under_the_interpreter():
    """Each autotuned kernel has one config under the interpreter: the first entry of its GPU table."""
    module = fast_backend("triton")
    if not _backends.triton_interpreted():
        pytest.skip("compiled Triton: the GPU tables are in use")
    for kernel, table, _, _ in PRUNING:
        assert [c.kwargs for c in getattr(module, kernel).configs] == [getattr(module, table)[0][0]]


# (variant, index) on (66, 70, 72) with K = 2: sizes at which the pruning keeps every GPU config of
# each launch (each tiled dimension above 64 rows or columns, each OUT reduction above 32).
EVERY_CONFIG = [("dual_linear_sqnorm", None), ("dual_linear", [(5 * i) % 37 for i in range(40)])]


@pytest.mark.parametrize("variant,index", EVERY_CONFIG, ids=["sqnorm-all_rows", "index"])
def test_triton_every_gpu_config_under_the_interpreter(monkeypatch, variant, index):
    """The autotuners as on a GPU: a stand-in benchmark runs every config of each GPU table once
    (preferring the last), then the chosen config runs; float64 against the reference. The sqnorm
    forward's configs write differently laid-out partials into one buffer, which the autotuner
    zeroes between them."""
    module = fast_backend("triton")
    ran = []

    def bench(kernel_call, quantiles):
        kernel_call()
        ran.append(1)
        return [1.0 / len(ran)] * 3

    for kernel, table, _, _ in PRUNING:
        kernel = getattr(module, kernel)
        monkeypatch.setattr(kernel, "configs", module._as_configs(getattr(module, table)))
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(vars(kernel), "do_bench", bench)  # over the autotuner's cached property
    leaves, idx = inputs((66, 70, 72), K=2, index=index, seed=17)
    check_float64("triton", "cpu", variant, leaves, idx, "silu")
    forward_launches = 1 if index is None else 2
    assert len(ran) == (len(module._FWD_TUNING) * forward_launches + len(module._MM_TUNING)
                        + len(module._W_TUNING))
