r"""Triton kernels of the dual-stream engine's layer norm, RMS norm and group norm (the op of
:mod:`grokalign_fast.ops.dual_layer_norm`, whose docstring gives the math).

On stacked rows ``s [N, n]`` (primal rows ``[0, P)``, tangent row ``j`` riding on primal row
``src(j) = index[j % R]``, or ``j % P`` without index), with ``c = 1`` for layer norm and ``c = 0``
for RMS norm, per primal row ``z``: ``mu = c mean(z)``, ``rstd = 1 / sqrt(mean((z - mu)^2) + eps)``,
``x = (z - mu) rstd``; the primal row gets ``y = x w + b``, tangent row j ``w u_j`` with
``u_j = rstd (t_j - c mean(t_j) - x mean(x t_j))``; ``w``, ``b`` the rows of ``weight``, ``bias``
(``[n]``, or ``[G, n]``: primal row p takes row ``p mod G``, a tangent row its source row's). The
backward is the op's formula (``h_j = g_j w``, ``a_j = mean(x t_j)``, ``e_j = mean(x h_j)``)::

    grad t_j = rstd (h_j - c mean(h_j) - x e_j)
    grad z   = rstd (G - c mean(G) - x (mean(x G) + S / n)),   G = gy w - rstd sum_j (a_j h_j + e_j t_j)
    grad w   = sum gy x + sum g_j u_j,   grad b = sum gy

where the two means of ``G`` come from scalars of the first pass: ``mean(G) = mean(gy w) - rstd
sum_j (a_j mean(h_j) + e_j mean(t_j))`` and ``mean(x G) = mean(x gy w) - 2 rstd sum_j a_j e_j``.
:func:`dual_layer_norm` has the signature and result of the C++ entry point
:func:`grokalign_fast.ops.dual_layer_norm.dual_layer_norm`.

Kernels. ``_fwd_kernel``: one program per primal row. Its first pass over the row's column blocks
(``BN`` columns each) gives ``mu`` and the second moment (per block the exact two-pass mean and sum
of squared deviations, merged across blocks by Chan's update, so a row with ``|mean| >> std`` keeps
its variance); it writes ``mean`` and ``rstd`` (saved for the backward) and the primal row, then
serves each rider: a pass for ``sum t`` and ``sum x t``, a pass writing ``w u``. ``_bwd_kernel``: a
program takes the primal rows ``p = pid, pid + PROGS, ...`` (``PROGS`` a multiple of G, so all its
rows share one group). Per row, a first pass sums ``t``, ``x t``, ``h``, ``x h``, ``h t`` per rider
and ``gy w``, ``x gy w`` on the primal row, and stores each rider's four scalars
(``a, e, c mean(t), c mean(h)``) in a ``[N - P, 4]`` scratch; after a barrier (the scratch is read
by other threads of the program) a second pass, per column block, writes every rider's gradient,
sums ``a_j h_j + e_j t_j`` over the riders in registers, writes the primal row's gradient and adds
``gy x + sum_j g_j u_j`` and ``gy`` to the program's ``[n]`` rows of the weight and bias partials
(``[PROGS, n]``; the barrier of the next row orders these read-modify-writes), which torch sums over
the programs of each group in a fixed order. No atomics: the same numbers on every run. Row offsets
are int64 (``row * n`` may pass ``2^31``), column offsets int32. Arithmetic is float32 (float64 for
float64 rows; half and bfloat16 rows are loaded into float32); ``eps`` is a compile-time constant
(exact in float64).

Bytes moved per entry of ``s`` (``e`` the element size): forward ``2 e`` (read ``s``, write ``out``),
backward ``3 e`` (read ``grad`` and ``s``, write the gradient): the floor, since the second pass over
a row re-reads what its first pass read a moment before (from L1 / L2). Per primal row the forward
adds the two statistics, the backward the partials' read-modify-write (``2 x 8`` bytes per column
with weight and bias, on a program's own L2-resident row) and per tangent row 32 bytes of scratch.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ... import _backends
from .. import _triton_rows as rows

from .._triton import jit as _jit, tl, triton  # noqa: F401

# Blocks. On a GPU a row is covered in column blocks of up to _GPU_BN = 2048 entries (one block for
# the usual widths, 768 to 2048), with num_warps = BN / 256 (8 entries per thread, at least 1 and at
# most 8 warps); the backward runs _WAVES = 8 programs per SM (each looping over its primal rows).
# Under the interpreter the blocks are _INTERPRETED_BN = 16 columns and the backward runs
# _INTERPRETED_PROGRAMS = 2 programs (times G), so that the tests' odd widths cross block boundaries
# and a program serves several rows.
_GPU_BN, _WAVES = 2048, 8
_INTERPRETED_BN, _INTERPRETED_PROGRAMS = 16, 2


@_jit
def _row_stats(z_ptr, n, RMS: tl.constexpr, ACC_FP64: tl.constexpr, BN: tl.constexpr):
    """``(mu, moment)`` of the row at ``z_ptr`` (n values): ``(0, mean(z^2))`` with RMS, else
    ``(mean(z), mean((z - mean(z))^2))``, by Chan's merge of the column blocks' exact statistics."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    cols = tl.arange(0, BN)
    mean = tl.zeros((BN,), acc_dtype).sum(axis=0)
    m2 = tl.zeros((BN,), acc_dtype).sum(axis=0)
    count = tl.zeros((BN,), acc_dtype).sum(axis=0)
    for c0 in range(0, n, BN):
        ok = c0 + cols < n
        z = tl.load(z_ptr + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
        if RMS:
            m2 += tl.sum(z * z, axis=0)
        else:
            nb = tl.minimum(n - c0, BN).to(acc_dtype)
            mb = tl.sum(z, axis=0) / nb
            d = tl.where(ok, z - mb, 0.0)
            total = count + nb
            delta = mb - mean
            mean += delta * (nb / total)
            m2 += tl.sum(d * d, axis=0) + delta * delta * (count * (nb / total))
            count = total
    return mean, m2 / n


@_jit
def _fwd_rider(s_ptr, out_ptr, t_off, z_off, w_ptr, w_off, mu, rstd, n,
               RMS: tl.constexpr, HAS_W: tl.constexpr, ACC_FP64: tl.constexpr, BN: tl.constexpr):
    """The tangent row at ``s_ptr + t_off`` riding on the primal row at ``s_ptr + z_off``:
    ``out = w rstd (t - c mean(t) - x mean(x t))``, two passes over its column blocks."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    cols = tl.arange(0, BN)
    st = tl.zeros((BN,), acc_dtype)
    sxt = tl.zeros((BN,), acc_dtype)
    for c0 in range(0, n, BN):
        ok = c0 + cols < n
        t = tl.load(s_ptr + t_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
        x = (tl.load(s_ptr + z_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype) - mu) * rstd
        st += t
        sxt += x * t
    a = tl.sum(sxt, axis=0) / n
    if RMS:
        cm = 0.0
    else:
        cm = tl.sum(st, axis=0) / n
    for c0 in range(0, n, BN):
        ok = c0 + cols < n
        t = tl.load(s_ptr + t_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
        x = (tl.load(s_ptr + z_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype) - mu) * rstd
        u = rstd * (t - cm - x * a)
        if HAS_W:
            u = u * tl.load(w_ptr + w_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
        tl.store(out_ptr + t_off + c0 + cols, u.to(out_ptr.dtype.element_ty), mask=ok)


@_jit
def _fwd_kernel(
    s_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, offsets_ptr, riders_ptr, P, R, K, n, G,
    EPS: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_INDEX: tl.constexpr,
    ACC_FP64: tl.constexpr, BN: tl.constexpr,
):
    """Primal row ``p = pid``: its ``mean`` and ``rstd``, ``y = x w + b``, then ``w u_j`` for every
    rider j (``k R + r`` for every stream k and every r with ``index[r] = p``; ``k P + p`` without
    index)."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    p = tl.program_id(0).to(tl.int64)  # int64: row * n may pass 2^31
    z_off = p * n
    mu, moment = _row_stats(s_ptr + z_off, n, RMS, ACC_FP64, BN)
    if ACC_FP64:
        rstd = 1.0 / tl.sqrt(moment + EPS)
    else:
        rstd = 1.0 / tl.sqrt_rn(moment + EPS)  # IEEE-rounded, as 1 / std::sqrt in the C++ kernels
    tl.store(mean_ptr + p, mu)
    tl.store(rstd_ptr + p, rstd)
    w_off = (p % G) * n
    cols = tl.arange(0, BN)
    for c0 in range(0, n, BN):
        ok = c0 + cols < n
        y = (tl.load(s_ptr + z_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype) - mu) * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + w_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
        if HAS_B:
            y = y + tl.load(b_ptr + w_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
        tl.store(out_ptr + z_off + c0 + cols, y.to(out_ptr.dtype.element_ty), mask=ok)
    if HAS_INDEX:
        q0 = tl.load(offsets_ptr + p)
        q1 = tl.load(offsets_ptr + p + 1)
    else:
        q0 = p
        q1 = p + 1
    for q in range(q0, q1):
        if HAS_INDEX:
            r = tl.load(riders_ptr + q)
        else:
            r = q
        for k in range(0, K):
            _fwd_rider(s_ptr, out_ptr, (P + k * R + r) * n, z_off, w_ptr, w_off, mu, rstd, n,
                       RMS, HAS_W, ACC_FP64, BN)


@_jit
def _bwd_kernel(
    g_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, grad_ptr, scratch_ptr, pw_ptr, pb_ptr, offsets_ptr, riders_ptr,
    P, R, K, n, G,
    RMS: tl.constexpr, HAS_W: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr, HAS_INDEX: tl.constexpr,
    ACC_FP64: tl.constexpr, BN: tl.constexpr,
):
    """Primal rows ``p = pid, pid + PROGS, ...`` (one group): the gradients of each row and its
    riders, and the program's weight / bias partials (``pw``, ``pb``: ``[PROGS, n]``, zeroed)."""
    if ACC_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    pid = tl.program_id(0)
    cols = tl.arange(0, BN)
    part_off = pid.to(tl.int64) * n
    for p in range(pid.to(tl.int64), P, tl.num_programs(0)):  # int64: row * n may pass 2^31
        z_off = p * n
        w_off = (p % G) * n
        mu = tl.load(mean_ptr + p).to(acc_dtype)
        rstd = tl.load(rstd_ptr + p).to(acc_dtype)
        if HAS_INDEX:
            q0 = tl.load(offsets_ptr + p)
            q1 = tl.load(offsets_ptr + p + 1)
        else:
            q0 = p
            q1 = p + 1
        # Pass 1: the riders' scalars (to the scratch) and their sums S, sum a e, sum (a mean(h) + e mean(t)).
        S = tl.zeros((BN,), acc_dtype).sum(axis=0)
        sum_ae = tl.zeros((BN,), acc_dtype).sum(axis=0)
        sum_m = tl.zeros((BN,), acc_dtype).sum(axis=0)
        for q in range(q0, q1):
            if HAS_INDEX:
                r = tl.load(riders_ptr + q)
            else:
                r = q
            for k in range(0, K):
                j = k * R + r
                t_off = (P + j) * n
                st = tl.zeros((BN,), acc_dtype)
                sxt = tl.zeros((BN,), acc_dtype)
                sh = tl.zeros((BN,), acc_dtype)
                sxh = tl.zeros((BN,), acc_dtype)
                sht = tl.zeros((BN,), acc_dtype)
                for c0 in range(0, n, BN):
                    ok = c0 + cols < n
                    t = tl.load(s_ptr + t_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
                    h = tl.load(g_ptr + t_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
                    if HAS_W:
                        h = h * tl.load(w_ptr + w_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
                    x = (tl.load(s_ptr + z_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype) - mu) * rstd
                    st += t
                    sxt += x * t
                    sh += h
                    sxh += x * h
                    sht += h * t
                a = tl.sum(sxt, axis=0) / n
                e = tl.sum(sxh, axis=0) / n
                mt = tl.sum(st, axis=0) / n
                mh = tl.sum(sh, axis=0) / n
                if RMS:
                    cm = 0.0 * mt
                    cmh = 0.0 * mh
                else:
                    cm = mt
                    cmh = mh
                S += rstd * (tl.sum(sht, axis=0) - n * (cm * mh + a * e))
                sum_ae += a * e
                sum_m += a * mh + e * mt
                tl.store(scratch_ptr + j * 4, a)
                tl.store(scratch_ptr + j * 4 + 1, e)
                tl.store(scratch_ptr + j * 4 + 2, cm)
                tl.store(scratch_ptr + j * 4 + 3, cmh)
        sgw = tl.zeros((BN,), acc_dtype)
        sxgw = tl.zeros((BN,), acc_dtype)
        for c0 in range(0, n, BN):
            ok = c0 + cols < n
            gw = tl.load(g_ptr + z_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
            if HAS_W:
                gw = gw * tl.load(w_ptr + w_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
            x = (tl.load(s_ptr + z_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype) - mu) * rstd
            sgw += gw
            sxgw += x * gw
        if RMS:
            cmG = 0.0 * sum_m
        else:
            cmG = tl.sum(sgw, axis=0) / n - rstd * sum_m
        kx = tl.sum(sxgw, axis=0) / n - 2.0 * rstd * sum_ae + S / n
        tl.debug_barrier()  # the scratch (and the partials of the program's previous row) to every thread
        # Pass 2, per column block: the riders' gradients, then the primal row's, then the partials.
        for c0 in range(0, n, BN):
            ok = c0 + cols < n
            x = (tl.load(s_ptr + z_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype) - mu) * rstd
            if HAS_W:
                w = tl.load(w_ptr + w_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
            else:
                w = tl.full((BN,), 1.0, acc_dtype)
            gy = tl.load(g_ptr + z_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
            acc = tl.zeros((BN,), acc_dtype)
            gu = tl.zeros((BN,), acc_dtype)
            for q in range(q0, q1):
                if HAS_INDEX:
                    r = tl.load(riders_ptr + q)
                else:
                    r = q
                for k in range(0, K):
                    j = k * R + r
                    t_off = (P + j) * n
                    a = tl.load(scratch_ptr + j * 4)
                    e = tl.load(scratch_ptr + j * 4 + 1)
                    t = tl.load(s_ptr + t_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
                    g = tl.load(g_ptr + t_off + c0 + cols, mask=ok, other=0.0).to(acc_dtype)
                    h = g * w
                    cmh = tl.load(scratch_ptr + j * 4 + 3)
                    grad_t = rstd * (h - cmh - x * e)
                    tl.store(grad_ptr + t_off + c0 + cols, grad_t.to(grad_ptr.dtype.element_ty), mask=ok)
                    acc += a * h + e * t
                    if NEED_W:
                        cm = tl.load(scratch_ptr + j * 4 + 2)
                        gu += g * (rstd * (t - cm - x * a))
            grad_z = rstd * (gy * w - rstd * acc - cmG - x * kx)
            tl.store(grad_ptr + z_off + c0 + cols, grad_z.to(grad_ptr.dtype.element_ty), mask=ok)
            if NEED_W:
                pw = tl.load(pw_ptr + part_off + c0 + cols, mask=ok, other=0.0)
                tl.store(pw_ptr + part_off + c0 + cols, pw + gy * x + gu, mask=ok)
            if NEED_B:
                pb = tl.load(pb_ptr + part_off + c0 + cols, mask=ok, other=0.0)
                tl.store(pb_ptr + part_off + c0 + cols, pb + gy, mask=ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block(n: int):
    """``(BN, num_warps)`` for rows of ``n`` columns (see the note on blocks above)."""
    if _backends.triton_interpreted():
        return min(triton.next_power_of_2(n), _INTERPRETED_BN), 1
    bn = min(triton.next_power_of_2(n), _GPU_BN)
    return bn, max(1, min(8, bn // 256))


def _programs(P: int, G: int, device: torch.device) -> int:
    """The backward's programs: a multiple of G, at most P (G divides P)."""
    target = _INTERPRETED_PROGRAMS if _backends.triton_interpreted() else _WAVES * _sm_count(device)
    return G * min(P // G, max(1, target // G))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _DualLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, weight, bias, P, R, index, eps, rms, groups):
        offsets, order = rows.riders(index, P)
        N, n = s.shape
        acc = _acc_dtype(s.dtype)
        out = torch.empty(N, n, device=s.device, dtype=rows.store_dtype(s.dtype))
        mean = torch.empty(P, device=s.device, dtype=acc)
        rstd = torch.empty(P, device=s.device, dtype=acc)
        bn, warps = _block(n)
        _fwd_kernel[(P,)](
            s, s if weight is None else weight, s if bias is None else bias, out, mean, rstd,
            s if offsets is None else offsets, s if order is None else order, P, R, (N - P) // R, n, groups,
            EPS=eps, RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_INDEX=offsets is not None,
            ACC_FP64=acc == torch.float64, BN=bn, num_warps=warps,
        )
        ctx.save_for_backward(s, weight, mean, rstd, offsets, order)
        ctx.P, ctx.R, ctx.rms, ctx.groups = P, R, rms, groups
        ctx.bias_like = None if bias is None else (bias.shape, bias.dtype)
        return out.to(s.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        s, weight, mean, rstd, offsets, order = ctx.saved_tensors
        need_s, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        need_b = need_b and ctx.bias_like is not None
        if not (need_s or need_w or need_b):
            return (None,) * 9
        P, R, G = ctx.P, ctx.R, ctx.groups
        N, n = s.shape
        acc = _acc_dtype(s.dtype)
        g = grad_out.contiguous()
        grad = torch.empty(N, n, device=s.device, dtype=rows.store_dtype(s.dtype))
        scratch = torch.empty(max(N - P, 1), 4, device=s.device, dtype=acc)
        progs = _programs(P, G, s.device)
        pw = torch.zeros(progs, n, device=s.device, dtype=acc) if need_w else scratch
        pb = torch.zeros(progs, n, device=s.device, dtype=acc) if need_b else scratch
        bn, warps = _block(n)
        _bwd_kernel[(progs,)](
            g, s, s if weight is None else weight, mean, rstd, grad, scratch, pw, pb,
            s if offsets is None else offsets, s if order is None else order, P, R, (N - P) // R, n, G,
            RMS=ctx.rms, HAS_W=weight is not None, NEED_W=need_w, NEED_B=need_b, HAS_INDEX=offsets is not None,
            ACC_FP64=acc == torch.float64, BN=bn, num_warps=warps,
        )
        grad_s = grad.to(s.dtype) if need_s else None
        grad_w = pw.view(progs // G, G, n).sum(0).view(weight.shape).to(weight.dtype) if need_w else None
        grad_b = None
        if need_b:
            shape, dtype = ctx.bias_like
            grad_b = pb.view(progs // G, G, n).sum(0).view(shape).to(dtype)
        return grad_s, grad_w, grad_b, None, None, None, None, None, None


def unavailable_reason(s: torch.Tensor) -> Optional[str]:
    """None when these kernels can run on ``s`` (its device and dtype), else why not."""
    return rows.unavailable_reason("dual_layer_norm", s)


def _check_params(s: torch.Tensor, weight, bias, P: int) -> int:
    """Checks weight and bias (floating point ``[n]`` or ``[G, n]`` on s's device, one shape when both
    are given, G dividing P); returns G."""
    n = s.shape[1]
    groups = 1
    for name, v in (("weight", weight), ("bias", bias)):
        if v is None:
            continue
        shape_ok = isinstance(v, torch.Tensor) and ((v.dim() == 1 and v.shape[0] == n) or
                                                    (v.dim() == 2 and v.shape[0] >= 1 and v.shape[1] == n))
        if not shape_ok or not v.is_floating_point() or v.device != s.device:
            raise ValueError(f"dual_layer_norm: {name} must be a floating-point [n={n}] or [G, n={n}] tensor on "
                             f"{s.device}, got {getattr(v, 'dtype', type(v).__name__)} "
                             f"{list(getattr(v, 'shape', []))} on {getattr(v, 'device', None)}")
        groups = v.shape[0] if v.dim() == 2 else 1
    if weight is not None and bias is not None and weight.shape != bias.shape:
        raise ValueError(f"dual_layer_norm: weight and bias must have one shape, got {list(weight.shape)} and "
                         f"{list(bias.shape)}")
    if P % groups:
        raise ValueError(f"dual_layer_norm: primal_rows ({P}) must be a multiple of the {groups} groups of weight "
                         "and bias")
    return groups


def dual_layer_norm(s: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], primal_rows: int,
                    index: Optional[torch.Tensor], eps: float, rms: bool = False) -> torch.Tensor:
    """``out`` as :func:`grokalign_fast.ops.dual_layer_norm.dual_layer_norm` (see the module doc), on the
    Triton kernels; differentiable in ``s``, ``weight`` and ``bias``.

    Args:
        s: ``[N, n]`` stacked rows (n >= 1), the ``primal_rows`` primal rows first.
        weight, bias: ``[n]`` or ``[G, n]`` (G dividing ``primal_rows``), or None.
        index: ``[R]`` long, the primal row of each of a stream's tangent rows; None: ``j % P``.
        eps: added to the variance (the mean square for RMS norm).
        rms: RMS norm (no centring) instead of layer norm.
    """
    R = rows.check_rows("dual_layer_norm", s, primal_rows, index)
    if s.shape[1] < 1:
        raise ValueError(f"dual_layer_norm: s must have n >= 1 features, got {list(s.shape)}")
    groups = _check_params(s, weight, bias, primal_rows)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    index = None if index is None else index.contiguous()
    return _DualLayerNormFunction.apply(s.contiguous(), weight, bias, primal_rows, R, index, float(eps), bool(rms),
                                        groups)
