"""Python side of the C++/CUDA op ``torch.ops.grokalign.probe_sqnorm``:
fake (meta) implementations for torch.compile, and the entry point.

The schema and the CPU/CUDA kernels live in ``csrc/``; the autograd is C++
(``csrc/autograd/probe_sqnorm_autograd.cpp``: the backward op is itself
differentiable, for double backward). Importing this module without the
extension does nothing (the reason is reported by
``grokalign_fast._backends.cpp_unavailable_reason``).
"""
import math

import torch

from ..._backends import _load_extension

if _load_extension() is None:

    @torch.library.register_fake("grokalign::probe_sqnorm")
    def _probe_sqnorm_fake(g):
        torch._check(g.dim() == 3, lambda: f"probe_sqnorm: g must be [P, B, N], got {g.shape}")
        return g.new_empty((g.shape[1],))

    @torch.library.register_fake("grokalign::probe_sqnorm_backward")
    def _probe_sqnorm_backward_fake(g, grad_out):
        torch._check(g.dim() == 3, lambda: f"probe_sqnorm_backward: g must be [P, B, N], got {g.shape}")
        return torch.empty_like(g)


def probe_sqnorm(g: torch.Tensor) -> torch.Tensor:
    """``g``: [P, B, ...] -> [B] through the extension op."""
    g3 = g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:]))
    return torch.ops.grokalign.probe_sqnorm(g3)
