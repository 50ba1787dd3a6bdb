"""The dual-stream engine's rules, one function at a time, against torch.func.jvp in float64.

For each case ``f`` (a per-sample function of the batch), the engine's output and per-row estimate
``(1/K) sum_k ||J V[k, r]||^2`` must equal ``f(x)`` and the same sum of ``torch.func.jvp`` products
at the rows ``index``, and the gradients of a loss on both with respect to the input and every
parameter must equal those of the reference, to 1e-10. Odd shapes, every row and a subset, one
probe and three; the rules in plain PyTorch (``kernels="torch"``), with the extension's epilogues
(``kernels="cpp"``, where it is built) and with the Triton epilogues (``kernels="triton"``, on the
CPU under Triton's interpreter).
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from grokalign_fast import _backends, available_backends
from grokalign_fast.dual import SampleMixingError, run
from grokalign_fast.dual.batch_stats import BatchStatistics

from utils import F64, max_rel_err

TOL64 = F64["rtol"]

DT = torch.float64
CPP = available_backends()["cpp"]
TRITON = _backends.triton_unavailable_reason(torch.device("cpu"))
KERNELS = pytest.mark.parametrize("kernels", [
    "torch", pytest.param("cpp", marks=pytest.mark.skipif(CPP is not None, reason=str(CPP))),
    pytest.param("triton", marks=pytest.mark.skipif(TRITON is not None, reason=str(TRITON)))])
# The cases that call a function with an epilogue in the extension; the Triton epilogues cover them
# too.
CPP_CASES = {"relu", "relu_method_inplace_module", "leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "elu",
             "softplus", "max_pool1d", "max_pool2d_pad", "max_pool3d", "adaptive_max_pool2d", "batch_norm_train_2d",
             "batch_norm_train_1d", "matmul_dual_dual", "add_sub_mul_div", "dropout_train", "layer_norm",
             "layer_norm_plain", "group_norm", "group_norm_plain", "rms_norm", "rms_norm_plain"}
EPILOGUE_CASES = {"torch": set(), "cpp": CPP_CASES, "triton": CPP_CASES}


def _lin(i, o, bias=True):
    torch.manual_seed(i * 31 + o)
    return nn.Linear(i, o, bias=bias).double()


def _conv(cls, *a, **k):
    torch.manual_seed(sum(a))
    return cls(*a, **k).double()


class Fn(nn.Module):
    """A module around a function of x and its own submodules (so the parameters are found)."""

    def __init__(self, fn, **mods):
        super().__init__()
        self.mods = nn.ModuleDict(mods)
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.mods)


def _affine_bn(cls, c, train):
    torch.manual_seed(c)
    bn = cls(c).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn.train(train)


def _randomised(norm):
    """A norm layer in float64 with weights and biases away from their 1 / 0 init."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    return norm.double()


