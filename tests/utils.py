"""The tests' one harness: tolerances and error measures, the low-precision rule, the devices,
model builders and the independent Jacobian references (torch.autograd.functional), plus the
checks every whole-MLP op passes.
"""
import math

import pytest
import torch
from torch import nn

import grokalign_fast.models
from grokalign_fast import _backends
from grokalign_fast.jacobian import safe_sqrt
from grokalign_fast.regularizer import GrokAlign

from grokalign_fast.ops import probe_sqnorm as probe_sqnorm_ops  # noqa: F401
from grokalign_fast.ops.probe_sqnorm import reference as probe_sqnorm_reference  # noqa: F401
from grokalign_fast.ops.mlp import reverse_mlp as reverse_mlp_ops  # noqa: F401
from grokalign_fast.ops.mlp.model import dual_forward, plan, unavailable_reasons as mlp_unavailable_reasons  # noqa: F401
from grokalign_fast.ops.mlp.whole_mlp import whole_mlp_op_args, whole_mlp_reason  # noqa: F401

# ---------------------------------------------------------------------------------------- devices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def triton_devices():
    """:data:`DEVICES` as pytest parameters, each skipped (with the reason) where Triton kernels cannot
    run on it: the CPU needs the interpreter (``TRITON_INTERPRET=1``), CUDA compiles them."""
    params = []
    for device in DEVICES:
        reason = _backends.triton_unavailable_reason(torch.device(device))
        params.append(pytest.param(device, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params

# ------------------------------------------------------------------------- tolerances and errors

F64 = dict(rtol=1e-10, atol=1e-12)
"""float64 against a float64 reference (``assert_close(a, b, **F64)``): the two differ only in
rounding order, ~1e-15 relative, so 1e-10 leaves five orders of margin and still fails any wrong
term."""

REL32 = 1e-5
"""float32 against the float64 reference, as :func:`max_rel_err` per tensor: float32 rounds at
6e-8, and the reductions here are at most a few hundred terms long."""


def gen(seed=0):
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def max_rel_err(a, ref):
    """``max|a - ref| / max|ref|`` over the tensor, in float64 on the CPU (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return (a - ref).abs().max().item() / max(ref.abs().max().item(), 1e-300)


def assert_close_all(got, want, names=None, **tol):
    """``assert_close`` pairwise (tol defaults to :data:`F64`); ``got`` may live on another device."""
    tol = tol or F64
    assert len(got) == len(want), (len(got), len(want))
    for i, (a, b) in enumerate(zip(got, want)):
        name = names[i] if names else f"[{i}]"
        torch.testing.assert_close(a.to(b.device), b, msg=lambda m: f"{name}: {m}", **tol)


def assert_within_twice_plain_error(ours, plain, exact, names=None):
    """The low-precision rule (float16, bfloat16; float32 for kernels with float approximations of their
    own), written once.

    ``ours``: the kernel's outputs in the low dtype; ``plain``: plain PyTorch (the reference
    implementation) run in the same dtype on the same inputs; ``exact``: the float64 reference.
    Per tensor, ``max_rel_err(ours, exact) <= 2 * max_rel_err(plain, exact) + u`` with ``u`` the
    dtype's unit roundoff (eps / 2).

    Why (flash-attention's rule): with 8 or 11 significand bits any fixed tolerance either fails a
    correct kernel or passes a wrong one, depending on shapes and values. Plain PyTorch's own error
    in the same dtype is the yardstick: a kernel computing the same formula with the same rounding
    model cannot be far worse than it; twice leaves room for another summation order or one more
    rounding of an intermediate, while a wrong term, a lost mask or a wrong cast (an O(1) relative
    error) fails. The ``u`` covers a plain result that happens to be exact (a short sum of
    representable numbers): storing the exact value in the dtype already costs up to ``u``.
    """
    assert len(ours) == len(plain) == len(exact)
    for i, (o, p, e) in enumerate(zip(ours, plain, exact)):
        name = names[i] if names else f"[{i}]"
        assert o.dtype == p.dtype and o.dtype in (torch.float16, torch.bfloat16, torch.float32), (name, o.dtype, p.dtype)
        err, err_plain = max_rel_err(o, e), max_rel_err(p, e)
        u = torch.finfo(o.dtype).eps / 2
        assert err <= 2 * err_plain + u, f"{name}: ours {err:.3g}, plain PyTorch {err_plain:.3g}"


def outputs_and_grads(outputs, inputs, use=None, seed=1):
    """``[*outputs, *grads]``: the outputs (detached), then the gradients of
    ``sum_i <c_i, outputs[i]>`` with respect to the inputs (``None`` inputs left out; zeros for an
    input the used outputs do not reach).

    The cotangents ``c_i`` are drawn from ``seed`` in float64 on the CPU and cast to each output's
    dtype and device, so two implementations (dtypes, devices) see the same numbers. ``use``: a
    bool per output; an unused output takes no part (its gradient reaches the backward as None).
    """
    outputs = list(outputs)
    use = [True] * len(outputs) if use is None else list(use)
    g = gen(seed)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]
    pairs = [(o, c) for o, c, u in zip(outputs, cots, use) if u and o.requires_grad]
    present = [v for v in inputs if v is not None]
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], present, [c for _, c in pairs], allow_unused=True,
                                    materialize_grads=True)
    else:
        grads = [torch.zeros_like(v) for v in present]
    return [o.detach() for o in outputs] + list(grads)


def grokalign_step(model, x, weight=0.3, **kw):
    """``(reg, out, penalty, grads)`` of one step ``out.pow(2).sum() + penalty`` under
    ``GrokAlign(model, weight, **kw)``; ``grads``: x's gradient (when x requires one), then every
    parameter's."""
    reg = GrokAlign(model, weight, **kw)
    out, pen = reg(x)
    leaves = ([x] if x.requires_grad else []) + list(model.parameters())
    grads = torch.autograd.grad(out.pow(2).sum() + pen, leaves)
    return reg, out.detach(), pen.detach(), list(grads)


# ------------------------------------------------------------------------------------- models


def mlp(sizes, *, act=nn.ReLU, bias=True, dtype=torch.float64, seed=0):
    """:func:`grokalign_fast.models.mlp` with the tests' defaults (bias, float64, seed 0)."""
    return grokalign_fast.models.mlp(sizes, act=act, bias=bias, dtype=dtype, seed=seed)


def linear_stack(sizes, acts, bias=True, seed=0, dtype=torch.float64):
    """``nn.Sequential``: ``Linear(sizes[i], sizes[i+1], bias[i])`` then the module ``acts[i]``
    (None: nothing); ``bias`` one bool for every layer or one per layer. Seeded, ``dtype``."""
    n = len(sizes) - 1
    biases = [bias] * n if isinstance(bias, bool) else list(bias)
    torch.manual_seed(seed)
    layers = []
    for i in range(n):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=biases[i]))
        if acts[i] is not None:
            layers.append(acts[i])
    return nn.Sequential(*layers).to(dtype)


