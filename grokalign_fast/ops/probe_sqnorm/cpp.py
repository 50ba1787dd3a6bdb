"""Python side of the C++/CUDA op ``torch.ops.grokalign.probe_sqnorm``:
fake (meta) implementations for torch.compile and the autograd formula.

The schema and the CPU/CUDA kernels live in ``csrc/``; importing this module
without the extension does nothing (the reason is reported by
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

    def _setup_context(ctx, inputs, output):
        (g,) = inputs
        ctx.save_for_backward(g if ctx.needs_input_grad[0] else None)

    def _backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        if g is None:
            return None
        return _ProbeSqnormBackward.apply(g, grad_out.contiguous())

    class _ProbeSqnormBackward(torch.autograd.Function):
        """The backward op, itself differentiable (double backward for penalties
        whose gradient is taken again, e.g. gradgradcheck or meta-learning)."""

        @staticmethod
        def forward(ctx, g, grad_out):
            ctx.save_for_backward(g, grad_out)
            return torch.ops.grokalign.probe_sqnorm_backward(g, grad_out)

        @staticmethod
        def backward(ctx, gg):
            g, grad_out = ctx.saved_tensors
            scale = 2.0 / g.shape[0]
            d_g = d_grad = None
            if ctx.needs_input_grad[0]:
                d_g = scale * gg * grad_out.view(1, -1, 1)
            if ctx.needs_input_grad[1]:
                d_grad = scale * (gg * g).sum(dim=(0, 2))
            return d_g, d_grad

    torch.library.register_autograd("grokalign::probe_sqnorm", _backward, setup_context=_setup_context)


def probe_sqnorm(g: torch.Tensor) -> torch.Tensor:
    """``g``: [P, B, ...] -> [B] through the extension op."""
    g3 = g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:]))
    return torch.ops.grokalign.probe_sqnorm(g3)
