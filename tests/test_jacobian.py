"""Estimators of ||J||_F against the exact Jacobian from torch.autograd.functional.jacobian."""
import math

import pytest
import torch
from torch import nn

import grokalign_fast as ga
from grokalign_fast.jacobian import probe_products
from utils import F64, assert_close_all, exact_jacobians, exact_sq_norms, gen, mlp, model_cases

CASES = model_cases()
IDS = [c[0] for c in CASES]


def _dims(model, x):
    with torch.no_grad():
        return model(x[:1]).numel(), x[0].numel()


@pytest.mark.parametrize("name,model,x", CASES, ids=IDS)
def test_exact_estimator_matches_autograd_jacobian(name, model, x):
    ref = exact_sq_norms(model, x)
    got = ga.jacobian_norm(model, x, estimator="exact", squared=True, reduction="none")
    torch.testing.assert_close(got, ref, **F64)
    got_norm = ga.jacobian_norm(model, x, estimator="exact", squared=False, reduction="none")
    torch.testing.assert_close(got_norm, ref.sqrt(), **F64)
    torch.testing.assert_close(ga.jacobian_norm(model, x, estimator="exact"), ref.sqrt().mean(), **F64)
    torch.testing.assert_close(
        ga.jacobian_norm(model, x, estimator="exact", squared=True, reduction="sum"), ref.sum(), **F64)


@pytest.mark.parametrize("name,model,x", CASES, ids=IDS)
def test_full_jacobian(name, model, x):
    torch.testing.assert_close(ga.jacobian(model, x), exact_jacobians(model, x), **F64)


def test_exact_uses_jvps_when_inputs_are_fewer():
    model = mlp([3, 8, 11], act=nn.GELU)  # D = 3 < C = 11: D Jacobian-vector products
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(
        ga.jacobian_norm(model, x, estimator="exact", squared=True, reduction="none"),
        exact_sq_norms(model, x),
        **F64,
    )
    torch.testing.assert_close(ga.jacobian(model, x), exact_jacobians(model, x), **F64)


@pytest.mark.parametrize("estimator", ["forward", "reverse"])
@pytest.mark.parametrize("name,model,x", CASES, ids=IDS)
def test_orthogonal_probes_with_full_dimension_are_exact(estimator, name, model, x):
    C, D = _dims(model, x)
    k = D if estimator == "forward" else C
    got = ga.jacobian_norm(
        model, x, estimator=estimator, probes="orthogonal", num_probes=k, squared=True, reduction="none",
        generator=gen(0),
    )
    torch.testing.assert_close(got, exact_sq_norms(model, x), **F64)


def test_reverse_is_exact_for_scalar_output_with_sphere_probes():
    model = mlp([7, 9, 1], act=nn.GELU)
    x = torch.randn(5, 7, dtype=torch.float64)
    got = ga.jacobian_norm(model, x, estimator="reverse", probes="sphere", squared=True, reduction="none")
    torch.testing.assert_close(got, exact_sq_norms(model, x), **F64)


def _single_probe_samples(model, x, estimator, probes, n, seed=0):
    """n independent one-probe estimates of ||J_b||^2 per sample: [n, B] (one call, n probes)."""
    with torch.no_grad():
        _, G, scale = probe_products(model, x, estimator=estimator, probes=probes, num_probes=n,
                                     generator=gen(seed))
    return scale * G.reshape(n, x.shape[0], -1).pow(2).sum(-1)


STAT_CASES = [(e, p, c) for e in ("forward", "reverse") for p in ("gaussian", "rademacher", "sphere", "orthogonal")
              for c in (0, 2)] + [(e, "sphere", c) for e in ("forward", "reverse") for c in (4, 5)]


@pytest.mark.parametrize("estimator,probes,case", STAT_CASES,
                         ids=[f"{e}-{p}-{IDS[c]}" for e, p, c in STAT_CASES])
