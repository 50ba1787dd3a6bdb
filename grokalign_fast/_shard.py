"""Probes for this process's rows of a batch split across processes (data-parallel training).

:class:`RowShard` stands in for a ``torch.Generator`` wherever probes are drawn: every draw of R rows
draws the whole split batch's ``total`` rows from the wrapped generator and keeps this process's
``rows`` of them. When every process holds the same generator state (the same seed), each row gets
the probe single-process training on the whole batch would give it, whatever the number of
processes, and the generators stay in step. The draw costs ``total / R`` times a local one; probes
are a small part of a step (one input- or output-sized vector per row against a forward pass).
"""
from __future__ import annotations

from typing import Optional

import torch


class RowShard:
    """``generator`` (None: the global RNG) with the rows of the current call: ``total`` rows are
    drawn and ``rows`` (a long tensor of positions in ``[0, total)``) kept. ``GrokAlign`` sets both
    before each distributed penalty."""

    def __init__(self, generator: Optional[torch.Generator]):
        self.generator = generator
        self.total: Optional[int] = None
        self.rows: Optional[torch.Tensor] = None

    def set(self, total: int, rows: torch.Tensor) -> None:
        self.total, self.rows = int(total), rows

    def take(self, draw, batch: int, device: torch.device) -> torch.Tensor:
        """``draw(total)`` ([P, total, ...]) restricted to this process's ``batch`` rows."""
        if self.total is None or self.rows is None:
            raise RuntimeError("RowShard: the rows of this call were not set")
        if self.rows.numel() != batch:
            raise RuntimeError(f"RowShard: {batch} rows asked for, {self.rows.numel()} set for this call")
        full = draw(self.total)
        return full.index_select(1, self.rows.to(full.device)).to(device)