class SmallCNN(nn.Module):
    """conv -> relu -> maxpool -> conv -> gelu -> avgpool -> flatten -> linear; input [B, 2, 5, 7]."""

    def __init__(self, classes=5):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.head = nn.Linear(3 * 1 * 1, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)  # [B, 4, 2, 3]
        x = nn.functional.avg_pool2d(nn.functional.gelu(self.c2(x)), 2)  # [B, 3, 1, 1]
        return self.head(x.flatten(1))


class TinyBlock(nn.Module):
    """Pre-LN transformer block on embeddings [B, T, d] -> logits [B, C].

    Attention is written with matmul + softmax (scaled_dot_product_attention has
    no forward-mode AD on the CPU).
    """

    def __init__(self, d=6, heads=2, d_mlp=10, classes=3):
        super().__init__()
        self.h = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d_mlp), nn.GELU(), nn.Linear(d_mlp, d))
        self.head = nn.Linear(d, classes)

    def forward(self, e):
        B, T, d = e.shape
        q, k, v = self.qkv(self.ln1(e)).split(d, dim=-1)
        q, k, v = (z.reshape(B, T, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.h), dim=-1)
        e = e + self.proj((att @ v).transpose(1, 2).reshape(B, T, d))
        e = e + self.mlp(self.ln2(e))
        return self.head(e.mean(dim=1))


