"""Every estimator on standard PyTorch transformer layers, in train and eval mode.

``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer`` (its
memory is the input itself) and ``F.scaled_dot_product_attention`` (causal), each between an input
projection and a classifier on the mean token, on embeddings ``[B, T, E]``. The fused attention
kernels have no forward-mode derivative and no double backward; the reference estimators run
attention on its math backend and the dual-stream engine runs it as the explicit formula.

Checks, in float64: the exact estimator equals ``||J||_F^2`` from
``torch.autograd.functional.jacobian``; the reverse estimator with ``num_probes = C`` orthogonal
probes and the forward estimator with ``num_probes = D`` orthogonal probes are exact, so they equal
it too; and the engine's penalty and gradients equal the reference's on the same probes. Dropout
is 0 in train mode so that the function is the same on every path.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grokalign_fast import GrokAlign, _backends
from grokalign_fast.models import GPT

from utils import F64, exact_sq_norms, grokalign_step, max_rel_err

DT = torch.float64
# The backend "auto" runs the forward estimator on: the engine with the extension's epilogues where built.
ENGINE = "cpp" if _backends.cpp_unavailable_reason() is None else "dual"
ENGINES = ["dual"] + (["cpp"] if ENGINE == "cpp" else [])
TRITON = _backends.triton_unavailable_reason(torch.device("cpu"))
T, E, HEADS, C = 3, 8, 2, 3


class SDPABlock(nn.Module):
    """A hand-written causal attention block calling F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)

    def forward(self, x):
        B = x.shape[0]
        q, k, v = self.qkv(x).split(E, dim=-1)
        q, k, v = (z.reshape(B, T, HEADS, E // HEADS).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(o.transpose(1, 2).reshape(B, T, E))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x):
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x, x)


def _wrap(body):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(E, E), body, _MeanTokens(), nn.Linear(E, C)).double()


class _MeanTokens(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


LAYERS = {
    "multihead_attention": lambda: MHA(),
    "encoder_layer": lambda: nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True),
    "decoder_layer": lambda: Decoder(),
    "sdpa": lambda: SDPABlock(),
}


def _penalty(model, x, **kw):
    """(penalty, parameter gradients, backend) of one squared-norm step on a copy of ``model``."""
    reg, _, pen, grads = grokalign_step(copy.deepcopy(model), x, 1.0, squared=True,
                                        generator=torch.Generator().manual_seed(4), **kw)
    return pen, grads, reg.last_backend


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_every_estimator_on_a_transformer_layer(layer, train):
    model = _wrap(LAYERS[layer]()).train(train)
    x = torch.randn(2, T, E, dtype=DT, generator=torch.Generator().manual_seed(1))
    exact = exact_sq_norms(model, x).mean()
    cases = [dict(estimator="exact"),
             dict(estimator="reverse", probes="orthogonal", num_probes=C),
             dict(estimator="forward", probes="orthogonal", num_probes=T * E),
             dict(estimator="forward", probes="orthogonal", num_probes=T * E, backend="reference")]
    results = [_penalty(model, x, **kw) for kw in cases]
    for (pen, _, _), kw in zip(results, cases):
        assert max_rel_err(pen, exact) < F64["rtol"], kw
    (_, g_dual, b_dual), (_, g_ref, b_ref) = results[2], results[3]
    assert (b_dual, b_ref) == (ENGINE, "reference")
    for a, b in zip(g_dual, g_ref):
        assert max_rel_err(a, b) < F64["rtol"]


def test_batch_first_false_attention_is_refused_on_the_engine_with_the_reason():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, HEADS)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0].sum(1)

    model = SeqFirst().double()
    with pytest.raises(ValueError, match=r"batch_first=True"):
        GrokAlign(model, 1.0, estimator="forward", backend="dual")(torch.randn(2, T, E, dtype=DT))


@pytest.mark.parametrize("engine", ENGINES + [
    pytest.param("triton", marks=pytest.mark.skipif(TRITON is not None, reason=str(TRITON)))])
