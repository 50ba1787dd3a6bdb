"""Per-sample Hutchinson reduction with a per-call backend."""

import torch

from ... import _backends
from . import reference, triton


def unavailable_reasons(g: torch.Tensor):
    reasons = {"reference": None, "cpp": _backends.cpp_unavailable_reason(g.device),
               "triton": triton.unavailable_reason(g)}
    if reasons["cpp"] is None and g.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        reasons["cpp"] = f"dtype {g.dtype} is not supported (float16/bfloat16/float32/float64)"
    return reasons


def probe_sqnorm(g: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Per-sample mean over probes of the squared norm of probe products.

    Args:
        g: ``[P, B, ...]``: P probe products (``J v_p`` or ``u_p^T J``) for each of B samples.
        backend: "auto", "reference", "cpp" or "triton".

    Returns:
        ``[B]``: ``(1/P) sum_p ||g[p, b]||^2``, differentiable (twice) with respect to ``g``.
    """
    if g.dim() < 2:
        raise ValueError(f"g must have shape [P, B, ...], got {list(g.shape)}")
    name = _backends.select(backend, unavailable_reasons(g), ("cpp", "triton", "reference"))
    if name == "cpp":
        from . import cpp

        return cpp.probe_sqnorm(g)
    if name == "triton":
        return triton.probe_sqnorm(g)
    return reference.probe_sqnorm(g)
