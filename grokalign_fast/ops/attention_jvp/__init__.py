r"""``attention_jvp``: scaled dot-product attention and its JVP along P tangents, differentiable in
all six inputs (the math: :mod:`.reference`), with a per-call backend.

Backends: ``"reference"`` (:mod:`.reference`, the specification, materialises ``[T, S]``),
``"triton"`` (:mod:`.triton`, flash-style kernels), ``"cpp"`` (:mod:`.cpp`, the C++/CUDA op).
Each fast backend module provides ``unavailable_reason`` (None when it can serve the call) and an
entry point with the reference's arguments whose results are differentiable in all six inputs.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch

from ... import _backends
from . import cpp
from .reference import attention_jvp as reference

ORDER = ("cpp", "triton", "reference")

__all__ = ["attention_jvp", "check_args", "reference", "unavailable_reasons"]


def check_args(q, k, v, q_t, k_t, v_t, causal, scale) -> None:
    """Shape/dtype/device checks shared by every backend, each error naming the argument."""
    named = dict(q=q, k=k, v=v, q_t=q_t, k_t=k_t, v_t=v_t)
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, H, T, d], got {list(q.shape)}")
    B, H, T, d = q.shape
    if d < 1:
        raise ValueError("q and k must have a head dimension d >= 1, got d=0")
    if k.dim() != 4 or tuple(k.shape[:2]) != (B, H) or k.shape[3] != d:
        raise ValueError(f"k must have shape [B={B}, H={H}, S, d={d}], got {list(k.shape)}")
    S = k.shape[2]
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, H, S):
        raise ValueError(f"v must have shape [B={B}, H={H}, S={S}, dv], got {list(v.shape)}")
    dv = v.shape[3]
    if q_t.dim() not in (4, 5):
        raise ValueError(f"q_t must have shape [B, H, T, d] or [P, B, H, T, d], got {list(q_t.shape)}")
    lead = tuple(q_t.shape[:1]) if q_t.dim() == 5 else ()
    prefix = [f"P={lead[0]}"] if lead else []
    for name, x, dims in (("q_t", q_t, dict(B=B, H=H, T=T, d=d)), ("k_t", k_t, dict(B=B, H=H, S=S, d=d)),
                          ("v_t", v_t, dict(B=B, H=H, S=S, dv=dv))):
        if tuple(x.shape) != lead + tuple(dims.values()):
            spec = ", ".join(prefix + [f"{key}={n}" for key, n in dims.items()])
            raise ValueError(f"{name} must have shape [{spec}] (the three tangents share one layout, with or "
                             f"without the probe dimension P), got {list(x.shape)}")
    dtypes = {x.dtype for x in named.values()}
    if len(dtypes) != 1:
        raise TypeError(f"q, k, v, q_t, k_t and v_t must share one dtype, got {sorted(map(str, dtypes))}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"attention_jvp takes floating-point tensors, got {q.dtype}")
    devices = {x.device for x in named.values()}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, q_t, k_t and v_t must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None (1/sqrt(d)) or a finite number > 0, got {scale!r}")


def unavailable_reasons(q, k, v, q_t, k_t, v_t) -> Dict[str, Optional[str]]:
    """Per backend, None (it can serve these checked arguments) or the reason it cannot."""
    from . import triton

    return {"reference": None, "cpp": cpp.unavailable_reason(q), "triton": triton.unavailable_reason(q, k, v, q_t, k_t, v_t)}


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                  v_t: torch.Tensor, *, causal: bool = False, scale: Optional[float] = None,
                  backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Scaled dot-product attention ``o`` and its JVP ``o_t`` along P tangents, in one pass that all
    tangents share (:mod:`.reference` gives the formulas).

    Args:
        q: ``[B, H, T, d]`` queries.
        k: ``[B, H, S, d]`` keys (``S`` may differ from ``T``: cross attention).
        v: ``[B, H, S, dv]`` values (``dv`` may differ from ``d``).
        q_t, k_t, v_t: the tangents of q, k, v: ``[B, H, T, d]``, ``[B, H, S, d]``, ``[B, H, S, dv]``
            (one tangent) or the same with a leading probe dimension ``P`` (``[P, B, H, T, d]``, ...);
            all three in the same layout.
        causal: mask as ``F.scaled_dot_product_attention(is_causal=True)`` (top-left aligned): key
            ``j`` is visible to query ``i`` iff ``j <= i``.
        scale: the score scale ``c`` in ``s = c q k^T``, > 0; default ``1/sqrt(d)``.
        backend: "auto" (cpp if it can serve, then triton on CUDA, else reference), "reference",
            "triton" or "cpp"; an explicit backend that cannot serve raises
            :class:`grokalign_fast.BackendUnavailableError` with the reason.

    Returns:
        ``(o, o_t)``: ``o [B, H, T, dv] = softmax(c q k^T) v`` and ``o_t`` (``[B, H, T, dv]`` or
        ``[P, B, H, T, dv]``, the tangents' layout), its derivative along each tangent.
        Differentiable in all six inputs through both outputs (first order).
    """
    check_args(q, k, v, q_t, k_t, v_t, causal, scale)
    name = _backends.select(backend, unavailable_reasons(q, k, v, q_t, k_t, v_t), ORDER)
    if name == "cpp":
        return cpp.attention_jvp_cpp(q, k, v, q_t, k_t, v_t, causal, scale)
    if name == "triton":
        from .triton import attention_jvp_triton

        return attention_jvp_triton(q, k, v, q_t, k_t, v_t, causal, scale)
    return reference(q, k, v, q_t, k_t, v_t, causal, scale)
