"""Benchmark shapes for the MLP training step (one registry for pytest-benchmark and the interleaved runner)."""
from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass(frozen=True)
class MLPShape:
    name: str
    sizes: Tuple[int, ...]
    batch: int
    dtype: torch.dtype = torch.float32
    bias: bool = False

    @property
    def id(self) -> str:
        return f"{self.name}-b{self.batch}-{str(self.dtype).replace('torch.', '')}"


PAPER = (784, 200, 200, 10)
DEEP = (784, 196, 196, 196, 196, 10)
WIDE = (4096, 4096, 4096, 4096)

SHAPES = [
    MLPShape("784-200-200-10", PAPER, 200),
    MLPShape("784-200-200-10", PAPER, 256),
    MLPShape("784-200-200-10", PAPER, 1000),
    MLPShape("784-200-200-10", PAPER, 200, torch.float64),
    MLPShape("784-196x4-10", DEEP, 200),
    MLPShape("784-196x4-10", DEEP, 256),
    MLPShape("784-196x4-10", DEEP, 1000),
    MLPShape("784-196x4-10", DEEP, 256, torch.float64),
    MLPShape("4096x4", WIDE, 512),
]
