"""GrokAlign: one model pass for output and penalty, schedules, fused backends vs the reference."""
import math

import pytest
import torch
from torch import nn

import grokalign_fast as ga
from grokalign_fast import _backends, regularizer
from grokalign_fast.regularizer import GrokAlign
from grokalign_fast.ops.mlp import model as mlp_model
from grokalign_fast.ops.mlp import reverse as mlp_reverse
from models import SmallCNN, exact_sq_norms, mlp

CPP = _backends.cpp_unavailable_reason() is None


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _fused_backends():
    out = []
    if _backends.cpp_unavailable_reason() is None and hasattr(torch.ops.grokalign, "dual_linear"):
        out.append("cpp")
    if _backends.triton_unavailable_reason(torch.device("cpu")) is None:
        out.append("triton")
    return out


FUSED = _fused_backends()


@pytest.mark.parametrize("estimator", ["reverse", "forward", "exact"])
@pytest.mark.parametrize("squared", [False, True])
def test_output_and_penalty_match_jacobian_norm(estimator, squared):
    model = mlp([9, 8, 6, 4], nn.GELU)
    x = torch.randn(5, 9, dtype=torch.float64)
    reg = GrokAlign(model, 0.25, estimator=estimator, num_probes=2, squared=squared, backend="reference",
                    generator=_gen(1))
    out, pen = reg(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    ref = ga.jacobian_norm(model, x, estimator=estimator, num_probes=2, squared=squared, generator=_gen(1))
    torch.testing.assert_close(pen, 0.25 * ref, rtol=1e-13, atol=0)
    assert pen.requires_grad and reg.last_backend == "reference"
    torch.testing.assert_close(reg.last_norm, ref.detach())


@pytest.mark.parametrize("estimator", ["reverse", "forward", "exact"])
def test_model_runs_once(estimator):
    model = mlp([9, 8, 4], nn.ReLU)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    reg = GrokAlign(model, 1.0, estimator=estimator, backend="reference")
    out, pen = reg(torch.randn(3, 9, dtype=torch.float64))
    (out.sum() + pen).backward()
    assert len(calls) == 1


def test_eval_mode_and_zero_weight_do_no_penalty_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("penalty work was done")

    monkeypatch.setattr(regularizer, "sq_norm_estimate", fail)
    monkeypatch.setattr(regularizer.mlp_model, "dual_forward", fail)
    model = mlp([4, 5, 3])
    x = torch.randn(2, 4, dtype=torch.float64)
    reg = GrokAlign(model, 1.0).eval()
    out, pen = reg(x)
    assert pen.item() == 0.0 and not pen.requires_grad and reg.last_norm is None
    torch.testing.assert_close(out, model(x))
    reg = GrokAlign(model, 0.0)
    assert reg(x)[1].item() == 0.0
    with torch.no_grad():
        assert GrokAlign(model, 1.0)(x)[1].item() == 0.0


def test_target_level_penalty():
    model = mlp([6, 7, 3], nn.Tanh)
    x = torch.randn(4, 6, dtype=torch.float64)
    norm = ga.jacobian_norm(model, x, estimator="exact")
    for level in (0.0, 0.5 * norm.item(), 2 * norm.item()):
        reg = GrokAlign(model, 0.1, estimator="exact", target=level)
        torch.testing.assert_close(reg(x)[1], 0.1 * (level - norm).abs())


def test_every_n_steps_scaled_by_n():
    model = mlp([6, 7, 3], nn.Tanh)
    x = torch.randn(4, 6, dtype=torch.float64)
    full = GrokAlign(model, 0.1, estimator="exact")(x)[1]
    reg = GrokAlign(model, 0.1, estimator="exact", every=3)
    pens = [reg(x)[1] for _ in range(7)]
    for i, p in enumerate(pens):
        if i % 3 == 0:
            torch.testing.assert_close(p, 3 * full)
        else:
            assert p.item() == 0.0 and reg.step == 7


def test_subsample_is_unbiased_for_the_batch_mean():
    model = mlp([6, 9, 3], nn.GELU)
    x = torch.randn(10, 6, dtype=torch.float64)
    full = GrokAlign(model, 1.0, estimator="exact", squared=True)(x)[1].item()
    reg = GrokAlign(model, 1.0, estimator="exact", squared=True, subsample=0.3, generator=_gen(2))
    vals = torch.tensor([reg(x)[1].item() for _ in range(400)])
    se = vals.std() / math.sqrt(len(vals))
    assert abs(vals.mean().item() - full) <= 5 * se.item()
    assert vals.std() > 0  # the subsets really differ
    out, _ = reg(x)
    assert out.shape == (10, 3)
    torch.testing.assert_close(GrokAlign(model, 1.0, estimator="exact", subsample=1.0)(x)[1],
                               GrokAlign(model, 1.0, estimator="exact")(x)[1])


ACT_MODULES = [nn.ReLU(), nn.LeakyReLU(0.2), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Tanh(),
               nn.Sigmoid(), nn.Identity()]


def _fused_model(act, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 11, bias=bias), act, nn.Dropout(0.0),
                         nn.Linear(11, 7, bias=bias), act, nn.Linear(7, 5, bias=bias)).double()


