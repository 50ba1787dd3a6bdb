r"""What the Triton epilogues of the dual-stream engine share (:mod:`.dual_act.triton`,
:mod:`.dual_smooth_act.triton`, :mod:`.dual_max_pool.triton`, :mod:`.dual_batch_norm_train.triton`,
:mod:`.dual_layer_norm.triton`, :mod:`.probe_sqnorm.triton`): the availability check, the argument
checks of the stacked-row layout (:mod:`._stacked_rows`), the riders' table, the dtype the kernels
write and the block sizes of the row kernels.

The row kernels (activations, the max pool) give each program ``BR`` primal rows and ``BN`` columns:
it reads the primal values once, computes what the activation needs from them (a mask, ``s'``,
``s''``; the max pool: its argmax columns) into registers, and then serves every tangent row riding
on those primal rows (its *riders*: ``j = k R + r`` for every stream ``k`` and every ``r`` with
``index[r] = p``, or ``j = k P + p`` without index), as the C++ kernels do
(``csrc/common/stacked_rows.h``). Each tangent row is written by the one program of its primal row:
no atomics, the same order on every run (but for the max pool's backward, a scatter-add). With an
index the riders come from the table of :func:`riders` (a stable sort of the index and a binary
search on the device, no host synchronisation). Element offsets are int64 (``row * n`` may pass
``2^31``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backends

from ._triton import triton  # None without triton: unavailable_reason then says why

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Block sizes of the row kernels. On a GPU a program covers up to _GPU_ELEMS = 2048 entries
# (BR x BN, BN up to 1024 columns of one row for coalesced loads; 16 entries per thread at 4 warps):
# the kernels are memory-bound, and a tile that size keeps enough loads in flight per SM. Under
# the interpreter the tiles are small (BN <= 16, BR <= 4) so that the tests' odd shapes span several
# programs along both axes and every mask is exercised.
_GPU_ELEMS, _GPU_BN = 2048, 1024
_INTERPRETED_BR, _INTERPRETED_BN = 4, 16


def unavailable_reason(op: str, s: torch.Tensor) -> Optional[str]:
    """None when the Triton kernels of ``op`` can run on ``s`` (triton importable, a CUDA tensor or
    a CPU tensor under the interpreter, a floating dtype), else why not."""
    reason = _backends.triton_unavailable_reason(s.device)
    if reason is not None:
        return reason
    if s.dtype not in DTYPES:
        return f"the Triton {op} kernels take float16, bfloat16, float32 or float64 rows, not {s.dtype}"
    return None


def check_rows(op: str, s: torch.Tensor, primal_rows: int, index: Optional[torch.Tensor], dims: int = 2,
               name: str = "s") -> int:
    """Checks the stacked rows ``s`` (``dims`` dimensions, floating point; ``name``: the argument's
    name in the errors), ``primal_rows`` P in ``[1, N]`` and ``index`` ([R] long on ``s``'s device,
    values in ``[0, P)``; the ``N - P`` tangent rows a whole number of streams of R rows, or of P
    without index); returns R. Each error names the argument."""
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(s).__name__}")
    if s.dim() != dims:
        shape = "[N, n]" if dims == 2 else "[N, C, L]"
        raise ValueError(f"{op}: {name} (the stacked rows) must be {shape}, got {list(s.shape)}")
    if s.dtype not in DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {s.dtype}")
    N = s.shape[0]
    if isinstance(primal_rows, bool) or not isinstance(primal_rows, int) or not 1 <= primal_rows <= N:
        raise ValueError(f"{op}: primal_rows must be an int in [1, {N}], got {primal_rows!r}")
    P, R = primal_rows, primal_rows
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.long or index.numel() == 0:
            raise ValueError(f"{op}: index must be a non-empty 1-D long tensor, got "
                             f"{getattr(index, 'dtype', type(index).__name__)} {list(getattr(index, 'shape', []))}")
        if index.device != s.device:
            raise ValueError(f"{op}: index must be on {s.device} (the rows' device), got {index.device}")
        R = index.shape[0]
        if index.device.type == "cpu":
            bad = ((index < 0) | (index >= P)).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise ValueError(f"{op}: index[{i}] = {int(index[i])} is out of range for {P} primal rows")
        else:  # checked on the device, without a host synchronisation
            torch._assert_async(((index >= 0) & (index < P)).all(), f"{op}: index values must lie in [0, primal_rows)")
    if (N - P) % R:
        raise ValueError(f"{op}: the {N - P} tangent rows of {name} are not a whole number of streams of {R} rows "
                         f"({'len(index)' if index is not None else 'primal_rows'})")
    return R


def riders(index: Optional[torch.Tensor], primal_rows: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The riders' table of ``index`` [R] over P primal rows: ``(offsets [P + 1], rows [R])`` with
    ``rows[offsets[p]:offsets[p + 1]]`` the positions r (ascending) where ``index[r] = p``
    (``csrc/common/stacked_rows.h``); ``(None, None)`` without index."""
    if index is None:
        return None, None
    ordered, order = torch.sort(index, stable=True)
    offsets = torch.searchsorted(ordered, torch.arange(primal_rows + 1, device=index.device))
    return offsets.contiguous(), order.contiguous()


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels write for rows of ``dtype``: the dtype itself, except bfloat16 under
    the interpreter, whose ``.to(tl.bfloat16)`` truncates instead of rounding to nearest; there the
    kernels write float32 and torch rounds (as :mod:`grokalign_fast.ops.mlp.triton` does)."""
    return torch.float32 if dtype == torch.bfloat16 and _backends.triton_interpreted() else dtype


def row_blocks(rows: int, n: int) -> Tuple[int, int]:
    """``(BR, BN)``: primal rows and columns per program of a row kernel over ``rows`` x ``n``."""
    if _backends.triton_interpreted():
        cap_r, cap_n = _INTERPRETED_BR, _INTERPRETED_BN
    else:
        cap_r, cap_n = _GPU_ELEMS, _GPU_BN
    bn = min(triton.next_power_of_2(max(n, 1)), cap_n)
    br = min(triton.next_power_of_2(max(rows, 1)), max(1, _GPU_ELEMS // bn), cap_r)
    return br, bn


def row_grid(rows: int, n: int, br: int, bn: int) -> Tuple[int, int]:
    """The grid of a row kernel: (primal row blocks, column blocks)."""
    return triton.cdiv(rows, br), triton.cdiv(n, bn)
