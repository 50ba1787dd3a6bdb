"""grokalign_fast.metrics against independent references (autograd.functional, numpy), float64."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import grokalign_fast.metrics as M
from grokalign_fast.centroids import centroid
from utils import F64, exact_jacobians, gen, mlp

DT = torch.float64


class _Flat(nn.Module):
    """[B, 2, 3] inputs -> tanh(x W) with W: [6, 5]."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 5, generator=gen(3), dtype=DT))

    def forward(self, x):
        return torch.tanh(x.flatten(1) @ self.W)


# --------------------------------------------------------------------------- row alignment


@pytest.mark.parametrize("case", ["mlp", "image_shaped"])
def test_row_alignment_matches_per_row_cosine_loop(case):
    if case == "mlp":
        f, x = mlp([7, 6, 4], act=nn.GELU), torch.randn(3, 7, generator=gen(1), dtype=DT)
    else:
        f, x = _Flat(), torch.randn(4, 2, 3, generator=gen(2), dtype=DT)
    J = exact_jacobians(f, x)
    ref = torch.empty(J.shape[:2], dtype=DT)
    for b in range(J.shape[0]):
        for c in range(J.shape[1]):
            ref[b, c] = torch.nn.functional.cosine_similarity(J[b, c], x[b].flatten(), dim=0)
    got = M.jacobian_row_alignment(f, x)
    assert got.shape == (x.shape[0], J.shape[1])
    torch.testing.assert_close(got, ref, **F64)
    stats = M.jacobian_row_alignment_stats(f, x)
    torch.testing.assert_close(stats["max"], ref.max(1).values, **F64)
    torch.testing.assert_close(stats["min"], ref.min(1).values, **F64)
    torch.testing.assert_close(stats["mean"], ref.mean(1), **F64)
    torch.testing.assert_close(stats["abs_min"], ref.abs().min(1).values, **F64)


def test_jacobian_aligned_construction_gives_plus_minus_one():
    # f(x) = 0.5 ||x||^2 a  =>  J = a x^T: every row a_c x^T is a multiple of x (Definition 1).
    a = torch.tensor([2.0, -3.0, 0.5, -0.25], dtype=DT)
    f = lambda x: 0.5 * x.flatten(1).pow(2).sum(1, keepdim=True) * a
    x = torch.randn(3, 5, generator=gen(4), dtype=DT)
    cos = M.jacobian_row_alignment(f, x)
    torch.testing.assert_close(cos, torch.sign(a).expand(3, 4), **F64)
    stats = M.jacobian_row_alignment_stats(f, x)
    torch.testing.assert_close(stats["abs_min"], torch.ones(3, dtype=DT), **F64)
    torch.testing.assert_close(stats["max"], torch.ones(3, dtype=DT), **F64)
    torch.testing.assert_close(stats["min"], -torch.ones(3, dtype=DT), **F64)
    # J = a x^T has rank 1
    torch.testing.assert_close(M.jacobian_pc1(f, x), torch.ones(3, dtype=DT), **F64)
    torch.testing.assert_close(M.jacobian_effective_rank(f, x), torch.ones(3, dtype=DT), **F64)


def test_row_alignment_zero_row_is_zero_not_nan():
    f = lambda x: torch.stack([x.sum(1), 0 * x.sum(1)], dim=1)
    x = torch.randn(2, 3, generator=gen(5), dtype=DT)
    cos = M.jacobian_row_alignment(f, x)
    assert torch.isfinite(cos).all()
    assert (cos[:, 1] == 0).all()


# --------------------------------------------------------------------------- rank


def _np_rank_metrics(J):
    pc1, er = [], []
    for Jb in J.numpy():
        s = np.linalg.svd(Jb, compute_uv=False)
        pc1.append(s[0] ** 2 / np.sum(s**2))
        p = s / s.sum()
        p = p[p > 0]
        er.append(np.exp(-np.sum(p * np.log(p))))
    return torch.tensor(pc1, dtype=DT), torch.tensor(er, dtype=DT)


@pytest.mark.parametrize("sizes", [[7, 6, 4], [3, 5, 8]])  # C < D (VJPs) and C > D (JVPs)
def test_pc1_and_effective_rank_match_numpy_svd(sizes):
    f = mlp(sizes, act=nn.GELU, seed=6)
    x = torch.randn(3, sizes[0], generator=gen(7), dtype=DT)
    ref_pc1, ref_er = _np_rank_metrics(exact_jacobians(f, x))
    torch.testing.assert_close(M.jacobian_pc1(f, x), ref_pc1, **F64)
    torch.testing.assert_close(M.jacobian_effective_rank(f, x), ref_er, **F64)
    torch.testing.assert_close(M.jacobian_pc1(f, x, reduction="mean"), ref_pc1.mean(), **F64)
    torch.testing.assert_close(M.jacobian_effective_rank(f, x, reduction="sum"), ref_er.sum(), **F64)


