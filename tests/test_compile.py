"""``torch.compile`` of a training step with GrokAlign.

On the fused MLP paths (the whole-MLP C++ ops of the reverse and forward estimators) the compiled
loss is one graph (``fullgraph=True`` raises on any graph break; ``torch._dynamo.explain`` counts
them too) and its loss and gradients equal eager's on the same probes. The probes come from the
global RNG (``generator=None``: dynamo cannot trace a user's generator); inductor's own random
numbers are switched off (``fallback_random``) so that both runs draw the same ones. The dual-stream
engine runs under compile with graph breaks and equals eager too.
"""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F

from grokalign_fast import GrokAlign, _backends

from utils import mlp

pytestmark = pytest.mark.skipif(_backends.cpp_unavailable_reason() is not None, reason="needs the C++ extension")

X = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(1))


def _steps(model, compiled, fullgraph=True, steps=3, **kw):
    """Losses and final parameter gradients of ``steps`` calls, each seeding the global RNG first."""
    model = copy.deepcopy(model)
    reg = GrokAlign(model, 0.3, check_every=1, **kw)

    def loss_fn(x, y):
        out, pen = reg(x)
        return F.cross_entropy(out, y) + pen

    fn = torch.compile(loss_fn, fullgraph=fullgraph) if compiled else loss_fn
    losses = []
    for i in range(steps):
        torch.manual_seed(100 + i)
        model.zero_grad()
        loss = fn(X, Y)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), [p.grad.clone() for p in model.parameters()], reg


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("estimator", ["reverse", "forward"])
def test_fused_mlp_step_compiles_to_one_graph_and_equals_eager(estimator):
    model = mlp([10, 16, 16, 4], dtype=torch.float32)
    eager, g_eager, reg_e = _steps(model, compiled=False, estimator=estimator)
    compiled, g_comp, reg_c = _steps(model, compiled=True, estimator=estimator)
    assert reg_e.last_backend == reg_c.last_backend == "cpp"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_explain_counts_no_graph_break_on_the_fused_path():
    model = mlp([10, 16, 4], dtype=torch.float32)
    reg = GrokAlign(model, 0.3, estimator="forward")
    explanation = torch._dynamo.explain(lambda x, y: F.cross_entropy(*reg(x)[:1], y) + reg(x)[1])(X, Y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_engine_path_runs_compiled_and_equals_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 3, 3, padding=1), torch.nn.GELU(), torch.nn.Flatten(),
                                torch.nn.Linear(30, 4))
    x = X.unsqueeze(1)

    def run(compiled):
        m = copy.deepcopy(model)
        reg = GrokAlign(m, 0.3, estimator="forward", check_every=1)

        def loss_fn(x, y):
            out, pen = reg(x)
            return F.cross_entropy(out, y) + pen

        fn = torch.compile(loss_fn) if compiled else loss_fn
        torch.manual_seed(7)
        loss = fn(x, Y)
        loss.backward()
        return loss.detach(), [p.grad for p in m.parameters()], reg.last_backend

    (l_e, g_e, b_e), (l_c, g_c, b_c) = run(False), run(True)
    assert b_e == b_c
    torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_above_one_is_refused_under_compile_with_the_reason():
    reg = GrokAlign(mlp([10, 4], dtype=torch.float32), 0.3, every=2)
    with pytest.raises(Exception, match=r"every=2 .*use every=1 under torch.compile"):
        torch.compile(lambda x: reg(x)[1], fullgraph=True)(X)


def test_a_non_finite_penalty_raises_inside_the_compiled_graph():
    model = mlp([10, 4], dtype=torch.float32)
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    reg = GrokAlign(model, 0.3, estimator="reverse")
    with pytest.raises(RuntimeError, match="the penalty is not finite"):
        torch.compile(lambda x: reg(x)[1], fullgraph=True)(X)


def test_every_op_has_its_fake_and_cpp_autograd_right_after_import():
    """A fresh interpreter that only imports grokalign_fast: every extension op can be traced with
    fake tensors (a registered fake: the ops are registered per device, none is a composite that
    FakeTensor could run), and every autograd kernel is the C++ one of csrc/autograd (so libtorch
    users get the same gradients), none a Python formula."""
    import subprocess
    import sys

    code = (
        "import torch, grokalign_fast\n"
        "from torch._library.simple_registry import singleton\n"
        "names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('grokalign::'))\n"
        "assert names\n"
        "missing = [n for n in names if singleton.find(n).fake_impl.kernel is None]\n"
        "autograd = {n: [l for l in torch._C._dispatch_dump(n).splitlines() if l.startswith('Autograd')]\n"
        "            for n in names}\n"
        "python = {n: lines for n, lines in autograd.items() if any('csrc/autograd/' not in l for l in lines)}\n"
        "print(len(names), missing, python)\n"
        "assert not missing, missing\n"
        "assert not python, python\n"
        "nondifferentiable = ('grokalign::rademacher_', 'grokalign::max_pool2d_argmax')  # a random fill, indices\n"
        "assert all(autograd[n] for n in names if not n.endswith('_backward') and n not in nondifferentiable)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
