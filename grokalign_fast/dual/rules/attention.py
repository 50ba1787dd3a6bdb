r"""Attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` on the dual stream.

Both run as the explicit formula (PAPER.md, "Softmax attention"),

    S = Q K^T * scale (+ mask),   P = softmax(S),   O = P V,

whose pieces have rules of their own: the score and output products follow the product rule
(``S' = (Q' K^T + Q K'^T) * scale``, ``O' = P' V + P V'``), the softmax
``P' = P * (S' - rowsum(P * S'))``, a mask moves the primal scores only, and dropout on ``P`` takes
the primal rows' mask. That form materialises the ``T x S`` score matrix; from
:data:`FUSED_MIN_KEYS` keys up, without a mask or dropout, the C++ or the Triton kernels (as
``ctx.kernels`` asks) run instead :func:`~grokalign_fast.ops.attention_jvp.attention_jvp`
(:func:`_fused`: blockwise, the tangent streams sharing the primal's softmax statistics, memory
linear in the sequence length; :data:`FUSED_MIN_KEYS` was measured for the C++ op on the CPU). Up to
:data:`SMALL_MAX_SCORES` scores a head (a read-out query over a few tokens), the same formula runs
with broadcast products instead of batched GEMMs (:func:`small_attention_jvp`).

``nn.MultiheadAttention`` reshapes to the sequence-first layout inside its ``forward``, which
moves the batch dimension; while the engine runs, each instance's ``forward`` is replaced by
:func:`multihead_attention` (the same projections and masks, batch-first throughout), and
restored afterwards (:func:`batch_first_attention`).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.attention_jvp import attention_jvp
from ...ops.attention_jvp import cpp as attention_jvp_cpp
from ...ops.attention_jvp import unavailable_reasons as attention_jvp_unavailable
from ...ops.attention_jvp.reference import attention_jvp as reference_attention_jvp
from . import register
from ._args import arg
from ..streams import SampleMixingError, Streams


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` written out; run inside the engine's mode, every step goes
    through its rule."""
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, True)
    return torch.matmul(weights, v)


# Below this many keys the explicit formula (batched GEMMs over [T, S] scores) is faster than the
# blockwise C++ op, whose blocks are mostly padding there: forward + backward, one probe, causal, H 4,
# d 64, 2 CPU threads, the formula over the op: 0.80x at S = 8, 0.97x at 32, 1.07x at 64, 1.22x at
# 128, 1.72x at 256 (and the modular-addition transformer's S = 3: 0.18x).
FUSED_MIN_KEYS = 64

# Up to this many scores a head (queries x keys) the rule runs :func:`small_attention_jvp`: its
# products as broadcast multiply-sums, where bmm would run thousands of GEMVs of a few entries each.
# The modular-addition transformer's read-out (1 query, 3 keys, d 32, B 958, H 4, one probe), forward
# + backward of o_t, 2 CPU threads: 2.3 ms against 3.8 ms for the explicit formula's bmm.
SMALL_MAX_SCORES = 16


def _broadcast_scores(a, b):  # a [.., T, d], b [.., S, d] -> a b^T [.., T, S]
    return (a.unsqueeze(-2) * b.unsqueeze(-3)).sum(-1)


def _broadcast_mix(w, x):  # w [.., T, S], x [.., S, e] -> w x [.., T, e]
    return (w.unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)


def small_attention_jvp(q, k, v, q_t, k_t, v_t, causal=False, scale=None):
    """``(o, o_t)`` of the reference formula (:func:`grokalign_fast.ops.attention_jvp.reference.attention_jvp`,
    the same layouts), its products over ``d`` and the keys as broadcast multiplies and sums: ``[.., T, S, d]``
    intermediates, so for a few scores a head only (:data:`SMALL_MAX_SCORES`)."""
    return reference_attention_jvp(q, k, v, q_t, k_t, v_t, causal, scale, scores=_broadcast_scores,
                                   mix=_broadcast_mix)