def test_equal_singular_values_and_zero_jacobian():
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen(8), dtype=DT))
    x = torch.randn(2, 5, generator=gen(9), dtype=DT)
    torch.testing.assert_close(M.jacobian_pc1(lambda z: z @ Q, x), torch.full((2,), 0.2, dtype=DT), **F64)
    torch.testing.assert_close(M.jacobian_effective_rank(lambda z: z @ Q, x), torch.full((2,), 5.0, dtype=DT), **F64)
    zero = lambda z: 0 * z[:, :3]
    assert M.jacobian_pc1(zero, x).tolist() == [0.0, 0.0]
    assert M.jacobian_effective_rank(zero, x).tolist() == [0.0, 0.0]
    # rank-1 with tiny scale: no underflow to 0 / nan
    s = torch.tensor([[1e-200, 0.0, 0.0]], dtype=DT)
    assert M.pc1_from_singular_values(s).item() == 1.0
    assert M.effective_rank_from_singular_values(s).item() == 1.0


# --------------------------------------------------------------------------- layer-wise centroids


def test_layerwise_centroids_match_truncated_networks():
    model = mlp([7, 6, 5, 4], act=nn.Tanh, seed=10)  # 0 Linear, 1 Tanh, 2 Linear, 3 Tanh, 4 Linear
    x = torch.randn(3, 7, generator=gen(11), dtype=DT)
    cents = M.layerwise_centroids(model, x, ["0", "3", "4"])
    assert list(cents) == ["0", "3", "4"]
    torch.testing.assert_close(cents["4"], centroid(model, x), **F64)
    torch.testing.assert_close(cents["3"], centroid(model[:4], x), **F64)
    torch.testing.assert_close(cents["0"], centroid(model[:1], x), **F64)
    # dict form, and the root module "" is the whole model
    cents2 = M.layerwise_centroids(model, x, {"mid": model[2], "all": model})
    torch.testing.assert_close(cents2["mid"], centroid(model[:3], x), **F64)
    torch.testing.assert_close(cents2["all"], centroid(model, x), **F64)
    torch.testing.assert_close(M.layerwise_centroids(model, x, [""])[""], centroid(model, x), **F64)
    al = M.layerwise_centroid_alignment(model, x, ["3", "4"])
    for name, c in cents.items():
        if name in al:
            ref = torch.nn.functional.cosine_similarity(c, x, dim=1)
            torch.testing.assert_close(al[name], ref, **F64)
    mean = M.layerwise_centroid_alignment(model, x, ["4"], reduction="mean")["4"]
    torch.testing.assert_close(mean, al["4"].mean(), **F64)


def test_layerwise_centroids_image_shaped_input():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.GELU(), nn.Flatten(), nn.Linear(3 * 3 * 2, 4)).to(DT)
    x = torch.randn(2, 2, 5, 4, generator=gen(13), dtype=DT)
    cents = M.layerwise_centroids(model, x, ["1", "3"])
    assert cents["1"].shape == x.shape
    torch.testing.assert_close(cents["1"], centroid(model[:2], x), **F64)
    torch.testing.assert_close(cents["3"], centroid(model, x), **F64)


def test_layerwise_centroids_errors():
    model = mlp([4, 3, 2], act=nn.GELU, seed=14)
    x = torch.randn(2, 4, generator=gen(15), dtype=DT)
    with pytest.raises(ValueError, match="modules: 'nope' is not a submodule"):
        M.layerwise_centroids(model, x, ["nope"])
    with pytest.raises(TypeError, match="modules must be a dict"):
        M.layerwise_centroids(model, x, model[0])
    with pytest.raises(TypeError, match="modules must be a dict"):
        M.layerwise_centroids(model, x, "0")
    with pytest.raises(ValueError, match="modules is empty"):
        M.layerwise_centroids(model, x, [])
    with pytest.raises(ValueError, match="called 0 times"):
        M.layerwise_centroids(model, x, {"stray": nn.Linear(4, 3).to(DT)})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        M.layerwise_centroids(lambda z: z, x, ["0"])
    torch.manual_seed(16)
    lin = nn.Linear(4, 4).to(DT)
    twice = nn.Sequential(lin, nn.Tanh(), lin)
    with pytest.raises(ValueError, match="called 2 times"):
        M.layerwise_centroids(twice, x, ["0"])
    inplace = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2)).to(DT)
    with pytest.raises(ValueError, match="modified in place"):
        M.layerwise_centroids(inplace, x, ["0"])


# --------------------------------------------------------------------------- empirical NTK


