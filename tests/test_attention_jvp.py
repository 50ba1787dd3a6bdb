"""The op attention_jvp (scaled dot-product attention ``o`` and its JVP ``o_t`` along P tangents):
each fast backend against the specification grokalign_fast/ops/attention_jvp/reference.py on the
same inputs, then the public function's argument checks and backend choice.

The fast backends run per device in :data:`utils.DEVICES` ("triton" on the CPU under
``TRITON_INTERPRET=1``); where one cannot run, the test is skipped with the backend's own reason.
The reference always runs in float64 on the CPU: float64 must match it to :data:`utils.F64` (values
and the gradients of a random loss on both outputs, for all six inputs), float32 to
:data:`utils.REL32`. Shapes are odd on purpose (T, S in 1, 3, 17, 113; d = 8, 40; dv != d), and
113 spans several 32-row tiles of the Triton kernels.
"""
import os

import pytest
import torch

from grokalign_fast import BackendUnavailableError
from grokalign_fast.ops import attention_jvp as ops
from grokalign_fast.ops.attention_jvp import attention_jvp
from grokalign_fast.ops.attention_jvp import triton as triton_backend
from utils import DEVICES, REL32, assert_close_all, gen, max_rel_err, outputs_and_grads

BACKENDS = ("cpp", "triton")
NAMES = ("o", "o_t", "grad q", "grad k", "grad v", "grad q_t", "grad k_t", "grad v_t")

# (B, H, T, S, d, dv)
SHAPES = {
    "self_17": (2, 2, 17, 17, 8, 8),
    "cross_T3_S17": (1, 2, 3, 17, 8, 8),
    "cross_T17_S3": (1, 2, 17, 3, 8, 8),  # causal: rows past S see every key
    "T1_S5": (2, 1, 1, 5, 8, 8),
    "d40_dv24": (1, 2, 17, 13, 40, 24),
    "dv13": (1, 1, 3, 17, 8, 13),
    "tiled_113": (1, 1, 113, 113, 8, 8),
}


