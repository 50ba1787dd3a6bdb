r"""The output-space ("reverse") estimator for piecewise-linear MLPs in one pass.

For an MLP ``h_l = s_l(z_l)``, ``z_l = h_{l-1} W_l^T + b_l`` whose activations
are piecewise linear (identity, ReLU, leaky ReLU), the Jacobian at x is
``J = D_L W_L ... D_1 W_1`` with ``D_l = diag(s_l'(z_l))`` constant on x's
linear region. For output probes ``u_k`` (``E[u u^T] = I``):

    delta_L = D_L u,   delta_{l-1} = D_{l-1} (W_l^T delta_l)      (the VJP chain)
    g = J^T u = W_1^T delta_1,           est = (1/K) sum_k ||g_k||^2
    t_0 = g,           t_l = D_l W_l t_{l-1}                       (a forward tangent along J^T u)
    d est / d W_l = (2/K) sum_k delta_{l,k} t_{l-1,k}^T,   d est / d b_l = 0

so the penalty gradient is a forward tangent pass in the direction ``J^T u``
plus outer products with the backward chain, and needs no double backward.
The backward stacks the loss and penalty terms: ``dW_l = [gamma_l; c delta_l]^T
[h_{l-1}; t_{l-1}]`` is one GEMM over ``(1 + K) B`` rows (``gamma`` is the loss's
backward chain, ``c = (2/K) d loss / d est``).

Per probe this costs one GEMM per layer for the chain, one for the tangent and
one for the outer product: the same FLOPs as the forward-mode path (2x a plain
step for one probe over the batch), with the output-space estimator's lower
variance when there are few outputs.

Two implementations of the same math: the C++ op ``torch.ops.grokalign.reverse_mlp``
(``csrc/common/reverse_mlp.h``: ATen GEMMs with each device's elementwise passes, registered for
the CPU and CUDA keys, C++ autograd, stacked ``[h_l; t_l]`` buffers so each weight gradient is one
GEMM without a copy) and
:class:`_ReverseMLP` below (Python, the specification and the fallback when the
extension is not built). Both give the same numbers to rounding (tests).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ... import _backends
from .model import DropoutStep, FlattenStep, LinearStep, Step
from .reference import PIECEWISE_LINEAR
from .whole_mlp import whole_mlp_runner


def cpp_unavailable_reason(x: torch.Tensor) -> Optional[str]:
    """None when the C++ op ``grokalign::reverse_mlp`` can run on ``x`` (its device and dtype), else
    why not."""
    return _backends.op_unavailable_reason(("reverse_mlp", "reverse_mlp_backward"), x)


def unavailable_reason(steps: Optional[List[Step]], training: bool) -> Optional[str]:
    if steps is None:
        return "the model is not a supported nn.Sequential MLP"
    for s in steps:
        if isinstance(s, LinearStep) and s.act not in PIECEWISE_LINEAR:
            return (f"the one-pass reverse estimator needs piecewise-linear activations {PIECEWISE_LINEAR}, "
                    f"got {s.act!r}")
        if isinstance(s, DropoutStep) and training and s.p > 0:
            return "the one-pass reverse estimator does not run dropout in training mode"
    return None


def _slope(z: torch.Tensor, act: str, alpha: float) -> Optional[torch.Tensor]:
    if act == "identity":
        return None
    if act == "relu":
        return (z > 0).to(z.dtype)
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, alpha))


class _ReverseMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, U, index, acts, *params):
        # params: W_1, b_1, ..., W_L, b_L (b may be None)
        Ws, bs = params[0::2], params[1::2]
        L = len(Ws)
        K = U.shape[0]
        hs, Ds = [x], []
        h = x
        for l in range(L):
            z = h @ Ws[l].t()
            if bs[l] is not None:
                z = z + bs[l]
            act, alpha = acts[l]
            D = _slope(z, act, alpha)
            h = z if D is None else z * D
            Ds.append(D)
            hs.append(h)
        # The probes ride on the rows `index` (all rows when None): R of them.
        Dr = [D if D is None or index is None else D.index_select(0, index) for D in Ds]
        # The VJP chain delta_l = D_l W_{l+1}^T ... D_L u  ([K, R, n_l]).
        deltas = [None] * L
        d = U if Dr[-1] is None else U * Dr[-1]
        for l in range(L - 1, -1, -1):
            deltas[l] = d
            g = d @ Ws[l]
            if l > 0:
                d = g if Dr[l - 1] is None else g * Dr[l - 1]
        est = g.pow(2).sum(dim=(0, 2)) / K
        # The forward tangent along g = J^T u: t_0 = g, t_l = D_l W_l t_{l-1} (t_L is not needed).
        ts = [g]
        t = g
        for l in range(L - 1):
            t = t @ Ws[l].t()
            if Dr[l] is not None:
                t = t * Dr[l]
            ts.append(t)
        ctx.acts = acts
        ctx.K = K
        ctx.has_bias = [b is not None for b in bs]
        ctx.save_for_backward(*hs[:-1], *[D if D is not None else torch.empty(0) for D in Ds], *deltas, *ts, *Ws)
        ctx.L = L
        return hs[-1], est

    @staticmethod
    def backward(ctx, grad_out, grad_est):
        L, K = ctx.L, ctx.K
        saved = ctx.saved_tensors
        hs = saved[0:L]
        Ds = [None if D.numel() == 0 else D for D in saved[L:2 * L]]
        deltas = saved[2 * L:3 * L]
        ts = saved[3 * L:4 * L]
        Ws = saved[4 * L:5 * L]
        R = deltas[0].shape[1]
        grads_W = [None] * L
        grads_b = [None] * L
        gamma = None
        if grad_out is not None:
            gamma = grad_out if Ds[-1] is None else grad_out * Ds[-1]
        c = None if grad_est is None else (2.0 / K) * grad_est  # [R]
        for l in range(L - 1, -1, -1):
            left, right = [], []
            if gamma is not None:
                left.append(gamma)
                right.append(hs[l])
            if c is not None:
                left.append((deltas[l] * c.view(1, R, 1)).reshape(K * R, -1))
                right.append(ts[l].reshape(K * R, -1))
            if left:
                grads_W[l] = torch.cat(left).t() @ torch.cat(right)
            if ctx.has_bias[l]:
                grads_b[l] = gamma.sum(0) if gamma is not None else torch.zeros_like(Ws[l][:, 0])
            if gamma is not None and (l > 0 or ctx.needs_input_grad[0]):
                g = gamma @ Ws[l]
                gamma = g if l == 0 or Ds[l - 1] is None else g * Ds[l - 1]
        grad_x = gamma if ctx.needs_input_grad[0] else None
        flat = []
        for l in range(L):
            flat += [grads_W[l], grads_b[l]]
        return (grad_x, None, None, None, *flat)


def reverse_forward(
    steps: List[Step], x: torch.Tensor, U: torch.Tensor, index: Optional[torch.Tensor] = None, *,
    implementation: str = "cpp",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(model(x) [B, C], est [R])``: the output-space estimate for probes ``U`` [K, R, C] at rows ``index``.

    ``implementation``: ``"cpp"`` (the op ``grokalign::reverse_mlp``; check
    :func:`cpp_unavailable_reason` first) or ``"python"`` (:class:`_ReverseMLP`).
    """
    h = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
    linear = [s for s in steps if isinstance(s, LinearStep)]
    assert all(isinstance(s, (LinearStep, FlattenStep, DropoutStep)) for s in steps)
    if implementation == "cpp":
        return whole_mlp_runner("reverse_mlp", steps)(h, U, index)
    if implementation != "python":
        raise ValueError(f'implementation must be "cpp" or "python", got {implementation!r}')
    acts = tuple((s.act, s.alpha) for s in linear)
    params = []
    for s in linear:
        params += [s.linear.weight, s.linear.bias]
    return _ReverseMLP.apply(h, U, index, acts, *params)