def _ref_ntk(model, x1, x2):
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(x):
        G = []
        for b in range(x.shape[0]):
            out = model(x[b : b + 1]).reshape(-1)
            rows = []
            for c in range(out.numel()):
                g = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, params)]))
            G.append(torch.stack(rows))
        return torch.stack(G)  # [B, C, P]

    G1, G2 = grads(x1), grads(x2)
    out = torch.empty(G1.shape[0], G2.shape[0], G1.shape[1], G2.shape[1], dtype=DT)
    for a in range(G1.shape[0]):
        for b in range(G2.shape[0]):
            for i in range(G1.shape[1]):
                for j in range(G2.shape[1]):
                    out[a, b, i, j] = torch.dot(G1[a, i], G2[b, j])
    return out


@pytest.mark.parametrize("method", ["func", "autograd"])
def test_ntk_matches_per_sample_gradient_dot_products(method):
    model = mlp([4, 5, 3], act=nn.Tanh, seed=17)
    x1 = torch.randn(3, 4, generator=gen(18), dtype=DT)
    x2 = torch.randn(2, 4, generator=gen(19), dtype=DT)
    ref = _ref_ntk(model, x1, x2)
    full = M.empirical_ntk(model, x1, x2, method=method)
    assert full.shape == (3, 2, 3, 3)
    torch.testing.assert_close(full, ref, **F64)
    torch.testing.assert_close(
        M.empirical_ntk(model, x1, x2, reduction="trace", method=method), ref.diagonal(dim1=2, dim2=3).sum(-1), **F64
    )
    torch.testing.assert_close(
        M.empirical_ntk(model, x1, x2, reduction="diagonal", method=method), ref.diagonal(dim1=2, dim2=3), **F64
    )
    # symmetry Theta(x1, x2)[a, b] = Theta(x2, x1)[b, a]^T, and x2=None means x2 = x1
    torch.testing.assert_close(full, M.empirical_ntk(model, x2, x1, method=method).permute(1, 0, 3, 2), **F64)
    torch.testing.assert_close(M.empirical_ntk(model, x1, method=method), _ref_ntk(model, x1, x1), **F64)


def test_ntk_uses_only_trainable_parameters_and_scalar_output():
    model = mlp([3, 4, 1], act=nn.Tanh, seed=20)
    model[0].weight.requires_grad_(False)
    x1 = torch.randn(2, 3, generator=gen(21), dtype=DT)
    x2 = torch.randn(3, 3, generator=gen(22), dtype=DT)
    ref = _ref_ntk(model, x1, x2)
    torch.testing.assert_close(M.empirical_ntk(model, x1, x2), ref, **F64)
    gram = M.empirical_ntk(model, x1, reduction="trace")
    assert torch.linalg.eigvalsh(gram).min() > -1e-12  # PSD


def test_ntk_errors():
    model = mlp([3, 2], act=nn.GELU, seed=23)
    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(ValueError, match="x2 must have the per-sample shape of x1"):
        M.empirical_ntk(model, x, torch.randn(2, 4, dtype=DT))
    with pytest.raises(ValueError, match="reduction must be one of"):
        M.empirical_ntk(model, x, reduction="mean")
    with pytest.raises(ValueError, match="method must be one of"):
        M.empirical_ntk(model, x, method="jvp")
    with pytest.raises(TypeError, match="x1 must be a floating-point"):
        M.empirical_ntk(model, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="x2 must have a batch dimension"):
        M.empirical_ntk(model, x, torch.randn(3, dtype=DT))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        M.empirical_ntk(lambda z: z, x)
    frozen = mlp([3, 2], act=nn.GELU, seed=24).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        M.empirical_ntk(frozen, x)


# --------------------------------------------------------------------------- Fourier Gini


def _np_gini(v):
    v = np.asarray(v, dtype=np.float64)
    return np.abs(v[:, None] - v[None, :]).sum() / (2 * len(v) ** 2 * v.mean())


