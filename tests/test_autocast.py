"""GrokAlign under ``torch.autocast`` (bfloat16, on each device present) on an MLP (the whole-MLP C++ ops), a CNN with
BatchNorm in train mode and a GPT-style LM (the dual-stream engine).

The penalty and every parameter gradient of one step follow the low-precision rule of
``utils.assert_within_twice_plain_error``: against the float64 reference, at most twice the error of
plain PyTorch (the reference estimator, autograd, under the same autocast) plus the dtype's unit
roundoff. The gradients are float32 (the parameters'), computed through bfloat16 activations. The
devices' autocast policies differ (CUDA's runs the norms in float32, the CPU's in bfloat16); the
engine's rules follow the policy of the device they run on.
"""
import copy

import pytest
import torch

from grokalign_fast import GrokAlign
from grokalign_fast.models import GPT, cnn6, mlp

from utils import DEVICES, max_rel_err

CASES = {
    "mlp-forward": (lambda: mlp([20, 48, 48, 10], bias=True, seed=0), lambda g: torch.randn(24, 20, generator=g),
                    "forward", "cpp"),
    "mlp-reverse": (lambda: mlp([20, 48, 48, 10], bias=True, seed=0), lambda g: torch.randn(24, 20, generator=g),
                    "reverse", "cpp"),
    "cnn-forward": (lambda: cnn6(3, 10, width=8, size=16, batch_norm=True),
                    lambda g: torch.randn(16, 3, 16, 16, generator=g), "forward", None),
    "gpt-forward": (lambda: GPT(17, d_model=32, layers=2, heads=2, context=12),
                    lambda g: torch.randint(0, 17, (6, 12), generator=g), "forward", None),
}


def _step(model, x, estimator, backend, dtype, autocast, device="cpu"):
    """[penalty, *parameter gradients] (float64 copies on the CPU) and the backend that ran."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    reg = GrokAlign(m, 0.5, estimator=estimator, backend=backend, generator=gen)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out, pen = reg(x)
        loss = out.float().pow(2).mean() + pen
    grads = torch.autograd.grad(loss, list(m.parameters()))
    return [pen.detach().double().cpu()] + [g.double().cpu() for g in grads], reg.last_backend


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_penalty_and_gradients_under_bf16_autocast_follow_the_2x_rule(case, device):
    build, data, estimator, backend = CASES[case]
    torch.manual_seed(0)
    model, x = build(), data(torch.Generator().manual_seed(1))
    exact, _ = _step(model, x, estimator, "reference", torch.float64, False, device)
    plain, _ = _step(model, x, estimator, "reference", torch.float32, True, device)
    ours, used = _step(model, x, estimator, "auto", torch.float32, True, device)
    assert used != "reference"
    if backend is not None:
        assert used == backend
    u = torch.finfo(torch.bfloat16).eps / 2
    names = ["penalty"] + [n for n, _ in model.named_parameters()]
    for name, o, p, e in zip(names, ours, plain, exact):
        err, err_plain = max_rel_err(o, e), max_rel_err(p, e)
        assert err <= 2 * err_plain + u, f"{name}: ours {err:.3g}, plain PyTorch {err_plain:.3g}"
