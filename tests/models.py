"""Small models shared by the tests (and the benchmarks): odd shapes on purpose."""
import math

import torch
from torch import nn


def mlp(sizes, act=nn.ReLU, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
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


def exact_sq_norms(f, x):
    """||J_b||_F^2 per sample from torch.autograd.functional.jacobian (independent of the library)."""
    out = []
    for b in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda xb: f(xb.unsqueeze(0)).squeeze(0), x[b])
        out.append(J.pow(2).sum())
    return torch.stack(out)


def exact_jacobians(f, x):
    """[B, C, D] per-sample Jacobians from torch.autograd.functional.jacobian."""
    Js = []
    for b in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda xb: f(xb.unsqueeze(0)).squeeze(0), x[b])
        Js.append(J.reshape(-1, x[b].numel()))
    return torch.stack(Js)


def model_cases():
    """(name, model, input) triples in float64."""
    g = torch.Generator().manual_seed(123)
    cases = [
        ("mlp_relu_bias", mlp([13, 11, 7, 5], nn.ReLU, bias=True), torch.randn(6, 13, generator=g, dtype=torch.float64)),
        ("mlp_relu_nobias", mlp([13, 11, 7, 5], nn.ReLU, bias=False), torch.randn(6, 13, generator=g, dtype=torch.float64)),
        ("mlp_gelu_bias", mlp([9, 8, 4], nn.GELU, bias=True), torch.randn(5, 9, generator=g, dtype=torch.float64)),
        ("mlp_gelu_nobias", mlp([9, 8, 12], nn.GELU, bias=False), torch.randn(5, 9, generator=g, dtype=torch.float64)),
    ]
    torch.manual_seed(1)
    cases.append(("cnn_pool", SmallCNN().double(), torch.randn(3, 2, 5, 7, generator=g, dtype=torch.float64)))
    torch.manual_seed(2)
    cases.append(("transformer_block", TinyBlock().double(), torch.randn(3, 5, 6, generator=g, dtype=torch.float64)))
    return cases
