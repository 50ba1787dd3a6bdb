"""Whole models on the dual-stream engine and the planner's choice of path.

``GrokAlign(estimator="forward", backend="dual")`` (the engine's rules in plain PyTorch) and
``backend="cpp"`` (the engine with the extension's epilogues) and ``backend="triton"`` (with the
Triton epilogues, on the CPU under Triton's interpreter) against the reference path
(``backend="reference"``: torch.func.jvp, with the batch statistics held constant where the model
has BatchNorm in train mode) on the same probes, in float64: output, penalty, ``last_norm`` and
every parameter gradient to 1e-10, for the CNN and ResNet-18 of ``grokalign_fast.models`` in
train and eval mode, a custom ``forward`` with a skip connection and a ``torch.cat``, and a model
with a layer that has no rule (the fallback and its warning); ``"dual"`` against ``"cpp"`` and
``"triton"`` on a CNN with every epilogue the extension has.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grokalign_fast import BackendUnavailableError, GrokAlign, _backends, available_backends
from grokalign_fast.dual import SampleMixingError
from grokalign_fast.models import ResNet18, cnn6, mlp

from utils import DEVICES, F64, max_rel_err

DT = torch.float64
CPP = available_backends()["cpp"]
TRITON = _backends.triton_unavailable_reason(torch.device("cpu"))


class SkipCat(nn.Module):
    """A custom forward: a conv stem, a residual branch, a channel concat and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU())
        self.head = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.cat([h + self.branch(h), F.avg_pool2d(h, 1)], dim=1)
        return self.head(F.adaptive_max_pool2d(h, 3).flatten(1))


class WithUnsupported(nn.Module):
    """A layer the engine has no rule for (``torch.logsumexp`` inside a custom module)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        h = self.lin(x)
        return h * torch.logsumexp(h, dim=1, keepdim=True)


def _models():
    torch.manual_seed(0)
    return [
        ("cnn6_eval", cnn6(2, 5, width=2, size=8).double().eval(), (3, 2, 8, 8)),
        ("cnn6_bn_train", cnn6(2, 5, width=2, size=8, batch_norm=True).double().train(), (4, 2, 8, 8)),
        ("resnet18_train", ResNet18(3, 4, width=2).double().train(), (3, 3, 8, 8)),
        ("resnet18_eval", ResNet18(3, 4, width=2).double().eval(), (3, 3, 8, 8)),
        ("skip_cat", SkipCat().double(), (3, 2, 6, 6)),
        ("unsupported_layer", WithUnsupported().double(), (5, 6)),
    ]


def _step(model, x, backend, **kw):
    model = copy.deepcopy(model)
    reg = GrokAlign(model, 0.7, estimator="forward", backend=backend, generator=torch.Generator().manual_seed(3), **kw)
    reg.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, pen = reg(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=DT, device=out.device).view_as(out)
    grads = torch.autograd.grad((out * weights).sum() + pen, list(model.parameters()))
    return out, pen, reg.last_norm, grads, reg, model


@pytest.mark.parametrize("name,model,shape", _models(), ids=[m[0] for m in _models()])
@pytest.mark.parametrize("kw", [dict(), dict(subsample=0.5, squared=True)], ids=["all", "subsample-squared"])
@pytest.mark.parametrize("backend", ["dual", "cpp", "triton"])
def test_whole_model_on_the_engine_equals_the_reference(name, model, shape, kw, backend):
    if backend == "cpp" and CPP is not None:
        pytest.skip(CPP)
    if backend == "triton" and TRITON is not None:
        pytest.skip(TRITON)
    if backend == "triton" and kw:  # the interpreter is slow: a subsample is tested on the next test's CNN
        pytest.skip("the Triton epilogues with a subsample: test_the_epilogue_kernels_equal_the_plain_rules_...")
    x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    got = _step(model, x, backend, **kw)
    want = _step(model, x, "reference", **kw)
    assert got[4].last_backend == backend and want[4].last_backend == "reference"
    _assert_same_step(got, want, exact_buffers=backend == "dual")


def _assert_same_step(got, want, exact_buffers):
    """Output, penalty, ``last_norm`` and every parameter gradient of two :func:`_step` results to
    1e-10, and the running statistics (updated once by each): bit for bit where both take them from
    ATen's batch norm, else to 1e-10 (the extension sums the batch statistics in another order)."""
    for a, b in zip(got[:3], want[:3]):
        assert max_rel_err(a, b) < F64["rtol"]
    assert len(got[3]) == len(want[3])
    for a, b in zip(got[3], want[3]):
        assert max_rel_err(a, b) < F64["rtol"]
    for a, b in zip(got[5].buffers(), want[5].buffers()):
        assert torch.equal(a, b) if exact_buffers else max_rel_err(a, b) < F64["rtol"]


