"""The op reverse_mlp (the output-space estimator of a piecewise-linear MLP in one pass: a forward
tangent along J^T u plus outer products, no double backward) and its Python twin, against the
reference (autograd's double backward) and each other."""
import pytest
import torch
from torch import nn

from grokalign_fast import _backends
from grokalign_fast.regularizer import GrokAlign
from utils import PL_ACTS, WholeMLPOpChecks, assert_close_all, gen, grokalign_step, mlp, reverse_mlp_ops

CPP = reverse_mlp_ops.cpp_unavailable_reason(torch.zeros(1)) is None


def needs_op(x):
    reason = reverse_mlp_ops.cpp_unavailable_reason(x)
    if reason is not None:
        pytest.skip(f"grokalign::reverse_mlp on {x.device.type}: {reason}")


@pytest.mark.parametrize("act", PL_ACTS, ids=repr)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("subsample", [None, 0.5])
@pytest.mark.parametrize("squared", [False, True])
def test_one_pass_equals_autograd_reverse(act, bias, subsample, squared):
    """GrokAlign's one-pass output-space path == the reference's double backward: output, penalty and
    the gradients of x and every parameter, float64, same probes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 11, bias=bias), act, nn.Linear(11, 7, bias=bias), act,
                          nn.Dropout(0.0), nn.Linear(7, 5, bias=bias)).double()  # dropout with p = 0 is allowed
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    res = {be: grokalign_step(model, x, estimator="reverse", num_probes=3, subsample=subsample, squared=squared,
                              backend=be, generator=gen(3)) for be in ("reference", "auto")}
    # auto runs the C++ op grokalign::reverse_mlp when the extension is built, else the Python one-pass path.
    assert res["reference"][0].last_backend == "reference"
    assert res["auto"][0].last_backend == ("cpp" if CPP else "dual")
    assert_close_all([res["auto"][1], res["auto"][2], *res["auto"][3]],
                     [res["reference"][1], res["reference"][2], *res["reference"][3]])


def test_cpp_op_checks_its_arguments():
    w = [torch.randn(4, 3), torch.randn(2, 4)]
    x, u = torch.randn(5, 3), torch.randn(1, 5, 2)
    needs_op(x)
    op = torch.ops.grokalign.reverse_mlp
    layers = ([], [False, False], [1, 0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have shape \[OUT, 4\]"):
        op(x, u, None, [w[0], torch.randn(2, 3)], *layers)
    with pytest.raises(RuntimeError, match="piecewise-linear activation code"):
        op(x, u, None, w, [], [False, False], [3, 0], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="u must have shape"):
        op(x, torch.randn(1, 5, 3), None, w, *layers)
    with pytest.raises(RuntimeError, match="pass index"):
        op(x, torch.randn(1, 4, 2), None, w, *layers)
    with pytest.raises(RuntimeError, match="index must be a long tensor"):
        op(x, torch.randn(1, 2, 2), torch.tensor([0, 1], dtype=torch.int32), w, *layers)
    with pytest.raises(RuntimeError, match="has_bias marks"):
        op(x, u, None, w, [], [True, False], [1, 0], [0.0, 0.0])


def test_refuses_smooth_activations_and_training_dropout():
    """The one-pass paths (Python: backend "dual"; C++: "cpp") say why they cannot serve; auto then runs
    the reference."""
    reg = GrokAlign(mlp([12, 11, 7, 5], act=nn.GELU), 0.1, estimator="reverse")
    plan = reg.explain(torch.randn(2, 12, dtype=torch.float64))
    assert "piecewise-linear" in plan.reasons["dual"] and "piecewise-linear" in plan.reasons["cpp"]
    reg(torch.randn(2, 12, dtype=torch.float64))
    assert reg.last_backend == "reference"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    reg = GrokAlign(model, 0.1, estimator="reverse")
    assert "dropout" in reg.explain(torch.randn(2, 4, dtype=torch.float64)).reasons["dual"]
    # backend="cpp" with the reverse estimator is the op grokalign::reverse_mlp: same limits.
    with pytest.raises(_backends.BackendUnavailableError, match="dropout"):
        GrokAlign(model, 0.1, estimator="reverse", backend="cpp")(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(_backends.BackendUnavailableError, match="forward"):
        GrokAlign(model, 0.1, estimator="reverse", backend="triton")(torch.randn(2, 4, dtype=torch.float64))


class TestWholeMLPOp(WholeMLPOpChecks):
    OP = "reverse_mlp"
    PROBE_SIDE = -1  # output-space probes

    def forward(self, steps, x, probes, index):
        return reverse_mlp_ops.reverse_forward(steps, x, probes, index, implementation="cpp")

    def twin(self, steps, x, probes, index):
        """The Python one-pass path (:class:`grokalign_fast.ops.mlp.reverse._ReverseMLP`)."""
        return reverse_mlp_ops.reverse_forward(steps, x, probes, index, implementation="python")
