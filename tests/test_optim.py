"""OrthoGrad against its definition, with SGD and AdamW as the base, its state round trip, and a
learning-rate scheduler on top."""
import copy

import pytest
import torch

from grokalign_fast.optim import OrthoGrad

DT = torch.float64


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=DT))
    b = torch.nn.Parameter(torch.zeros(4, dtype=DT))  # ||b||^2 = 0: left as it is
    return [w, b], g


def _grads(params, g):
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=DT)


def test_sgd_step_is_the_projected_gradient():
    params, g = _params()
    _grads(params, g)
    w, b = params
    gw, gb = w.grad.clone(), b.grad.clone()
    w0, b0 = w.detach().clone(), b.detach().clone()
    OrthoGrad(params, torch.optim.SGD, lr=0.5).step()
    # The definition, written out on the flattened tensors.
    perp = gw - (gw * w0).sum() / (w0 * w0).sum() * w0
    torch.testing.assert_close(w.detach(), w0 - 0.5 * perp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb, rtol=1e-12, atol=1e-14)
    assert abs(float((w.grad * w0).sum())) < 1e-12  # the projected gradient is orthogonal to w


def test_adamw_base_equals_adamw_on_the_projected_gradients_and_state_round_trips():
    params, g = _params(1)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = OrthoGrad(params, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    base = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        _grads(params, g)
        for p, q in zip(params, ref):
            w = q.detach()
            ww = (w * w).sum()
            q.grad = p.grad - ((p.grad * w).sum() / ww) * w if ww > 1e-8 else p.grad.clone()
        opt.step()
        base.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    # state_dict round trip: a fresh wrapper loaded from it continues identically.
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = OrthoGrad(params2, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    gg = torch.Generator().manual_seed(7)
    _grads(params, gg)
    gg = torch.Generator().manual_seed(7)
    _grads(params2, gg)
    opt.step()
    opt2.step()
    for p, q in zip(params, params2):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_scheduler_and_closure():
    params, g = _params(2)
    opt = OrthoGrad(params, torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = (params[0] ** 3).sum()
        loss.backward()
        return loss

    w0 = params[0].detach().clone()
    loss = opt.step(closure)  # the closure's gradient, 3 w0^2, projected, then the SGD step at lr 1
    grad = 3 * w0 ** 2
    perp = grad - (grad * w0).sum() / (w0 * w0).sum() * w0
    torch.testing.assert_close(params[0].detach(), w0 - perp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, (w0 ** 3).sum())
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_bad_arguments():
    params, _ = _params()
    with pytest.raises(TypeError, match=r"base must be a torch.optim.Optimizer class"):
        OrthoGrad(params, "adam")
    with pytest.raises(ValueError, match=r"eps must be a number >= 0"):
        OrthoGrad(params, torch.optim.SGD, eps=-1.0, lr=0.1)


def test_grok_digits_orthograd_method_runs():
    from grokalign_fast.experiments import grok_digits

    cfg = grok_digits.Config(max_steps=40, eval_every=20, monitor_every=20, monitor_probe=4)
    record = grok_digits.run_one(cfg, "orthograd", 0)
    assert record["method"] == "orthograd" and record["steps_run"] == 40 and len(record["log"]) == 2
