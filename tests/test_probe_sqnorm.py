"""The op probe_sqnorm (per-sample Hutchinson reduction, C++/CUDA) against its reference."""
import pytest
import torch

from grokalign_fast import _backends
from utils import (DEVICES, F64, REL32, assert_within_twice_plain_error, gen, max_rel_err)
from utils import probe_sqnorm_ops as ops
from utils import probe_sqnorm_reference as reference


def needs_ext(device="cpu"):
    reason = _backends.cpp_unavailable_reason(torch.device(device))
    if reason is not None:
        pytest.skip(f"cpp on {device}: {reason}")


def sample_inputs(dtype=torch.float64, requires_grad=False, device="cpu"):
    g = gen(0)
    shapes = [(1, 1, 1), (3, 7, 13), (2, 5, 4, 3), (4, 1, 31), (1, 0, 5)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)
            for s in shapes]


@pytest.mark.parametrize("device", DEVICES)
def test_float64_matches_reference(device):
    needs_ext(device)
    for g in sample_inputs(device=device):
        torch.testing.assert_close(ops.probe_sqnorm(g, backend="cpp"), reference.probe_sqnorm(g), **F64)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_close_to_float64_reference(device):
    needs_ext(device)
    for g in sample_inputs(device=device):
        out = ops.probe_sqnorm(g.float(), backend="cpp")
        assert out.dtype == torch.float32 and max_rel_err(out, reference.probe_sqnorm(g)) <= REL32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_at_most_twice_plain_pytorch_error(device, dtype):
    needs_ext(device)
    g = torch.randn(3, 9, 257, generator=gen(1), dtype=torch.float64).to(device, dtype)
    exact = reference.probe_sqnorm(g.double())
    assert_within_twice_plain_error([ops.probe_sqnorm(g, backend="cpp")], [reference.probe_sqnorm(g)], [exact])


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_and_gradgrad(device):
    needs_ext(device)
    for g in sample_inputs(requires_grad=True, device=device)[:4]:
        assert torch.autograd.gradcheck(lambda g: ops.probe_sqnorm(g, backend="cpp"), (g,))
        assert torch.autograd.gradgradcheck(lambda g: ops.probe_sqnorm(g, backend="cpp"), (g,))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    needs_ext(device)
    g = torch.randn(7, 3, 5, dtype=torch.float64, device=device).transpose(0, 1)  # [3, 7, 5] non-contiguous
    torch.testing.assert_close(ops.probe_sqnorm(g, backend="cpp"), reference.probe_sqnorm(g), **F64)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    needs_ext(device)
    for g in sample_inputs(requires_grad=True, device=device)[:4]:
        g3 = g.detach().reshape(g.shape[0], g.shape[1], -1).requires_grad_()
        torch.library.opcheck(torch.ops.grokalign.probe_sqnorm.default, (g3,))
        torch.library.opcheck(torch.ops.grokalign.probe_sqnorm_backward.default,
                              (g3.detach(), torch.randn(g3.shape[1], dtype=g3.dtype, device=device)))


def test_op_errors_name_the_argument():
    needs_ext()
    with pytest.raises(RuntimeError, match=r"g must have shape \[P, B, N\]"):
        torch.ops.grokalign.probe_sqnorm(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[B\]"):
        torch.ops.grokalign.probe_sqnorm_backward(torch.ones(2, 3, 4), torch.ones(4))


def test_reference_backend_always_available_and_unknown_rejected():
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(ops.probe_sqnorm(g, backend="reference"), g.pow(2).sum((0, 2)) / 2, **F64)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.probe_sqnorm(g, backend="fast")


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_backends, "cpp_unavailable_reason", lambda device=None: "the C++ extension is not built")
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(_backends.BackendUnavailableError, match=r"cpp: the C\+\+ extension is not built"):
        ops.probe_sqnorm(g, backend="cpp")
    torch.testing.assert_close(ops.probe_sqnorm(g, backend="auto"), reference.probe_sqnorm(g), rtol=0, atol=0)


def test_torch_compile_fullgraph():
    needs_ext()
    f = torch.compile(lambda g: ops.probe_sqnorm(g, backend="cpp").sum(), fullgraph=True, backend="aot_eager")
    g = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(f(g), g)
    torch.testing.assert_close(grad, g.detach(), **F64)  # d/dg sum_b (1/P) sum g^2 = 2g/P, P = 2
