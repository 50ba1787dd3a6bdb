"""The offset term of GrokAlign: ``offset * mean_b ||f(x_b) - J(x_b) x_b||^2``, against an
independent computation from ``torch.autograd.functional.jacobian`` (penalty and every parameter
gradient, float64, 1e-10), on the engine and the reference path, with subsample and every; and
skipped (exactly 0) for a bias-free piecewise-linear MLP, where ``f(x) = J x``."""
import copy

import pytest
import torch
from torch import nn

from grokalign_fast import GrokAlign, available_backends
from grokalign_fast.models import cnn6

from utils import F64, exact_jacobians, max_rel_err, mlp

DT = torch.float64
CPP = available_backends()["cpp"]


def _independent(model, x, weight, mu):
    """weight * mean ||J||_F^2 + mu * mean ||f(x) - J x||^2, with J from autograd.functional.jacobian."""
    J = exact_jacobians(model, x, create_graph=True)  # [B, C, D]
    out = model(x).reshape(x.shape[0], -1)
    b = out - (J @ x.reshape(x.shape[0], -1, 1)).squeeze(-1)
    return weight * J.pow(2).sum((1, 2)).mean() + mu * b.pow(2).sum(1).mean(), b.pow(2).sum(1).mean()


MODELS = {
    "mlp_gelu_bias": lambda: (mlp([5, 7, 4], act=nn.GELU), (6, 5)),
    "mlp_relu_bias": lambda: (mlp([5, 7, 4]), (6, 5)),
    "cnn_bias_eval": lambda: (cnn6(2, 3, width=2, size=8).double().eval(), (3, 2, 8, 8)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("estimator", ["exact", "forward"])
def test_offset_penalty_equals_the_independent_computation(name, estimator):
    model, shape = MODELS[name]()
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    kw = dict(estimator="exact") if estimator == "exact" else dict(
        estimator="forward", probes="orthogonal", num_probes=int(torch.tensor(shape[1:]).prod()))
    m1 = copy.deepcopy(model)
    reg = GrokAlign(m1, 0.3, squared=True, offset=0.7, generator=torch.Generator().manual_seed(1), **kw)
    _, pen = reg(x)
    g1 = torch.autograd.grad(pen, list(m1.parameters()))
    m2 = copy.deepcopy(model)
    want, want_offset = _independent(m2, x, 0.3, 0.7)
    g2 = torch.autograd.grad(want, list(m2.parameters()))
    assert max_rel_err(pen, want) < F64["rtol"]
    assert max_rel_err(reg.last_offset, want_offset) < F64["rtol"]
    for a, b in zip(g1, g2):
        assert max_rel_err(a, b) < F64["rtol"]
    if estimator == "forward":  # the engine computes the offset (the fused MLP ops do not)
        assert reg.last_backend == ("cpp" if CPP is None else "dual")
        assert "engine" in reg.last_plan.description


@pytest.mark.parametrize("kw", [dict(), dict(subsample=0.5), dict(every=2)], ids=["all", "subsample", "every"])
@pytest.mark.parametrize("engine", ["dual", "cpp"])
def test_engine_offset_equals_reference_with_batchnorm_in_train(kw, engine):
    if engine == "cpp" and CPP is not None:
        pytest.skip(CPP)
    model = cnn6(2, 3, width=2, size=8, batch_norm=True).double().train()
    x = torch.randn(4, 2, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(2))
    res = []
    for backend in (engine, "reference"):
        m = copy.deepcopy(model)
        reg = GrokAlign(m, 0.2, estimator="forward", offset=0.5, backend=backend,
                        generator=torch.Generator().manual_seed(3), **kw)
        for _ in range(2):
            out, pen = reg(x)
        grads = torch.autograd.grad(out.sum() + pen, list(m.parameters()))
        res.append((pen.detach(), reg.last_offset, grads))
    (p1, o1, g1), (p2, o2, g2) = res
    assert max_rel_err(p1, p2) < F64["rtol"]
    if o1 is None:
        assert o2 is None  # every=2: the second call computes no penalty
    else:
        assert max_rel_err(o1, o2) < F64["rtol"] and float(o1) > 0
    for a, b in zip(g1, g2):
        assert max_rel_err(a, b) < F64["rtol"]


def test_bias_free_piecewise_linear_mlp_skips_the_offset():
    model = mlp([5, 7, 4], bias=False, act=nn.LeakyReLU)
    x = torch.randn(6, 5, dtype=DT)
    for estimator in ("forward", "reverse"):
        reg = GrokAlign(model, 0.3, estimator=estimator, offset=1.0)
        _, pen = reg(x)
        assert float(reg.last_offset) == 0.0 and "offset 0" in reg.last_plan.description
        want = "cpp" if available_backends()["cpp"] is None else "dual"
        assert reg.last_backend == want
    # The same model with biases has a non-zero offset, computed off the fused ops.
    biased = mlp([5, 7, 4], act=nn.LeakyReLU)
    reg = GrokAlign(biased, 0.3, estimator="reverse", offset=1.0)
    reg(x)
    assert float(reg.last_offset) > 0 and reg.last_backend == "reference"
    assert "offset term" in reg.last_plan.reasons["cpp"]


def test_authors_way_equals_grokalign_offset_form():
    """sparse-parity's ``grokalign-authors`` (autograd.functional.jvp with create_graph, a unit Gaussian
    output probe through a create_graph VJP) and ``GrokAlign(offset=lam)`` with the output-space
    estimator draw the same probe from the same generator state: same penalty, same gradients."""
    from grokalign_fast.experiments.sparse_parity import AuthorsPenalty

    model = mlp([6, 9, 3], act=nn.GELU)
    x = torch.randn(5, 6, dtype=DT, generator=torch.Generator().manual_seed(4))
    results = []
    for make in (lambda m: AuthorsPenalty(m, 0.1, generator=torch.Generator().manual_seed(8)),
                 lambda m: GrokAlign(m, 0.1, offset=0.1, estimator="reverse", generator=torch.Generator().manual_seed(8))):
        m = copy.deepcopy(model)
        out, pen = make(m)(x)
        results.append((pen.detach(), torch.autograd.grad(out.sum() + pen, list(m.parameters()))))
    (p1, g1), (p2, g2) = results
    assert max_rel_err(p1, p2) < F64["rtol"]
    for a, b in zip(g1, g2):
        assert max_rel_err(a, b) < F64["rtol"]
