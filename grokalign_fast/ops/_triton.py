"""Triton, imported once for every Triton kernel module: ``triton``, ``tl`` and ``jit``, or None and a
no-op ``jit`` where triton is missing (the modules still import; their ``unavailable_reason`` says why)."""
try:
    import triton
    import triton.language as tl

    jit = triton.jit
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

    def jit(fn):
        return fn
