"""C++/CPU and CUDA backend of the dual-stream Linear(+bias) + activation.

Python side of the ops ``torch.ops.grokalign.dual_linear`` and
``torch.ops.grokalign.dual_linear_sqnorm`` (schemas in ``csrc/grokalign.cpp``,
kernels in ``csrc/cpu/dual_linear_cpu.cpp`` and ``csrc/cuda/dual_linear_cuda.cu``):
fake implementations for torch.compile and the backend
entry points used by :mod:`.function`. The autograd formulas are C++
(``csrc/autograd/dual_linear_autograd.cpp``, a ``torch::autograd::Function`` per op
registered for the Autograd key): a Python ``register_autograd`` formula costs
~0.15-0.2 ms per layer on a 2-core CPU, 7% of a small MLP's training step.

Forward: the primal and tangent rows go through the GEMM into one stacked
buffer ``preact = [z; u]`` ([B + K*R, OUT]: the pre-activations ``z`` and the tangents'
``u = t W^T``), then one fused pass adds
the bias and writes ``y = s(z)`` and ``t' = s'(z[index]) * u`` (or accumulates
``sq``).

Saved for backward (only when a gradient is needed):
  * relu / leaky_relu: the uint8 mask ``[z > 0]`` [B, OUT] (s' is a function of
    the sign; s'' = 0 so u is not needed);
  * smooth activations: ``preact`` itself -- the forward GEMM's output, kept rather
    than recomputed, so the backward runs no extra GEMM (u cannot be recovered
    from ``t' = s'(z) u`` where s' vanishes);
  * identity: nothing;
  * the sqnorm variant: ``preact`` for every activation (``t'`` is recomputed from
    it in the backward epilogue and never stored);
  * ``x`` and ``t`` only when ``weight`` needs a gradient, ``weight`` only when
    ``x`` or ``t`` do.

Backward: one fused pass builds ``G = [gz; gu]`` with
``gz = gy s'(z) + s''(z) sum_{r -> b, k} gt'_{k,r} u_{k,r}`` and
``gu = gt' s'(z[index])`` (``gt' = (2/K) gsq[r] t'`` for the sqnorm), then
``gW = gz^T x + gu^T t``, ``gb = sum gz`` and ``[gx; gt] = G W``, each only if
the autograd context asks for it (the first layer's ``x`` and ``t`` need none).
The backward is not itself differentiable (no double backward).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._backends import cpp_unavailable_reason, extension_ops_reason
from .reference import ACT_CODE, ACTIVATIONS, PIECEWISE_LINEAR

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OPS = ("dual_linear", "dual_linear_sqnorm", "dual_linear_backward", "dual_linear_sqnorm_backward")
_MASK_CODES = frozenset((ACT_CODE["relu"], ACT_CODE["leaky_relu"]))
_PIECEWISE_CODES = frozenset(ACT_CODE[a] for a in PIECEWISE_LINEAR)


def _ops_reason() -> Optional[str]:
    """None if the extension is loaded and registers the dual_linear ops."""
    return extension_ops_reason(_OPS)


def unavailable_reason(x, t, weight, bias, act, index) -> Optional[str]:
    """None when this backend can serve the call, else the reason it cannot."""
    reason = cpp_unavailable_reason(x.device)
    if reason is not None:
        return reason
    reason = _ops_reason()
    if reason is not None:
        return reason
    if x.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "grokalign::dual_linear", "CUDA"
    ):
        return "the extension was built without the CUDA dual_linear kernels; rebuild with a CUDA torch"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (supported: {', '.join(map(str, SUPPORTED_DTYPES))})"
    if act not in ACT_CODE:
        return f"act must be one of {ACTIVATIONS}, got {act!r}"
    return None


if _ops_reason() is None:

    def _fake_forward(x, t, weight, index, act, save, sqnorm):
        torch._check(x.dim() == 2 and t.dim() == 3 and weight.dim() == 2, lambda: "dual_linear: bad ranks")
        B, K, R, OUT = x.shape[0], t.shape[0], t.shape[1], weight.shape[0]
        y = x.new_empty((B, OUT))
        out = x.new_empty((R,)) if sqnorm else x.new_empty((K, R, OUT))
        keep_preact = save and (sqnorm or act not in _PIECEWISE_CODES)
        preact = x.new_empty((B + K * R, OUT)) if keep_preact else x.new_empty((0, OUT))
        return y, out, preact

    @torch.library.register_fake("grokalign::dual_linear")
    def _dual_linear_fake(x, t, weight, bias, index, act, alpha, save):
        y, t_out, preact = _fake_forward(x, t, weight, index, act, save, sqnorm=False)
        keep_mask = save and act in _MASK_CODES
        shape = (x.shape[0], weight.shape[0]) if keep_mask else (0, 0)
        return y, t_out, x.new_empty(shape, dtype=torch.uint8), preact

    @torch.library.register_fake("grokalign::dual_linear_sqnorm")
    def _dual_linear_sqnorm_fake(x, t, weight, bias, index, act, alpha, save):
        return _fake_forward(x, t, weight, index, act, save, sqnorm=True)

    def _fake_backward(grad_y, grad_tan, dims, output_mask):
        torch._check(len(dims) == 5, lambda: f"dims must be [B, K, R, IN, OUT], got {dims}")
        B, K, R, IN, OUT = dims
        need_x, need_t, need_w, need_b = output_mask
        ref = grad_y if grad_y is not None else grad_tan
        rows = (B if need_x else 0) + (K * R if need_t else 0)
        gxt = ref.new_empty((rows, IN))
        gw = ref.new_empty((OUT, IN)) if need_w else ref.new_empty((0,))
        gb = ref.new_empty((OUT,)) if need_b else ref.new_empty((0,))
        return gxt, gw, gb

    @torch.library.register_fake("grokalign::dual_linear_backward")
    def _dual_linear_backward_fake(grad_y, grad_t_out, x, t, weight, mask, preact, index, dims, act, alpha, output_mask):
        return _fake_backward(grad_y, grad_t_out, dims, output_mask)

    @torch.library.register_fake("grokalign::dual_linear_sqnorm_backward")
    def _dual_linear_sqnorm_backward_fake(grad_y, grad_sq, x, t, weight, preact, index, dims, act, alpha, output_mask):
        return _fake_backward(grad_y, grad_sq, dims, output_mask)


def _save(*tensors) -> bool:
    """Whether the forward must keep state for a backward."""
    return torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors)


def dual_linear(
    x: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act: str = "identity",
    alpha: float = 0.01,
    index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y [B, OUT], t' [K, R, OUT])``; see :func:`.reference.dual_linear`."""
    y, t_out, _, _ = torch.ops.grokalign.dual_linear(
        x, t, weight, bias, index, ACT_CODE[act], float(alpha), _save(x, t, weight, bias)
    )
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
    """``(y [B, OUT], sq [R])``; see :func:`.reference.dual_linear_sqnorm`."""
    y, sq, _ = torch.ops.grokalign.dual_linear_sqnorm(
        x, t, weight, bias, index, ACT_CODE[act], float(alpha), _save(x, t, weight, bias)
    )
    return y, sq
