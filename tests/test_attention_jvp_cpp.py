"""grokalign::attention_jvp (the blockwise C++ kernels, grokalign_fast.ops.attention_jvp.cpp) against
the explicit formula of grokalign_fast.ops.attention_jvp.reference: o, o_t and the gradients of all
six inputs in float64 (causal or not, cross-attention, odd lengths, one or several probes, a custom
scale), gradcheck, float32 and half / bfloat16 against the float64 reference, opcheck, memory linear
in the sequence length, and the argument errors."""
import math
import os
import subprocess
import sys

import pytest
import torch

from grokalign_fast.ops.attention_jvp import cpp
from grokalign_fast.ops.attention_jvp.reference import attention_jvp as reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from providers import peak_allocated_bytes  # noqa: E402

from utils import DEVICES, F64, REL32, assert_close_all, assert_within_twice_plain_error, gen, outputs_and_grads

REASON = cpp.unavailable_reason(torch.zeros(1))
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

NAMES = ["o", "o_t", "grad_q", "grad_k", "grad_v", "grad_q_t", "grad_k_t", "grad_v_t"]


def inputs(B, H, T, S, d, dv, P, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v, q_t, k_t, v_t (tangents [P, ...], or the primals' shapes when P is None), drawn in
    float64 from ``seed`` and cast, requiring grad."""
    g = gen(seed)
    lead = () if P is None else (P,)
    shapes = [(B, H, T, d), (B, H, S, d), (B, H, S, dv), (*lead, B, H, T, d), (*lead, B, H, S, d),
              (*lead, B, H, S, dv)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]


def both(args, causal, scale, use=None):
    """``[o, o_t, *grads]`` of the kernel and of the reference (on float64 copies on the CPU), for the same
    cotangents (``use``: which of o, o_t the loss takes)."""
    ours = outputs_and_grads(cpp.attention_jvp_cpp(*args, causal=causal, scale=scale), args, use)
    ref_args = [a.detach().double().cpu().requires_grad_() for a in args]
    ref = outputs_and_grads(reference(*ref_args, causal=causal, scale=scale), ref_args, use)
    return ours, ref


# B, H, T, S, d, dv, P: odd lengths (1, 3, 17, 113), T != S both ways, d in (8, 40) with dv != d, no
# probe dimension, P = 1 and P = 4; the last two span several query (64) and key (128) blocks.
CASES = [
    (1, 2, 1, 1, 8, 5, None),
    (2, 1, 3, 3, 8, 5, 1),
    (1, 2, 17, 17, 40, 24, 4),
    (2, 2, 113, 113, 8, 12, None),
    (1, 3, 17, 113, 40, 8, 1),
    (1, 1, 113, 17, 8, 40, 4),
    (1, 2, 150, 300, 8, 6, 2),
    (1, 1, 300, 150, 40, 8, 3),
]


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default_scale", "scale0.3"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}T{}S{}d{}dv{}P{}".format(*c))
@pytest.mark.parametrize("device", DEVICES)
def test_float64_equals_reference(device, case, causal, scale):
    ours, ref = both(inputs(*case, device=device), causal, scale)
    assert ours[1].shape == ref[1].shape  # o_t in the tangents' layout
    assert_close_all(ours, ref, NAMES, **F64)


@pytest.mark.parametrize("use", [(True, False), (False, True)], ids=["loss_on_o", "loss_on_o_t"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_loss_on_one_output(causal, use):
    """The other output's gradient reaches the backward op as None (taken as zero)."""
    ours, ref = both(inputs(1, 2, 70, 130, 8, 6, 3), causal, None, use)
    assert_close_all(ours, ref, NAMES, **F64)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_query_grads_summed_over_key_block_chunks(causal):
    """With more threads than heads the CPU backward splits each head's key blocks into chunks, each
    with its own copy of the query-side gradients, summed at the end (here 3 chunks of one key block)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        ours, ref = both(inputs(1, 1, 200, 300, 8, 6, 2), causal, None)
    finally:
        torch.set_num_threads(threads)
    assert_close_all(ours, ref, NAMES, **F64)


def test_non_contiguous_inputs():
    """q, k, v and the tangents as transposes of [B, T, H, d] (the usual layout before the heads split)."""
    args = [x.detach().transpose(-2, -3).contiguous().transpose(-2, -3).requires_grad_()
            for x in inputs(2, 3, 17, 19, 8, 5, 2)]
    assert not args[0].is_contiguous()
    ours, ref = both(args, True, None)
    assert_close_all(ours, ref, NAMES, **F64)


@pytest.mark.parametrize("shape", [(1, 2, 0, 3, 4, 5, 2), (0, 2, 3, 3, 4, 5, 2), (1, 1, 3, 4, 4, 0, 1)],
                         ids=["T=0", "B=0", "dv=0"])
def test_empty_inputs(shape):
    ours, ref = both(inputs(*shape), True, None)
    assert_close_all(ours, ref, NAMES, **F64)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 2, 3, 5, 4, 3, 2), (2, 1, 5, 2, 3, 4, None)], ids=["T<S", "T>S"])
def test_gradcheck(shape, causal):
    args = inputs(*shape)
    assert torch.autograd.gradcheck(lambda *a: cpp.attention_jvp_cpp(*a, causal=causal, scale=0.7), args)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64_reference(device, causal):
    args = inputs(2, 2, 113, 150, 40, 24, 3)
    ref = both(args, causal, None)[1]
    f32 = [a.detach().to(device, torch.float32).requires_grad_() for a in args]
    ours = outputs_and_grads(cpp.attention_jvp_cpp(*f32, causal=causal), f32)
    for name, a, b in zip(NAMES, ours, ref):
        assert a.dtype == torch.float32
        err = (a.double().cpu() - b).abs().max().item() / b.abs().max().item()
        assert err <= REL32, f"{name}: {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_within_twice_plain_error(device, dtype):
    """The kernel accumulates in float: its error against the float64 reference is at most twice that
    of the reference itself run in the low dtype (tests/utils.py's rule)."""
    args = inputs(1, 2, 70, 90, 16, 8, 2)
    exact = both(args, True, None)[1]
    low = [a.detach().to(device, dtype).requires_grad_() for a in args]
    ours = outputs_and_grads(cpp.attention_jvp_cpp(*low, causal=True), low)
    low_ref = [a.detach().to(dtype).requires_grad_() for a in args]
    plain = outputs_and_grads(reference(*low_ref, causal=True), low_ref)
    assert_within_twice_plain_error([x.cpu() for x in ours], plain, exact, NAMES)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_opcheck(causal):
    args = [a.detach() for a in inputs(1, 2, 5, 7, 4, 3, 2)]
    torch.library.opcheck(torch.ops.grokalign.attention_jvp.default, (*args, causal, 0.3))
    o, o_t, lse, mu = torch.ops.grokalign.attention_jvp(*args, causal, 0.3)
    g = gen(3)
    grad_o, grad_o_t = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(o_t.shape, generator=g,
                                                                                       dtype=o.dtype)
    for grads in ((grad_o, grad_o_t), (None, grad_o_t), (grad_o, None)):
        torch.library.opcheck(torch.ops.grokalign.attention_jvp_backward.default,
                              (*grads, *args, o, o_t, lse, mu, causal, 0.3))


def test_torch_compile_fullgraph():
    """The fakes and the autograd registration carry the op through torch.compile (AOT autograd)."""
    args = inputs(1, 2, 9, 11, 8, 5, 2)
    f = torch.compile(lambda *a: cpp.attention_jvp_cpp(*a, causal=True), fullgraph=True, backend="aot_eager")
    assert_close_all(outputs_and_grads(f(*args), args), outputs_and_grads(cpp.attention_jvp_cpp(*args, causal=True),
                                                                          args))


def _peak_allocated(fn, T, d=16, P=1):
    """Peak of the bytes held by torch's CPU allocator during ``fn``'s forward and backward at length
    T = S (bench/providers.py's measure: the profiler's allocation and free events, counted from the
    call's start; the inputs exist before)."""
    args = inputs(1, 1, T, T, d, d, P)

    def step():
        o, o_t = fn(*args)
        (o.sum() + o_t.sum()).backward()

    return peak_allocated_bytes(step)


def test_memory_is_linear_in_the_sequence_length():
    """Forward + backward at T = S = 2048 against 512: the kernel's peak allocation grows ~4x (linear);
    the explicit reference, which holds [T, S] matrices, ~16x (the control: the measure sees it)."""
    ours = _peak_allocated(cpp.attention_jvp_cpp, 2048) / _peak_allocated(cpp.attention_jvp_cpp, 512)
    assert 3.0 < ours < 6.0, ours
    control = _peak_allocated(reference, 1024) / _peak_allocated(reference, 256)
    assert control > 12.0, control


def _bad(**change):
    """Valid arguments of attention_jvp with some replaced."""
    q, k, v, q_t, k_t, v_t = (a.detach() for a in inputs(1, 2, 5, 7, 4, 3, 2))
    args = dict(q=q, k=k, v=v, q_t=q_t, k_t=k_t, v_t=v_t, causal=False, scale=0.5)
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.zeros(2, 5, 4, dtype=torch.float64)), r"q must be \[B, H, T, d\]"),
        (dict(k=torch.zeros(1, 2, 7, 5, dtype=torch.float64)), r"k must be \[1, 2, 7, 4\]"),
        (dict(v=torch.zeros(1, 2, 6, 3, dtype=torch.float64)), r"v must be \[1, 2, 7, 3\]"),
        (dict(k=torch.zeros(1, 2, 0, 4, dtype=torch.float64), v=torch.zeros(1, 2, 0, 3, dtype=torch.float64)),
         r"S = 0 keys"),
        (dict(q_t=torch.zeros(1, 2, 5, 4, dtype=torch.float64)), r"q_t must be \[P, B, H, T, d\]"),
        (dict(k_t=torch.zeros(3, 1, 2, 7, 4, dtype=torch.float64)), r"k_t must be \[2, 1, 2, 7, 4\]"),
        (dict(v_t=torch.zeros(2, 1, 2, 7, 3, dtype=torch.float32)), r"v_t must have q's dtype"),
        (dict(q=torch.zeros(1, 2, 5, 4, dtype=torch.int64)), r"q must be floating point"),
        (dict(scale=math.inf), r"scale must be finite"),
    ],
)
def test_bad_arguments_are_named(change, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.grokalign.attention_jvp(*_bad(**change))


def test_bad_backward_arguments_are_named():
    args = _bad()
    o, o_t, lse, mu = torch.ops.grokalign.attention_jvp(*args)
    inputs6, flags = args[:6], args[6:]
    with pytest.raises(RuntimeError, match=r"grad_o_t must be \[2, 1, 2, 5, 3\]"):
        torch.ops.grokalign.attention_jvp_backward(None, o, *inputs6, o, o_t, lse, mu, *flags)
    with pytest.raises(RuntimeError, match=r"lse and mu must be Double"):
        torch.ops.grokalign.attention_jvp_backward(o, None, *inputs6, o, o_t, lse.float(), mu, *flags)
    with pytest.raises(RuntimeError, match=r"mu must be \[2, 1, 2, 5\]"):
        torch.ops.grokalign.attention_jvp_backward(o, None, *inputs6, o, o_t, lse, mu[:1], *flags)


def test_unavailable_reason():
    assert cpp.unavailable_reason(torch.zeros(1, dtype=torch.float32)) is None
    assert "not torch.int64" in cpp.unavailable_reason(torch.zeros(1, dtype=torch.int64))
    assert "not meta" in cpp.unavailable_reason(torch.zeros(1, device="meta"))



def _float64_tests_with(gemm):
    """This file's float64 comparison with the reference (every case) in a new process whose
    GROKALIGN_CPU_GEMM is ``gemm`` (the setting is read once per process)."""
    env = dict(os.environ, GROKALIGN_CPU_GEMM=gemm)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
           "-k", "test_float64_equals_reference and cpu"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("gemm", ["blas", "auto"])
def test_each_cpu_gemm_path_equals_reference(gemm):
    """The kernels through either CPU GEMM path (csrc/cpu/blas.h: the AVX-512 kernel where the CPU has
    it, or the BLAS; GROKALIGN_CPU_GEMM=blas picks the second) equal the reference in float64."""
    done = _float64_tests_with(gemm)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_bad_cpu_gemm_setting_is_named():
    done = _float64_tests_with("fast")
    assert done.returncode != 0
    assert 'GROKALIGN_CPU_GEMM: expected "auto" or "blas", got "fast"' in done.stdout + done.stderr