def test_estimators_are_unbiased_for_the_squared_norm(estimator, probes, case):
    """Mean of many one-probe estimates within 5 standard errors of the exact value."""
    name, model, x = CASES[case]
    x = x[:2]
    if probes == "orthogonal":
        # k orthogonal probes per call are dependent: test the mean over independent one-probe draws.
        samples = torch.cat([_single_probe_samples(model, x, estimator, probes, 1, seed=s) for s in range(300)])
    else:
        samples = _single_probe_samples(model, x, estimator, probes, 1000, seed=case)
    n = samples.shape[0]
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(n)
    exact = exact_sq_norms(model, x)
    assert torch.all((mean - exact).abs() <= 5 * se + 1e-12), (mean, exact, se)


def test_statistical_test_can_fail():
    """The same 5-sigma check rejects a biased estimator (the squared norm scaled by 1.5)."""
    name, model, x = CASES[0]
    x = x[:2]
    samples = 1.5 * _single_probe_samples(model, x, "forward", "rademacher", 1000)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(1000)
    assert not torch.all((mean - exact_sq_norms(model, x)).abs() <= 5 * se)


def test_jacobian_norm_with_k_probes_is_the_mean_of_the_probe_estimates():
    name, model, x = CASES[2]
    for estimator in ("forward", "reverse"):
        est = ga.jacobian_norm(model, x, estimator=estimator, num_probes=5, squared=True, reduction="none",
                               probes="sphere", generator=gen(4))
        per_probe = _single_probe_samples(model, x, estimator, "sphere", 5, seed=4)
        torch.testing.assert_close(est, per_probe.mean(0), **F64)


def test_more_probes_average_single_probe_estimates():
    name, model, x = CASES[2]
    k = 7
    many = ga.jacobian_norm(model, x, estimator="forward", probes="gaussian", num_probes=k, squared=True,
                            reduction="none", generator=gen(3))
    v = ga.draw_probes("gaussian", k, x.shape[0], x.shape[1:], dtype=x.dtype, device=x.device,
                       generator=gen(3))
    J = exact_jacobians(model, x)  # [B, C, D]
    manual = torch.einsum("bcd,pbd->pbc", J, v.reshape(k, x.shape[0], -1)).pow(2).sum(-1).mean(0)
    torch.testing.assert_close(many, manual, **F64)


def test_auto_probes_are_sphere_for_reverse_and_rademacher_for_forward():
    name, model, x = CASES[2]
    for estimator, kind in (("reverse", "sphere"), ("forward", "rademacher")):
        kw = dict(estimator=estimator, num_probes=2, squared=True, reduction="none")
        a = ga.jacobian_norm(model, x, generator=gen(9), **kw)
        b = ga.jacobian_norm(model, x, probes=kind, generator=gen(9), **kw)
        assert torch.equal(a, b)


def test_norm_is_square_root_of_per_sample_estimate():
    name, model, x = CASES[0]
    kw = dict(estimator="reverse", num_probes=3, reduction="none")
    sq = ga.jacobian_norm(model, x, squared=True, generator=gen(5), **kw)
    nrm = ga.jacobian_norm(model, x, squared=False, generator=gen(5), **kw)
    torch.testing.assert_close(nrm, sq.sqrt(), **F64)


@pytest.mark.parametrize("estimator", ["forward", "reverse", "exact"])
def test_same_generator_state_same_numbers(estimator):
    name, model, x = CASES[4]
    a = ga.jacobian_norm(model, x, estimator=estimator, reduction="none", generator=gen(11))
    b = ga.jacobian_norm(model, x, estimator=estimator, reduction="none", generator=gen(11))
    assert torch.equal(a, b)
    if estimator != "exact":
        c = ga.jacobian_norm(model, x, estimator=estimator, reduction="none", generator=gen(12))
        assert not torch.equal(a, c)


@pytest.mark.parametrize("estimator", ["forward", "reverse", "exact"])
def test_cpp_and_reference_reductions_agree(estimator):
    pytest.importorskip("grokalign_fast._C", reason="C++ extension not built")
    name, model, x = CASES[5]
    kw = dict(estimator=estimator, num_probes=2, squared=True, reduction="none")
    a = ga.jacobian_norm(model, x, backend="reference", generator=gen(1), **kw)
    b = ga.jacobian_norm(model, x, backend="cpp", generator=gen(1), **kw)
    torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("estimator", ["forward", "reverse", "exact"])
