r"""C++/CUDA backend of ``attention_jvp``: the ops ``torch.ops.grokalign.attention_jvp`` and
``torch.ops.grokalign.attention_jvp_backward`` (schemas in ``csrc/grokalign.cpp``, kernels in
``csrc/cpu/attention_jvp_cpu.cpp`` and ``csrc/cuda/attention_jvp_cuda.cu``).

This module registers the ops' fakes (shapes, for torch.compile), says when the ops cannot serve
(:func:`unavailable_reason`) and gives the entry point :func:`attention_jvp_cpp`. The autograd is C++
(``csrc/autograd/attention_jvp_autograd.cpp``: the backward op, from the inputs, ``o``, ``o_t`` and the
row statistics ``lse`` and ``mu`` the forward returns; first order only). The kernels are blockwise (flash-style): memory linear in the
sequence lengths, never the ``[T, S]`` scores. The math: :mod:`.reference`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ... import _backends

_OPS = ("attention_jvp", "attention_jvp_backward")


def unavailable_reason(q: torch.Tensor) -> Optional[str]:
    """None when the ops can run on ``q``'s device and dtype, else why not."""
    return _backends.op_unavailable_reason(_OPS, q)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``lse`` and ``mu``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


if _backends.extension_ops_reason(_OPS) is None:

    @torch.library.register_fake("grokalign::attention_jvp")
    def _attention_jvp_fake(q, k, v, q_t, k_t, v_t, causal, scale):
        torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                     lambda: f"attention_jvp: q, k, v must be 4-D, got {q.shape}, {k.shape}, {v.shape}")
        torch._check(q_t.dim() == 5, lambda: f"attention_jvp: q_t must be [P, B, H, T, d], got {q_t.shape}")
        B, H, T, _ = q.shape
        P, dv, acc = q_t.shape[0], v.shape[-1], _acc_dtype(q.dtype)
        return (q.new_empty((B, H, T, dv)), q.new_empty((P, B, H, T, dv)), q.new_empty((B, H, T), dtype=acc),
                q.new_empty((P, B, H, T), dtype=acc))

    @torch.library.register_fake("grokalign::attention_jvp_backward")
    def _attention_jvp_backward_fake(grad_o, grad_o_t, q, k, v, q_t, k_t, v_t, o, o_t, lse, mu, causal, scale):
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, q_t, k_t, v_t))


def attention_jvp_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                      v_t: torch.Tensor, causal: bool = False, scale: Optional[float] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(o, o_t)`` of :func:`.reference.attention_jvp` through ``grokalign::attention_jvp``,
    differentiable in all six inputs.

    ``q [B, H, T, d]``, ``k [B, H, S, d]``, ``v [B, H, S, dv]``; the tangents ``q_t``, ``k_t``, ``v_t``
    have the primals' shapes (one probe) or a leading probe dimension ``P`` (all three alike);
    ``o [B, H, T, dv]`` and ``o_t`` in the tangents' layout (``[B, H, T, dv]`` or
    ``[P, B, H, T, dv]``). ``causal``: key ``j`` visible to query ``i`` iff ``j <= i``;
    ``scale`` defaults to ``1 / sqrt(d)``. No keys (S = 0: ``o = o_t = 0``) or no probes (P = 0) leave
    nothing to compute: those calls run the reference formula, which defines them.
    """
    if k.shape[-2] == 0 or (q_t.dim() == q.dim() + 1 and q_t.shape[0] == 0):
        from .reference import attention_jvp as reference

        return reference(q, k, v, q_t, k_t, v_t, causal, scale)
    probes = q_t.dim() == q.dim() + 1
    if not probes:
        q_t, k_t, v_t = q_t.unsqueeze(0), k_t.unsqueeze(0), v_t.unsqueeze(0)
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, o_t, _, _ = torch.ops.grokalign.attention_jvp(q, k, v, q_t, k_t, v_t, bool(causal), c)
    return o, (o_t if probes else o_t.squeeze(0))
