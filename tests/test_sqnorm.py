"""grokalign::probe_sqnorm (C++/CUDA op) against its reference."""
import pytest
import torch

from grokalign_fast import _backends
from grokalign_fast.ops.sqnorm import probe_sqnorm
from grokalign_fast.ops.sqnorm import reference

needs_ext = pytest.mark.skipif(_backends.cpp_unavailable_reason() is not None,
                               reason=str(_backends.cpp_unavailable_reason()))


def sample_inputs(dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 1), (3, 7, 13), (2, 5, 4, 3), (4, 1, 31), (1, 0, 5)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_match_reference(dtype):
    for g in sample_inputs(dtype):
        torch.testing.assert_close(probe_sqnorm(g, backend="cpp"), reference.probe_sqnorm(g))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    g64 = torch.randn(3, 9, 257, dtype=torch.float64)
    ref = reference.probe_sqnorm(g64)
    ours = probe_sqnorm(g64.to(dtype), backend="cpp").double()
    plain = reference.probe_sqnorm(g64.to(dtype)).double()
    assert (ours - ref).abs().max() <= 2 * (plain - ref).abs().max() + 1e-6 * ref.abs().max()


@needs_ext
def test_gradients_and_gradgrad():
    for g in sample_inputs(requires_grad=True)[:4]:
        assert torch.autograd.gradcheck(lambda g: probe_sqnorm(g, backend="cpp"), (g,))
        assert torch.autograd.gradgradcheck(lambda g: probe_sqnorm(g, backend="cpp"), (g,))


@needs_ext
def test_non_contiguous_input():
    g = torch.randn(7, 3, 5, dtype=torch.float64).transpose(0, 1)  # [3, 7, 5] non-contiguous
    torch.testing.assert_close(probe_sqnorm(g, backend="cpp"), reference.probe_sqnorm(g))


@needs_ext
def test_opcheck():
    for g in sample_inputs(requires_grad=True)[:4]:
        g3 = g.detach().reshape(g.shape[0], g.shape[1], -1).requires_grad_()
        torch.library.opcheck(torch.ops.grokalign.probe_sqnorm.default, (g3,))
        torch.library.opcheck(torch.ops.grokalign.probe_sqnorm_backward.default,
                              (g3.detach(), torch.randn(g3.shape[1], dtype=g3.dtype)))


@needs_ext
def test_op_errors_name_the_argument():
    with pytest.raises(RuntimeError, match=r"g must have shape \[P, B, N\]"):
        torch.ops.grokalign.probe_sqnorm(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[B\]"):
        torch.ops.grokalign.probe_sqnorm_backward(torch.ones(2, 3, 4), torch.ones(4))


def test_reference_backend_always_available_and_unknown_rejected():
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(probe_sqnorm(g, backend="reference"), g.pow(2).sum((0, 2)) / 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        probe_sqnorm(g, backend="fast")
    with pytest.raises(_backends.BackendUnavailableError, match="does not implement"):
        probe_sqnorm(g, backend="triton")


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_backends, "cpp_unavailable_reason", lambda device=None: "the C++ extension is not built")
    g = torch.randn(2, 3, 4)
    with pytest.raises(_backends.BackendUnavailableError, match=r"cpp: the C\+\+ extension is not built"):
        probe_sqnorm(g, backend="cpp")
    torch.testing.assert_close(probe_sqnorm(g, backend="auto"), reference.probe_sqnorm(g))


@needs_ext
def test_torch_compile_fullgraph():
    f = torch.compile(lambda g: probe_sqnorm(g, backend="cpp").sum(), fullgraph=True, backend="aot_eager")
    g = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    out = f(g)
    (grad,) = torch.autograd.grad(out, g)
    torch.testing.assert_close(grad, g.detach())  # d/dg sum_b (1/P) sum g^2 = 2g/P, P = 2
