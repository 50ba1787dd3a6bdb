"""Models that ship with the package (no download): the builders the experiments, the benchmarks
and the tests share."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn


def mlp(
    sizes: Sequence[int],
    *,
    act=nn.ReLU,
    bias: bool = False,
    init_scale: float = 1.0,
    dtype: Optional[torch.dtype] = None,
    seed: Optional[int] = None,
) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) -> act() -> ... -> Linear(sizes[-2], sizes[-1])`` as an ``nn.Sequential``.

    Args:
        sizes: layer widths, input first (at least two).
        act: the activation module class placed between Linear layers (none after the last).
        bias: give every Linear a bias.
        init_scale: PyTorch's default init, every parameter then multiplied by this factor
            (Omnigrok's large-init grokking set-up uses 8).
        dtype: the parameters' dtype (None: the default dtype).
        seed: if given, ``torch.manual_seed(seed)`` before the parameters are drawn.
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be at least two positive ints, got {sizes!r}")
    if seed is not None:
        torch.manual_seed(seed)
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    model = nn.Sequential(*layers)
    scale_(model, init_scale)
    return model if dtype is None else model.to(dtype)


@torch.no_grad()
def scale_(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every parameter of ``model`` by ``factor`` in place; returns ``model``."""
    if factor != 1.0:
        for p in model.parameters():
            p.mul_(factor)
    return model


def cnn6(in_channels: int = 3, classes: int = 10, *, width: int = 32, size: int = 32, batch_norm: bool = False,
         bias: bool = True) -> nn.Sequential:
    """The 6-convolution CNN of the CIFAR-10 experiments: three stages of two 3x3 convolutions (width,
    2 width, 4 width channels, ReLU, optionally BatchNorm after each convolution) each followed by a
    2x2 max-pool, then a Linear classifier on the flattened ``4 width x size/8 x size/8`` features.

    Args:
        in_channels, classes: input channels and outputs.
        width: channels of the first stage.
        size: input height and width (a multiple of 8).
        batch_norm: BatchNorm2d after each convolution.
        bias: convolutions and the classifier carry biases.
    """
    if size % 8:
        raise ValueError(f"size must be a multiple of 8 (three 2x2 max-pools), got {size}")
    layers: List[nn.Module] = []
    c = in_channels
    for stage in range(3):
        out = width * 2 ** stage
        for _ in range(2):
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=bias and not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            c = out
        layers.append(nn.MaxPool2d(2))
    side = size // 8
    layers += [nn.Flatten(), nn.Linear(c * side * side, classes, bias=bias)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, ReLU, and the identity (or a 1x1
    convolution with BatchNorm where the shape changes) added before the last ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return torch.relu(out)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (CIFAR): a 3x3 stem without max-pool, four stages of two
    :class:`BasicBlock` (width, 2, 4, 8 width channels; stride 2 from the second stage), global
    average pooling and a Linear classifier. ``width=64`` is the standard network."""

    def __init__(self, in_channels: int = 3, classes: int = 10, *, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks: List[nn.Module] = []
        c = width
        for stage in range(4):
            out = width * 2 ** stage
            for i in range(2):
                blocks.append(BasicBlock(c, out, stride=2 if (stage > 0 and i == 0) else 1))
                c = out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class GPTBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``, with causal
    self-attention through ``F.scaled_dot_product_attention`` and a GELU MLP of width ``4 d``."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} must be divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(B, T, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        o = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + self.proj(o.transpose(1, 2).reshape(B, T, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-style causal language model: token and learned positional embeddings, ``layers``
    :class:`GPTBlock`, a final LayerNorm and an unembedding to ``vocab`` logits per position.
    ``tokens [B, T] (T <= context) -> logits [B, T, vocab]``. The Jacobian of GrokAlign is taken at
    the token embedding's output (:mod:`grokalign_fast.dual.embedding`)."""

    def __init__(self, vocab: int, *, d_model: int = 256, layers: int = 4, heads: int = 4, context: int = 256,
                 dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.pos.num_embeddings:
            raise ValueError(f"tokens has {T} positions, more than the model's context {self.pos.num_embeddings}")
        x = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln(x))