class EveryEpilogue(nn.Module):
    """A CNN through every epilogue of the extension: BatchNorm in train mode, GroupNorm, LayerNorm,
    RMSNorm, GELU (erf and tanh), SiLU, ReLU, leaky ReLU, tanh, sigmoid, ELU, softplus, an overlapping
    max-pool and an adaptive one."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)  # a bias before a batch norm has gradient 0
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(3, 6)
        self.bn3 = nn.BatchNorm1d(12)
        self.ln = nn.LayerNorm(12)
        self.rn = nn.RMSNorm(12)
        self.head = nn.Linear(12, 5)
        with torch.no_grad():
            for norm in (self.bn1, self.bn2, self.gn, self.bn3, self.ln, self.rn):
                norm.weight.uniform_(0.5, 1.5)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = F.gelu(self.bn1(self.c1(x)))
        h = F.max_pool2d(F.silu(h) + F.leaky_relu(h, 0.1), 3, stride=2, padding=1)  # overlapping windows
        h = F.gelu(self.gn(self.bn2(self.c2(h))), approximate="tanh")
        h = torch.tanh(F.adaptive_max_pool2d(torch.relu(h) + F.elu(h, 0.7), (1, 2))).flatten(1)
        return self.head(torch.sigmoid(self.bn3(h)) + F.softplus(self.ln(h), beta=2.0, threshold=1.0) + self.rn(h))


EPILOGUES = [("batch_norm", 3), ("gelu", 2), ("silu", 1), ("relu", 1), ("leaky_relu", 1), ("tanh", 1), ("sigmoid", 1),
             ("elu", 1), ("softplus", 1), ("max_pool", 2), ("group_norm", 1), ("layer_norm", 1), ("rms_norm", 1),
             ("probe_sqnorm", 1)]


def _epilogue_backends():
    """(backend, device) for every device present, skipped where the backend cannot run there (Triton
    on the CPU needs the interpreter)."""
    params = []
    for device in DEVICES:
        checks = (("cpp", _backends.cpp_unavailable_reason), ("triton", _backends.triton_unavailable_reason))
        for backend, check in checks:
            reason = check(torch.device(device))
            params.append(pytest.param(backend, device, id=f"{backend}-{device}",
                                       marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


@pytest.mark.parametrize("backend,device", _epilogue_backends())
@pytest.mark.parametrize("kw", [dict(), dict(subsample=0.5), dict(subsample=0.75, squared=True, num_probes=2)],
                         ids=["all", "subsample", "subsample-squared-K2"])
def test_the_epilogue_kernels_equal_the_plain_rules_on_a_whole_model(backend, device, kw):
    """``backend="cpp"`` (the engine with the extension's epilogues) and ``backend="triton"`` (with the
    Triton epilogues, every one of them) against ``backend="dual"`` (its rules in plain PyTorch) on the
    same probes and device, in float64: output, penalty, every parameter gradient and the running
    statistics to 1e-10; every epilogue counted as the kernel's on one side only."""
    torch.manual_seed(4)
    model = EveryEpilogue().double().train().to(device)
    x = torch.randn(6, 2, 7, 6, dtype=DT, generator=torch.Generator().manual_seed(2)).to(device)
    got = _step(model, x, backend, **kw)
    want = _step(model, x, "dual", **kw)
    assert got[4].last_backend == backend
    _assert_same_step(got, want, exact_buffers=False)
    counts, plain = got[4].last_plan.counts, want[4].last_plan.counts
    for rule, calls in EPILOGUES:
        assert counts[f"{rule}[{backend}]"] == calls and rule not in counts, counts
    assert not [k for k in plain if k.endswith("]")], plain


