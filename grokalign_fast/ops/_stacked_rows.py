r"""The stacked-row layout the dual-stream engine's epilogue ops take (``csrc/common/stacked_rows.h``
in C++): rows ``[0, P)`` are primal, tangent row ``j`` (row ``P + j``) rides on primal row
``src(j) = index[j % R]`` (``index [R]`` long), or ``j % P`` without index."""
from __future__ import annotations

from typing import Optional

import torch


def source_rows(N: int, primal_rows: int, index: Optional[torch.Tensor], device=None) -> torch.Tensor:
    """``[N - P]`` long: ``src(j)`` for every tangent row ``j`` of ``N`` stacked rows."""
    j = torch.arange(N - primal_rows, device=device)
    return j % primal_rows if index is None else index[j % index.shape[0]]