def _fused(ctx: Streams, q, k, v, is_causal, scale):
    """Attention and its tangents as one :func:`~grokalign_fast.ops.attention_jvp.attention_jvp`
    call: the K tangent streams share the primal's softmax statistics, and no ``[T, S]`` matrix is
    kept. With a subsample the primal rows run plain SDPA and the op runs on the rows that carry
    tangents. None where the layout does not fit (then the explicit formula's rules serve)."""
    if not (ctx.is_dual(q) and ctx.is_dual(k) and ctx.is_dual(v)) or q.dim() not in (3, 4):
        return None
    if not (q.dim() == k.dim() == v.dim()) or q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1]:
        return None
    if not (ctx.block(q) == ctx.block(k) == ctx.block(v) == 1):
        return None
    heads = q.dim() == 4
    (q_p, q_t, _), (k_p, k_t, _), (v_p, v_t, _) = ctx.split(q), ctx.split(k), ctx.split(v)
    if not heads:  # [N, T, d]: one head
        q_p, k_p, v_p = q_p.unsqueeze(1), k_p.unsqueeze(1), v_p.unsqueeze(1)
        q_t, k_t, v_t = q_t.unsqueeze(2), k_t.unsqueeze(2), v_t.unsqueeze(2)
    backend = "reference"
    if k.shape[-2] >= FUSED_MIN_KEYS:
        if ctx.kernels == "cpp" and attention_jvp_cpp.unavailable_reason(q) is None:
            backend = ctx.kernel = "cpp"
        elif ctx.kernels == "triton" and attention_jvp_unavailable(q_p, k_p, v_p, q_t, k_t, v_t)["triton"] is None:
            backend = ctx.kernel = "triton"
    if backend == "reference" and q.shape[-2] * k.shape[-2] <= SMALL_MAX_SCORES:
        op = small_attention_jvp
    else:
        op = functools.partial(attention_jvp, backend=backend)
    if ctx.index is None:
        o, o_t = op(q_p, k_p, v_p, q_t, k_t, v_t, causal=is_causal, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q_p, k_p, v_p, is_causal=is_causal, scale=scale)
        _, o_t = op(ctx.rows(q_p), ctx.rows(k_p), ctx.rows(v_p), q_t, k_t, v_t, causal=is_causal, scale=scale)
    if not heads:
        o, o_t = o.squeeze(1), o_t.squeeze(2)
    return ctx.join(o, o_t)


@register("attention", F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx: Streams, func, args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    values = [arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa = values
    if attn_mask is None and dropout_p == 0.0 and not enable_gqa:
        out = _fused(ctx, q, k, v, bool(is_causal), scale)
        if out is not None:
            return out
    with ctx.mode:
        return explicit_attention(*values)


@register("masked_fill", torch.masked_fill, torch.Tensor.masked_fill)
def masked_fill(ctx: Streams, func, args, kwargs):
    """``x.masked_fill(mask, value)``: the primal rows take the value, the tangent rows 0 (a constant
    there); a mask laid out per row (from the input) or without a batch dimension."""
    x, mask, value = args[0], arg(args, kwargs, 1, "mask"), arg(args, kwargs, 2, "value")
    if not ctx.is_dual(x) or ctx.is_dual(value) or ctx.is_dual(mask):
        return None
    if ctx.is_aligned(mask):
        m_p, m_t, _ = ctx.split(mask)
        m_t = m_t.reshape((-1,) + tuple(m_t.shape[2:]))
    elif mask.dim() >= x.dim() and mask.shape[0] != 1:
        return None
    else:
        m_p = m_t = mask
    x_p, t, _ = ctx.split(x)
    return ctx.join(x_p.masked_fill(m_p, value), t.reshape((-1,) + tuple(t.shape[2:])).masked_fill(m_t, 0.0))


def multihead_attention(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` for ``batch_first=True`` written with functions the engine
    has rules for: the in-projections, heads, explicit attention (masks, dropout in training) and
    the out-projection. Returns ``(output, None)`` (attention weights are not computed here)."""
    if not self.batch_first:
        raise SampleMixingError(
            "nn.MultiheadAttention(batch_first=False) takes [T, B, E] inputs: the batch is not the first "
            "dimension. Build it with batch_first=True (inputs [B, T, E]) to use the dual-stream engine")
    if self.bias_k is not None or self.add_zero_attn:
        raise NotImplementedError("the dual-stream engine does not run nn.MultiheadAttention with add_bias_kv or "
                                  "add_zero_attn; use backend='reference'")
    E, H = self.embed_dim, self.num_heads
    if self._qkv_same_embed_dim:
        wq, wk, wv = self.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
    bq = bk = bv = None
    if self.in_proj_bias is not None:
        bq, bk, bv = self.in_proj_bias.chunk(3)

    def heads(x, w, b):
        y = F.linear(x, w, b)
        return y.view(y.shape[0], y.shape[1], H, -1).transpose(1, 2)  # [N, H, T, d]

    if key_padding_mask is not None:
        raise NotImplementedError("the dual-stream engine does not take a key_padding_mask for nn.MultiheadAttention "
                                  "yet; use backend='reference'")
    q, k, v = heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv)
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() != 2:
            raise NotImplementedError("the dual-stream engine takes a 2-D attn_mask [T, S] for nn.MultiheadAttention")
        mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask  # MHA's True hides; SDPA's True keeps
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
    out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], E)
    return F.linear(out, self.out_proj.weight, self.out_proj.bias), None


@contextlib.contextmanager
def batch_first_attention(model):
    """While the engine runs ``model``: every ``nn.MultiheadAttention`` in it runs
    :func:`multihead_attention`."""
    patched = []
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                patched.append(m)
                m.forward = multihead_attention.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