def _step(model, x, **kw):
    model.zero_grad()
    reg = GrokAlign(model, 0.3, estimator="forward", **kw)
    out, pen = reg(x)
    (out.pow(2).sum() + pen).backward()
    return reg, out.detach(), pen.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("act", ACT_MODULES, ids=lambda m: repr(m))
@pytest.mark.parametrize("subsample", [None, 0.5])
def test_fused_backend_equals_reference_float64(backend, act, subsample):
    """Same generator state -> same probes -> same penalty and gradients (float64, 1e-10)."""
    model = _fused_model(act, bias=not isinstance(act, nn.Tanh))
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    kw = dict(num_probes=2, probes="rademacher", subsample=subsample, squared=isinstance(act, nn.SiLU))
    reg_ref, out_ref, pen_ref, g_ref = _step(model, x, backend="reference", generator=_gen(5), **kw)
    reg, out, pen, g = _step(model, x, backend=backend, generator=_gen(5), **kw)
    assert reg.last_backend == backend and reg_ref.last_backend == "reference"
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pen, pen_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_float32_close_to_float64_reference(backend):
    model = _fused_model(nn.GELU())
    x = torch.randn(6, 12, dtype=torch.float64)
    # Rademacher probes are the same numbers in every dtype.
    _, _, pen64, g64 = _step(model, x, backend="reference", generator=_gen(5), num_probes=1, probes="rademacher")
    model32 = _fused_model(nn.GELU()).float()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    gen = _gen(5)
    reg = GrokAlign(model32, 0.3, estimator="forward", backend=backend, generator=gen, probes="rademacher")
    out, pen = reg(x.float())
    (out.pow(2).sum() + pen).backward()
    torch.testing.assert_close(pen.double(), pen64, rtol=1e-5, atol=0)
    for a, b in zip(model32.parameters(), g64):
        torch.testing.assert_close(a.grad.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("backend", FUSED)
def test_fused_dropout_shares_masks_between_primal_and_tangent(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Dropout(0.5), nn.Linear(40, 1, bias=False)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    reg = GrokAlign(model, 1.0, estimator="forward", backend=backend, probes="orthogonal", num_probes=6,
                    squared=True, generator=_gen(0))
    torch.manual_seed(3)
    out, pen = reg(x)
    # With the mask m drawn by the fused pass, f(x) = w^T (m * relu(W x + b)): J = (w * m * [z>0])^T W exactly.
    torch.manual_seed(3)
    keep = (torch.rand(5, 40) >= 0.5).double() * 2
    z = x @ model[0].weight.t() + model[0].bias
    J = (model[3].weight * keep * (z > 0)).unsqueeze(1) @ model[0].weight  # [5, 1, 6]
    torch.testing.assert_close(out, (torch.relu(z) * keep) @ model[3].weight.t())
    torch.testing.assert_close(pen, J.pow(2).sum((1, 2)).mean(), rtol=1e-10, atol=1e-12)


def test_auto_uses_a_fused_backend_when_it_can():
    model = _fused_model(nn.ReLU())
    reg = GrokAlign(model, 0.1, estimator="forward")
    reg(torch.randn(3, 12, dtype=torch.float64))
    expected = "cpp" if "cpp" in FUSED else "reference"  # auto never picks the Triton interpreter
    assert reg.last_backend == expected


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_explicit_fused_backend_on_unsupported_model_raises_with_reason(backend):
    x = torch.randn(2, 2, 5, 7, dtype=torch.float64)
    with pytest.raises(_backends.BackendUnavailableError, match=r"SmallCNN"):
        GrokAlign(SmallCNN().double(), 0.1, estimator="forward", backend=backend)(x)
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 3)).double()
    with pytest.raises(_backends.BackendUnavailableError, match=r"must directly follow an nn.Linear"):
        GrokAlign(model, 0.1, estimator="forward", backend=backend)(torch.randn(2, 4, dtype=torch.float64))
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    with pytest.raises(_backends.BackendUnavailableError, match=r"LayerNorm"):
        GrokAlign(model, 0.1, estimator="forward", backend=backend)(torch.randn(2, 4, dtype=torch.float64))