def model_cases():
    """(name, model, input) triples in float64: odd shapes on purpose."""
    g = gen(123)
    cases = [
        ("mlp_relu_bias", mlp([13, 11, 7, 5], act=nn.ReLU), torch.randn(6, 13, generator=g, dtype=torch.float64)),
        ("mlp_relu_nobias", mlp([13, 11, 7, 5], act=nn.ReLU, bias=False),
         torch.randn(6, 13, generator=g, dtype=torch.float64)),
        ("mlp_gelu_bias", mlp([9, 8, 4], act=nn.GELU), torch.randn(5, 9, generator=g, dtype=torch.float64)),
        ("mlp_gelu_nobias", mlp([9, 8, 12], act=nn.GELU, bias=False),
         torch.randn(5, 9, generator=g, dtype=torch.float64)),
    ]
    torch.manual_seed(1)
    cases.append(("cnn_pool", SmallCNN().double(), torch.randn(3, 2, 5, 7, generator=g, dtype=torch.float64)))
    torch.manual_seed(2)
    cases.append(("transformer_block", TinyBlock().double(), torch.randn(3, 5, 6, generator=g, dtype=torch.float64)))
    return cases


# ------------------------------------------------------------ independent Jacobian references


def exact_jacobians(f, x, create_graph=False):
    """``[B, C, D]`` per-sample Jacobians from ``torch.autograd.functional.jacobian`` (one row per
    output, independent of the library); ``create_graph``: differentiable, for gradient checks."""
    Js = []
    for b in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda xb: f(xb.unsqueeze(0)).squeeze(0), x[b],
                                               create_graph=create_graph)
        Js.append(J.reshape(-1, x[b].numel()))
    return torch.stack(Js)


def exact_sq_norms(f, x):
    """``||J_b||_F^2`` per sample from :func:`exact_jacobians`."""
    return exact_jacobians(f, x).pow(2).sum((1, 2))


# ---------------------------------------------------- checks shared by the whole-MLP ops

PL_ACTS = [nn.ReLU(), nn.LeakyReLU(0.1), nn.Identity()]


