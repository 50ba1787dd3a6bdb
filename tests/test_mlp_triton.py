"""Triton backend of the dual-stream Linear + activation against the reference.

Runs on a CUDA device, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` set in the environment before Python starts). Errors
are measured per tensor as ``max|kernel - ref| / max|ref|`` against the
float64 reference: at most 1e-10 for float64 and 1e-5 for float32; float16 and
bfloat16 at most twice plain PyTorch's error in the same dtype.
"""
import itertools
import os

import pytest
import torch

from grokalign_fast import _backends
from grokalign_fast.ops.mlp import function, reference
from grokalign_fast.ops.mlp import triton as mlp_triton

_REASON = _backends.triton_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"triton unavailable: {_REASON}", allow_module_level=True)
if not _backends.triton_interpreted() and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set to 1", allow_module_level=True)

DEVICE = torch.device("cpu" if _backends.triton_interpreted() else "cuda")
ALPHA = 0.1  # leaky ReLU slope (not a power of two: exercises its float64 exactness)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# Deliberately odd shapes (B, IN, OUT); the second spans several tiles in every
# dimension (BK = 32 steps, two OUT tiles) under the launchers' block caps.
SMALL = (7, 13, 11)
TILED = (33, 80, 70)


def _inputs(shape, K, dtype, bias, index_kind, seed):
    B, IN, OUT = shape
    g = torch.Generator().manual_seed(seed)
    if index_kind is None:
        index = None
    elif index_kind == "repeats":  # a subset with repeated rows, out of order
        index = torch.tensor([3, 0, 3, 6, 1, 3])[: max(1, min(6, B))] % B
    elif index_kind == "empty":
        index = torch.zeros(0, dtype=torch.long)
    else:
        raise ValueError(index_kind)
    R = B if index is None else index.numel()
    x = torch.randn(B, IN, generator=g, dtype=torch.float64)
    t = torch.randn(K, R, IN, generator=g, dtype=torch.float64)
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64) / IN ** 0.5
    b = torch.randn(OUT, generator=g, dtype=torch.float64) if bias else None
    leaves = [v.to(DEVICE, dtype) for v in (x, t, w) + ((b,) if bias else ())]
    index = None if index is None else index.to(DEVICE)
    return leaves, index, g


def _run(fn, leaves, act, index, cots, bias):
    leaves = [v.detach().clone().requires_grad_(True) for v in leaves]
    x, t, w = leaves[:3]
    b = leaves[3] if bias else None
    outs = fn(x, t, w, b, act, ALPHA, index)
    used = [(o, c) for o, c in zip(outs, cots) if c is not None]
    grads = torch.autograd.grad([o for o, _ in used], leaves, [c.to(o.dtype) for o, c in used], allow_unused=True)
    grads = [torch.zeros_like(v) if gv is None else gv for v, gv in zip(leaves, grads)]
    return [o.detach() for o in outs], grads


def _rel_err(a, ref):
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return (a.double() - ref.double()).abs().max().item() / max(scale, 1e-300) if ref.numel() else 0.0


def _compare(shape, K, dtype, bias, index_kind, act, sqnorm, seed=0, use=(True, True)):
    leaves, index, g = _inputs(shape, K, dtype, bias, index_kind, seed)
    ref_fn = reference.dual_linear_sqnorm if sqnorm else reference.dual_linear
    tri_fn = mlp_triton.dual_linear_sqnorm if sqnorm else mlp_triton.dual_linear
    ref_leaves = [v.double() for v in leaves]
    with torch.no_grad():
        ref_shapes = [o.shape for o in ref_fn(*ref_leaves[:3], ref_leaves[3] if bias else None, act, ALPHA, index)]
    cots = [torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE) if u else None for s, u in zip(ref_shapes, use)]
    ref_out, ref_grad = _run(ref_fn, ref_leaves, act, index, cots, bias)
    out, grad = _run(tri_fn, leaves, act, index, cots, bias)
    names = ["y", "sq" if sqnorm else "t_out", "grad x", "grad t", "grad W", "grad b"]
    errs = {}
    for name, a, r in zip(names, out + grad, ref_out + ref_grad):
        assert a.shape == r.shape and a.dtype == dtype, (name, a.shape, r.shape, a.dtype)
        errs[name] = _rel_err(a, r)
    return errs