def test_unsupported_model_falls_back_to_reference_under_auto():
    model = SmallCNN().double()
    x = torch.randn(2, 2, 5, 7, dtype=torch.float64)
    reg = GrokAlign(model, 0.1, estimator="forward")
    _, pen = reg(x)
    assert reg.last_backend == "reference"
    torch.testing.assert_close(pen.detach(), 0.1 * exact_sq_norms(model, x).sqrt().mean(), rtol=2.0, atol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=-1.0), r"weight must be a finite number >= 0"),
        (dict(weight="a"), r"weight must be a real number"),
        (dict(weight=1.0, estimator="jvp"), r"estimator must be one of"),
        (dict(weight=1.0, num_probes=0), r"num_probes must be >= 1"),
        (dict(weight=1.0, subsample=0.0), r"subsample must be a fraction in \(0, 1\]"),
        (dict(weight=1.0, every=0), r"every must be an int >= 1"),
        (dict(weight=1.0, backend="gpu"), r"backend must be one of"),
        (dict(weight=1.0, probes="uniform"), r"probes must be one of"),
        (dict(weight=1.0, target=-2.0), r"target must be a finite number >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GrokAlign(mlp([3, 2]), **kwargs)


def test_bad_input_through_module():
    reg = GrokAlign(mlp([3, 2]), 0.1)
    with pytest.raises(TypeError, match=r"\bx\b.*floating-point"):
        reg(torch.ones(2, 3, dtype=torch.long))
    reg = GrokAlign(mlp([3, 4, 2], nn.Tanh), 0.1)  # J depends on x: a nan input gives a nan Jacobian
    with pytest.raises(FloatingPointError, match="not finite"):
        reg(torch.tensor([[1.0, float("nan"), 0.0]], dtype=torch.float64))
    for squared in (False, True):  # an overflowing Jacobian is caught on every path, sqrt or not
        for estimator in ("forward", "reverse"):
            big = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
            with torch.no_grad():
                big[0].weight.fill_(1e30)
                big[2].weight.fill_(1e30)
            reg = GrokAlign(big, 0.1, estimator=estimator, squared=squared)
            with pytest.raises(FloatingPointError, match="not finite"):
                reg(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\bx\b has an empty batch"):
        reg(torch.ones(0, 3, dtype=torch.float64))
    for estimator in ("forward", "reverse"):
        reg = GrokAlign(nn.Sequential(nn.Flatten(), nn.Linear(0, 2)).double(), 0.1, estimator=estimator)
        with pytest.raises(ValueError, match=r"\bx\b has no features per sample \(shape \[2, 3, 0\]\)"):
            reg(torch.ones(2, 3, 0, dtype=torch.float64))


PL_ACTS = [nn.ReLU(), nn.LeakyReLU(0.1), nn.Identity()]


@pytest.mark.parametrize("act", PL_ACTS, ids=repr)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("subsample", [None, 0.5])
@pytest.mark.parametrize("squared", [False, True])
def test_one_pass_reverse_mlp_equals_autograd_reverse(act, bias, subsample, squared):
    """The one-pass output-space path (tangent along J^T u + outer products) == double backward, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 11, bias=bias), act, nn.Linear(11, 7, bias=bias), act,
                          nn.Dropout(0.3), nn.Linear(7, 5, bias=bias)).double().eval()
    model.train()  # dropout in training is refused by the one-pass path: eval it, but keep GrokAlign training
    model[5].p = 0.0
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    res = {}
    for be in ("reference", "auto"):
        model.zero_grad()
        x.grad = None
        reg = GrokAlign(model, 0.3, estimator="reverse", num_probes=3, subsample=subsample, squared=squared,
                        backend=be, generator=_gen(3))
        out, pen = reg(x)
        (out.pow(2).sum() + pen).backward()
        res[be] = (reg.last_backend, out.detach(), pen.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()])
    # auto runs the C++ op grokalign::reverse_mlp when the extension is built, else the Python one-pass path.
    assert res["reference"][0] == "reference" and res["auto"][0] == ("cpp" if CPP else "reverse_mlp")
    for a, b in zip(res["auto"][1:4], res["reference"][1:4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(res["auto"][4], res["reference"][4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("act", PL_ACTS, ids=repr)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("index", [None, [4, 0, 4, 2]])
@pytest.mark.parametrize("outputs", ["both", "est", "y"])
def test_reverse_mlp_cpp_op_equals_python_one_pass(act, bias, index, outputs):
    """grokalign::reverse_mlp (C++) == the Python one-pass path: outputs and every gradient, float64,
    with a repeated row in index and with only one of the two outputs used."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(9, 8, bias=bias), act, nn.Linear(8, 6, bias=bias), act,
                          nn.Linear(6, 3, bias=bias)).double()
    steps, _ = mlp_model.plan(model)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    idx = None if index is None else torch.tensor(index)
    U = torch.randn(2, 5 if idx is None else len(index), 3, dtype=torch.float64)
    params = [x] + list(model.parameters())
    got = {}
    for impl in ("cpp", "python"):
        y, est = mlp_reverse.reverse_forward(steps, x, U, idx, implementation=impl)
        gy, ge = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y), torch.linspace(0.5, 2, est.numel(),
                                                                                               dtype=y.dtype)
        loss = {"both": (y * gy).sum() + (est * ge).sum(), "est": (est * ge).sum(), "y": (y * gy).sum()}[outputs]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        got[impl] = [y, est] + [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    for a, b in zip(got["cpp"], got["python"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_reverse_mlp_cpp_op_checks_its_arguments():
    w = [torch.randn(4, 3), torch.randn(2, 4)]
    x, u = torch.randn(5, 3), torch.randn(1, 5, 2)
    op = torch.ops.grokalign.reverse_mlp
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have shape \[OUT, 4\]"):
        op(x, u, None, [w[0], torch.randn(2, 3)], [], [False, False], [1, 0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="piecewise-linear activation code"):
        op(x, u, None, w, [], [False, False], [3, 0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="u must have shape"):
        op(x, torch.randn(1, 5, 3), None, w, [], [False, False], [1, 0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="pass index"):
        op(x, torch.randn(1, 4, 2), None, w, [], [False, False], [1, 0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="index must be a long tensor"):
        op(x, torch.randn(1, 2, 2), torch.tensor([0, 1], dtype=torch.int32), w, [], [False, False], [1, 0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="has_bias marks"):
        op(x, u, None, w, [], [True, False], [1, 0], [0.0, 0.0])


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_reverse_mlp_cpp_op_passes_opcheck_and_compiles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3, bias=False)).double()
    steps, _ = mlp_model.plan(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    U = torch.randn(1, 2, 3, dtype=torch.float64)
    idx = torch.tensor([3, 1])
    weights = [model[0].weight, model[2].weight]
    args = (x, U, idx, weights, [model[0].bias], [True, False], [1, 0], [0.0, 0.0])
    torch.library.opcheck(torch.ops.grokalign.reverse_mlp.default, args)

    def f(x):
        y, est = mlp_reverse.reverse_forward(steps, x, U, idx, implementation="cpp")
        return y.sum() + est.sum()

    eager = torch.autograd.grad(f(x), weights)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), weights)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_one_pass_reverse_mlp_refuses_smooth_activations_and_training_dropout():
    reg = GrokAlign(_fused_model(nn.GELU()), 0.1, estimator="reverse")
    reasons = reg.fused_unavailable_reasons(torch.randn(2, 12, dtype=torch.float64))
    assert "piecewise-linear" in reasons["reverse_mlp"]
    reg(torch.randn(2, 12, dtype=torch.float64))
    assert reg.last_backend == "reference"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    reg = GrokAlign(model, 0.1, estimator="reverse")
    assert "dropout" in reg.fused_unavailable_reasons(torch.randn(2, 4, dtype=torch.float64))["reverse_mlp"]
    # backend="cpp" with the reverse estimator is the op grokalign::reverse_mlp: same limits.
    with pytest.raises(_backends.BackendUnavailableError, match="dropout"):
        GrokAlign(model, 0.1, estimator="reverse", backend="cpp")(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(_backends.BackendUnavailableError, match="forward"):
        GrokAlign(model, 0.1, estimator="reverse", backend="triton")(torch.randn(2, 4, dtype=torch.float64))


def test_auto_estimator_picks_the_smaller_probe_space():
    x = torch.randn(3, 12, dtype=torch.float64)
    reg = GrokAlign(_fused_model(nn.ReLU()), 0.1, estimator="auto")  # 12 inputs, 5 outputs
    reg(x)
    assert reg.estimator == "reverse" and reg.requested_estimator == "auto"
    wide_out = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 20)).double()
    reg = GrokAlign(wide_out, 0.1, estimator="auto")
    reg(torch.randn(3, 3, dtype=torch.float64))
    assert reg.estimator == "forward"
    reg = GrokAlign(SmallCNN().double(), 0.1, estimator="auto")  # not an MLP: sizes from one forward
    reg(torch.randn(2, 2, 5, 7, dtype=torch.float64))
    assert reg.estimator == "reverse"


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("act", PL_ACTS, ids=repr)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("index", [None, [4, 0, 4, 2]])
@pytest.mark.parametrize("outputs", ["both", "sq", "y"])
def test_whole_mlp_op_equals_layer_by_layer_ops(act, bias, index, outputs):
    """grokalign::dual_mlp_sqnorm (one call, stacked rows) == the per-layer dual_linear ops: outputs and
    every gradient (x, weights, biases), float64, K = 2 probes, a repeated row in index."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(9, 8, bias=bias), act, nn.Linear(8, 6, bias=bias), act,
                          nn.Linear(6, 3, bias=bias), act).double()
    steps, _ = mlp_model.plan(model)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    idx = None if index is None else torch.tensor(index)
    V = torch.randn(2, 5 if idx is None else len(index), 9, dtype=torch.float64)
    assert mlp_model.whole_mlp_reason(steps, True, x) is None
    params = [x] + list(model.parameters())
    got = {}
    for checked in (True, False):  # checked + cpp: the whole-MLP op; unchecked: layer by layer
        y, sq = mlp_model.dual_forward(steps, x, V, index=idx, backend="cpp", checked=checked)
        gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        gs = torch.linspace(0.5, 2, sq.numel(), dtype=y.dtype)
        loss = {"both": (y * gy).sum() + (sq * gs).sum(), "sq": (sq * gs).sum(), "y": (y * gy).sum()}[outputs]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        got[checked] = [y, sq] + [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_whole_mlp_op_opcheck_compile_and_limits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(0.2), nn.Linear(5, 3, bias=False)).double()
    steps, _ = mlp_model.plan(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    V = torch.randn(1, 2, 6, dtype=torch.float64)
    idx = torch.tensor([3, 1])
    weights = [model[0].weight, model[2].weight]
    args = (x, V, idx, weights, [model[0].bias], [True, False], [2, 0], [0.2, 0.0])
    torch.library.opcheck(torch.ops.grokalign.dual_mlp_sqnorm.default, args)

    def f(x):
        y, sq = mlp_model.dual_forward(steps, x, V, index=idx, backend="cpp", checked=True)
        return y.sum() + sq.sum()

    eager = torch.autograd.grad(f(x), weights)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), weights)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Smooth activations and training dropout stay on the per-layer ops, with the reason.
    gelu_steps, _ = mlp_model.plan(nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)))
    assert "piecewise-linear" in mlp_model.whole_mlp_reason(gelu_steps, True, x)
    drop_steps, _ = mlp_model.plan(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3)))
    assert "dropout" in mlp_model.whole_mlp_reason(drop_steps, True, x)
    assert mlp_model.whole_mlp_reason(drop_steps, False, x) is None
    op = torch.ops.grokalign.dual_mlp_sqnorm
    with pytest.raises(RuntimeError, match=r"v must have shape \[K, R, 6\] \(the MLP's inputs\)"):
        op(x, torch.randn(1, 4, 3, dtype=torch.float64), None, weights, [model[0].bias], [True, False], [2, 0],
           [0.2, 0.0])
    with pytest.raises(RuntimeError, match="piecewise-linear activation code"):
        op(x, V, idx, weights, [model[0].bias], [True, False], [5, 0], [0.2, 0.0])


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("op_name", ["dual_mlp_sqnorm", "reverse_mlp"])
@pytest.mark.parametrize("act", PL_ACTS, ids=repr)
@pytest.mark.parametrize("root", [False, True])
def test_whole_mlp_ops_aten_fallback_equals_cpu_loops(op_name, act, root):
    """The whole-MLP ops run their elementwise passes as CPU loops for float / double
    (csrc/common/pl_rows.h) and as ATen ops elsewhere (other devices, other dtypes). bfloat16 on
    the CPU takes the ATen path: from the same bfloat16 values, its outputs and gradients match
    the float64 loops up to bfloat16 rounding (a wrong slope row, a lost mask or a lost scale is an
    O(1) error)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(9, 8), act, nn.Linear(8, 7, bias=False), act, nn.Linear(7, 3)).double()
    steps, _ = mlp_model.plan(model)
    weights, biases, has_bias, acts, alphas = mlp_model.whole_mlp_op_args(steps)
    idx = torch.tensor([4, 0, 4, 2])
    x = torch.randn(5, 9, dtype=torch.float64)
    probes = torch.randn(2, 4, 9 if op_name == "dual_mlp_sqnorm" else 3, dtype=torch.float64)
    op = getattr(torch.ops.grokalign, op_name)
    got = {}
    for dtype in (torch.bfloat16, torch.float64):
        leaves = [t.detach().to(torch.bfloat16).to(dtype).requires_grad_(True) for t in [x] + weights + biases]
        xs, ws, bs = leaves[0], leaves[1:1 + len(weights)], leaves[1 + len(weights):]
        y, est, _ = op(xs, probes.to(torch.bfloat16).to(dtype), idx, ws, bs, has_bias, acts, alphas, root, 0.37)
        loss = y.sum() + est.sum()
        got[dtype] = [y, est] + list(torch.autograd.grad(loss, leaves))
    for a, b in zip(got[torch.bfloat16], got[torch.float64]):
        scale = b.abs().max().item() + 1e-3
        assert (a.double() - b).abs().max().item() <= 0.05 * scale


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("op_name", ["dual_mlp_sqnorm", "reverse_mlp"])
def test_whole_mlp_ops_refuse_an_out_of_range_index(op_name):
    w = [torch.randn(4, 3), torch.randn(2, 4)]
    x = torch.randn(5, 3)
    probes = torch.randn(1, 2, 3 if op_name == "dual_mlp_sqnorm" else 2)
    op = getattr(torch.ops.grokalign, op_name)
    for bad in ([0, 5], [-1, 2]):
        with pytest.raises(RuntimeError, match=r"index\[\d\] = -?\d is out of range for x with B=5 rows"):
            op(x, probes, torch.tensor(bad), w, [], [False, False], [1, 0], [0.0, 0.0])


@pytest.mark.parametrize("estimator", ["forward", "reverse"])
def test_copies_and_replaced_parameters_use_their_own_weights(estimator):
    """The path cache binds a plan (and, on the C++ paths, the op's layer arguments) to the model's
    parameters: a deep copy or a pickled module must run on its own weights, and a replaced
    parameter must be picked up."""
    import copy
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    reg = GrokAlign(model, 0.5, estimator=estimator, squared=True, generator=_gen(1))
    reg(x)
    buf = io.BytesIO()
    torch.save(reg, buf)
    buf.seek(0)
    for other in (copy.deepcopy(reg), torch.load(buf, weights_only=False)):
        with torch.no_grad():
            other.model[0].weight.mul_(3.0)
        other.generator = _gen(5)
        reg.generator = _gen(5)
        model.zero_grad()
        out, pen = other(x)
        (out.sum() + pen).backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad is not None for p in other.model.parameters())
        torch.testing.assert_close(out, other.model(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out, model(x))
    new_w = nn.Parameter(model[2].weight.detach() * 2)
    model[2].weight = new_w
    reg.generator = _gen(7)
    out, pen = reg(x)
    pen.backward()
    assert new_w.grad is not None
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["forward", "reverse", "exact"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_settings_changed_after_a_call_are_used(estimator, backend):
    """The per-call function cached for a path binds the probe settings: changing num_probes, probes,
    squared, subsample or the generator on a used regulariser gives what a new one with those settings
    gives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    reg = GrokAlign(model, 0.5, estimator=estimator, backend=backend, generator=_gen(1))
    reg(x)
    changes = [dict(num_probes=3), dict(probes="gaussian"), dict(squared=True), dict(subsample=0.5),
               dict(generator=_gen(2))]
    settings = dict(num_probes=1, probes="auto", squared=False, subsample=None)
    for change in changes:
        for name, value in change.items():
            setattr(reg, name, value)
        settings.update({k: v for k, v in change.items() if k != "generator"})
        before = reg.generator.get_state()
        _, got = reg(x)
        fresh = GrokAlign(model, 0.5, estimator=estimator, backend=backend, generator=torch.Generator(), **settings)
        fresh.generator.set_state(before)
        _, want = fresh(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        assert reg.last_backend == fresh.last_backend


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("op_name", ["dual_mlp_sqnorm", "reverse_mlp"])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whole_mlp_ops_primal_is_torchs_on_nonfinite_values(op_name, act, dtype):
    """The fused activation keeps torch's semantics: relu(-inf) = 0, relu(nan) = nan, leaky_relu(-inf) = -inf."""
    model = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 2, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
    steps, _ = mlp_model.plan(model)
    x = torch.tensor([[-math.inf, 1.0, -2.0], [math.nan, 0.5, 3.0], [math.inf, -1.0, 0.0]], dtype=dtype)
    probes = torch.randn(1, 3, 3 if op_name == "dual_mlp_sqnorm" else 2, dtype=dtype)
    y, _, _ = getattr(torch.ops.grokalign, op_name)(x, probes, None, *mlp_model.whole_mlp_op_args(steps))
    with torch.no_grad():
        torch.testing.assert_close(y, model(x), equal_nan=True)


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("op_name", ["dual_mlp_sqnorm", "reverse_mlp"])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1)], ids=repr)
def test_whole_mlp_ops_root_equals_safe_sqrt_of_the_estimate(op_name, act):
    """root=True returns sqrt(est) with the gradient of grokalign_fast.jacobian.safe_sqrt (0 at a zero
    estimate), in one pass: values and every gradient equal safe_sqrt(op(root=False)), float64,
    with a repeated index row and a zero probe (est = 0 on that row)."""
    from grokalign_fast.jacobian import safe_sqrt

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(9, 8), act, nn.Linear(8, 6, bias=False), act, nn.Linear(6, 3)).double()
    steps, _ = mlp_model.plan(model)
    weights, biases, has_bias, acts, alphas = mlp_model.whole_mlp_op_args(steps)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 0, 4, 2])
    probes = torch.randn(2, 4, 9 if op_name == "dual_mlp_sqnorm" else 3, dtype=torch.float64)
    probes[:, 1] = 0.0
    op = getattr(torch.ops.grokalign, op_name)
    params = [x] + weights + biases
    got = {}
    for root in (True, False):
        y, est, _ = op(x, probes, idx, weights, biases, has_bias, acts, alphas, root)
        norm = est if root else safe_sqrt(est)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + (norm * torch.arange(1.0, 5.0,
                                                                                                              dtype=y.dtype)).sum()
        got[root] = [y, norm] + list(torch.autograd.grad(loss, params))
    assert got[True][1][1] == 0 and all(torch.isfinite(g).all() for g in got[True][2:])
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    torch.library.opcheck(op.default, (x.detach(), probes, idx, weights, biases, has_bias, acts, alphas, True))


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("op_name", ["dual_mlp_sqnorm", "reverse_mlp"])
@pytest.mark.parametrize("root", [False, True])
def test_whole_mlp_ops_scale_multiplies_the_estimate_and_its_gradient(op_name, root):
    """scale=s returns s * est (or s * sqrt(est)) and the gradients of that: equal to the unscaled op's
    output times s, float64, with a zero probe row under root; opcheck with the scale."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(7, 6), nn.LeakyReLU(0.2), nn.Linear(6, 4, bias=False), nn.ReLU(),
                          nn.Linear(4, 3)).double()
    steps, _ = mlp_model.plan(model)
    weights, biases, has_bias, acts, alphas = mlp_model.whole_mlp_op_args(steps)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 4, 1])
    probes = torch.randn(2, 3, 7 if op_name == "dual_mlp_sqnorm" else 3, dtype=torch.float64)
    probes[:, 2] = 0.0
    op = getattr(torch.ops.grokalign, op_name)
    params = [x] + weights + biases
    gy = torch.linspace(-1, 1, 15, dtype=torch.float64).view(5, 3)
    got = {}
    for scale in (1.0, 0.37):
        y, est, _ = op(x, probes, idx, weights, biases, has_bias, acts, alphas, root, scale)
        pen = est if scale != 1.0 else 0.37 * est
        loss = (y * gy).sum() + (pen * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()
        got[scale] = [y, pen] + list(torch.autograd.grad(loss, params))
    for a, b in zip(got[0.37], got[1.0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.library.opcheck(op.default, (x.detach(), probes, idx, weights, biases, has_bias, acts, alphas, root, 0.37))


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
@pytest.mark.parametrize("estimator", ["forward", "reverse"])
@pytest.mark.parametrize("squared", [False, True])
def test_folded_weight_equals_the_reference_penalty_gradients_and_last_norm(estimator, squared):
    """backend="cpp" folds weight * every / R into the op and sums: penalty, every parameter gradient
    and last_norm equal the reference path's (mean, then weight) on the same probes, float64, with
    subsample and every; target= keeps the unfolded path and matches too."""
    import copy

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    for extra in (dict(subsample=0.5, every=2), dict(target=1.5)):
        res = {}
        for backend in ("cpp", "reference"):
            m = copy.deepcopy(model)
            reg = GrokAlign(m, 0.3, estimator=estimator, squared=squared, backend=backend, generator=_gen(8), **extra)
            out, pen = reg(x)
            grads = torch.autograd.grad(out.sum() + pen, list(m.parameters()))
            res[backend] = [out, pen, reg.last_norm] + list(grads)
            assert reg.last_backend == backend
        for a, b in zip(res["cpp"], res["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
        assert res["cpp"][2].requires_grad is False


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_a_weight_that_overflows_the_penalty_is_named():
    """float32, ||J||_F^2 ~ 1e13 and weight 1e38: the penalty overflows though every norm is finite."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e3)
        model[2].weight.fill_(1e3)
        model[0].bias.fill_(1.0)
    reg = GrokAlign(model, 1e38, estimator="forward", backend="cpp", squared=True)
    with pytest.raises(FloatingPointError, match=r"weight \* every / rows = .* makes it overflow"):
        reg(torch.ones(1, 3) * 1e3)
    reg = GrokAlign(model, 1e38, estimator="forward", backend="reference", squared=True)
    with pytest.raises(FloatingPointError, match="overflowed"):
        reg(torch.ones(2, 3) * 1e3)