@pytest.mark.parametrize("squared", [True, False])
def test_penalty_gradients_gradcheck(estimator, squared):
    """d(penalty)/d(parameters) through the Jacobian products, smooth net, float64."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64)
    W1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    W2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def penalty(W1, b1, W2):
        f = lambda z: torch.tanh(z @ W1.t() + b1) @ W2.t()
        return ga.jacobian_norm(f, x, estimator=estimator, num_probes=2, squared=squared,
                                generator=gen(7))

    assert torch.autograd.gradcheck(penalty, (W1, b1, W2))


def test_penalty_gradient_with_respect_to_input():
    torch.manual_seed(0)
    model = mlp([4, 6, 3], act=nn.Tanh)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    f = lambda x: ga.jacobian_norm(model, x, estimator="forward", generator=gen(1))
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("estimator", ["reverse", "forward", "exact"])
def test_zero_jacobian_has_zero_norm_and_zero_gradient(estimator):
    """safe_sqrt's convention: where J = 0 the norm and its gradient are 0, not nan. f(z) = m_b z W^T
    with m = (0, 1): J_0 = 0 and J_1 = W, so the norms are (0, ||W||_F) and d(sum)/dW = W / ||W||_F,
    sample 0 adding exactly 0; at W = 0 both norms and the gradient are 0. Orthogonal probes spanning
    the probe space make the estimators exact."""
    x = torch.randn(2, 4, dtype=torch.float64)
    m = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    kw = dict(estimator=estimator, reduction="none")
    if estimator != "exact":
        kw.update(probes="orthogonal", num_probes=3 if estimator == "reverse" else 4, generator=gen(0))
    for W in (torch.zeros(3, 4, dtype=torch.float64), torch.randn(3, 4, generator=gen(1), dtype=torch.float64)):
        W.requires_grad_()
        v = ga.jacobian_norm(lambda z: m * (z @ W.t()), x, **kw)
        (g,) = torch.autograd.grad(v.sum(), W)
        norm = W.detach().norm()
        torch.testing.assert_close(v, torch.stack([torch.zeros_like(norm), norm]), **F64)
        torch.testing.assert_close(g, W.detach() / norm if norm > 0 else torch.zeros_like(W), **F64)


def test_no_grad_mode_gives_detached_exact_result():
    """Under no_grad every estimator gives a detached value: with orthogonal probes spanning the probe
    space, the exact mean norm from torch.autograd.functional.jacobian."""
    name, model, x = CASES[0]
    C, D = _dims(model, x)
    want = exact_sq_norms(model, x).sqrt().mean()
    for estimator, kw in (("forward", dict(probes="orthogonal", num_probes=D)),
                          ("reverse", dict(probes="orthogonal", num_probes=C)), ("exact", {})):
        with torch.no_grad():
            v = ga.jacobian_norm(model, x, estimator=estimator, generator=gen(2), **kw)
        assert not v.requires_grad
        torch.testing.assert_close(v, want, **F64)


def test_jacobian_with_respect_to_non_leaf_embeddings_flows_to_embedding_table():
    """The penalty's gradients reach the embedding table through the non-leaf input e = emb(tokens):
    equal to the gradients of mean_b ||J_b||_F with J_b from
    torch.autograd.functional.jacobian(create_graph=True), float64 (orthogonal probes spanning the two
    outputs make the reverse estimator exact)."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4).double()
    head = nn.Linear(4 * 3, 2).double()
    tokens = torch.randint(0, 10, (5, 3))
    params = [emb.weight, head.weight, head.bias]

    def f(z):
        return torch.tanh(head(z.flatten(1)))

    pen = ga.jacobian_norm(f, emb(tokens), estimator="reverse", probes="orthogonal", num_probes=2, generator=gen(0))
    want = exact_jacobians(f, emb(tokens), create_graph=True).pow(2).sum((1, 2)).sqrt().mean()
    assert_close_all(torch.autograd.grad(pen, params), torch.autograd.grad(want, params))