# (name, module, input shape): every case is a per-sample function of x.
CASES = [
    ("linear_bias", Fn(lambda x, m: m["l"](x), l=_lin(7, 5)), (6, 7)),
    ("linear_nobias_3d", Fn(lambda x, m: m["l"](x), l=_lin(7, 5, bias=False)), (6, 3, 7)),
    ("conv1d_stride_groups", Fn(lambda x, m: m["c"](x), c=_conv(nn.Conv1d, 4, 6, 3, stride=2, groups=2)), (5, 4, 11)),
    ("conv2d_dilation_pad", Fn(lambda x, m: m["c"](x), c=_conv(nn.Conv2d, 3, 5, 3, padding=2, dilation=2)), (4, 3, 7, 6)),
    ("conv2d_reflect", Fn(lambda x, m: m["c"](x), c=_conv(nn.Conv2d, 2, 3, 3, padding=1, padding_mode="reflect")),
     (4, 2, 5, 5)),
    ("conv3d", Fn(lambda x, m: m["c"](x), c=_conv(nn.Conv3d, 2, 3, 2, bias=True)), (3, 2, 4, 3, 5)),
    ("conv_transpose2d", Fn(lambda x, m: m["c"](x), c=_conv(nn.ConvTranspose2d, 3, 2, 3, stride=2)), (4, 3, 4, 3)),
    ("matmul_const", Fn(lambda x, m: x @ m["l"].weight.t(), l=_lin(7, 4)), (5, 3, 7)),
    ("matmul_dual_dual", Fn(lambda x, m: torch.tanh(x @ x.transpose(1, 2))), (5, 3, 4)),
    ("relu", Fn(lambda x, m: F.relu(x)), (6, 9)),
    ("relu_method_inplace_module", Fn(lambda x, m: m["r"](x * 1.0).relu(), r=nn.ReLU(inplace=True)), (6, 9)),
    ("leaky_relu", Fn(lambda x, m: F.leaky_relu(x, 0.2)), (6, 9)),
    ("gelu", Fn(lambda x, m: F.gelu(x)), (6, 9)),
    ("gelu_tanh", Fn(lambda x, m: F.gelu(x, approximate="tanh")), (6, 9)),
    ("silu", Fn(lambda x, m: F.silu(x)), (6, 9)),
    ("tanh", Fn(lambda x, m: torch.tanh(x)), (6, 9)),
    ("sigmoid", Fn(lambda x, m: x.sigmoid()), (6, 9)),
    ("elu", Fn(lambda x, m: F.elu(x, 0.7)), (6, 9)),
    ("softplus", Fn(lambda x, m: F.softplus(3 * x, beta=2.0, threshold=4.0)), (6, 9)),
    ("hardtanh_relu6", Fn(lambda x, m: F.hardtanh(3 * x, -0.5, 0.7) + F.relu6(5 * x)), (6, 9)),
    ("dropout_eval", Fn(lambda x, m: m["d"](x), d=nn.Dropout(0.5).eval()), (6, 9)),
    ("batch_norm_eval_2d", Fn(lambda x, m: m["bn"](x), bn=_affine_bn(nn.BatchNorm2d, 3, False)), (5, 3, 4, 3)),
    ("batch_norm_eval_1d", Fn(lambda x, m: m["bn"](x), bn=_affine_bn(nn.BatchNorm1d, 7, False)), (5, 7)),
    ("layer_norm", Fn(lambda x, m: m["ln"](x), ln=_randomised(nn.LayerNorm((3, 6)))), (5, 3, 6)),
    ("group_norm", Fn(lambda x, m: m["gn"](x), gn=_randomised(nn.GroupNorm(2, 6))), (4, 6, 3, 2)),
    ("rms_norm", Fn(lambda x, m: m["rn"](x), rn=_randomised(nn.RMSNorm(5, eps=1e-3))), (4, 3, 5)),
    ("layer_norm_plain", Fn(lambda x, m: F.layer_norm(x, (7,), eps=1e-3)), (4, 3, 2, 7)),
    ("group_norm_plain", Fn(lambda x, m: F.group_norm(x, 3, eps=1e-3)), (4, 6, 5)),
    ("rms_norm_plain", Fn(lambda x, m: F.rms_norm(x, (2, 5))), (4, 3, 2, 5)),
    ("max_pool1d", Fn(lambda x, m: F.max_pool1d(x, 3, 2)), (5, 2, 9)),
    ("max_pool2d_pad", Fn(lambda x, m: F.max_pool2d(x, 3, stride=2, padding=1)), (5, 2, 7, 6)),
    ("max_pool3d", Fn(lambda x, m: F.max_pool3d(x, 2)), (3, 2, 4, 4, 5)),
    ("adaptive_max_pool2d", Fn(lambda x, m: F.adaptive_max_pool2d(x, (2, 3))), (4, 2, 5, 7)),
    ("avg_pools", Fn(lambda x, m: F.avg_pool2d(x, 2).flatten(1) + F.adaptive_avg_pool2d(x, 1).flatten(1).sum(1, True)),
     (4, 2, 4, 6)),
    ("interpolate_pad", Fn(lambda x, m: F.pad(F.interpolate(x, scale_factor=2, mode="bilinear"), (1, 2, 0, 1),
                                               value=0.5) + F.pad(x, (1, 1, 1, 1), mode="reflect").mean((1, 2, 3), keepdim=True)), (3, 2, 3, 4)),
    ("views", Fn(lambda x, m: x.view(x.size(0), 3, -1).permute(0, 2, 1).transpose(1, 2).unsqueeze(1).squeeze(1)
                 .flatten(1).reshape(x.shape[0], -1, 2).contiguous().expand(-1, -1, -1).sum(-1)), (4, 6, 2)),
    ("slicing", Fn(lambda x, m: x[:, 1:, ::2] * 2 + x[..., :1].mean(dim=(1, 2), keepdim=True)), (5, 4, 5)),
    ("cat_stack_const", Fn(lambda x, m: torch.cat([x, torch.ones_like(x[:, :1]) * 3.0], 1) + torch.stack([x, -x], 2)
                          .sum(2)[:, :1].mean(1, keepdim=True)), (5, 6)),
    ("add_sub_mul_div", Fn(lambda x, m: (x + 1.5 - x * x / 2.0 + (2.0 - x) * 3 - (x - 1) / 4 + m["l"].bias).tanh()
                           * x, l=_lin(6, 6)), (5, 6)),
    ("residual_inplace", Fn(lambda x, m: _residual(x, m), l=_lin(6, 6)), (5, 6)),
    ("softmax", Fn(lambda x, m: F.softmax(x, -1) + F.log_softmax(2 * x, dim=1)), (5, 7)),
    ("pointwise", Fn(lambda x, m: torch.exp(x / 3) + (x * x + 1).sqrt() + x.pow(3) + torch.clamp(x, -0.3, 0.4)
                     + torch.erf(x).abs()), (5, 7)),
    ("mask_from_input", Fn(lambda x, m: x * (x > 0.1) + torch.where(x > 0, x, 0.0)), (5, 7)),
]


