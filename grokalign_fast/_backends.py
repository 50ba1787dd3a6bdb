"""Backend registry: which fast paths are present, and why one is not.

Backends are chosen per call (``backend="auto"|"reference"|"cpp"|"triton"``).
``"auto"`` takes the first backend that can serve the call (cpp, triton, then
reference); an explicitly requested backend that cannot serve raises a
:class:`BackendUnavailableError` listing the reasons and never falls back
silently.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch

BACKENDS = ("auto", "reference", "cpp", "triton")


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot serve a call."""


@functools.lru_cache(maxsize=None)
def _load_extension() -> Optional[str]:
    """Import grokalign_fast._C; return None on success or the reason it failed."""
    try:
        from grokalign_fast import _C  # noqa: F401  (import registers torch.ops.grokalign.*)
    except ImportError as exc:
        return (
            "the C++ extension grokalign_fast._C is not built or does not load "
            f"({exc}); build it with `pip install -e . --no-build-isolation`"
        )
    if not hasattr(torch.ops.grokalign, "probe_sqnorm"):
        return "grokalign_fast._C loaded but registered no operators"
    return None


@functools.lru_cache(maxsize=None)
def extension_ops_reason(names: Tuple[str, ...]) -> Optional[str]:
    """None if the extension is loaded and registers every op ``torch.ops.grokalign.<name>``
    in ``names``, else why not."""
    reason = _load_extension()
    if reason is not None:
        return reason
    missing = [name for name in names if not hasattr(torch.ops.grokalign, name)]
    if missing:
        return (
            f"grokalign_fast._C was built without the ops {missing}; rebuild it with "
            "`pip install -e . --no-build-isolation`"
        )
    return None


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def op_unavailable_reason(ops: Tuple[str, ...], x: torch.Tensor) -> Optional[str]:
    """None when the extension registers the ops ``ops`` (``ops[0]`` names them in the reasons) and
    has a kernel for ``x``'s device and floating dtype, else why not: the one check of every op
    that takes floating-point tensors on cpu or cuda."""
    reason = extension_ops_reason(ops)
    if reason is not None:
        return reason
    name = f"grokalign::{ops[0]}"
    if x.device.type not in ("cpu", "cuda"):
        return f"{name} runs on cpu and cuda tensors, not {x.device.type}"
    if x.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"):
        return "the extension was built without CUDA kernels"
    if x.dtype not in FLOAT_DTYPES:
        return f"{name} takes float16, bfloat16, float32 or float64 tensors, not {x.dtype}"
    return None


def cpp_unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None if the C++/CUDA extension can run on ``device``, else why not."""
    reason = _load_extension()
    if reason is not None:
        return reason
    if device is not None and device.type == "cuda" and not cuda_kernels_built():
        return "the extension was built CPU-only (no CUDA kernels); rebuild with a CUDA torch"
    if device is not None and device.type not in ("cpu", "cuda"):
        return f"the extension has kernels for cpu and cuda, not {device.type}"
    return None


@functools.lru_cache(maxsize=None)
def cuda_kernels_built() -> bool:
    if _load_extension() is not None:
        return False
    # The CUDA kernels register a CUDA dispatch key for probe_sqnorm.
    return torch._C._dispatch_has_kernel_for_dispatch_key("grokalign::probe_sqnorm", "CUDA")


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({exc})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None if Triton kernels can run on ``device``, else why not."""
    reason = _triton_import_reason()
    if reason is not None:
        return reason
    if device is None:
        return None
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreted():
            return None
        return "Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before import for CPU tensors)"
    return f"Triton kernels do not run on {device.type} tensors"


def check_backend_name(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def select(backend: str, reasons: Dict[str, Optional[str]], order: Iterable[str]) -> str:
    """Pick a backend given, per candidate, None (can serve) or a reason it cannot.

    ``reasons`` must hold every candidate of ``order``; "reference" is always
    acceptable when it is a candidate.
    """
    check_backend_name(backend)
    order = list(order)
    if backend == "auto":
        for name in order:
            # Triton's CPU interpreter is for testing: auto never picks it.
            if name == "triton" and triton_interpreted():
                continue
            if reasons.get(name) is None:
                return name
        raise BackendUnavailableError(_format("no backend can serve this call", reasons, order))
    if backend not in reasons:
        raise BackendUnavailableError(
            f"backend={backend!r} does not implement this operation; available here: {order}"
        )
    if reasons[backend] is not None:
        raise BackendUnavailableError(_format(f"backend={backend!r} cannot serve this call", reasons, [backend]))
    return backend


def _format(head: str, reasons: Dict[str, Optional[str]], names: List[str]) -> str:
    lines = [head + ":"]
    for name in names:
        if reasons.get(name) is not None:
            lines.append(f"  - {name}: {reasons[name]}")
    return "\n".join(lines)


def available_backends(device: Optional[torch.device] = None) -> Dict[str, Optional[str]]:
    """Map each backend to None (usable on ``device``) or the reason it is not. ``"dual"`` (the
    one-pass paths in plain PyTorch, :mod:`grokalign_fast.dual.plan`) needs nothing beyond torch."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return {
        "reference": None,
        "dual": None,
        "cpp": cpp_unavailable_reason(device),
        "triton": triton_unavailable_reason(device),
    }
