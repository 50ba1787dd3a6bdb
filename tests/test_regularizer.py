"""GrokAlign: one model pass for output and penalty, schedules, fused backends vs the reference."""
import math
import os
import re

import pytest
import torch
from torch import nn

import grokalign_fast as ga
from grokalign_fast import _backends
from grokalign_fast.regularizer import GrokAlign
from utils import F64, REL32, SmallCNN, assert_close_all, gen, grokalign_step, max_rel_err, mlp

CPP = _backends.cpp_unavailable_reason() is None


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
    model = mlp([9, 8, 6, 4], act=nn.GELU)
    x = torch.randn(5, 9, dtype=torch.float64)
    reg = GrokAlign(model, 0.25, estimator=estimator, num_probes=2, squared=squared, backend="reference",
                    generator=gen(1))
    out, pen = reg(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    ref = ga.jacobian_norm(model, x, estimator=estimator, num_probes=2, squared=squared, generator=gen(1))
    torch.testing.assert_close(pen, 0.25 * ref, **F64)
    assert pen.requires_grad and reg.last_backend == "reference"
    torch.testing.assert_close(reg.last_norm, ref.detach())


@pytest.mark.parametrize("estimator", ["reverse", "forward", "exact"])
def test_model_runs_once(estimator):
    model = mlp([9, 8, 4], act=nn.ReLU)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    reg = GrokAlign(model, 1.0, estimator=estimator, backend="reference")
    out, pen = reg(torch.randn(3, 9, dtype=torch.float64))
    (out.sum() + pen).backward()
    assert len(calls) == 1


def test_eval_mode_and_zero_weight_do_no_penalty_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("penalty work was done")

    monkeypatch.setattr(GrokAlign, "planner", fail)  # every penalty path starts there
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
    model = mlp([6, 7, 3], act=nn.Tanh)
    x = torch.randn(4, 6, dtype=torch.float64)
    norm = ga.jacobian_norm(model, x, estimator="exact")
    for level in (0.0, 0.5 * norm.item(), 2 * norm.item()):
        reg = GrokAlign(model, 0.1, estimator="exact", target=level)
        torch.testing.assert_close(reg(x)[1], 0.1 * (level - norm).abs())


def test_every_n_steps_scaled_by_n():
    model = mlp([6, 7, 3], act=nn.Tanh)
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
    model = mlp([6, 9, 3], act=nn.GELU)
    x = torch.randn(10, 6, dtype=torch.float64)
    full = GrokAlign(model, 1.0, estimator="exact", squared=True)(x)[1].item()
    reg = GrokAlign(model, 1.0, estimator="exact", squared=True, subsample=0.3, generator=gen(2))
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


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("act", ACT_MODULES, ids=lambda m: repr(m))
@pytest.mark.parametrize("subsample", [None, 0.5])
def test_fused_backend_equals_reference_float64(backend, act, subsample):
    """Same generator state -> same probes -> same penalty and gradients (float64, 1e-10)."""
    model = _fused_model(act, bias=not isinstance(act, nn.Tanh))
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    kw = dict(num_probes=2, probes="rademacher", subsample=subsample, squared=isinstance(act, nn.SiLU))
    reg_ref, out_ref, pen_ref, g_ref = grokalign_step(model, x, estimator="forward", backend="reference",
                                                      generator=gen(5), **kw)
    reg, out, pen, g = grokalign_step(model, x, estimator="forward", backend=backend, generator=gen(5), **kw)
    assert reg.last_backend == backend and reg_ref.last_backend == "reference"
    torch.testing.assert_close(out, out_ref, **F64)
    torch.testing.assert_close(pen, pen_ref, **F64)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_float32_close_to_float64_reference(backend):
    model = _fused_model(nn.GELU())
    x = torch.randn(6, 12, dtype=torch.float64)
    # Rademacher probes are the same numbers in every dtype.
    _, _, pen64, g64 = grokalign_step(model, x, estimator="forward", backend="reference", generator=gen(5),
                                      probes="rademacher")
    model32 = _fused_model(nn.GELU()).float()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    _, _, pen, g = grokalign_step(model32, x.float(), estimator="forward", backend=backend, generator=gen(5),
                                  probes="rademacher")
    assert pen.dtype == torch.float32 and max_rel_err(pen, pen64) <= REL32
    for a, b in zip(g, g64):
        assert a.dtype == torch.float32 and max_rel_err(a, b) <= REL32


@pytest.mark.parametrize("backend", FUSED)
def test_fused_dropout_shares_masks_between_primal_and_tangent(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Dropout(0.5), nn.Linear(40, 1, bias=False)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    reg = GrokAlign(model, 1.0, estimator="forward", backend=backend, probes="orthogonal", num_probes=6,
                    squared=True, generator=gen(0))
    torch.manual_seed(3)
    out, pen = reg(x)
    # With the mask m drawn by the fused pass, f(x) = w^T (m * relu(W x + b)): J = (w * m * [z>0])^T W exactly.
    torch.manual_seed(3)
    keep = (torch.rand(5, 40) >= 0.5).double() * 2
    z = x @ model[0].weight.t() + model[0].bias
    J = (model[3].weight * keep * (z > 0)).unsqueeze(1) @ model[0].weight  # [5, 1, 6]
    torch.testing.assert_close(out, (torch.relu(z) * keep) @ model[3].weight.t())
    torch.testing.assert_close(pen, J.pow(2).sum((1, 2)).mean(), **F64)


def test_auto_uses_a_fused_backend_when_it_can():
    model = _fused_model(nn.ReLU())
    reg = GrokAlign(model, 0.1, estimator="forward")
    reg(torch.randn(3, 12, dtype=torch.float64))
    expected = "cpp" if "cpp" in FUSED else "dual"  # auto never picks the Triton interpreter
    assert reg.last_backend == expected


def _off_chain_models():
    """(model, input, what the MLP-chain check names): models the fused MLP ops cannot run."""
    return [
        (SmallCNN().double(), torch.randn(2, 2, 5, 7, dtype=torch.float64), r"SmallCNN"),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 3)).double(), torch.randn(2, 4, dtype=torch.float64),
         r"must directly follow an nn.Linear"),
        (nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double(),
         torch.randn(2, 4, dtype=torch.float64), r"LayerNorm"),
    ]