@pytest.mark.parametrize("subsample", [None, 0.5], ids=["all", "sub0.5"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gpt_on_the_engine_equals_the_reference(train, subsample, engine):
    """The GPT-style causal LM of grokalign_fast.models on tokens: output, penalty and every parameter
    gradient of the engine equal the reference's on the same probes (Jacobian at the token embedding)."""
    if engine == "triton" and not train:
        pytest.skip("the Triton interpreter is slow (~25 s a case): eval runs the same kernels as train")
    torch.manual_seed(0)
    # 67 positions: past FUSED_MIN_KEYS, so the "cpp" and "triton" engines run attention as the JVP op.
    model = GPT(13, d_model=16, layers=2, heads=2, context=67).double().train(train)
    x = torch.randint(0, 13, (3, 67), generator=torch.Generator().manual_seed(2))
    kw = dict(estimator="forward", num_probes=2, subsample=subsample)
    reg_d, out_d, pen_d, g_d = grokalign_step(copy.deepcopy(model), x, 0.7, backend=engine,
                                              generator=torch.Generator().manual_seed(3), **kw)
    reg_r, out_r, pen_r, g_r = grokalign_step(copy.deepcopy(model), x, 0.7, backend="reference",
                                              generator=torch.Generator().manual_seed(3), **kw)
    assert (reg_d.last_backend, reg_r.last_backend) == (engine, "reference")
    assert reg_d.last_plan.counts.get("attention" if engine == "dual" else f"attention[{engine}]") == 2
    torch.testing.assert_close(out_d, out_r, **F64)
    torch.testing.assert_close(pen_d, pen_r, **F64)
    assert len(g_d) == len(g_r) == len(list(model.parameters()))
    for a, b in zip(g_d, g_r):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("subsample", [None, 0.4], ids=["all", "sub0.4"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_modadd_transformer_on_the_engine_equals_the_reference(train, subsample, engine):
    """The modular-addition transformer of experiments/modadd.py (its last query through SDPA), with
    the penalty at the embeddings as the experiment takes it."""
    from grokalign_fast.experiments.modadd import QUICK, Config, Transformer

    torch.manual_seed(0)
    cfg = Config(**{k: v for k, v in QUICK.items() if k in ("p", "d_model", "n_heads", "d_mlp")})
    model = Transformer(cfg).double().train(train)
    tokens = torch.randint(0, cfg.p, (5, 3), generator=torch.Generator().manual_seed(2))
    e = model.embed(tokens).detach()
    kw = dict(estimator="forward", num_probes=2, subsample=subsample)
    reg_d, out_d, pen_d, g_d = grokalign_step(model.body, e, 0.7, backend=engine,
                                              generator=torch.Generator().manual_seed(3), **kw)
    reg_r, out_r, pen_r, g_r = grokalign_step(model.body, e, 0.7, backend="reference",
                                              generator=torch.Generator().manual_seed(3), **kw)
    assert reg_d.last_plan.counts.get("attention") == 1  # 1 query x 3 keys: small_attention_jvp
    torch.testing.assert_close(out_d, out_r, **F64)
    torch.testing.assert_close(pen_d, pen_r, **F64)
    for a, b in zip(g_d, g_r):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 3, 8, 5, None), (1, 2, 3, 3, 4, 6, 2), (3, 1, 4, 2, 5, 5, 3)],
                         ids=lambda c: "B{}H{}T{}S{}d{}dv{}P{}".format(*c))
def test_small_attention_jvp_equals_the_reference_op(shape, causal):
    """The rule's broadcast form for a few scores a head (1 query x 3 keys in the modular-addition
    transformer) against the reference op: o, o_t and the gradients of all six inputs, float64."""
    from grokalign_fast.dual.rules.attention import SMALL_MAX_SCORES, small_attention_jvp
    from grokalign_fast.ops.attention_jvp.reference import attention_jvp as reference

    B, H, T, S, d, dv, P = shape
    assert T * S <= SMALL_MAX_SCORES
    g = torch.Generator().manual_seed(5)
    lead = () if P is None else (P,)
    shapes = [(B, H, T, d), (B, H, S, d), (B, H, S, dv), (*lead, B, H, T, d), (*lead, B, H, S, d), (*lead, B, H, S, dv)]
    args = [torch.randn(sh, generator=g, dtype=DT) for sh in shapes]
    cot = [torch.randn(B, H, T, dv, generator=g, dtype=DT), torch.randn(*lead, B, H, T, dv, generator=g, dtype=DT)]
    results = []
    for f in (small_attention_jvp, reference):
        xs = [a.clone().requires_grad_() for a in args]
        outs = f(*xs, causal=causal, scale=0.6)
        grads = torch.autograd.grad(outs, xs, cot)
        results.append([*outs, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **F64)
