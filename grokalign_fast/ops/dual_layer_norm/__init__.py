r"""``grokalign::dual_layer_norm``: the dual-stream engine's layer norm, RMS norm and group norm as one op.

On stacked rows ``s [N, n]`` (the normalised features flattened to n; primal rows ``[0, P)``,
tangent row ``j`` riding on primal row ``src(j) = index[j % R]``, or ``j % P`` without index; see
:mod:`grokalign_fast.dual.streams`), with ``c = 1`` for layer norm and ``c = 0`` for RMS norm
(``rms=True``: no centring), per primal row ``z``:

    mu = c mean(z),   rstd = 1 / sqrt(mean((z - mu)^2) + eps),   x = (z - mu) rstd
    primal row:      y  = x w + b
    tangent row j:   t' = w rstd (t - c mean(t) - x mean(x t))        (x of src(j))

the exact per-sample JVP (layer norm: ``w (t_c - x mean(x t_c)) / sigma`` with ``t_c = t - mean(t)``;
RMS norm: ``w r (t - z r^2 mean(z t))``; :mod:`grokalign_fast.dual.rules.norm`). ``w``, ``b``: the
rows of ``weight``, ``bias`` (``[n]``, or ``[G, n]`` for group norm: primal row ``p`` takes row
``p mod G``, a tangent row its source row's; None: 1 and 0).

For the cotangents ``gy`` of a primal row and ``g_j`` of its riders, ``h_j = g_j w``, ``a_j = mean(x t_j)``,
``e_j = mean(x h_j)``, ``u_j = rstd (t_j - c mean(t_j) - x a_j)`` and ``S = sum_j <h_j, u_j>``, the
backward is

    grad t_j = rstd (h_j - c mean(h_j) - x e_j)
    grad z   = rstd (G - c mean(G) - x (mean(x G) + S / n)),    G = gy w - rstd sum_j (a_j h_j + e_j t_j)
    grad w   = sum gy x + sum g_j u_j,    grad b = sum gy          (per group, over the rows)

(the primal rows' terms in ``S`` and ``G`` are the tangent rows' second-order dependence on ``x``
and ``rstd``; the derivation is in ``csrc/common/dual_layer_norm.h``). The op saves the input rows,
the per-primal-row ``mean`` and ``rstd`` and the index; where the plain-PyTorch rule
(:func:`reference`, and the engine's ATen rules) runs var_mean, the centring, two means, the affine
and a join, each saving its intermediates for autograd.

Kernels: ``csrc/cpu/dual_layer_norm_cpu.cpp``, ``csrc/cuda/dual_layer_norm_cuda.cu``; autograd:
``csrc/autograd/dual_layer_norm_autograd.cpp``. This module registers the fakes,
:func:`unavailable_reason` says when the op cannot serve and :func:`reference` is the op in plain
PyTorch (autograd through the statistics).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _backends
from .._stacked_rows import source_rows

_OPS = ("dual_layer_norm", "dual_layer_norm_backward")


def unavailable_reason(s: torch.Tensor) -> Optional[str]:
    """None when ``grokalign::dual_layer_norm`` can run on ``s`` (its device and dtype), else why not."""
    return _backends.op_unavailable_reason(_OPS, s)


def reference(s: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], primal_rows: int,
              index: Optional[torch.Tensor], eps: float, rms: bool = False) -> torch.Tensor:
    """The op in plain PyTorch: ``out [N, n]``, differentiable in ``s``, ``weight`` and ``bias``
    (through the statistics too), in the rows' dtype."""
    P, n = primal_rows, s.shape[1]
    z = s[:P]
    if rms:
        mu = torch.zeros_like(z[:, :1])
        rstd = torch.rsqrt(z.pow(2).mean(1, keepdim=True) + eps)
    else:
        var, mu = torch.var_mean(z, dim=1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + eps)
    x = (z - mu) * rstd
    src = source_rows(s.shape[0], P, index, s.device)
    xs, rs, t = x[src], rstd[src], s[P:]
    c = 0.0 if rms else 1.0
    u = rs * (t - c * t.mean(1, keepdim=True) - xs * (xs * t).mean(1, keepdim=True))
    groups = 1
    for p in (weight, bias):
        if p is not None and p.dim() == 2:
            groups = p.shape[0]
    rows = torch.arange(P, device=s.device) % groups

    def param(p):
        return p.reshape(groups, n).to(s.dtype)

    y = x
    if weight is not None:
        w = param(weight)
        y, u = y * w[rows], u * w[rows[src]]
    if bias is not None:
        y = y + param(bias)[rows]
    return torch.cat([y, u])


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


if _backends.extension_ops_reason(_OPS) is None:

    @torch.library.register_fake("grokalign::dual_layer_norm")
    def _dual_layer_norm_fake(s, weight, bias, primal_rows, index, eps, rms):
        torch._check(s.dim() == 2, lambda: f"dual_layer_norm: s must be [N, n], got {s.shape}")
        stats = s.new_empty((primal_rows,), dtype=_stat_dtype(s.dtype))
        return torch.empty_like(s), stats, torch.empty_like(stats)

    @torch.library.register_fake("grokalign::dual_layer_norm_backward")
    def _dual_layer_norm_backward_fake(grad, s, weight, mean, rstd, primal_rows, index, rms, groups, output_mask):
        def param(need):
            return mean.new_empty((groups, s.shape[1]) if need else (0,))

        return (torch.empty_like(s) if output_mask[0] else s.new_empty((0,))), param(output_mask[1]), \
            param(output_mask[2])


def dual_layer_norm(s: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], primal_rows: int,
                    index: Optional[torch.Tensor], eps: float, rms: bool = False) -> torch.Tensor:
    """``out`` of ``grokalign::dual_layer_norm`` (see the module doc), differentiable in ``s``, ``weight``
    and ``bias``.

    Args:
        s: ``[N, n]`` stacked rows, the ``primal_rows`` primal rows first.
        weight, bias: ``[n]`` or ``[G, n]`` (G dividing ``primal_rows``), or None.
        index: ``[R]`` long, the primal row of each of a stream's tangent rows; None: ``j % P``.
        eps: added to the variance (the mean square for RMS norm).
        rms: RMS norm (no centring) instead of layer norm.
    """
    out, _, _ = torch.ops.grokalign.dual_layer_norm(s, weight, bias, primal_rows, index, float(eps), bool(rms))
    return out
