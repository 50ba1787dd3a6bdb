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
``csrc/common/dual_max_pool.h``); autograd (C++): ``csrc/autograd/dual_max_pool_autograd.cpp``. This
module registers the fakes, and :func:`unavailable_reason` says when the op cannot serve.
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
