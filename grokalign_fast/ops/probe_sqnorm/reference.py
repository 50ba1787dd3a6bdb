"""Reference per-sample Hutchinson reduction (the specification).

``probe_sqnorm(g)[b] = (1/P) * sum_{p, n} g[p, b, n]^2`` for ``g`` of shape
``[P, B, ...]`` (P probe products per sample, features flattened).
"""
import math

import torch


def probe_sqnorm(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:])).pow(2).sum(dim=(0, 2)) / g.shape[0]