def _np_frequency_norms(W):
    """Group bins k and p-k of the full fft: one norm per real frequency, orthonormal scaling."""
    p = W.shape[0]
    X = np.fft.fft(W, axis=0)
    norms = []
    for k in range(p // 2 + 1):
        bins = {k, (p - k) % p}
        norms.append(np.sqrt(sum(np.sum(np.abs(X[j]) ** 2) for j in bins) / p))
    return np.array(norms)


def _np_real_basis(p):
    """Nanda et al.'s orthonormal real Fourier basis rows: const, cos_k, sin_k (+ Nyquist for even p)."""
    t = np.arange(p)
    rows = [np.ones(p)]
    for k in range(1, (p + 1) // 2):
        rows += [np.cos(2 * np.pi * k * t / p), np.sin(2 * np.pi * k * t / p)]
    if p % 2 == 0:
        rows.append(np.cos(np.pi * t))
    B = np.stack(rows)
    return B / np.linalg.norm(B, axis=1, keepdims=True)


@pytest.mark.parametrize("p", [13, 12])
def test_fourier_gini_matches_numpy_reference(p):
    W = torch.randn(p, 5, generator=gen(25), dtype=DT)
    W[:, 1] += 3 * torch.cos(2 * math.pi * 2 * torch.arange(p, dtype=DT) / p)
    ref_f = _np_gini(_np_frequency_norms(W.numpy()))
    ref_r = _np_gini(np.linalg.norm(_np_real_basis(p) @ W.numpy(), axis=1))
    assert M.fourier_gini(W).item() == pytest.approx(ref_f, rel=1e-10)
    assert M.fourier_gini(W, grouping="real").item() == pytest.approx(ref_r, rel=1e-10)
    # the token dimension can be the last one (unembedding [d, p])
    assert M.fourier_gini(W.T.contiguous(), dim=1).item() == pytest.approx(ref_f, rel=1e-10)
    assert M.fourier_gini(W.T.contiguous(), dim=-1, grouping="real").item() == pytest.approx(ref_r, rel=1e-10)


@pytest.mark.parametrize("p", [13, 12])
def test_fourier_gini_pure_frequency_noise_scaling_shift(p):
    t = torch.arange(p, dtype=DT).unsqueeze(1)
    phase = torch.tensor([0.3, 1.1, -2.0, 0.7], dtype=DT)
    amp = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=DT)
    pure = amp * torch.cos(2 * math.pi * 3 * t / p + phase)  # [p, 4]: one frequency, several phases
    n = p // 2 + 1
    assert M.fourier_gini(pure).item() == pytest.approx((n - 1) / n, abs=1e-10)
    noise = torch.randn(113, 64, generator=gen(26), dtype=DT)
    g_noise = M.fourier_gini(noise).item()
    assert 0.0 <= g_noise < 0.1
    assert M.fourier_gini(noise, grouping="real").item() < 0.1
    W = torch.randn(p, 3, generator=gen(27), dtype=DT)
    g = M.fourier_gini(W)
    torch.testing.assert_close(M.fourier_gini(-4.2 * W), g, **F64)
    torch.testing.assert_close(M.fourier_gini(1e-30 * W), g, **F64)
    torch.testing.assert_close(M.fourier_gini(torch.roll(W, 5, dims=0)), g, **F64)  # phase invariance
    assert M.fourier_gini(torch.zeros(p, 3, dtype=DT)).item() == 0.0
    assert M.fourier_gini(torch.ones(p, dtype=DT)).item() == pytest.approx((n - 1) / n, abs=1e-12)  # 1-D W: DC only


def test_fourier_gini_is_differentiable():
    W = torch.randn(7, 3, generator=gen(28), dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: M.fourier_gini(w), (W,))


def test_gini_and_fourier_gini_errors():
    with pytest.raises(TypeError, match="W must be a real floating-point tensor"):
        M.fourier_gini(torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        M.fourier_gini(np.ones((5, 3)))
    with pytest.raises(ValueError, match="dim must be an int in"):
        M.fourier_gini(torch.ones(5, 3, dtype=DT), dim=2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        M.fourier_gini(torch.ones(1, 3, dtype=DT))
    with pytest.raises(ValueError, match="W must be a nonempty tensor"):
        M.fourier_gini(torch.ones(5, 0, dtype=DT))
    with pytest.raises(ValueError, match="grouping must be one of"):
        M.fourier_gini(torch.ones(5, 3, dtype=DT), grouping="fft")
    with pytest.raises(ValueError, match="values must be nonnegative"):
        M.gini(torch.tensor([1.0, -1.0], dtype=DT))
    assert M.gini(torch.tensor([0.0, 0.0, 5.0], dtype=DT)).item() == pytest.approx(2 / 3)
    assert M.gini(torch.zeros(4, dtype=DT)).item() == 0.0


# --------------------------------------------------------------------------- Jacobian metrics: bad inputs


def test_jacobian_metric_errors():
    f = mlp([3, 2], act=nn.GELU, seed=29)
    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        M.jacobian_row_alignment(f, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="x must have a batch dimension"):
        M.jacobian_pc1(f, torch.randn(3, dtype=DT))
    with pytest.raises(TypeError, match="f must be callable"):
        M.jacobian_effective_rank("f", x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        M.jacobian_pc1(f, x, reduction="max")
    with pytest.raises(ValueError, match="f\\(x\\) changed the batch size"):
        M.jacobian_row_alignment_stats(lambda z: z.sum(0, keepdim=True), x)