class WholeMLPOpChecks:
    """Checks every whole-MLP op passes: ``grokalign::dual_mlp_sqnorm`` (input-space probes) and
    ``grokalign::reverse_mlp`` (output-space probes) share one schema
    ``(x, probes, index, weights, biases, has_bias, acts, alphas, root=False, scale=1.0) -> (y, est, state)``.

    A test module subclasses it as ``Test...``, setting ``OP`` (the op's name) and ``PROBE_SIDE``
    (0: probes as wide as the input, -1: as the output) and defining ``forward`` (the library's
    Python entry that calls the op) and ``twin`` (another implementation of the same math)."""

    OP = None
    PROBE_SIDE = 0

    def forward(self, steps, x, probes, index):
        """``(y, est)`` through the op."""
        raise NotImplementedError

    def twin(self, steps, x, probes, index):
        """``(y, est)`` from an independent implementation."""
        raise NotImplementedError

    def op(self, device="cpu"):
        """The op; skips the test, with the reason, where it is not built for ``device`` (it is
        registered for the CPU and, in a CUDA build, the CUDA key)."""
        reason = _backends.op_unavailable_reason((self.OP, self.OP + "_backward"), torch.zeros(1, device=device))
        if reason is not None:
            pytest.skip(f"{self.OP} on {device}: {reason}")
        return getattr(torch.ops.grokalign, self.OP)

    def case(self, sizes, acts, bias, seed, rows=(4, 0, 4, 2), dtype=torch.float64, device="cpu"):
        """(op, model, steps, x [5, IN], probes [2, len(rows), n], index, layer args): index has a repeated row."""
        op = self.op(device)
        model = linear_stack(sizes, acts, bias, seed, dtype).to(device)
        steps, _ = plan(model)
        x = torch.randn(5, sizes[0], dtype=dtype, device=device)
        probes = torch.randn(2, len(rows), sizes[self.PROBE_SIDE], dtype=dtype, device=device)
        return op, model, steps, x, probes, torch.tensor(rows, device=device), list(whole_mlp_op_args(steps))

    @pytest.mark.parametrize("act", PL_ACTS, ids=repr)
    @pytest.mark.parametrize("bias", [False, True])
    @pytest.mark.parametrize("index", [None, (4, 0, 4, 2)])
    @pytest.mark.parametrize("use", [(True, True), (False, True), (True, False)], ids=["both", "est", "y"])
    @pytest.mark.parametrize("device", DEVICES)
    def test_equals_its_twin(self, device, act, bias, index, use):
        """The op == its twin: outputs and every gradient (x, weights, biases), float64, K = 2 probes,
        with a repeated row in index and with only one of the two outputs used."""
        rows = range(5) if index is None else index
        _, model, steps, x, probes, idx, _ = self.case([9, 8, 6, 3], [act] * 3, bias, seed=2, rows=rows, device=device)
        idx = None if index is None else idx
        x.requires_grad_(True)
        params = [x] + list(model.parameters())
        assert_close_all(outputs_and_grads(self.forward(steps, x, probes, idx), params, use),
                         outputs_and_grads(self.twin(steps, x, probes, idx), params, use))

    def test_opcheck_and_compile(self):
        op, model, steps, x, probes, idx, args = self.case([6, 5, 3], [nn.LeakyReLU(0.2), None], [True, False], seed=0,
                                                           rows=(3, 1))
        torch.library.opcheck(op.default, (x, probes, idx, *args))

        def f(x):
            y, est = self.forward(steps, x, probes, idx)
            return y.sum() + est.sum()

        eager = torch.autograd.grad(f(x), args[0])
        compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), args[0])
        assert_close_all(compiled, eager)

    @pytest.mark.parametrize("act", PL_ACTS, ids=repr)
    @pytest.mark.parametrize("root", [False, True])
    def test_aten_fallback_equals_cpu_loops(self, act, root):
        """The whole-MLP ops run their elementwise passes on the CPU as loops for float / double
        (csrc/cpu/row_passes_cpu.h) and as ATen ops for other dtypes (csrc/common/row_passes.h).
        bfloat16 on the CPU takes the ATen path: from the same bfloat16 values, its outputs and gradients match
        the float64 loops up to bfloat16 rounding (a wrong slope row, a lost mask or a lost scale is an
        O(1) error)."""
        op, _, _, x, probes, idx, (weights, biases, *rest) = self.case([9, 8, 7, 3], [act, act, None],
                                                                        [True, False, True], seed=3)
        got = {}
        for dtype in (torch.bfloat16, torch.float64):
            leaves = [t.detach().to(torch.bfloat16).to(dtype).requires_grad_(True) for t in [x] + weights + biases]
            xs, ws, bs = leaves[0], leaves[1:1 + len(weights)], leaves[1 + len(weights):]
            y, est, _ = op(xs, probes.to(torch.bfloat16).to(dtype), idx, ws, bs, *rest, root, 0.37)
            got[dtype] = outputs_and_grads((y, est), leaves)
        for a, b in zip(got[torch.bfloat16], got[torch.float64]):
            assert max_rel_err(a, b) <= 0.05

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    @pytest.mark.parametrize("act", PL_ACTS, ids=repr)
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("root", [False, True])
    def test_cuda_kernels_equal_the_cpu_loops(self, act, dtype, root):
        """The CUDA row-pass kernels (csrc/cuda/row_passes_cuda.cu) against the CPU op on the same
        values: outputs and every gradient (x, weights, biases), with a repeated index row, a zero
        probe row (est = 0 under root) and a scale. float64 to 1e-10; float32 and bfloat16 against the
        float64 CPU op on the same rounded values, to 1e-4 and 0.05 relative (a wrong slope row, a
        lost mask or a lost scale is an O(1) error)."""
        self.op("cuda")
        op, _, _, x, probes, idx, (weights, biases, *rest) = self.case([9, 8, 7, 3], [act, act, None],
                                                                        [True, False, True], seed=5)
        probes[:, 1] = 0.0
        got = {}
        for device, dt in (("cuda", dtype), ("cpu", torch.float64)):
            leaves = [t.detach().to(dtype).to(device=device, dtype=dt).requires_grad_(True)
                      for t in [x] + weights + biases]
            xs, ws, bs = leaves[0], leaves[1:1 + len(weights)], leaves[1 + len(weights):]
            y, est, _ = op(xs, probes.to(dtype).to(device=device, dtype=dt), idx.to(device), ws, bs, *rest, root,
                           0.37)
            got[device] = outputs_and_grads((y, est), leaves)
        if dtype == torch.float64:
            assert_close_all(got["cuda"], got["cpu"])
        else:
            bound = 1e-4 if dtype == torch.float32 else 0.05
            for a, b in zip(got["cuda"], got["cpu"]):
                assert a.device.type == "cuda" and a.dtype == dtype
                assert max_rel_err(a, b) <= bound

    def test_refuses_an_out_of_range_index(self):
        op = self.op()
        w = [torch.randn(4, 3), torch.randn(2, 4)]
        x = torch.randn(5, 3)
        probes = torch.randn(1, 2, [3, 2][self.PROBE_SIDE])
        for bad in ([0, 5], [-1, 2]):
            with pytest.raises(RuntimeError, match=r"index\[\d\] = -?\d is out of range for x with B=5 rows"):
                op(x, probes, torch.tensor(bad), w, [], [False, False], [1, 0], [0.0, 0.0])

    @pytest.mark.parametrize("act", PL_ACTS[:2], ids=repr)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_primal_is_torchs_on_nonfinite_values(self, act, dtype):
        """The fused activation keeps torch's semantics: relu(-inf) = 0, relu(nan) = nan, leaky_relu(-inf) = -inf."""
        op, model, _, _, _, _, args = self.case([3, 3, 2], [act, None], [True, False], seed=0, dtype=dtype)
        with torch.no_grad():
            model[0].weight.copy_(torch.eye(3))
            model[0].bias.zero_()
        x = torch.tensor([[-math.inf, 1.0, -2.0], [math.nan, 0.5, 3.0], [math.inf, -1.0, 0.0]], dtype=dtype)
        probes = torch.randn(1, 3, [3, 2][self.PROBE_SIDE], dtype=dtype)
        y, _, _ = op(x, probes, None, *args)
        with torch.no_grad():
            torch.testing.assert_close(y, model(x), equal_nan=True)

    @pytest.mark.parametrize("act", PL_ACTS[:2], ids=repr)
    def test_root_equals_safe_sqrt_of_the_estimate(self, act):
        """root=True returns sqrt(est) with the gradient of grokalign_fast.jacobian.safe_sqrt (0 at a zero
        estimate), in one pass: values and every gradient equal safe_sqrt(op(root=False)), float64,
        with a repeated index row and a zero probe (est = 0 on that row)."""
        op, _, _, x, probes, idx, args = self.case([9, 8, 6, 3], [act, act, None], [True, False, True], seed=4)
        weights, biases = args[:2]
        probes[:, 1] = 0.0
        x.requires_grad_(True)
        got = {}
        for root in (True, False):
            y, est, _ = op(x, probes, idx, *args, root)
            got[root] = outputs_and_grads((y, est if root else safe_sqrt(est)), [x] + weights + biases)
        assert got[True][1][1] == 0 and all(torch.isfinite(g).all() for g in got[True][2:])
        assert_close_all(got[True], got[False])
        torch.library.opcheck(op.default, (x.detach(), probes, idx, *args, True))

    @pytest.mark.parametrize("root", [False, True])
    def test_scale_multiplies_the_estimate_and_its_gradient(self, root):
        """scale=s returns s * est (or s * sqrt(est)) and the gradients of that: equal to the unscaled op's
        output times s, float64, with a zero probe row under root; opcheck with the scale."""
        op, _, _, x, probes, idx, args = self.case([7, 6, 4, 3], [nn.LeakyReLU(0.2), nn.ReLU(), None],
                                                   [True, False, True], seed=6, rows=(1, 4, 1))
        weights, biases = args[:2]
        probes[:, 2] = 0.0
        x.requires_grad_(True)
        got = {}
        for scale in (1.0, 0.37):
            y, est, _ = op(x, probes, idx, *args, root, scale)
            got[scale] = outputs_and_grads((y, est if scale != 1.0 else 0.37 * est), [x] + weights + biases)
        assert_close_all(got[0.37], got[1.0])
        torch.library.opcheck(op.default, (x.detach(), probes, idx, *args, root, 0.37))
