"""Random probes for the Hutchinson / projection estimators of ||J||_F^2.

Every distribution is normalised to ``E[v v^T] = I`` in the space it lives in,
so that ``E ||J v||^2 = ||J||_F^2`` (input space, forward mode) and
``E ||u^T J||^2 = ||J||_F^2`` (output space, reverse mode):

- ``"gaussian"``:   v ~ N(0, I).
- ``"rademacher"``: entries +-1 with equal probability (lowest variance of the
  i.i.d. choices for Hutchinson's estimator; drawn as packed random bits, 62
  entries per 64-bit draw, several times cheaper than Gaussian draws on a CPU).
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

from typing import Optional, Sequence

import torch

from ._validation import check_choice, check_generator, check_num_probes

PROBES = ("sphere", "gaussian", "rademacher", "orthogonal")
_BITS = 62  # random bits used per int64 draw for Rademacher probes


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
    gen_device = generator.device if generator is not None else torch.device(device)
    # Draw in at least float32 (and float64 for float64 targets) so low-precision
    # targets get correctly normalised probes.
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    P, B = num_probes, batch
    if kind == "rademacher":
        total = P * B * n
        words = torch.randint(0, 2**_BITS, ((total + _BITS - 1) // _BITS,), generator=generator, device=gen_device)
        shifts = torch.arange(_BITS, device=gen_device)
        bits = (words.unsqueeze(1) >> shifts).bitwise_and_(1).reshape(-1)[:total]
        v = bits.to(draw_dtype).mul_(2).sub_(1).reshape(P, B, n)
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