def test_explicit_triton_backend_off_the_mlp_chains_runs_the_engine_with_the_triton_epilogues():
    """backend="triton" runs models the per-layer Triton MLP ops cannot on the dual-stream engine with
    the Triton epilogues (its description says why the MLP ops could not), equal to backend="dual" on
    the same probes, float64; where Triton cannot run on the device (the CPU without the interpreter)
    it raises, naming the reason."""
    reason = _backends.triton_unavailable_reason(torch.device("cpu"))
    for model, x, why in _off_chain_models():
        if reason is not None:
            with pytest.raises(_backends.BackendUnavailableError, match=re.escape(reason)):
                GrokAlign(model, 0.1, estimator="forward", backend="triton")(x)
            continue
        results = {}
        for backend in ("triton", "dual"):
            reg, out, pen, grads = grokalign_step(model, x, estimator="forward", backend=backend, generator=gen(2))
            assert reg.last_backend == backend
            results[backend] = [out, pen] + grads
        plan = GrokAlign(model, 0.1, estimator="forward", backend="triton").explain(x)
        assert "Triton epilogues" in plan.description and re.search(why, plan.description)
        assert_close_all(results["triton"], results["dual"])
    cnn = GrokAlign(SmallCNN().double(), 0.1, estimator="forward", backend="triton")
    if reason is None:
        cnn(torch.randn(2, 2, 5, 7, dtype=torch.float64))
        counts = cnn.last_plan.counts
        assert counts["relu[triton]"] == counts["gelu[triton]"] == counts["max_pool[triton]"] == 1
        assert counts["probe_sqnorm[triton]"] == 1


