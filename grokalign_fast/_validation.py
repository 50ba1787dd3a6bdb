"""Input checks shared by the estimators, metrics and modules.

Every check names the argument and what was expected: bad input gets a clear
error, never a silently wrong number.
"""
from __future__ import annotations

from typing import Sequence

import torch


def check_batch_input(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, ...], got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(
            f"{name} must be a floating-point tensor (the Jacobian is taken with respect to it), "
            f"got dtype {x.dtype}; convert with {name}.float() or {name}.double()"
        )
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have a batch dimension and at least one feature dimension, shape [B, ...]; "
            f"got shape {list(x.shape)}. For a single sample use {name}.unsqueeze(0)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {list(x.shape)})")
    if 0 in x.shape[1:]:
        raise ValueError(f"{name} has no features per sample (shape {list(x.shape)}): its Jacobian is empty")
    return x


def check_batch_output(out, batch: int, name: str = "f") -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}(x) must return a tensor of shape [B, ...], got {type(out).__name__}")
    if out.dim() == 0:
        raise ValueError(
            f"{name}(x) returned a single number for the whole batch; it must return per-sample "
            f"outputs of shape [B, ...] with B = {batch} (samples independent), not a reduced loss"
        )
    if out.shape[0] != batch:
        raise ValueError(
            f"{name}(x) changed the batch size: x has B = {batch} samples but {name}(x) has shape "
            f"{list(out.shape)}; {name} must map [B, ...] to [B, ...] with samples independent"
        )
    if not out.is_floating_point():
        raise TypeError(f"{name}(x) must return floating-point outputs, got dtype {out.dtype}")
    return out


def check_num_probes(num_probes) -> int:
    if isinstance(num_probes, bool) or not isinstance(num_probes, int):
        raise TypeError(f"num_probes must be an int >= 1, got {num_probes!r}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    return num_probes


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_finite(values: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(values.detach()).all()):
        bad = (~torch.isfinite(values.detach())).nonzero()
        raise FloatingPointError(
            f"{what} is not finite (inf or nan) for sample(s) {bad[:, 0].tolist()[:8]}: "
            "check f and x (overflow, a nan in the input, or a non-differentiable point)"
        )


def check_generator(generator, name: str = "generator") -> None:
    from ._shard import RowShard

    if generator is not None and not isinstance(generator, (torch.Generator, RowShard)):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")


def check_nonnegative_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number >= 0, got {value!r}")
    value = float(value)
    if not (value >= 0.0) or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value
