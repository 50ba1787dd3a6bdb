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
