r"""The stacked layout of the dual stream: the primal batch and K tangent streams in one tensor.

A *dual* value is one tensor ``s`` whose leading dimension holds, in order,

- the primal rows of the B samples, and
- K tangent streams of R rows each, stream-major: tangent row ``k * R + r`` is the tangent
  (a Jacobian-vector product) of primal row ``index[r]`` (of row r when ``index`` is None,
  where R = B).

So ``N = B + K * R`` rows, and every heavy op (a GEMM, a convolution, a pooling window) runs
once over all of them, reading its weights once. A per-sample reshape may merge the batch with
the next dimension (``[N, T, d] -> [N * T, d]``); the leading dimension is then ``m * N`` with
every sample's m rows contiguous, and :class:`Streams` splits it the same way.

The tangent of a row depends on its primal row only (the per-sample Jacobian): nonlinear rules
read the primal rows' slopes (a ReLU mask, a max-pool argmax, a norm's statistics) and apply them
to the tangent rows of the same sample; linear rules run on the stacked rows as they are.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class SampleMixingError(ValueError):
    """The model mixes samples (a reduction, concatenation, slice or permutation across the batch
    dimension), so the per-sample Jacobian of the dual stream is not defined for it."""


class Streams:
    """The layout of one dual-stream call: B primal rows, K streams of R tangent rows.

    Dual tensors are recognised by identity (:meth:`is_dual`): the input stack and every result a
    rule marks with :meth:`mark`. Anything else (parameters, buffers, constants) is a constant of
    the Jacobian: it has no tangent.
    """

    def __init__(self, B: int, K: int, R: int, index: Optional[torch.Tensor]):
        if index is None and R != B:
            raise ValueError(f"R = {R} tangent rows per stream need an index when B = {B}")
        self.B, self.K, self.R, self.index = B, K, R, index
        self.N = B + K * R
        self.seed = None  # (tokens, probes) until the tokens' embedding seeds the tangents
        # The rules' kernels: "torch" (ATen ops), "cpp" (the extension's where one serves) or "triton"
        # (the Triton epilogues where one serves).
        self.kernels = "torch"
        self.kernel: Optional[str] = None  # set by a rule that ran a kernel for the current call
        self.mode = None  # the DualMode running the call
        self._dual: Dict[int, torch.Tensor] = {}
        self._aligned: Dict[int, torch.Tensor] = {}
        self._row_index: Dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ which values are dual
    def mark(self, s: torch.Tensor) -> torch.Tensor:
        """Record ``s`` as a dual value (kept alive for the call, so its id stays unique)."""
        self._dual[id(s)] = s
        return s

    def is_dual(self, v) -> bool:
        return isinstance(v, torch.Tensor) and self._dual.get(id(v)) is v

    def align(self, v: torch.Tensor) -> torch.Tensor:
        """A constant computed from the primal rows ([B*m, ...], e.g. a mask ``x > 0``) laid out for
        every stacked row, each tangent row taking its primal row's value. A value without the
        primal rows leading (a reduction over the batch) is returned as it is."""
        if v.dim() == 0 or v.shape[0] % self.B:
            return v
        m = v.shape[0] // self.B
        tangent = self.rows(v, m)
        out = torch.cat([v, tangent.unsqueeze(0).expand((self.K,) + tuple(tangent.shape)).reshape(
            (-1,) + tuple(v.shape[1:]))])
        self._aligned[id(out)] = out
        return out

    def is_aligned(self, v) -> bool:
        """True for a constant laid out by :meth:`align` (one value per stacked row)."""
        return isinstance(v, torch.Tensor) and self._aligned.get(id(v)) is v

    # ------------------------------------------------------------------ layout
    def block(self, s: torch.Tensor) -> int:
        """m: the rows per sample of the dual tensor ``s`` (its leading dimension is m * N)."""
        if s.dim() == 0 or s.shape[0] % self.N:
            raise SampleMixingError(
                f"a value of the model has leading dimension {s.shape[0] if s.dim() else '(scalar)'}, "
                f"not a multiple of the {self.N} stacked rows: the model reshapes or reduces across the batch"
            )
        return s.shape[0] // self.N

    def split(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """``(primal [B*m, ...], tangent [K, R*m, ...], m)``: views of ``s``. One ``torch.split``
        rather than two slices: its backward is one ``cat`` of the two gradients, where each slice's
        would fill a zero tensor of ``s``'s size and the two be added."""
        m = self.block(s)
        Bm = self.B * m
        primal, tangent = torch.split(s, [Bm, s.shape[0] - Bm])
        return primal, tangent.view((self.K, self.R * m) + tuple(s.shape[1:])), m

    def join(self, primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
        """Stack primal rows [B*m, ...] and tangent rows ([K, R*m, ...] or [K*R*m, ...]) into a dual value."""
        return self.mark(torch.cat([primal, tangent.reshape((-1,) + tuple(primal.shape[1:]))]))

    def rows(self, p: torch.Tensor, m: int = 1) -> torch.Tensor:
        """The primal-row value of every tangent row of one stream: ``p`` [B*m, ...] -> [R*m, ...]
        (``p`` itself when every row carries tangents), to broadcast against tangent [K, R*m, ...]."""
        if self.index is None:
            return p
        return p.index_select(0, self.row_index(m))

    def row_index(self, m: int) -> torch.Tensor:
        """[R*m]: the primal row of each tangent row of one stream, for m rows per sample."""
        idx = self._row_index.get(m)
        if idx is None:
            if m == 1:
                idx = self.index
            else:
                base = self.index.unsqueeze(1) * m
                idx = (base + torch.arange(m, device=base.device)).reshape(-1)
            self._row_index[m] = idx
        return idx

    def scale(self, s: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        """``s * slope`` on every row, where ``slope`` [B*m, ...] is given for the primal rows and each
        tangent row takes its primal row's: the rule of a positively homogeneous map (ReLU, leaky ReLU,
        a dropout mask), whose primal output is ``slope * z`` and whose tangent is ``slope * t``."""
        m = self.block(s)
        shape = tuple(s.shape[1:])
        if slope.dtype != s.dtype:
            # A bool mask (ReLU) as the value's dtype on the primal rows only: a multiply by it costs what
            # a ReLU costs, where torch.where took 2.3x that, forward and backward (CPU, [256, 32, 32, 32]).
            slope = slope.to(s.dtype)
        if self.index is None:
            view, full = s.view((self.K + 1, self.B * m) + shape), slope
        else:
            rows = self.rows(slope, m)
            view = s
            full = torch.cat([slope, rows.expand((self.K,) + tuple(rows.shape)).reshape((-1,) + tuple(slope.shape[1:]))])
        return self.mark((view * full).view((-1,) + shape))

    def add_bias_(self, out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Add ``bias`` (broadcast over a row) to the primal rows of ``out`` in place, for a fresh
        ``out`` that no backward has saved (a GEMM or convolution output). Its backward passes the
        gradient through unchanged and sums the primal rows' for the bias: no copy of the buffer."""
        return self.mark(_AddBiasToPrimal.apply(out, bias, self.B * self.block(out)))

    def add_to_primal(self, s: torch.Tensor, c) -> torch.Tensor:
        """``s + c`` on the primal rows, the tangent rows unchanged: adding a constant (a bias, a
        positional embedding) moves the primal and leaves the Jacobian as it is."""
        primal, tangent, _ = self.split(s)
        return self.join(primal + c, tangent)


class _AddBiasToPrimal(torch.autograd.Function):
    """``out[:rows] += bias`` in place, with the gradient of ``out`` passed through as it is."""

    @staticmethod
    def forward(ctx, out, bias, rows):
        out[:rows].add_(bias)
        ctx.mark_dirty(out)
        ctx.rows = rows
        ctx.bias_shape = bias.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_bias = None
        if ctx.needs_input_grad[1]:
            g = grad[: ctx.rows]
            shape = ctx.bias_shape
            # Sum over every dimension the bias broadcasts along.
            lead = g.dim() - len(shape)
            dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1]
            grad_bias = g.sum(dim=dims, keepdim=False).reshape(shape) if dims else g.reshape(shape)
        return grad, grad_bias, None
