"""The op dual_mlp_sqnorm (a whole piecewise-linear MLP in one call: primal and input-space tangent
rows stacked through each GEMM, returning y and the per-row Hutchinson sum) against the
per-layer dual_linear ops."""
import pytest
import torch
from torch import nn

from utils import WholeMLPOpChecks, dual_forward, mlp_unavailable_reasons, plan, whole_mlp_op_args, whole_mlp_reason


class TestWholeMLPOp(WholeMLPOpChecks):
    OP = "dual_mlp_sqnorm"
    PROBE_SIDE = 0  # input-space probes

    def forward(self, steps, x, probes, index):
        assert whole_mlp_reason(steps, True, x) is None  # one call of the op, not the layers
        return dual_forward(steps, x, probes, index=index, backend="cpp", checked=True)

    def twin(self, steps, x, probes, index):
        """Layer by layer: the C++ dual_linear / dual_linear_sqnorm ops."""
        reason = mlp_unavailable_reasons(None, x, steps)["cpp"]
        if reason is not None:
            pytest.skip(f"the per-layer cpp ops on {x.device.type}: {reason}")
        return dual_forward(steps, x, probes, index=index, backend="cpp", checked=False)


def test_limits_and_errors():
    """Smooth activations and training dropout stay on the per-layer ops, with the reason; the op
    names a wrong probe width and a smooth activation code."""
    op = TestWholeMLPOp().op()
    x = torch.randn(4, 6, dtype=torch.float64)
    gelu_steps, _ = plan(nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)))
    assert "piecewise-linear" in whole_mlp_reason(gelu_steps, True, x)
    drop_steps, _ = plan(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3)).double())
    assert "dropout" in whole_mlp_reason(drop_steps, True, x)
    assert whole_mlp_reason(drop_steps, False, x) is None
    weights, biases, has_bias, _, alphas = whole_mlp_op_args(drop_steps)
    V = torch.randn(1, 2, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"v must have shape \[K, R, 6\] \(the MLP's inputs\)"):
        op(x, torch.randn(1, 4, 3, dtype=torch.float64), None, weights, biases, has_bias, [1, 0], alphas)
    with pytest.raises(RuntimeError, match="piecewise-linear activation code"):
        op(x, V, torch.tensor([3, 1]), weights, biases, has_bias, [5, 0], alphas)