# ---------------------------------------------------------------- bad input


def _lin(z):
    return z @ torch.ones(z.shape[-1], 2, dtype=z.dtype)


def test_integer_x_rejected():
    with pytest.raises(TypeError, match=r"\bx\b.*floating-point"):
        ga.jacobian_norm(_lin, torch.ones(3, 4, dtype=torch.long))


def test_x_without_batch_dimension_rejected():
    with pytest.raises(ValueError, match=r"x must have a batch dimension"):
        ga.jacobian_norm(_lin, torch.ones(4, dtype=torch.float64))


def test_f_returning_one_number_rejected():
    for estimator in ("reverse", "forward", "exact"):
        with pytest.raises(ValueError, match=r"f\(x\) returned a single number"):
            ga.jacobian_norm(lambda z: z.pow(2).sum(), torch.ones(3, 4), estimator=estimator)


def test_f_changing_batch_size_rejected():
    for estimator in ("reverse", "forward", "exact"):
        with pytest.raises(ValueError, match=r"f\(x\) changed the batch size"):
            ga.jacobian_norm(lambda z: z[:2], torch.ones(3, 4), estimator=estimator)


@pytest.mark.parametrize("k", [0, -1])
def test_num_probes_below_one_rejected(k):
    with pytest.raises(ValueError, match=r"num_probes must be >= 1"):
        ga.jacobian_norm(_lin, torch.ones(3, 4), num_probes=k)


def test_non_integer_num_probes_rejected():
    with pytest.raises(TypeError, match=r"num_probes"):
        ga.jacobian_norm(_lin, torch.ones(3, 4), num_probes=2.0)


def test_unknown_estimator_backend_probes_reduction_rejected():
    x = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"estimator must be one of"):
        ga.jacobian_norm(_lin, x, estimator="hutch")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        ga.jacobian_norm(_lin, x, backend="cuda")
    with pytest.raises(ValueError, match=r"probes must be one of"):
        ga.jacobian_norm(_lin, x, probes="normal")
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        ga.jacobian_norm(_lin, x, reduction="max")


def test_orthogonal_probes_beyond_dimension_rejected():
    with pytest.raises(ValueError, match=r"num_probes=5 exceeds the probe dimension 4"):
        ga.jacobian_norm(_lin, torch.ones(3, 4), estimator="forward", probes="orthogonal", num_probes=5)


@pytest.mark.parametrize("estimator", ["reverse", "forward", "exact"])
def test_non_finite_jacobian_rejected(estimator):
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"not finite .*sample\(s\) \[1\]"):
        ga.jacobian_norm(lambda z: torch.sqrt(z), x, estimator=estimator)


def test_f_not_callable_and_no_graph_rejected():
    with pytest.raises(TypeError, match=r"f must be callable"):
        ga.jacobian_norm(3, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"does not depend differentiably on x"):
        ga.jacobian_norm(lambda z: z.detach() * 2, torch.ones(3, 4))


def test_generator_type_checked():
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator"):
        ga.jacobian_norm(_lin, torch.ones(3, 4), generator=0)


def test_safe_sqrt_value_and_gradient_including_zero():
    from grokalign_fast.jacobian import safe_sqrt

    v = torch.tensor([0.0, 0.25, 4.0, 0.0, 1e-300], dtype=torch.float64, requires_grad=True)
    out = safe_sqrt(v)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 2.0, 0.0, 1e-150], dtype=torch.float64), rtol=0, atol=0)
    (g,) = torch.autograd.grad(out.sum(), v)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, torch.tensor([0.0, 1.0, 0.25, 0.0, 0.5e150], dtype=torch.float64))
    pos = torch.tensor([0.3, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(safe_sqrt, (pos,))
    assert safe_sqrt(torch.tensor([4.0], dtype=torch.bfloat16)).dtype == torch.bfloat16
    # nan (and a negative value, which no squared norm is) is not hidden behind a 0
    assert torch.isnan(safe_sqrt(torch.tensor([float("nan"), -1.0, 1.0]))[:2]).all()
    assert torch.isinf(safe_sqrt(torch.tensor([float("inf")]))).all()