def test_unsupported_layer_warns_once_and_is_counted():
    model = WithUnsupported().double()
    reg = GrokAlign(model, 0.1, estimator="forward", backend="dual")
    x = torch.randn(4, 6, dtype=DT)
    with pytest.warns(UserWarning, match=r"no rule for torch.logsumexp"):
        reg(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg(x)
    assert reg.last_plan.counts["fallback:torch.logsumexp"] == 1


class LoopMLP(nn.Module):
    """The paper's MLP written as most people write it: a ModuleList and a loop."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@pytest.mark.parametrize("estimator", ["forward", "reverse"])
def test_a_loop_mlp_takes_the_same_path_as_its_sequential(estimator):
    sizes = (9, 7, 6, 4)
    loop = LoopMLP(sizes).double()
    seq = mlp(sizes, dtype=DT)
    seq.load_state_dict({f"{2 * i}.weight": l.weight for i, l in enumerate(loop.layers)})
    x = torch.randn(5, 9, dtype=DT)
    results = []
    for model in (loop, seq):
        reg = GrokAlign(model, 0.3, estimator=estimator, generator=torch.Generator().manual_seed(0))
        out, pen = reg(x)
        grads = torch.autograd.grad(out.sum() + pen, list(model.parameters()))
        results.append((reg.last_plan, out, pen, grads))
    (plan_loop, *a), (plan_seq, *b) = results
    assert plan_loop.backend == plan_seq.backend == ("cpp" if available_backends()["cpp"] is None else "dual")
    assert plan_loop.description == plan_seq.description
    assert max_rel_err(a[0], b[0]) < F64["rtol"] and max_rel_err(a[1], b[1]) < F64["rtol"]
    for ga, gb in zip(a[2], b[2]):
        assert max_rel_err(ga, gb) < F64["rtol"]


def test_planner_picks_the_engine_for_a_cnn_and_explains_the_fused_backends():
    """auto runs a CNN on the engine, with the extension's epilogues where it is built ("cpp", which
    says why the fused MLP ops cannot serve) and in plain PyTorch ("dual") where it is not, when
    "cpp" names the missing extension."""
    model = cnn6(1, 3, width=2, size=8).double()
    x = torch.randn(2, 1, 8, 8, dtype=DT)
    plan = GrokAlign(model, 0.1, estimator="forward").explain(x)
    assert plan.reasons["dual"] is None and plan.reasons["reference"] is None
    assert plan.reasons["triton"] == _backends.triton_unavailable_reason(x.device)  # the engine on Triton
    if CPP is None:
        assert plan.backend == "cpp" and plan.reasons["cpp"] is None
        assert "epilogues" in plan.description and "Conv2d" in plan.description
        reg = GrokAlign(model, 0.1, estimator="forward", backend="cpp")
        reg(x)
        assert reg.last_plan.counts["relu[cpp]"] == 6 and reg.last_plan.counts["max_pool[cpp]"] == 3
    else:
        assert plan.backend == "dual" and plan.reasons["cpp"] == CPP
        with pytest.raises(BackendUnavailableError, match=r"backend='cpp'.*extension"):
            GrokAlign(model, 0.1, estimator="forward", backend="cpp")(x)
    reverse = GrokAlign(model, 0.1, estimator="reverse").explain(x)
    assert reverse.backend == "reference" and "forward (input-space) estimator" in reverse.reasons["dual"]


def test_a_model_that_mixes_samples_is_refused_on_the_engine():
    class Mixing(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    with pytest.raises(SampleMixingError, match=r"over the batch dimension"):
        GrokAlign(Mixing(), 0.1, estimator="forward", backend="dual")(torch.randn(3, 4, dtype=DT))