def test_auto_never_picks_the_triton_interpreter_off_the_mlp_chains(monkeypatch):
    """Under the interpreter "triton" could serve a CNN, but "auto" takes the next backend; the order
    is cpp, triton, dual, reference."""
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    plan = GrokAlign(SmallCNN().double(), 0.1, estimator="forward").explain(torch.randn(2, 2, 5, 7,
                                                                                        dtype=torch.float64))
    assert plan.backend == ("cpp" if CPP else "dual")
    assert plan.reasons["triton"] == _backends.triton_unavailable_reason(torch.device("cpu"))


def test_explicit_cpp_backend_off_the_mlp_chains_runs_the_engine_with_the_epilogues():
    """backend="cpp" runs models the fused MLP ops cannot on the dual-stream engine with the extension's
    epilogues (its description says why the fused ops could not), equal to backend="dual" on the same
    probes; without the extension it raises, naming it."""
    for model, x, why in _off_chain_models():
        if not CPP:
            with pytest.raises(_backends.BackendUnavailableError, match=r"extension"):
                GrokAlign(model, 0.1, estimator="forward", backend="cpp")(x)
            continue
        results = {}
        for backend in ("cpp", "dual"):
            reg, out, pen, grads = grokalign_step(model, x, estimator="forward", backend=backend, generator=gen(2))
            assert reg.last_backend == backend
            results[backend] = [out, pen] + grads
        desc = GrokAlign(model, 0.1, estimator="forward", backend="cpp").explain(x).description
        assert "epilogues" in desc and re.search(why, desc)
        assert_close_all(results["cpp"], results["dual"])


def test_unsupported_model_falls_back_to_reference_under_auto():
    """The reverse estimator on a model no one-pass path runs (a CNN) falls back to the reference under
    auto: the penalty jacobian_norm gives from the same generator state (the same probes), float64."""
    model = SmallCNN().double()
    x = torch.randn(2, 2, 5, 7, dtype=torch.float64)
    reg = GrokAlign(model, 0.1, estimator="reverse", generator=gen(4))
    _, pen = reg(x)
    assert reg.last_backend == "reference"
    torch.testing.assert_close(pen, 0.1 * ga.jacobian_norm(model, x, estimator="reverse", generator=gen(4)), **F64)


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
    reg = GrokAlign(mlp([3, 4, 2], act=nn.Tanh), 0.1)  # J depends on x: a nan input gives a nan Jacobian
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
    reg = GrokAlign(model, 0.5, estimator=estimator, squared=True, generator=gen(1))
    reg(x)
    buf = io.BytesIO()
    torch.save(reg, buf)
    buf.seek(0)
    for other in (copy.deepcopy(reg), torch.load(buf, weights_only=False)):
        with torch.no_grad():
            other.model[0].weight.mul_(3.0)
        other.generator = gen(5)
        reg.generator = gen(5)
        model.zero_grad()
        out, pen = other(x)
        (out.sum() + pen).backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad is not None for p in other.model.parameters())
        torch.testing.assert_close(out, other.model(x), **F64)
        assert not torch.allclose(out, model(x))
    new_w = nn.Parameter(model[2].weight.detach() * 2)
    model[2].weight = new_w
    reg.generator = gen(7)
    out, pen = reg(x)
    pen.backward()
    assert new_w.grad is not None
    torch.testing.assert_close(out, model(x), **F64)


