"""The op rademacher_ (random signs: a C++ loop on the CPU, the reference's words unpacked by a kernel
on CUDA) against probes.rademacher_reference, and the Rademacher probes every path draws."""
import pytest
import torch

import grokalign_fast as ga
from grokalign_fast.probes import rademacher_reference
from utils import DEVICES, gen


def needs_op():
    reason = ga._backends.extension_ops_reason(("rademacher_",))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_op_draws_the_reference_signs(dtype):
    """grokalign::rademacher_ == probes.rademacher_reference (the ATen path) from the same generator
    state, leaving the generator in the same state: odd sizes, partial last words, empty draws."""
    needs_op()
    for seed, total in enumerate([0, 1, 7, 31, 32, 33, 95, 784 * 3 + 5, 4096 * 32 + 17]):
        g = gen(seed)
        want = rademacher_reference(total, torch.float32, torch.device("cpu"), g).to(dtype)
        state = g.get_state()
        g.manual_seed(seed)
        got = torch.empty(total, dtype=dtype)
        torch.ops.grokalign.rademacher_(got, g)
        assert torch.equal(got, want), (total, dtype)
        assert torch.equal(g.get_state(), state)
    # generator=None draws from (and advances) the default CPU generator, as torch.randint does.
    with torch.random.fork_rng():
        torch.manual_seed(3)
        want = rademacher_reference(100, torch.float32, torch.device("cpu"), None).to(dtype)
        torch.manual_seed(3)
        got = torch.empty(100, dtype=dtype)
        torch.ops.grokalign.rademacher_(got, None)
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_cuda_op_draws_the_reference_signs(dtype):
    """On CUDA (csrc/cuda/rademacher_cuda.cu): grokalign::rademacher_ == probes.rademacher_reference from
    the same CUDA generator state, leaving the generator in the same state; the default CUDA generator
    for generator=None; draw_probes with a CUDA generator takes the op and gives the same signs."""
    needs_op()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("grokalign::rademacher_", "CUDA"):
        pytest.skip("the extension was built without CUDA kernels")
    cuda = torch.device("cuda")
    for seed, total in enumerate([0, 1, 7, 31, 32, 33, 95, 784 * 3 + 5, 4096 * 32 + 17]):
        g = torch.Generator(device=cuda).manual_seed(seed)
        want = rademacher_reference(total, torch.float32, cuda, g).to(dtype)
        state = g.get_state()
        g.manual_seed(seed)
        got = torch.empty(total, dtype=dtype, device=cuda)
        torch.ops.grokalign.rademacher_(got, g)
        assert torch.equal(got, want), (total, dtype)
        assert torch.equal(g.get_state(), state)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.cuda.manual_seed(3)
        want = rademacher_reference(100, torch.float32, cuda, None).to(dtype)
        torch.cuda.manual_seed(3)
        got = torch.empty(100, dtype=dtype, device=cuda)
        torch.ops.grokalign.rademacher_(got, None)
    assert torch.equal(got, want)
    from grokalign_fast import probes

    assert "cuda" in probes._RADEMACHER_DEVICES
    v = ga.draw_probes("rademacher", 2, 5, (3, 7), dtype=dtype, device=cuda,
                       generator=torch.Generator(device=cuda).manual_seed(4))
    want = rademacher_reference(2 * 5 * 21, torch.float32, cuda, torch.Generator(device=cuda).manual_seed(4))
    assert v.dtype == dtype and torch.equal(v, want.to(dtype).reshape(2, 5, 3, 7))
    with pytest.raises(RuntimeError, match="generator must be a CUDA generator"):
        torch.ops.grokalign.rademacher_(torch.empty(4, device=cuda), torch.Generator())


def test_op_refuses_bad_out():
    needs_op()
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.grokalign.rademacher_(torch.empty(4, dtype=torch.int64), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.grokalign.rademacher_(torch.empty(4, 6).t(), None)


def test_op_schema_and_fake():
    needs_op()
    from grokalign_fast import probes

    assert probes._RADEMACHER_OP is not None  # its fake registered at import
    # Random by design: the checks that run the op twice and compare do not apply.
    torch.library.opcheck(torch.ops.grokalign.rademacher_.default, (torch.empty(3, 5), torch.Generator()),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_probes_are_the_reference_signs_on_every_path(device):
    """draw_probes (the extension's fill where it is built) gives rademacher_reference's signs,
    reshaped [P, B, *shape], for every target dtype, drawn on the generator's device."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        v = ga.draw_probes("rademacher", 2, 5, (3, 7), dtype=dtype, device=device, generator=gen(4))
        want = rademacher_reference(2 * 5 * 21, torch.float32, torch.device("cpu"), gen(4))
        want = want.to(dtype).reshape(2, 5, 3, 7)
        assert v.dtype == dtype and v.device.type == device and torch.equal(v.cpu(), want)


def test_probes_are_signs_with_identity_covariance():
    v = ga.draw_probes("rademacher", 3, 500, (7, 3), dtype=torch.float64, device="cpu", generator=gen(0))
    assert v.shape == (3, 500, 7, 3) and set(v.unique().tolist()) == {-1.0, 1.0}
    flat = v.reshape(-1, 21)
    cov = flat.t() @ flat / flat.shape[0]
    assert (cov - torch.eye(21, dtype=torch.float64)).abs().max() < 5 / flat.shape[0] ** 0.5