def _residual(x, m):
    h = m["l"](x)
    h += x
    return h


class _FormulaLayerNorm(TorchFunctionMode):
    """F.layer_norm written out: torch's own layer norm has a wrong second-order forward-mode
    derivative (pytorch/pytorch#196700), which the reference's gradients would inherit."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            named = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
            x, shape = named["input"], tuple(named["normalized_shape"])
            dims = tuple(range(-len(shape), 0))
            mu = x.mean(dims, keepdim=True)
            var = ((x - mu) ** 2).mean(dims, keepdim=True)
            y = (x - mu) / torch.sqrt(var + named.get("eps", 1e-5))
            if named.get("weight") is not None:
                y = y * named["weight"]
            return y if named.get("bias") is None else y + named["bias"]
        return func(*args, **kwargs)


def _jvp_sq(model, rows, V):
    """(1/K) sum_k ||J V[k]||^2 per row by torch.func.jvp."""
    with _FormulaLayerNorm():
        return torch.stack([torch.func.jvp(model, (rows,), (V[k],))[1].pow(2).flatten(1).sum(1)
                            for k in range(V.shape[0])]).mean(0)


def _reference(model, x, V, index):
    """(model(x), est) with est[r] = (1/K) sum_k ||jvp at x[index[r]] along V[k, r]||^2."""
    rows = x if index is None else x.index_select(0, index)
    return model(x), _jvp_sq(model, rows, V)


def _grads(model, x, y, est, wy, ws):
    loss = (y * wy).sum() + (est * ws).sum()
    return torch.autograd.grad(loss, [x] + [p for p in model.parameters() if p.requires_grad], allow_unused=True)


def _compare(model, shape, index, K, reference=_reference, ref_model=None, kernels="torch"):
    """Engine (its rules on ``kernels``) against ``reference`` (computed with ``ref_model``, a copy of
    ``model`` with the same parameters, or ``model`` itself): output, estimate, and the gradients of
    a loss on both with respect to the input and every parameter."""
    ref_model = model if ref_model is None else ref_model
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, dtype=DT, generator=g).requires_grad_()
    R = shape[0] if index is None else len(index)
    V = torch.randn((K, R) + tuple(shape[1:]), dtype=DT, generator=g)
    idx = None if index is None else torch.tensor(index)
    y, est, counts = run(model, x, V, idx, warned=set(), kernels=kernels)
    y_ref, est_ref = reference(ref_model, x, V, idx)
    assert y.shape == y_ref.shape and est.shape == (R,)
    assert max_rel_err(y, y_ref) < TOL64
    assert max_rel_err(est, est_ref) < TOL64
    wy = torch.randn(y.shape, dtype=DT, generator=g)
    ws = torch.rand(est.shape, dtype=DT, generator=g)
    for a, b in zip(_grads(model, x, y, est, wy, ws), _grads(ref_model, x, y_ref, est_ref, wy, ws)):
        if a is None and b is None:  # a parameter the case does not use
            continue
        assert max_rel_err(a, b) < TOL64
    return counts


def _check_kernels(name, counts, kernels):
    """A case of :data:`EPILOGUE_CASES` ran an epilogue of the kernels asked for (``"<rule>[cpp]"``,
    ``"<rule>[triton]"``), the other cases none; no rule ran one with ``kernels="torch"``."""
    ran = [k for k in counts if k.endswith("]") and not k.startswith("probe_sqnorm[")]
    assert all(k.endswith(f"[{kernels}]") for k in ran), counts
    assert bool(ran) == (name in EPILOGUE_CASES[kernels]), counts


@pytest.mark.parametrize("name,model,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("index,K", [(None, 1), ([2, 0, 2], 3)], ids=["all-K1", "subset-K3"])
@KERNELS
def test_rule_matches_jvp(name, model, shape, index, K, kernels):
    if kernels == "triton" and name not in EPILOGUE_CASES["triton"]:
        pytest.skip("no Triton epilogue in this case: the ATen rules of kernels='torch'")
    counts = _compare(model, shape, index, K, kernels=kernels)
    assert not [k for k in counts if k.startswith("fallback:")], counts
    _check_kernels(name, counts, kernels)


def _train_reference(model, x, V, index):
    """The per-sample Jacobian with the batch statistics and masks of the plain forward held constant."""
    stats = BatchStatistics(model)
    with stats.record():
        out = model(x)
    rows = x if index is None else x.index_select(0, index)
    with stats.replay(index):
        est = _jvp_sq(model, rows, V)
    return out, est


TRAIN_CASES = [
    ("batch_norm_train_2d", lambda: Fn(lambda x, m: m["bn"](x), bn=_affine_bn(nn.BatchNorm2d, 3, True)), (5, 3, 4, 3)),
    ("batch_norm_train_1d", lambda: Fn(lambda x, m: m["bn"](x), bn=_affine_bn(nn.BatchNorm1d, 7, True)), (5, 7)),
    ("dropout_train", lambda: Fn(lambda x, m: m["d"](torch.tanh(x)) + F.dropout2d(x.unsqueeze(-1), 0.3).squeeze(-1),
                                 d=nn.Dropout(0.4)), (6, 5, 4)),
]


@pytest.mark.parametrize("name,make,shape", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
@pytest.mark.parametrize("index,K", [(None, 1), ([3, 1], 2)], ids=["all-K1", "subset-K2"])
@KERNELS
def test_batch_dependent_rules_match_the_frozen_statistics_reference(name, make, shape, index, K, kernels):
    """BatchNorm in train mode and dropout: the engine equals the reference that holds the plain
    forward's statistics and masks constant, and updates the running statistics exactly once, as
    the plain forward does (bit for bit from ATen's batch norm; to 1e-10 from the extension's, which
    sums the statistics in another order)."""
    torch.manual_seed(11)
    model = make()
    ref_model = make()
    ref_model.load_state_dict(model.state_dict())
    state = torch.random.get_rng_state()

    def reference(m, x, V, idx):
        torch.random.set_rng_state(state)  # the same dropout masks as the engine's forward
        return _train_reference(m, x, V, idx)

    torch.random.set_rng_state(state)
    counts = _compare(model, shape, index, K, reference=reference, ref_model=ref_model, kernels=kernels)
    _check_kernels(name, counts, kernels)
    for a, b in zip(model.buffers(), ref_model.buffers()):
        assert torch.equal(a, b) if kernels == "torch" else max_rel_err(a, b) < TOL64


def test_unknown_function_falls_back_to_jvp_with_one_warning():
    model = Fn(lambda x, m: torch.logsumexp(x, dim=1, keepdim=True) * x)
    counts = _compare(model, (5, 4), [1, 3], 2)
    assert counts["fallback:torch.logsumexp"] == 1
    warned = set()
    x, V = torch.randn(3, 4, dtype=DT), torch.randn(1, 3, 4, dtype=DT)
    with pytest.warns(UserWarning, match=r"no rule for torch.logsumexp"):
        run(model, x, V, warned=warned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, x, V, warned=warned)  # once per set of warnings: no second warning


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda x: x.sum(), r"over the batch dimension"),
        (lambda x: x.mean(0, keepdim=True).expand_as(x), r"over the batch dimension"),
        (lambda x: torch.cat([x, x], 0), r"concatenates along the batch dimension"),
        (lambda x: x[0:1], r"indexes the batch dimension"),
        (lambda x: x.permute(1, 0), r"permutes the batch dimension"),
        (lambda x: x.T, r"moves the batch dimension"),
        (lambda x: F.softmax(x, 0), r"softmax over the batch dimension"),
    ],
)
def test_a_model_that_mixes_samples_gets_a_clear_error(fn, match):
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(SampleMixingError, match=match):
        run(fn, x, torch.randn(1, 4, 3, dtype=DT))


def test_batch_norm_over_one_value_per_channel_in_train_mode_is_named():
    bn = nn.BatchNorm1d(3).double().train()
    with pytest.raises(SampleMixingError, match=r"batch norm in train mode over 1 sample"):
        run(bn, torch.randn(1, 3, dtype=DT), torch.randn(1, 1, 3, dtype=DT))


def test_math_of_the_layer_norm_rule_against_the_closed_form():
    """The layer-norm tangent is PAPER.md's formula gamma * (t_c - x_hat mean(x_hat t_c)) / sigma."""
    ln = nn.LayerNorm(5).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
    x, t = torch.randn(3, 5, dtype=DT), torch.randn(1, 3, 5, dtype=DT)
    _, est, _ = run(ln, x, t)
    mu, sigma = x.mean(1, keepdim=True), (x.var(1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    xh = (x - mu) / sigma
    tc = t[0] - t[0].mean(1, keepdim=True)
    tp = ln.weight * (tc - xh * (xh * tc).mean(1, keepdim=True)) / sigma
    assert max_rel_err(est, tp.pow(2).sum(1)) < TOL64
    assert math.isfinite(float(est.sum()))