def _case_id(p):
    return "-".join(str(v) for v in p)


# float64: the full grid; float32 (the same kernels, another accumulator): K = 2 only, for time.
GRID = [(torch.float64,) + p for p in itertools.product(
    reference.ACTIVATIONS, (False, True), (None, "repeats"), (1, 2), (False, True))]
GRID += [(torch.float32,) + p for p in itertools.product(
    reference.ACTIVATIONS, (False, True), (None, "repeats"), (2,), (False, True))]


@pytest.mark.parametrize("dtype,act,bias,index_kind,K,sqnorm", GRID,
                         ids=[_case_id(("f64" if p[0] == torch.float64 else "f32",) + p[1:]) for p in GRID])
def test_values_and_grads(dtype, act, bias, index_kind, K, sqnorm):
    errs = _compare(SMALL, K, dtype, bias, index_kind, act, sqnorm)
    assert max(errs.values()) <= TOL[dtype], errs


TILED_CASES = [
    # (act, index_kind, K, sqnorm): K = 3 pads the stream chunk (KC = 4), K = 9 takes two chunks
    ("gelu", None, 3, False),
    ("relu", "repeats", 3, True),
    ("silu", None, 9, True),
    ("leaky_relu", "repeats", 9, False),
]


@pytest.mark.parametrize("act,index_kind,K,sqnorm", TILED_CASES, ids=[_case_id(p) for p in TILED_CASES])
def test_multi_tile(act, index_kind, K, sqnorm):
    errs = _compare(TILED, K, torch.float64, True, index_kind, act, sqnorm)
    assert max(errs.values()) <= TOL[torch.float64], errs


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["y-only", "tangent-only"])
@pytest.mark.parametrize("act,index_kind,sqnorm", [("tanh", "repeats", False), ("gelu_tanh", None, True),
                                                   ("relu", None, False)])
def test_one_output_used(act, index_kind, sqnorm, use):
    errs = _compare(SMALL, 2, torch.float64, True, index_kind, act, sqnorm, use=use)
    assert max(errs.values()) <= TOL[torch.float64], errs


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (1, 2)], ids=["x", "t", "W", "b", "t+W"])
def test_partial_requires_grad(wanted):
    leaves, index, g = _inputs(SMALL, 2, torch.float64, True, "repeats", 1)
    cots = [torch.randn(7, 11, generator=g, dtype=torch.float64), torch.randn(2, 6, 11, generator=g, dtype=torch.float64)]
    results = []
    for fn in (reference.dual_linear, mlp_triton.dual_linear):
        vs = [v.detach().clone().requires_grad_(i in wanted) for i, v in enumerate(leaves)]
        outs = fn(*vs, "silu", ALPHA, index)
        used = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]  # y is constant when only t varies
        results.append(torch.autograd.grad([o for o, _ in used], [vs[i] for i in wanted], [c for _, c in used]))
    for r, a in zip(*results):
        assert _rel_err(a, r) <= 1e-10


def test_no_grad_matches_and_saves_nothing():
    leaves, index, _ = _inputs(SMALL, 2, torch.float64, True, "repeats", 2)
    with torch.no_grad():
        y, sq = mlp_triton.dual_linear_sqnorm(*leaves, "gelu", ALPHA, index)
    y_ref, sq_ref = reference.dual_linear_sqnorm(*leaves, "gelu", ALPHA, index)
    assert y.grad_fn is None and sq.grad_fn is None
    assert _rel_err(y, y_ref) <= 1e-10 and _rel_err(sq, sq_ref) <= 1e-10


