"""Compile the Triton dual-linear kernels for an H100/H200 (sm_90) on a machine without a GPU, the way
a GPU compiles them (not interpreted), and print one JSON line per kernel and tuning-table entry:
whether it compiled to a cubin, its shared memory and the MMA instructions of its ``tl.dot``\\ s (the
backward epilogue, elementwise, once per pass).

Run by tests/test_dual_linear.py in a process without TRITON_INTERPRET. Inputs are bfloat16 with
the precision flags ``_precision`` gives a bfloat16 tensor outside the interpreter; unit strides of
contiguous tensors are compile-time constants, as Triton specialises them at launch.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from grokalign_fast.ops.mlp import triton as mlp  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SILU = mlp.ACT_CODE["silu"]  # a smooth activation: the forward stores z and u, the epilogue uses s''


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through triton.autotune and triton.heuristics
    return kernel


def _compile(kernel, types, consts, warps, stages):
    fn = _jit_function(kernel)
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=TARGET,
                              options=dict(num_warps=warps, num_stages=stages))
    mma = sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", compiled.asm["ptx"])))
    return dict(cubin=len(compiled.asm["cubin"]) > 0, shared=compiled.metadata.shared, mma=mma)


def main():
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without the interpreter"
    fp64, upcast, precision = mlp._precision(torch.zeros(1, dtype=torch.bfloat16))
    flags = dict(ACC_FP64=fp64, UPCAST=upcast, DOT_PRECISION=precision)
    bf16, f32 = "*bf16", "*fp32"
    fwd_types = dict(x_ptr=bf16, t_ptr=bf16, w_ptr=bf16, b_ptr=bf16, index_ptr="*i64", y_ptr=bf16,
                     saved_ptr=bf16, tout_ptr=bf16, u_ptr=bf16, sq_part_ptr=f32)
    cases = []
    for blocks, warps, stages in mlp._FWD_TUNING:
        for kc, sqnorm in ((1, False), (8, True)):
            consts = dict(ACT=SILU, ALPHA=0.01, HAS_BIAS=True, HAS_PRIMAL=True, HAS_TANGENT=True, GATHER=False,
                          STORE_SAVED=True, STORE_TOUT=not sqnorm, STORE_U=True, SQNORM=sqnorm, KC=kc,
                          BM=mlp._fwd_bm(dict(blocks, KC=kc)), stride_xi=1, stride_ti=1, stride_wi=1,
                          **flags, **blocks)
            cases.append((f"fwd KC={kc}", mlp._dual_linear_fwd_kernel, fwd_types, consts, blocks, warps, stages))
    for blocks, warps, stages in mlp._MM_TUNING:
        consts = dict(GROUP_M=mlp._MM_GROUP, stride_ak=1, stride_bn=1, stride_cn=1, **flags, **blocks)
        cases.append(("matmul", mlp._matmul_kernel, dict(a_ptr=f32, b_ptr=bf16, c_ptr=bf16), consts, blocks, warps,
                      stages))
    for blocks, warps, stages in mlp._W_TUNING:
        consts = dict(TANGENT=True, BIAS_GRAD=True, stride_xi=1, stride_ti=1, **flags, **blocks)
        types = dict(g_ptr=f32, x_ptr=bf16, t_ptr=bf16, gw_ptr=f32, gb_ptr=f32)
        cases.append(("weight", mlp._dual_linear_bwd_weight_kernel, types, consts, blocks, warps, stages))
    for gather in (False, True):
        consts = dict(ACT=SILU, ALPHA=0.01, PRIMAL_ROWS=not gather, TANGENT=True, GATHER=gather, HAS_GY=True,
                      SQNORM=gather, ADD_GZR=True, STORE_GU=True, ACC_FP64=fp64, BM=mlp._EPI_BM, BN=mlp._EPI_BN)
        types = dict(gy_ptr=bf16, gt_ptr=bf16, gsq_ptr=bf16, saved_ptr=bf16, u_ptr=bf16, index_ptr="*i64", g_ptr=f32)
        cases.append((f"epilogue GATHER={gather}", mlp._dual_linear_bwd_epilogue_kernel, types, consts, {}, 4, 1))
    for name, kernel, types, consts, blocks, warps, stages in cases:
        row = dict(kernel=name, blocks=blocks, num_warps=warps, num_stages=stages)
        try:
            row.update(_compile(kernel, types, consts, warps, stages))
        except Exception as exc:  # reported, and failed by the test
            row.update(error=f"{type(exc).__name__}: {exc}"[:500])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
