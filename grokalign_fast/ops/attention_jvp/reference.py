r"""The specification of ``attention_jvp``: scaled dot-product attention and its forward-mode
derivative (JVP), by the explicit formula, differentiable by autograd in all six inputs.

For one head, queries ``q [T, d]``, keys ``k [S, d]``, values ``v [S, dv]`` and scale ``c``
(default ``1/sqrt(d)``):

    s = c q k^T                (masked: -inf above the diagonal when causal, top-left aligned as
                                F.scaled_dot_product_attention(is_causal=True): key j <= query i)
    p = softmax_j(s)           o = p v

Along tangents ``(q_t, k_t, v_t)`` (one per probe):

    s_t  = c (q_t k^T + q k_t^T)              (0 where masked)
    mu_i = sum_j p_ij s_t,ij                   (the softmax's centring term)
    o_t  = (p * (s_t - mu)) v + p v_t

Every probe shares ``p``, i.e. the primal's row maximum ``m_i`` and normaliser ``l_i``: a flash-style
kernel keeps ``lse_i = m_i + log l_i`` per row and, per probe, the running sums
``sum_j p_ij s_t,ij`` and ``sum_j p_ij (s_t,ij v_j + v_t,j)``.

**Backward** (``g_o``, ``g_t`` the gradients of a loss on ``o`` and ``o_t``; per probe ``a_ij =
v_j . g_t,i``; the probe sums run over the probes):

    g_v_j   = sum_i p_ij g_o,i + sum_probes sum_i p_ij (s_t,ij - mu_i) g_t,i
    g_vt_j  = sum_i p_ij g_t,i                                   (per probe)
    g_st_ij = p_ij (a_ij - o_i . g_t,i)                          (per probe)
    g_p_ij  = v_j . g_o,i + sum_probes [(s_t,ij - mu_i) a_ij + v_t,j . g_t,i - s_t,ij (o_i . g_t,i)]
    D_i     = o_i . g_o,i + sum_probes [o_t,i . g_t,i - mu_i (o_i . g_t,i)]   (= sum_j p_ij g_p_ij)
    g_s_ij  = p_ij (g_p_ij - D_i)
    g_q_i   = c sum_j g_s_ij k_j + c sum_probes sum_j g_st_ij k_t,j      g_qt_i = c sum_j g_st_ij k_j
    g_k_j   = c sum_i g_s_ij q_i + c sum_probes sum_i g_st_ij q_t,i      g_kt_j = c sum_i g_st_ij q_i

so a blockwise backward needs only the saved ``o``, ``o_t``, ``mu`` and ``lse`` per row besides the
inputs. :func:`attention_jvp` here materialises ``[T, S]`` and lets autograd differentiate it: it is
the ground truth the kernels are tested against.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """``[T, S]`` bool, True where key ``j`` is visible to query ``i`` (``j <= i``)."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril()


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                  v_t: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
                  scores: Callable = None, mix: Callable = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(o, o_t)`` by the explicit formula (module doc). ``q [B, H, T, d]``, ``k [B, H, S, d]``,
    ``v [B, H, S, dv]``; the tangents have the same shapes or a leading probe dimension ``P`` (all
    three alike), and ``o_t`` has the tangents' layout. The formula's two products can be given:
    ``scores(a [.., T, d], b [.., S, d]) -> a b^T`` and ``mix(w [.., T, S], x [.., S, e]) -> w x``
    (default: matmul)."""
    scores = scores or (lambda a, b: a @ b.transpose(-1, -2))
    mix = mix or (lambda w, x: w @ x)
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = c * scores(q, k)
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = mix(p, v)
    s_t = c * (scores(q_t, k) + scores(q, k_t))
    if mask is not None:
        s_t = s_t.masked_fill(~mask, 0.0)
    mu = (p * s_t).sum(-1, keepdim=True)
    o_t = mix(p * (s_t - mu), v) + mix(p, v_t)
    return o, o_t