def test_noncontiguous_inputs():
    leaves, index, g = _inputs(SMALL, 2, torch.float64, True, None, 3)
    x, t, w, b = leaves
    xs = x.t().contiguous().t()  # column-major
    ts = t.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # stream stride < row stride
    ws = w.t().contiguous().t()
    cots = [torch.randn(7, 11, generator=g, dtype=torch.float64), torch.randn(2, 7, 11, generator=g, dtype=torch.float64)]
    results = []
    for fn, args in ((reference.dual_linear, (x, t, w, b)), (mlp_triton.dual_linear, (xs, ts, ws, b))):
        vs = [v.detach().requires_grad_(True) for v in args]
        outs = fn(*vs, "sigmoid", ALPHA, None)
        results.append(list(outs) + list(torch.autograd.grad(outs, vs, cots)))
    for r, a in zip(*results):
        assert _rel_err(a, r) <= 1e-10


def test_empty_index():
    errs = _compare(SMALL, 2, torch.float64, True, "empty", "gelu", False)
    assert max(errs.values()) <= TOL[torch.float64], errs


def test_gradcheck():
    leaves, index, _ = _inputs((3, 4, 5), 2, torch.float64, True, "repeats", 4)
    index = index[:2]  # rows [3 % 3, 0] = [0, 0]: a repeated row
    leaves[1] = leaves[1][:, :2].contiguous()
    vs = [v.detach().requires_grad_(True) for v in leaves]
    for fn in (mlp_triton.dual_linear, mlp_triton.dual_linear_sqnorm):
        assert torch.autograd.gradcheck(
            lambda *a: fn(*a, "gelu_tanh", ALPHA, index), vs, eps=1e-6, atol=1e-8, fast_mode=True
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_within_twice_torch(dtype):
    """flash-attention's rule: our error <= 2 x plain PyTorch's error in the same dtype."""
    for act, index_kind, sqnorm in (("gelu", None, False), ("relu", "repeats", True)):
        leaves, index, g = _inputs(TILED, 2, dtype, True, index_kind, 5)
        ref_fn = reference.dual_linear_sqnorm if sqnorm else reference.dual_linear
        tri_fn = mlp_triton.dual_linear_sqnorm if sqnorm else mlp_triton.dual_linear
        B, _, OUT = TILED
        R = B if index is None else index.numel()
        shapes = [(B, OUT), (R,) if sqnorm else (2, R, OUT)]
        cots = [torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE) for s in shapes]
        exact = _run(ref_fn, [v.double() for v in leaves], act, index, cots, True)
        plain = _run(ref_fn, leaves, act, index, cots, True)
        ours = _run(tri_fn, leaves, act, index, cots, True)
        for e, p, o in zip(exact[0] + exact[1], plain[0] + plain[1], ours[0] + ours[1]):
            assert o.dtype == dtype
            assert _rel_err(o, e) <= 2 * _rel_err(p, e), (act, _rel_err(o, e), _rel_err(p, e))


def test_dispatch_and_reasons(monkeypatch):
    leaves, index, _ = _inputs(SMALL, 1, torch.float64, True, "repeats", 6)
    y, t_out = function.dual_linear(*leaves, "tanh", ALPHA, index, backend="triton")
    y_ref, t_ref = reference.dual_linear(*leaves, "tanh", ALPHA, index)
    assert _rel_err(y, y_ref) <= 1e-10 and _rel_err(t_out, t_ref) <= 1e-10
    x, t, w, b = leaves
    assert mlp_triton.unavailable_reason(x, t, w, b, "tanh", index) is None
    xi = torch.zeros(7, 13, dtype=torch.int32, device=DEVICE)
    assert "float" in mlp_triton.unavailable_reason(xi, t, w, b, "tanh", index)
    if DEVICE.type == "cpu":
        monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
        assert "CUDA" in mlp_triton.unavailable_reason(x, t, w, b, "tanh", index)


def test_index_out_of_range_raises():
    leaves, _, _ = _inputs(SMALL, 1, torch.float64, False, None, 7)
    x, t, w = leaves
    bad = torch.tensor([0, 7], device=DEVICE)
    with pytest.raises(RuntimeError, match="index"):
        mlp_triton.dual_linear(x, t[:, :2], w, None, "relu", ALPHA, bad)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
