"""Integer token inputs: the Jacobian at the embedding output, on the engine and the reference.

A one-layer modular-addition transformer in the style of the paper's experiment (token embedding,
a learned positional embedding, one encoder layer, the last token unembedded), on tokens
``[B, 3]``. The penalty's Jacobian is taken with respect to ``e = E[x]``: the exact estimator must
equal ``||J||_F^2`` of ``e -> body(e)`` from ``torch.autograd.functional.jacobian``, and the engine's
forward estimator must equal the reference's on the same probes, with every gradient (the embedding
table's included), to 1e-10.
"""
import copy

import pytest
import torch
from torch import nn

from grokalign_fast import GrokAlign

from utils import F64, exact_sq_norms, grokalign_step, max_rel_err

DT = torch.float64
P, D = 11, 8


class ModAdd(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(P + 1, D)
        self.pos = nn.Parameter(torch.randn(3, D) * 0.1)
        self.layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.unembed = nn.Linear(D, P, bias=False)

    def body(self, e):
        return self.unembed(self.layer(e + self.pos)[:, -1])

    def forward(self, tokens):
        return self.body(self.embed(tokens))


def _tokens(B=4):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, P, (B, 3), generator=g)
    x[:, 2] = P  # the "=" token
    return x


def _step(model, x, **kw):
    """(penalty, parameter gradients, backend) of one squared-norm step on a copy of ``model``."""
    reg, _, pen, grads = grokalign_step(copy.deepcopy(model), x, 1.0, squared=True,
                                        generator=torch.Generator().manual_seed(5), **kw)
    return pen, grads, reg.last_backend


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_exact_penalty_is_the_jacobian_at_the_embedding(train):
    model = ModAdd().double().train(train)
    x = _tokens()
    with torch.no_grad():
        e = model.embed(x)
    exact = exact_sq_norms(model.body, e).mean()
    for kw in (dict(estimator="exact"), dict(estimator="reverse", probes="orthogonal", num_probes=P),
               dict(estimator="forward", probes="orthogonal", num_probes=3 * D)):
        pen, _, _ = _step(model, x, **kw)
        assert max_rel_err(pen, exact) < F64["rtol"], kw


@pytest.mark.parametrize("subsample", [None, 0.5])
def test_engine_equals_reference_on_tokens(subsample):
    model = ModAdd().double().train()
    x = _tokens(6)
    pen_d, g_d, b_d = _step(model, x, estimator="forward", backend="dual", subsample=subsample)
    pen_r, g_r, b_r = _step(model, x, estimator="forward", backend="reference", subsample=subsample)
    assert (b_d, b_r) == ("dual", "reference")
    assert max_rel_err(pen_d, pen_r) < F64["rtol"]
    for a, b in zip(g_d, g_r):
        assert max_rel_err(a, b) < F64["rtol"]
    assert float(g_d[0].abs().sum()) > 0  # the embedding table gets the penalty's gradient too


def test_integer_input_without_an_embedding_is_refused_with_the_reason():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    for backend in ("dual", "reference"):
        with pytest.raises(TypeError, match=r"embeds none of it"):
            GrokAlign(model, 1.0, estimator="forward", backend=backend)(torch.ones(2, 3, dtype=torch.long))
