"""The Triton kernels of the per-sample Hutchinson reduction (grokalign_fast.ops.probe_sqnorm.triton; the
dual-stream engine's row sum of squares) against its reference, on the C++ op's inputs
(tests/test_probe_sqnorm.py): float64 values, gradients and second derivatives (the backward is
differentiable again, as the C++ op's), float32, low precision by the twice-plain rule, shapes that
cross tile and split boundaries, empty and non-contiguous inputs, int64 feature indices, gradcheck
and gradgradcheck, the argument errors and the backend registry; on every device present (the CPU
under Triton's interpreter). Inside the engine: tests/test_dual_engine.py and tests/test_dual_rules.py."""
import os

import pytest
import torch

from grokalign_fast import _backends
from grokalign_fast.ops.probe_sqnorm import triton as T

from test_probe_sqnorm import sample_inputs  # the C++ op's inputs
from utils import F64, REL32, assert_within_twice_plain_error, gen, max_rel_err, outputs_and_grads, triton_devices
from utils import probe_sqnorm_ops as ops
from utils import probe_sqnorm_reference as reference

DEVICES = triton_devices()
# Beyond the C++ op's inputs: 9 samples (three sample blocks under the interpreter) of 37 features
# (three splits of the forward, three feature blocks of the backward), one sample of 50.
WIDE = [(2, 9, 37), (3, 1, 2, 25)]


def _inputs(device, dtype=torch.float64):
    g = gen(3)
    wide = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in WIDE]
    return [v.to(dtype) for v in sample_inputs(device=device)] + wide


def _second_order(fn, g, seed=2):
    """``[out, grad_g, d <grad_g, v> / d g, d <grad_g, v> / d c]``: the output, the gradient of
    ``<c, out>`` (c a random cotangent that requires grad) built with create_graph, and the gradients of
    ``<grad_g, v>`` with respect to g and c (double backward through both of the backward's inputs)."""
    g = g.detach().requires_grad_()
    rnd = gen(seed)
    out = fn(g)
    c = torch.randn(out.shape, generator=rnd, dtype=torch.float64).to(g.device, g.dtype).requires_grad_()
    v = torch.randn(g.shape, generator=rnd, dtype=torch.float64).to(g.device, g.dtype)
    (grad,) = torch.autograd.grad(out, g, c, create_graph=True)
    second = torch.autograd.grad((grad * v).sum(), [g, c])
    return [out.detach(), grad.detach(), *second]


@pytest.mark.parametrize("device", DEVICES)
def test_float64_values_gradients_and_second_derivatives(device):
    """float64, 1e-10: the estimate, its gradient and both second-derivative terms of the double backward."""
    for g in _inputs(device):
        for a, b in zip(_second_order(T.probe_sqnorm, g), _second_order(reference.probe_sqnorm, g)):
            assert a.shape == b.shape and max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
def test_int64_feature_indices(device, monkeypatch):
    """The kernels' int64 feature indices (taken where n can pass 2^31) give the same numbers."""
    monkeypatch.setattr(T, "_INT32_MAX", 0)
    for g in _inputs(device)[-2:]:
        g.requires_grad_()
        for a, b in zip(outputs_and_grads([T.probe_sqnorm(g)], [g]), outputs_and_grads([reference.probe_sqnorm(g)], [g])):
            assert max_rel_err(a, b) < F64["rtol"]


@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64_reference(device):
    for g in _inputs(device):
        out = T.probe_sqnorm(g.float())
        assert out.dtype == torch.float32 and max_rel_err(out, reference.probe_sqnorm(g)) <= REL32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_at_most_twice_plain_pytorch_error(device, dtype):
    """Sums and products in float32: the estimate and its gradient at most twice the plain error."""
    g = torch.randn(3, 9, 257, generator=gen(1), dtype=torch.float64).to(device, dtype).requires_grad_()
    exact_g = g.detach().double().requires_grad_()
    ours = outputs_and_grads([T.probe_sqnorm(g)], [g])
    plain = outputs_and_grads([reference.probe_sqnorm(g)], [g])
    exact = outputs_and_grads([reference.probe_sqnorm(exact_g)], [exact_g])
    assert ours[0].dtype == ours[1].dtype == dtype
    assert_within_twice_plain_error(ours, plain, exact, names=["out", "grad"])


def test_gradcheck_and_gradgradcheck():
    """On the C++ op's inputs; fast mode (random projections of the Jacobians: the interpreter's time)."""
    for g in sample_inputs(requires_grad=True)[:4]:
        assert torch.autograd.gradcheck(T.probe_sqnorm, (g,), fast_mode=True)
        assert torch.autograd.gradgradcheck(T.probe_sqnorm, (g,), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    g = torch.randn(7, 3, 5, dtype=torch.float64, device=device).transpose(0, 1)  # [3, 7, 5] non-contiguous
    assert max_rel_err(T.probe_sqnorm(g), reference.probe_sqnorm(g)) < F64["rtol"]


def test_the_backend_registry_serves_triton_where_it_can_run(monkeypatch):
    """probe_sqnorm(backend="triton") runs these kernels (under the interpreter on the CPU) or raises,
    naming the reason; "auto" never picks the interpreter."""
    g = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    reason = T.unavailable_reason(g)
    if reason is None:
        for a, b in zip(outputs_and_grads([ops.probe_sqnorm(g, backend="triton")], [g]),
                        outputs_and_grads([reference.probe_sqnorm(g)], [g])):
            assert max_rel_err(a, b) < F64["rtol"]
    else:
        with pytest.raises(_backends.BackendUnavailableError, match=r"triton: "):
            ops.probe_sqnorm(g, backend="triton")
    monkeypatch.setattr(_backends, "cpp_unavailable_reason", lambda device=None: "the C++ extension is not built")
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    torch.testing.assert_close(ops.probe_sqnorm(g, backend="auto"), reference.probe_sqnorm(g), rtol=0, atol=0)


@pytest.mark.parametrize(
    "arg,match",
    [
        (torch.ones(3), r"g must be \[P, B, \.\.\.\], got \[3\]"),
        (torch.ones(2, 3, dtype=torch.long), r"g must be float16, bfloat16, float32 or float64, got torch.int64"),
        (torch.ones(0, 3, 4), r"g needs at least one probe \(P >= 1\)"),
    ],
)
def test_bad_arguments_are_named(arg, match):
    with pytest.raises((ValueError, TypeError), match=match):
        T.probe_sqnorm(arg)
