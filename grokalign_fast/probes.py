"""Random probes for the Hutchinson / projection estimators of ||J||_F^2.

Every distribution is normalised to ``E[v v^T] = I`` in the space it lives in,
so that ``E ||J v||^2 = ||J||_F^2`` (input space, forward mode) and
``E ||u^T J||^2 = ||J||_F^2`` (output space, reverse mode):

- ``"gaussian"``:   v ~ N(0, I).
- ``"rademacher"``: entries +-1 with equal probability (lowest variance of the
  i.i.d. choices for Hutchinson's estimator). Drawn as random bytes, each
  expanded to 8 signs through a 256 x 8 lookup table: one 32-bit random draw
  per 32 entries (:func:`rademacher_reference`, ~2x cheaper than Gaussian
  draws). The extension op ``grokalign::rademacher_`` draws the same signs: from
  a CPU generator in one pass (measured for 50 x 784: ~10 us against ~35 us in
  ATen calls and ~220 us for Gaussian probes); from a CUDA generator it draws the
  reference's words with the reference's own ``randint`` call (so the same
  Philox state gives the same words) and unpacks their bits in one kernel.
- ``"sphere"``:     uniform on the sphere of radius sqrt(n). For the output
  space this is the authors' estimator ``C * ||u^T J||^2`` with unit ``u``.
- ``"orthogonal"``: per sample, k <= n orthonormal directions (a Haar-random
  frame, QR of a Gaussian matrix with the sign fix) scaled by sqrt(n); unbiased
  for any k and exact for k = n.

Probes are drawn once from ``generator`` on the generator's device and then
moved to the target device, so the same generator state gives the same probes
whatever backend consumes them.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ._shard import RowShard
from ._validation import check_choice, check_generator, check_num_probes

PROBES = ("sphere", "gaussian", "rademacher", "orthogonal")
_SIGN_TABLES = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 8]: row b holds the signs +-1 of the 8 bits of byte b (bit i -> column i)."""
    key = (dtype, device)
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (bits * 2 - 1).to(device=device, dtype=dtype)
        _SIGN_TABLES[key] = table
    return table


