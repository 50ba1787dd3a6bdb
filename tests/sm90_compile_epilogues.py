"""Compile the Triton epilogue kernels of the dual-stream engine (dual_act, dual_smooth_act,
dual_max_pool, dual_batch_norm_train, dual_layer_norm, probe_sqnorm) for an H100/H200 (sm_90) on a
machine without a GPU, the way a GPU compiles them (not interpreted), and print one JSON line per
kernel variant: whether it compiled to a cubin, and its shared memory.

Run by tests/test_dual_smooth_act_triton.py in a process without TRITON_INTERPRET. The kernels are
compiled for bfloat16 and float64 rows (see ``_cases``), with and without an index, with the block
sizes a GPU launch gives (``_triton_rows.row_blocks``, the batch norm's ``_tiles``, the layer norm's
``_block``) for a large problem (the kernels take row-major buffers: no stride specialisation). The
max pool's backward adds atomically into a float32 buffer for bfloat16 rows and into a float64 one
for float64 rows.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from grokalign_fast.ops import _triton_rows as rows  # noqa: E402
from grokalign_fast.ops.dual_act import triton as act  # noqa: E402
from grokalign_fast.ops.dual_batch_norm_train import triton as bn  # noqa: E402
from grokalign_fast.ops.dual_layer_norm import triton as ln  # noqa: E402
from grokalign_fast.ops.dual_max_pool import triton as pool  # noqa: E402
from grokalign_fast.ops.dual_smooth_act import ACT as SMOOTH  # noqa: E402
from grokalign_fast.ops.dual_smooth_act import triton as smooth  # noqa: E402
from grokalign_fast.ops.probe_sqnorm import triton as sqnorm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {"bf16": "*bf16", "fp64": "*fp64"}


def _compile(kernel, types, consts, warps=4):
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=consts), target=TARGET,
                              options=dict(num_warps=warps, num_stages=1))
    return dict(cubin=len(compiled.asm["cubin"]) > 0, shared=compiled.metadata.shared)


def _cases():
    """bfloat16 for every kernel and activation; float64 (libdevice's exp, erf, log and sqrt in
    double) for one activation of each kind (the erf GELU, softplus), the max pool, the batch norm,
    the layer norm and the sum of squares."""
    br, bn_ = rows.row_blocks(4096, 4096)
    idx = dict(offsets_ptr="*i64", riders_ptr="*i64")
    for dt, ptr in TYPES.items():
        fp64 = dt == "fp64"
        for has_index in ((True,) if fp64 else (False, True)):
            consts = dict(OFF=0.01, HAS_INDEX=has_index, ACC_FP64=fp64, BR=br, BN=bn_)
            yield (f"dual_act fwd {dt} index={has_index}", act._dual_act_fwd_kernel,
                   dict(s_ptr=ptr, mask_ptr="*u8", out_ptr=ptr, **idx), consts)
            yield (f"dual_act bwd {dt} index={has_index}", act._dual_act_bwd_kernel,
                   dict(g_ptr=ptr, mask_ptr="*u8", out_ptr=ptr, **idx), consts)
            for name, code in SMOOTH.items():
                if (not has_index or fp64) and name not in ("gelu", "softplus"):
                    continue
                consts = dict(ACT=code, ALPHA=0.7, BETA=2.0, THRESHOLD=20.0, HAS_INDEX=has_index, ACC_FP64=fp64,
                              BR=br, BN=bn_)
                yield (f"dual_smooth_act fwd {name} {dt} index={has_index}", smooth._smooth_fwd_kernel,
                       dict(s_ptr=ptr, out_ptr=ptr, **idx), consts)
                yield (f"dual_smooth_act bwd {name} {dt} index={has_index}", smooth._smooth_bwd_kernel,
                       dict(g_ptr=ptr, s_ptr=ptr, out_ptr=ptr, **idx), consts)
        acc = "*fp64" if fp64 else "*fp32"
        for C, L in ((64, 1024),) if fp64 else ((64, 1024), (512, 1)):
            bc, blk = bn._tiles(C, L)
            tiles = dict(INDEX64=fp64, ACC_FP64=fp64, BC=bc, BLK=blk)  # int64 indices in one of the two
            yield (f"batch_norm stats {dt} C={C} L={L}", bn._stats_kernel, dict(s_ptr=ptr, part_ptr=acc), tiles)
            yield (f"batch_norm backward sums {dt} C={C} L={L}", bn._backward_sums_kernel,
                   dict(g_ptr=ptr, s_ptr=ptr, mean_ptr=acc, part_ptr=acc, LEN="i64", PRIMAL_LEN="i64"), tiles)
        for backward in (False, True):
            types = dict(x_ptr=ptr, s_ptr=ptr, out_ptr=ptr, mean_ptr=acc, var_ptr=acc, w_ptr="*fp32", b_ptr="*fp32",
                         sum_g_ptr=acc, dots_ptr=acc, total="i64", primal_end="i64")
            consts = dict(BACKWARD=backward, HAS_W=True, HAS_B=not backward, EPS=1e-5, INDEX64=fp64, ACC_FP64=fp64,
                          BLOCK=bn._APPLY_BLOCK)
            yield f"batch_norm apply {dt} backward={backward}", bn._apply_kernel, types, consts
        # The layer norm: one block of 1024 columns (n = 768) and a loop over 2048-column blocks (n = 4096),
        # layer norm with weight and bias, RMS norm with weight only, with an index (and without, for one);
        # bfloat16 rows take float32 parameters.
        param = "*fp64" if fp64 else "*fp32"
        layer_norms = ((4096, False, True),) if fp64 else \
            ((768, False, True), (768, False, False), (768, True, True), (4096, False, True), (4096, True, True))
        for n, rms, has_index in layer_norms:
            block, warps = ln._block(n)
            flags = dict(RMS=rms, HAS_W=True, HAS_INDEX=has_index, ACC_FP64=fp64, BN=block)
            yield (f"layer_norm fwd {dt} n={n} rms={rms} index={has_index}", ln._fwd_kernel,
                   dict(s_ptr=ptr, w_ptr=param, b_ptr=param, out_ptr=ptr, mean_ptr=acc, rstd_ptr=acc, **idx),
                   dict(EPS=1e-5, HAS_B=not rms, **flags), warps)
            yield (f"layer_norm bwd {dt} n={n} rms={rms} index={has_index}", ln._bwd_kernel,
                   dict(g_ptr=ptr, s_ptr=ptr, w_ptr=param, mean_ptr=acc, rstd_ptr=acc, grad_ptr=ptr,
                        scratch_ptr=acc, pw_ptr=acc, pb_ptr=acc, **idx),
                   dict(NEED_W=True, NEED_B=not rms, **flags), warps)
        pool_br, pool_bn = rows.row_blocks(4096, 64 * 256)  # 64 channels of a 16 x 16 map
        for backward in (False, True):
            for has_index in ((True,) if fp64 else (False, True)):
                consts = dict(BACKWARD=backward, HAS_INDEX=has_index, INDEX64=fp64, BR=pool_br, BN=pool_bn)
                types = dict(src_ptr=ptr, idx_ptr="*i64", dst_ptr=(acc if backward else ptr), **idx)
                yield (f"dual_max_pool {'bwd' if backward else 'fwd'} {dt} index={has_index}", pool._dual_max_pool_kernel,
                       types, consts)
        sq_bb, sq_bn = rows.row_blocks(256, 4096)
        consts = dict(INDEX64=fp64, ACC_FP64=fp64, BB=sq_bb, BN=sq_bn)
        yield (f"probe_sqnorm partial {dt}", sqnorm._sqnorm_partial_kernel,
               dict(g_ptr=ptr, part_ptr=acc, STRIDE="i64"), consts)
        yield (f"probe_sqnorm backward {dt}", sqnorm._sqnorm_backward_kernel,
               dict(g_ptr=ptr, grad_ptr=ptr, out_ptr=ptr, STRIDE="i64"), consts)


def main():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the interpreter"
    for name, kernel, types, consts, *warps in _cases():
        row = dict(kernel=name)
        try:
            row.update(_compile(kernel, types, consts, *warps))
        except Exception as exc:  # reported, and failed by the test
            row.update(error=f"{type(exc).__name__}: {exc}"[:800])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