@pytest.mark.parametrize("estimator", ["forward", "reverse", "exact"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_settings_changed_after_a_call_are_used(estimator, backend):
    """The per-call function cached for a path binds the probe settings: changing num_probes, probes,
    squared, subsample or the generator on a used regulariser gives what a new one with those settings
    gives."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    reg = GrokAlign(model, 0.5, estimator=estimator, backend=backend, generator=gen(1))
    reg(x)
    changes = [dict(num_probes=3), dict(probes="gaussian"), dict(squared=True), dict(subsample=0.5),
               dict(generator=gen(2))]
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
        torch.testing.assert_close(got, want, **F64)
        assert reg.last_backend == fresh.last_backend


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
            reg = GrokAlign(m, 0.3, estimator=estimator, squared=squared, backend=backend, generator=gen(8), **extra)
            out, pen = reg(x)
            grads = torch.autograd.grad(out.sum() + pen, list(m.parameters()))
            res[backend] = [out, pen, reg.last_norm] + list(grads)
            assert reg.last_backend == backend
        for a, b in zip(res["cpp"], res["reference"]):
            torch.testing.assert_close(a, b, **F64)
        assert res["cpp"][2].requires_grad is False


@pytest.mark.skipif(not CPP, reason="the C++ extension is not built")
def test_a_weight_that_overflows_the_penalty_is_named():
    """float32, ||J||_F^2 = 6 (4e6)^2 ~ 1e14 (every norm finite): weight 1e38 overflows each weighted
    value, weight 5e24 only their sum (2 x 2.4e38); each error names the weight."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e3)
        model[2].weight.fill_(1e3)
        model[0].bias.fill_(1.0)
    for backend in ("cpp", "reference"):
        reg = GrokAlign(model, 1e38, estimator="forward", backend=backend, squared=True)
        with pytest.raises(FloatingPointError, match=r"weight \* every = .* makes it overflow"):
            reg(torch.ones(2, 3) * 1e3)
    reg = GrokAlign(model, 5e24, estimator="forward", backend="reference", squared=True, probes="orthogonal",
                    num_probes=3)  # exact
    with pytest.raises(FloatingPointError, match=r"overflowed .* \(weight=5e\+24"):
        reg(torch.ones(2, 3) * 1e3)


_HOST_READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "cpu", "numpy")


@pytest.mark.parametrize("estimator,subsample", [("forward", None), ("reverse", 0.5), ("forward", 0.5)])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_a_default_training_step_reads_nothing_on_the_host(monkeypatch, model_name, estimator, subsample):
    """No host read of a tensor in a training step (the finite check reads at the first penalty and
    every check_every-th one): steps 1-3 run with every host read patched to fail."""
    if model_name == "mlp":
        model, x = mlp([5, 7, 3]), torch.randn(6, 5, dtype=torch.float64)
    else:
        from grokalign_fast.models import cnn6
        model, x = cnn6(2, 3, width=2, size=8).double(), torch.randn(4, 2, 8, 8, dtype=torch.float64)
    reg = GrokAlign(model, 0.1, estimator=estimator, subsample=subsample, generator=gen(0))
    reg(x)  # the first call reads once (the first finite check)
    reads = []
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def patched(self, *a, _name=name, _original=original, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, patched)
    for _ in range(3):
        out, pen = reg(x)
        (out.sum() + pen).backward()
    assert reads == []


def test_the_periodic_finite_check_names_the_calls_and_check_every_1_the_samples():
    model = mlp([3, 4, 2], act=nn.Tanh)
    good, bad = torch.randn(2, 3, dtype=torch.float64), torch.tensor([[1.0, float("nan"), 0.0]] * 2,
                                                                      dtype=torch.float64)
    reg = GrokAlign(model, 0.1, check_every=3)
    for _ in range(2):
        reg(good)
    reg(bad)  # the third penalty: not checked yet
    with pytest.raises(FloatingPointError, match=r"between calls 1 and 3 .*check_every=1"):
        reg(good)  # the fourth: the sum of the three since the last check is read
    reg = GrokAlign(model, 0.1, check_every=1)
    reg(good)
    with pytest.raises(FloatingPointError, match=r"not finite"):
        reg(bad)
