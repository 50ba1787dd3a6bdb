r"""Dual-stream Linear (+bias) + activation: the specification (plain PyTorch).

A dual-stream layer carries the primal batch and K forward-mode tangent
streams (JVPs) through ``y = s(x W^T + b)``:

    z     = x W^T + b                      x: [B, IN], W: [OUT, IN], b: [OUT] or None
    y     = s(z)                           y: [B, OUT]
    u_k   = t_k W^T                        t: [K, R, IN]   (no bias on tangents)
    t'_k  = s'(z[index]) * u_k             t': [K, R, OUT]

The tangent rows correspond to primal rows ``index`` (``R = len(index)``), or to
all rows when ``index`` is None (``R = B``); this lets a penalty ride on a
subset of the batch while the primal covers all of it.

The last layer can instead return the per-row Hutchinson sum without the
tangents: ``sq[r] = (1/K) sum_k ||t'_k[r]||^2``  -> [R].

Training differentiates *through* the tangents: the backward of ``t'`` with
respect to ``z`` needs ``s''(z)`` for smooth activations. For ReLU and
leaky ReLU ``s'`` is piecewise constant (a mask from the primal, no gradient
through it). The functions below are written so that plain autograd gives the
exact backward; fast backends must match them (float64 to ~1e-10).

Activations (name, s, s', s''):
  identity    z                      1                      0
  relu        max(z, 0)              [z > 0]                0
  leaky_relu  z if z > 0 else a z    1 if z > 0 else a      0
  gelu        z Phi(z)               Phi + z phi            phi (2 - z^2)
  gelu_tanh   z/2 (1 + tanh(g))      see act_d1             see act_d2      (g = c (z + 0.044715 z^3), c = sqrt(2/pi))
  silu        z sig(z)               sig (1 + z (1 - sig))  sig (1 - sig) (2 + z (1 - 2 sig))
  tanh        tanh z                 1 - th^2               -2 th (1 - th^2)
  sigmoid     sig(z)                 sig (1 - sig)          sig (1 - sig) (1 - 2 sig)
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

ACTIVATIONS = ("identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
# Integer codes shared by the C++/CUDA and Triton kernels.
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
PIECEWISE_LINEAR = ("identity", "relu", "leaky_relu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_A = 0.044715


def _phi(z):
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _Phi(z):
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))


def act_fwd(z: torch.Tensor, act: str, alpha: float = 0.01) -> torch.Tensor:
    """s(z)."""
    if act == "identity":
        return z
    if act == "relu":
        return torch.relu(z)
    if act == "leaky_relu":
        return torch.where(z > 0, z, alpha * z)
    if act == "gelu":
        return z * _Phi(z)
    if act == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_A * z ** 3)))
    if act == "silu":
        return z * torch.sigmoid(z)
    if act == "tanh":
        return torch.tanh(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def act_d1(z: torch.Tensor, act: str, alpha: float = 0.01) -> torch.Tensor:
    """s'(z), differentiable in z by autograd where s'' != 0."""
    if act == "identity":
        return torch.ones_like(z)
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, alpha))
    if act == "gelu":
        return _Phi(z) + z * _phi(z)
    if act == "gelu_tanh":
        th = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_A * z ** 3))
        dg = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_A * z * z)
        return 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * dg
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if act == "tanh":
        th = torch.tanh(z)
        return 1.0 - th * th
    if act == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def act_d2(z: torch.Tensor, act: str, alpha: float = 0.01) -> torch.Tensor:
    """s''(z) in closed form (the fast backends' formulas; tested against autograd of act_d1)."""
    if act in PIECEWISE_LINEAR:
        return torch.zeros_like(z)
    if act == "gelu":
        return _phi(z) * (2.0 - z * z)
    if act == "gelu_tanh":
        g = _SQRT_2_OVER_PI * (z + _GELU_TANH_A * z ** 3)
        th = torch.tanh(g)
        sech2 = 1.0 - th * th
        dg = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_A * z * z)
        d2g = _SQRT_2_OVER_PI * 6.0 * _GELU_TANH_A * z
        return sech2 * dg + 0.5 * z * (-2.0 * th * sech2 * dg * dg + sech2 * d2g)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    if act == "tanh":
        th = torch.tanh(z)
        return -2.0 * th * (1.0 - th * th)
    if act == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (1.0 - 2.0 * s)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def dual_linear(
    x: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act: str = "identity",
    alpha: float = 0.01,
    index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Primal ``y = s(x W^T + b)`` [B, OUT] and tangents ``t' = s'(z[index]) * (t W^T)`` [K, R, OUT]."""
    z = x @ weight.t()
    if bias is not None:
        z = z + bias
    y = act_fwd(z, act, alpha)
    zr = z if index is None else z.index_select(0, index)
    t_out = act_d1(zr, act, alpha) * (t @ weight.t())
    return y, t_out


def dual_linear_sqnorm(
    x: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act: str = "identity",
    alpha: float = 0.01,
    index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Primal ``y`` [B, OUT] and the per-row Hutchinson sum ``(1/K) sum_k ||t'_k||^2`` [R]."""
    y, t_out = dual_linear(x, t, weight, bias, act, alpha, index)
    return y, t_out.pow(2).sum(dim=(0, 2)) / t_out.shape[0]
