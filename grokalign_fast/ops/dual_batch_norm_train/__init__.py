r"""``grokalign::dual_batch_norm_train``: the dual-stream engine's batch norm in train mode as one op.

On stacked rows ``s [N, C, *spatial]`` (primal rows ``[0, P)``, then the tangent rows) the batch
statistics of channel c come from the ``n = P * prod(spatial)`` primal values only:
``mean_c``, ``var_c`` (biased), ``invstd_c = 1 / sqrt(var_c + eps)``; with ``w = weight`` (1 if
None) and ``b = bias`` (0 if None):

    primal rows:   y  = (z - mean) * invstd * w + b
    tangent rows:  t' = t * invstd * w

the per-sample Jacobian with the batch statistics held constant (:mod:`grokalign_fast.dual.rules.norm`).
The statistics stay functions of the primal rows, so for a cotangent ``g`` the backward is, per
channel, with ``sum_g`` and ``dot`` the sums of ``g`` and ``g (z - mean)`` over the primal rows and
``S`` the sum of ``g t`` over the tangent rows,

    grad z = invstd w (g - sum_g / n - (z - mean) invstd^2 (dot + S) / n)      (primal rows)
    grad t = g invstd w                                                        (tangent rows)
    grad w = invstd (dot + S),    grad b = sum_g

(ATen's batch-norm backward in train mode plus the tangent rows' dependence on ``invstd``: the
backward of :class:`grokalign_fast.dual.rules.norm._BatchNormTrain`). The running statistics are
updated as ``F.batch_norm`` updates them: ``running_mean = (1 - momentum) running_mean + momentum
mean`` and the same for ``running_var`` with the unbiased variance ``var * n / (n - 1)``.

The op saves the input rows and the two ``[C]`` statistics. Kernels:
``csrc/cpu/dual_batch_norm_train_cpu.cpp``, ``csrc/cuda/dual_batch_norm_train_cuda.cu`` (the
math in ``csrc/common/dual_batch_norm_train.h``); autograd (C++):
``csrc/autograd/dual_batch_norm_train_autograd.cpp``. This module registers the fakes, updates the
running statistics (:func:`dual_batch_norm_train`), :func:`unavailable_reason` says when the op cannot
serve, and :func:`reference` is the same map in plain PyTorch (autograd through the statistics).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import _backends

_OPS = ("dual_batch_norm_train", "dual_batch_norm_train_backward")


def unavailable_reason(s: torch.Tensor) -> Optional[str]:
    """None when ``grokalign::dual_batch_norm_train`` can run on ``s`` (its device and dtype), else why not."""
    return _backends.op_unavailable_reason(_OPS, s)


def update_running_stats(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         mean: torch.Tensor, var: torch.Tensor, n: int, momentum: float) -> None:
    """``F.batch_norm``'s update from the batch ``mean`` and biased ``var`` over ``n > 1`` values."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)


def reference(s: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], primal_rows: int,
              momentum: float, eps: float) -> torch.Tensor:
    """The op in plain PyTorch: ``out`` like ``s``, differentiable in ``s``, ``weight`` and ``bias``
    (through the statistics too); updates the running statistics."""
    P = primal_rows
    z = s[:P]
    dims = [0] + list(range(2, s.dim()))
    var, mean = torch.var_mean(z, dim=dims, unbiased=False)
    shape = (-1,) + (1,) * (s.dim() - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    out_p = (z - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        out_p = out_p + bias.view(shape)
    update_running_stats(running_mean, running_var, mean.detach(), var.detach(), z.numel() // z.shape[1], momentum)
    return torch.cat([out_p, s[P:] * scale.view(shape)])


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


if _backends.extension_ops_reason(_OPS) is None:

    @torch.library.register_fake("grokalign::dual_batch_norm_train")
    def _dual_batch_norm_train_fake(s, weight, bias, primal_rows, eps):
        torch._check(s.dim() == 3, lambda: f"dual_batch_norm_train: s must be [N, C, L], got {s.shape}")
        stats = s.new_empty((s.shape[1],), dtype=_stat_dtype(s.dtype))
        return torch.empty_like(s), stats, torch.empty_like(stats)

    @torch.library.register_fake("grokalign::dual_batch_norm_train_backward")
    def _dual_batch_norm_train_backward_fake(grad, s, weight, mean, var, primal_rows, eps, output_mask):
        def channel(need):
            return mean.new_empty((s.shape[1] if need else 0,))

        return (torch.empty_like(s) if output_mask[0] else s.new_empty((0,))), channel(output_mask[1]), \
            channel(output_mask[2])


def dual_batch_norm_train(s: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], primal_rows: int,
                          momentum: float, eps: float) -> torch.Tensor:
    """``out`` of ``grokalign::dual_batch_norm_train`` (see the module doc), differentiable in ``s``,
    ``weight`` and ``bias``; updates the running statistics (None: not tracked).

    Args:
        s: ``[N, C, *spatial]`` stacked rows, the ``primal_rows`` primal rows first (more than one
            value per channel among them).
        weight, bias: ``[C]`` or None.
        running_mean, running_var: ``[C]`` buffers or None.
        momentum, eps: as ``F.batch_norm``'s.
    """
    out, mean, var = torch.ops.grokalign.dual_batch_norm_train(s.reshape(s.shape[0], s.shape[1], -1), weight, bias,
                                                               primal_rows, float(eps))
    update_running_stats(running_mean, running_var, mean, var, primal_rows * math.prod(s.shape[2:]), momentum)
    return out.view(s.shape)
