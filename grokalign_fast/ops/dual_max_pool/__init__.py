r"""``grokalign::dual_max_pool``: the dual-stream engine's max pool as one gather.

A max pool is ``y = z[argmax]`` with the argmax piecewise constant in z, so its Jacobian-vector
product gathers the tangent at the primal's argmax (PAPER.md). On stacked rows ``z [N, C, L]``
(the pooled dimensions flattened; primal rows ``[0, P)``, tangent row ``j`` riding on primal row
``src(j) = index[j % R]``, or ``j % P`` without index) and the primal rows' argmax indices
``idx [P, C, Lout]`` (from ATen's max pool with ``return_indices=True`` on the primal rows):

    out[r, c, o] = z[r, c, idx[src(r), c, o]]              (src(r) = r for a primal row)

so the primal rows get their maxima and the tangent rows their JVPs. The backward scatters:
``grad_z[r, c, idx[src(r), c, o]] += g[r, c, o]`` (windows may overlap). Only ``idx`` (and the
index) is saved. The plain-PyTorch rule (:func:`reference`) gathers the same way after an index copy
for every tangent row when the penalty rides on a subsample.

Kernels: ``csrc/cpu/dual_max_pool_cpu.cpp``, ``csrc/cuda/dual_max_pool_cuda.cu`` (checks in
``csrc/common/dual_max_pool.h``); autograd (C++): ``csrc/autograd/dual_max_pool_autograd.cpp``; the
Triton kernels of the same op: :mod:`.triton`. This module registers the fakes, and
:func:`unavailable_reason` says when the op cannot serve.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _backends
from .._stacked_rows import source_rows

_OPS = ("dual_max_pool", "dual_max_pool_backward")


def unavailable_reason(z: torch.Tensor) -> Optional[str]:
    """None when ``grokalign::dual_max_pool`` can run on ``z`` (its device and dtype), else why not."""
    return _backends.op_unavailable_reason(_OPS, z)


def reference(z: torch.Tensor, idx: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """The op in plain PyTorch: ``out [N, C, Lout]``, differentiable in ``z`` (its backward, a
    scatter-add, is the op's)."""
    N, P = z.shape[0], idx.shape[0]
    if index is None:  # every stream lines up with the primal rows: the indices broadcast over them
        streams = (N // P, P) + tuple(idx.shape[1:])
        return z.reshape((N // P, P) + tuple(z.shape[1:])).gather(-1, idx.expand(streams)).reshape(
            (N,) + tuple(idx.shape[1:]))
    return z.gather(-1, torch.cat([idx, idx[source_rows(N, P, index, z.device)]]))


if _backends.extension_ops_reason(_OPS) is None:

    @torch.library.register_fake("grokalign::dual_max_pool")
    def _dual_max_pool_fake(z, idx, index):
        torch._check(z.dim() == 3, lambda: f"dual_max_pool: z must be [N, C, L], got {z.shape}")
        return z.new_empty((z.shape[0], z.shape[1], idx.shape[2]))

    @torch.library.register_fake("grokalign::dual_max_pool_backward")
    def _dual_max_pool_backward_fake(grad, idx, index, length):
        return grad.new_empty((grad.shape[0], grad.shape[1], length))


def dual_max_pool(z: torch.Tensor, idx: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` of ``grokalign::dual_max_pool`` (see the module doc); differentiable in ``z``.

    Args:
        z: ``[N, C, L]`` stacked rows, the primal rows first.
        idx: ``[P, C, Lout]`` long, the primal rows' argmax into L.
        index: ``[R]`` long, the primal row of each of a stream's tangent rows; None: ``j % P``.
    """
    return torch.ops.grokalign.dual_max_pool(z, idx, index)


_ARGMAX_OPS = ("max_pool2d_argmax",)

if _backends.extension_ops_reason(_ARGMAX_OPS) is None:

    @torch.library.register_fake("grokalign::max_pool2d_argmax")
    def _max_pool2d_argmax_fake(z, kernel_size, stride, padding, dilation, ceil_mode):
        torch._check(z.dim() == 4, lambda: f"max_pool2d_argmax: z must be [N, C, H, W], got {z.shape}")
        Ho, Wo = (_out_size(z.shape[2 + i], kernel_size[i], padding[i], stride[i], dilation[i], ceil_mode)
                  for i in range(2))
        return z.new_empty((z.shape[0], z.shape[1], Ho, Wo), dtype=torch.long)


def _out_size(n, k, pad, stride, dil, ceil_mode):
    """ATen's pooling output size (a last window starting in the right padding only is dropped)."""
    num = n + 2 * pad - dil * (k - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = num // stride + 1
    if ceil_mode and (out - 1) * stride >= n + pad:
        out -= 1
    return out


def argmax_unavailable_reason(z: torch.Tensor) -> Optional[str]:
    """None when ``grokalign::max_pool2d_argmax`` can run on ``z`` (its device and dtype), else why not."""
    return _backends.op_unavailable_reason(_ARGMAX_OPS, z)


def max_pool2d_argmax(z: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                      ceil_mode: bool = False) -> torch.Tensor:
    """The indices ``F.max_pool2d(z, ..., return_indices=True)`` returns (equal to them: ties take the
    window's first entry, NaN its last NaN), without the values: ``[N, C, Ho, Wo]`` long, flat into
    ``H W``. The arguments are ``F.max_pool2d``'s (``stride=None``: the kernel size). Not
    differentiable (an index). ``grokalign::max_pool2d_argmax``: the dual-stream engine's max pool
    rule takes the primal rows' argmax from it (ATen's max pool computes the values too, with a
    branch per comparison: ``bench/max_pool_argmax.py``)."""
    from torch.nn.modules.utils import _pair

    k = _pair(kernel_size)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _pair(stride)
    return torch.ops.grokalign.max_pool2d_argmax(z, list(k), list(s), list(_pair(padding)), list(_pair(dilation)),
                                                 bool(ceil_mode))