def leaves(B, H, T, S, d, dv, P=None, seed=0):
    """Float64 CPU ``[q, k, v, q_t, k_t, v_t]``; tangents ``[B, H, *, *]`` (P None) or ``[P, B, H, *, *]``."""
    g = gen(seed)
    lead = () if P is None else (P,)
    shapes = [(B, H, T, d), (B, H, S, d), (B, H, S, dv)]
    return ([torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
            + [torch.randn(lead + s, generator=g, dtype=torch.float64) for s in shapes])


def require(backend, device="cpu", dtype=torch.float64):
    """Skip the test, with the backend's reason, where it cannot serve ``device`` and ``dtype``."""
    xs = [x.to(device, dtype) for x in leaves(1, 1, 1, 1, 1, 1)]
    reason = ops.unavailable_reasons(*xs)[backend]
    if reason is not None:
        pytest.skip(f"{backend} on {device} ({dtype}): {reason}")


def evaluate(backend, xs, device="cpu", dtype=torch.float64, use=None, view=None, wanted=range(6), **kw):
    """``[o, o_t, *grads]`` of ``attention_jvp(backend=...)`` on copies of ``xs`` cast to (device,
    dtype): the gradients of a fixed random combination of the used outputs with respect to the
    leaves at the positions in ``wanted``. ``view`` maps each leaf to the tensor passed in
    (non-contiguous layouts)."""
    vs = [x.detach().to(device, dtype).requires_grad_(i in wanted) for i, x in enumerate(xs)]
    args = vs if view is None else [view(x) for x in vs]
    outs = attention_jvp(*args, backend=backend, **kw)
    assert all(o.device.type == torch.device(device).type and o.dtype == dtype for o in outs)
    return outputs_and_grads(outs, [vs[i] for i in wanted], use=use)


def check_float64(backend, device, xs, **kw):
    """The backend on ``device`` against the reference, float64: outputs and gradients to F64."""
    require(backend, device)
    assert_close_all(evaluate(backend, xs, device, **kw), evaluate("reference", xs, **kw), NAMES)


# ------------------------------------------------------------------ every backend, every device


@pytest.mark.parametrize("P", [None, 1, 4], ids=["noP", "P1", "P4"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_values_and_grads_match_reference(backend, device, shape, causal, P):
    check_float64(backend, device, leaves(*shape, P=P), causal=causal)


@pytest.mark.parametrize("scale", [0.3, 1.7])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale(backend, device, causal, scale):
    check_float64(backend, device, leaves(1, 2, 17, 13, 40, 24, P=2), causal=causal, scale=scale)


@pytest.mark.parametrize("P", [3, 6])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_counts_that_pad_or_split(backend, device, causal, P):
    """P = 3 pads a group of probes; P = 6 exceeds the Triton kernels' 4 probes per program (two
    chunks whose partial gradients add)."""
    check_float64(backend, device, leaves(1, 2, 17, 21, 8, 12, P=P), causal=causal)


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["o_only", "o_t_only"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_used_and_strided_inputs(backend, device, use):
    """Inputs as [B, T, H, d] tensors seen through transpose(-2, -3) (no copy), and a loss on one
    output only (the other's gradient reaches the backward as None)."""
    def view(x):  # leaf [.., T, H, d] -> [.., H, T, d]
        return x.transpose(-2, -3)

    xs = [x.transpose(-2, -3).contiguous() for x in leaves(2, 3, 17, 13, 8, 12, P=2)]
    check_float64(backend, device, xs, causal=True, use=use, view=view)


EMPTY = {"T0": ((1, 2, 0, 5, 8, 8), 2), "S0": ((1, 2, 5, 0, 8, 8), 2), "B0": ((0, 2, 5, 5, 8, 8), 2),
         "P0": ((1, 2, 5, 5, 8, 8), 0)}


@pytest.mark.parametrize("shape,P", EMPTY.values(), ids=EMPTY.keys())
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes(backend, device, shape, P):
    """No queries, no keys (o = o_t = 0, empty sums), no batch or no probes: as the reference."""
    check_float64(backend, device, leaves(*shape, P=P), causal=True)


@pytest.mark.parametrize("wanted", [(3,), (1, 5), (0, 2, 4)], ids=["q_t", "k+v_t", "q+v+k_t"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_some_inputs(backend, device, wanted):
    """Only some inputs require a gradient (the Triton backend then skips the kernel of the other side)."""
    require(backend, device)
    xs = leaves(1, 2, 17, 13, 8, 12, P=2)
    assert_close_all(evaluate(backend, xs, device, causal=True, wanted=wanted),
                     evaluate("reference", xs, causal=True, wanted=wanted))


@pytest.mark.parametrize("P", [None, 2], ids=["noP", "P2"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, device, causal, P):
    require(backend, device)
    xs = [x.to(device).requires_grad_(True) for x in leaves(1, 2, 3, 2, 3, 2, P=P, seed=5)]
    assert torch.autograd.gradcheck(
        lambda *a: attention_jvp(*a, causal=causal, scale=0.8, backend=backend), xs, fast_mode=True)


# (shape, P, causal)
FLOAT32_CASES = [(SHAPES["self_17"], 4, True), (SHAPES["d40_dv24"], 2, False), (SHAPES["tiled_113"], 2, True)]


@pytest.mark.parametrize("shape,P,causal", FLOAT32_CASES, ids=["self_17", "d40_dv24", "tiled_113"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_close_to_float64_reference(backend, device, shape, P, causal):
    """float32 rounds at 6e-8; the longest reductions here (113 keys, 113 rows times the probes)
    leave a largest relative error of ~5e-7 per tensor, as plain PyTorch's float32 does on the same
    inputs, so 1e-5 passes a correct kernel with a 20x margin and fails any wrong term (an O(1)
    error)."""
    require(backend, device, torch.float32)
    xs = leaves(*shape, P=P)
    got = evaluate(backend, xs, device, torch.float32, causal=causal)
    want = evaluate("reference", xs, causal=causal)
    for name, a, r in zip(NAMES, got, want):
        assert max_rel_err(a, r) <= REL32, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_saved_without_a_gradient(backend):
    """Under no_grad, or when no input requires a gradient, the forward keeps no tensor for backward."""
    require(backend)
    xs = leaves(1, 2, 5, 7, 8, 8, P=2)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with torch.no_grad():
            attention_jvp(*[x.requires_grad_(True) for x in xs], backend=backend)
        attention_jvp(*[x.detach() for x in xs], backend=backend)
        assert saved == []
        attention_jvp(*[x.detach().requires_grad_(True) for x in xs], backend=backend)
        assert saved


def test_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    require("triton")
    xs = leaves(1, 1, 3, 3, 8, 8)
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    assert "CUDA" in triton_backend.unavailable_reason(*xs)
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot serve this call:\n  - triton: .*CUDA"):
        attention_jvp(*xs, backend="triton")


def test_triton_under_the_interpreter_refuses_low_precision():
    require("triton")
    xs = [x.to(torch.bfloat16) for x in leaves(1, 1, 3, 3, 8, 8)]
    with pytest.raises(BackendUnavailableError, match="float32 and float64 only"):
        attention_jvp(*xs, backend="triton")


def test_cpp_raises_where_it_cannot_serve():
    xs = leaves(1, 1, 3, 3, 8, 8)
    reason = ops.unavailable_reasons(*xs)["cpp"]
    if reason is None:
        pytest.skip("the C++ backend serves this call here")
    with pytest.raises(BackendUnavailableError, match="backend='cpp' cannot serve this call"):
        attention_jvp(*xs, backend="cpp")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_matches_reference(causal):
    """Whichever backend "auto" picks here (never the Triton interpreter), it computes the reference."""
    xs = leaves(1, 2, 5, 7, 8, 6, P=2)
    assert_close_all(evaluate("auto", xs, causal=causal), evaluate("reference", xs, causal=causal), NAMES)


# ------------------------------------------------------------------------------- argument checks


def _bad(**changes):
    """Valid arguments (B=2, H=3, T=5, S=7, d=4, dv=6, P=2) with some replaced."""
    q, k, v, q_t, k_t, v_t = leaves(2, 3, 5, 7, 4, 6, P=2)
    args = dict(q=q, k=k, v=v, q_t=q_t, k_t=k_t, v_t=v_t, causal=False, scale=None)
    args.update(changes)
    return args


BAD_ARGS = [
    (dict(q=torch.zeros(2, 3, 5)), ValueError, r"q must have shape \[B, H, T, d\], got \[2, 3, 5\]"),
    (dict(q=torch.zeros(2, 3, 5, 0), k=torch.zeros(2, 3, 7, 0)), ValueError, "head dimension d >= 1"),
    (dict(k=torch.zeros(2, 3, 7, 5, dtype=torch.float64)), ValueError, r"k must have shape \[B=2, H=3, S, d=4\]"),
    (dict(k=torch.zeros(1, 3, 7, 4, dtype=torch.float64)), ValueError, r"k must have shape \[B=2, H=3, S, d=4\]"),
    (dict(v=torch.zeros(2, 3, 6, 6, dtype=torch.float64)), ValueError, r"v must have shape \[B=2, H=3, S=7, dv\]"),
    (dict(q_t=torch.zeros(5, 4)), ValueError, r"q_t must have shape \[B, H, T, d\] or \[P, B, H, T, d\]"),
    (dict(q_t=torch.zeros(2, 3, 5, 4)), ValueError, r"k_t must have shape \[B=2, H=3, S=7, d=4\].*one layout"),
    (dict(v_t=torch.zeros(3, 2, 3, 7, 6)), ValueError, r"v_t must have shape \[P=2, B=2, H=3, S=7, dv=6\]"),
    (dict(k_t=torch.zeros(2, 2, 3, 7, 5)), ValueError, r"k_t must have shape \[P=2, B=2, H=3, S=7, d=4\]"),
    (dict(v=torch.zeros(2, 3, 7, 6, dtype=torch.float32)), TypeError, "must share one dtype"),
    (dict(q=torch.zeros(2, 3, 5, 4, dtype=torch.int64)), TypeError, "must share one dtype"),
    (dict(k=torch.zeros(2, 3, 7, 4, dtype=torch.float64, device="meta")), ValueError, "must be on one device"),
    (dict(v=[[0.0]]), TypeError, "v must be a torch.Tensor, got list"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(scale=0.0), ValueError, r"scale must be None \(1/sqrt\(d\)\) or a finite number > 0, got 0.0"),
    (dict(scale=-1.0), ValueError, "scale must be None"),
    (dict(scale=float("nan")), ValueError, "scale must be None"),
    (dict(scale="0.5"), ValueError, "scale must be None"),
]


@pytest.mark.parametrize("changes,exc,message", BAD_ARGS, ids=range(len(BAD_ARGS)))
def test_argument_errors_name_the_argument(changes, exc, message):
    args = _bad(**changes)
    tensors = [args.pop(n) for n in ("q", "k", "v", "q_t", "k_t", "v_t")]
    with pytest.raises(exc, match=message):
        attention_jvp(*tensors, **args)


def test_int_tensors_are_refused():
    q, k, v, q_t, k_t, v_t = (torch.zeros(1, 1, 2, 2, dtype=torch.int64) for _ in range(6))
    with pytest.raises(TypeError, match="floating-point tensors, got torch.int64"):
        attention_jvp(q, k, v, q_t, k_t, v_t)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        attention_jvp(*leaves(1, 1, 2, 2, 2, 2), backend="cuda")