def rademacher_reference(total: int, dtype: torch.dtype, device: torch.device,
                         generator: Optional[torch.Generator]) -> torch.Tensor:
    """``total`` random signs +-1 [total] in plain PyTorch, the specification of the extension op
    ``grokalign::rademacher_``: ``W = ceil(total / 32)`` words from
    ``torch.randint(0, 2**32, (W,))``, element e the sign of bit ``e % 32`` of word ``e // 32``
    (bit set: +1), expanded through the byte table."""
    # 32 random bits per draw, seen as 4 little-endian bytes (the int32 cast keeps the low 32 bits).
    words = torch.randint(0, 2**32, ((total + 31) // 32,), generator=generator, device=device)
    nbytes = words.to(torch.int32).view(torch.uint8).int()
    signs = torch.nn.functional.embedding(nbytes, _sign_table(dtype, device))
    return signs.reshape(-1)[:total]


def _load_rademacher_op():
    """``(op, device types)``: ``torch.ops.grokalign.rademacher_`` and the device types it has kernels for
    (its fake registered, for FakeTensor / torch.compile tracing), or ``(None, ())`` without the
    extension. Run once, at import."""
    from ._backends import extension_ops_reason

    if extension_ops_reason(("rademacher_",)) is not None:
        return None, ()

    # It writes into out and returns nothing: the fake only checks the argument.
    @torch.library.register_fake("grokalign::rademacher_")
    def _rademacher_fake(out, generator=None):
        torch._check(out.dtype.is_floating_point, lambda: f"rademacher_: out must be floating point, got {out.dtype}")

    devices = tuple(d for d in ("cpu", "cuda")
                    if torch._C._dispatch_has_kernel_for_dispatch_key("grokalign::rademacher_", d.upper()))
    return torch.ops.grokalign.rademacher_.default, devices


_RADEMACHER_OP, _RADEMACHER_DEVICES = _load_rademacher_op()


def resolve_probes(probes: str, estimator: str) -> str:
    """``"auto"``: sphere in the output space (reverse; the authors' choice), Rademacher
    in the input space (forward; Hutchinson's lowest-variance i.i.d. probes)."""
    check_choice(probes, "probes", PROBES + ("auto",))
    if probes != "auto":
        return probes
    return "rademacher" if estimator == "forward" else "sphere"


def draw_probes(
    kind: str,
    num_probes: int,
    batch: int,
    shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Return probes of shape ``[num_probes, batch, *shape]`` with E[v v^T] = I per sample.

    The probe dimension n is ``prod(shape)``; ``"orthogonal"`` needs ``num_probes <= n``.
    """
    check_choice(kind, "probes", PROBES)
    check_num_probes(num_probes)
    check_generator(generator)
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    if n < 1:
        raise ValueError(f"probe space must have at least one dimension, got shape {shape}")
    return draw_checked(kind, num_probes, batch, shape, n, dtype=dtype, device=torch.device(device),
                        generator=generator)


def draw_checked(
    kind: str,
    num_probes: int,
    batch: int,
    shape: tuple,
    n: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """:func:`draw_probes` without its argument checks, for callers that checked them once
    (``GrokAlign`` checks its probe settings at construction): ``shape`` a tuple of ints with
    product ``n >= 1``, ``device`` a ``torch.device``. The same generator state gives the same
    probes through either function."""
    return drawer(kind, num_probes, shape, n, dtype=dtype, device=device, generator=generator)(batch)


def drawer(
    kind: str,
    num_probes: int,
    shape: tuple,
    n: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: Optional[torch.Generator],
) -> Callable[[int], torch.Tensor]:
    """``draw(batch)``: :func:`draw_checked` with everything but the batch size fixed, for a
    caller that draws the same kind of probes every step (``GrokAlign`` keeps one per path).
    Each call draws fresh probes from ``generator``: the same values as :func:`draw_checked`.
    A :class:`~grokalign_fast._shard.RowShard` generator draws its whole batch and keeps its rows."""
    if isinstance(generator, RowShard):
        shard = generator
        inner = drawer(kind, num_probes, shape, n, dtype=dtype, device=device, generator=shard.generator)
        return lambda batch: shard.take(inner, batch, device)
    gen_device = generator.device if generator is not None else device
    # Draw in at least float32 (and float64 for float64 targets) so low-precision
    # targets get correctly normalised probes.
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    P = num_probes
    if kind == "rademacher" and gen_device.type in _RADEMACHER_DEVICES:
        # The extension's fill on the generator's device: the same signs (CPU: ~10 us instead of ~35 us
        # for 50 x 784). Signs are exact in every floating dtype, so a target on that device is filled
        # directly.
        fill = _RADEMACHER_OP
        if device == gen_device:

            def draw(batch: int) -> torch.Tensor:
                v = torch.empty((P, batch) + shape, dtype=dtype, device=device)
                fill(v, generator)
                return v

            return draw

        def draw(batch: int) -> torch.Tensor:
            v = torch.empty((P, batch) + shape, dtype=draw_dtype, device=gen_device)
            fill(v, generator)
            return v.to(device=device, dtype=dtype)

        return draw

    def draw(batch: int) -> torch.Tensor:
        B = batch
        if kind == "rademacher":
            v = rademacher_reference(P * B * n, draw_dtype, gen_device, generator).reshape(P, B, n)
        elif kind == "gaussian":
            v = torch.randn((P, B, n), generator=generator, device=gen_device, dtype=draw_dtype)
        elif kind == "sphere":
            v = torch.randn((P, B, n), generator=generator, device=gen_device, dtype=draw_dtype)
            v = v * (n ** 0.5 / v.norm(dim=-1, keepdim=True))
        else:  # orthogonal
            if P > n:
                raise ValueError(
                    f"num_probes={P} exceeds the probe dimension {n}: orthogonal probes need "
                    f"num_probes <= {n} (num_probes = {n} is exact)"
                )
            g = torch.randn((B, n, P), generator=generator, device=gen_device, dtype=draw_dtype)
            q, r = torch.linalg.qr(g)  # q: [B, n, P] with orthonormal columns
            # Sign fix makes the frame Haar-distributed (Mezzadri 2007).
            d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
            d = torch.where(d == 0, torch.ones_like(d), d)
            q = q * d.unsqueeze(-2)
            v = q.permute(2, 0, 1) * (n ** 0.5)
        return v.reshape((P, B) + shape).to(device=device, dtype=dtype)

    return draw
