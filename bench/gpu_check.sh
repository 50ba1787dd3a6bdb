#!/usr/bin/env bash
# The GPU check, prepared to run in minutes on a machine with one NVIDIA GPU and a CUDA build of
# torch in .venv (or $PYTHON):
#
#   bash bench/gpu_check.sh [OUT.md]          # on the GPU machine (about 5-8 minutes on an H100/H200)
#   bash bench/gpu_check.sh --dry-run [OUT]   # on a CPU: the same steps, tiny, Triton interpreted
#
# 1. builds grokalign_fast._C in place against that torch (TORCH_CUDA_ARCH_LIST from the device);
# 2. runs the test suite: every test that compares a backend with the reference is parametrised
#    over the devices present, so the CUDA kernels and the compiled Triton kernels are tested there
#    by the same tests as the CPU path (dry run: tests/test_dual_act.py only);
# 3. bench/gpu_layers.py: the fused layers against cuBLAS GEMMs of the same stacked size;
# 4. bench/gpu_attention.py: the JVP attention op's forward against FlashAttention's (SDPA) and
#    jvp-flash-attention's (when installed), forward + backward against SDPA's;
# 5. bench/gpu_steps.py: whole training steps (MLP, cnn6, GPT; float32 and bf16 autocast) against
#    plain steps, after a float64 check of each model's fused path against the reference.
# Every table goes to OUT.md (default gpu_check.md); the script stops at the first failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
OUT=${1:-gpu_check.md}
START=$SECONDS
log() { printf '[gpu-check %4ds] %s\n' "$((SECONDS - START))" "$*"; }

if ((DRY)); then
  export TRITON_INTERPRET=1
  DEVICE=cpu
  LAYERS_ARGS=(--device cpu --quick --reps 1)
  ATTN_ARGS=(--device cpu --quick --reps 1)
  STEPS_ARGS=(--device cpu --quick --rounds 1)
  TESTS=(tests/test_dual_act.py)
else
  DEVICE=cuda
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  log "building the extension for sm_${ARCH/./}"
  TORCH_CUDA_ARCH_LIST=$ARCH GROKALIGN_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace -q
  "$PY" -c "import torch, grokalign_fast._C; assert torch._C._dispatch_has_kernel_for_dispatch_key('grokalign::dual_act', 'CUDA')"
  LAYERS_ARGS=(--reps 100)
  ATTN_ARGS=(--reps 50)
  STEPS_ARGS=(--rounds 30)
  TESTS=(tests)
fi

{
  echo "# GPU check ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), device $DEVICE)"
  echo
} > "$OUT"
log "tests: ${TESTS[*]}"
"$PY" -m pytest -q -x "${TESTS[@]}" | tail -3 | tee -a "$OUT"
log "fused layers against cuBLAS"
"$PY" bench/gpu_layers.py "${LAYERS_ARGS[@]}" --out "$OUT"
log "JVP attention against FlashAttention"
"$PY" bench/gpu_attention.py "${ATTN_ARGS[@]}" --out "$OUT"
for dtype in float32 bfloat16; do
  log "training steps ($dtype)"
  "$PY" bench/gpu_steps.py "${STEPS_ARGS[@]}" --dtype "$dtype" --out "$OUT"
done
log "done: $OUT"
