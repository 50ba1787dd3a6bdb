#!/usr/bin/env bash
# CUDA compile check (no GPU needed): builds grokalign_fast._C with its CUDA
# kernels against the CUDA build of torch, in a copy of the sources, then
# imports it and checks that every op declared in csrc/grokalign.cpp has a CPU
# kernel (csrc/cpu) and a CUDA kernel (csrc/cuda), that every kernel the sources
# register (those of csrc/autograd for the Autograd key) is in the dispatcher,
# and that the CPU op still computes the right numbers.
#
#   .ci/cuda_compile_check.sh
#
# Environment:
#   GROKALIGN_CUDA_VENV   venv with the CUDA torch, made when missing
#                         (default ~/.cache/grokalign_fast/cuda-venv; ~100 s, 5.4 GB)
#   GROKALIGN_CUDA_TORCH  torch to put in it (default torch==2.14.1, the CUDA 13.0 build)
#   CUDA_HOME             the CUDA toolkit folder; found from `nvcc` when unset
#   TORCH_CUDA_ARCH_LIST  default "8.0;9.0" (needed: no GPU to detect it from)
#   MAX_JOBS              parallel compile jobs, default 2
#   PYTHON                python that makes the venv (default python3)
#   KEEP_BUILD=1          keep the temporary build folder
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GROKALIGN_CUDA_VENV:-$HOME/.cache/grokalign_fast/cuda-venv}
TORCH_SPEC=${GROKALIGN_CUDA_TORCH:-torch==2.14.1}
START=$SECONDS

log() { printf '[cuda-compile-check %4ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '[cuda-compile-check] FAILED: %s\n' "$*" >&2; exit 1; }

# --- 1. the venv with the CUDA torch ---------------------------------------------
# Prints "torch <version> CUDA <version>" when $VENV is ready to build with.
venv_torch() {
  [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - "$TORCH_SPEC" <<'EOF' 2>/dev/null
import sys
import numpy, ninja, setuptools, wheel, torch
want = sys.argv[1].partition("==")[2]
assert torch.version.cuda is not None, "not a CUDA build of torch"
assert not want or torch.__version__.split("+")[0] == want, torch.__version__
print("torch", torch.__version__, "CUDA", torch.version.cuda)
EOF
}

if TORCH_DESC=$(venv_torch); then
  log "reusing $VENV"
else
  log "making $VENV with $TORCH_SPEC (about 100 s, 5.4 GB)"
  if [[ ! -x "$VENV/bin/python" ]]; then
    if [[ -L "$VENV" && ! -e "$VENV" ]]; then rm -f "$VENV"; fi  # a link to a removed venv
    mkdir -p "$(dirname "$VENV")"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy ninja setuptools wheel
  TORCH_DESC=$(venv_torch) ||
    die "$VENV still lacks a CUDA torch ($TORCH_SPEC), numpy, ninja, setuptools or wheel"
fi
VPY="$VENV/bin/python"
log "$TORCH_DESC"

# --- 2. the CUDA toolkit -------------------------------------------------------
is_toolkit() { [[ -n "$1" && -x "$1/bin/nvcc" && -f "$1/include/cuda_runtime.h" ]]; }
is_elf() { [[ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" == '177ELF' ]]; }

# The `nvcc` on PATH may be a wrapper script: then the real nvcc is the one it
# execs, and the toolkit is the folder above that nvcc's bin/. (torch's own
# guess, the wrapper's parent folder, is wrong in that case.)
find_cuda_home() {
  local nvcc real
  nvcc=$(command -v nvcc || true)
  if [[ -n "$nvcc" ]]; then
    nvcc=$(readlink -f "$nvcc")
    if is_elf "$nvcc"; then
      real=$nvcc
    else
      real=$(grep -oE '/[^[:space:]"'"'"']*/bin/nvcc' "$nvcc" | head -n 1 || true)
    fi
    if [[ -n "$real" ]]; then
      real=$(readlink -f "$real")
      if is_toolkit "$(dirname "$(dirname "$real")")"; then
        dirname "$(dirname "$real")"
        return
      fi
    fi
  fi
  local d
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if is_toolkit "$d"; then echo "$d"; return; fi
  done
}

if [[ -n "${CUDA_HOME:-}" ]]; then
  is_toolkit "$CUDA_HOME" || die "CUDA_HOME=$CUDA_HOME is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)"
  is_elf "$CUDA_HOME/bin/nvcc" || die "CUDA_HOME=$CUDA_HOME: bin/nvcc is a wrapper, not the toolkit's nvcc"
else
  CUDA_HOME=$(find_cuda_home)
  [[ -n "$CUDA_HOME" ]] || die "no CUDA toolkit found (nvcc on PATH, /usr/local/cuda-13.0, /usr/local/cuda); set CUDA_HOME"
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export GROKALIGN_FORCE_CUDA=1
unset GROKALIGN_FORCE_CPU
# torch runs `ninja` from PATH; the venv has it.
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"
log "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -oE 'release [0-9.]+')), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

# --- 3. build in a copy of the sources -----------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/grokalign-cuda-check.XXXXXX")
if [[ "${KEEP_BUILD:-0}" == 1 ]]; then
  log "keeping $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
SRC="$WORK/src"
mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked and untracked-but-not-ignored files: what a commit of this tree would hold.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
     while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done |
     tar --null -T - -cf -) | tar -C "$SRC" -xf -
else
  cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/csrc" "$ROOT/grokalign_fast" "$SRC/"
fi
find "$SRC" -name '*.so' -delete
log "building grokalign_fast._C (CPU + CUDA) in $SRC (about 130-160 s on 2 cores)"
if ! (cd "$SRC" && "$VPY" setup.py -q build_ext --inplace) >"$WORK/build.log" 2>&1; then
  grep -nE 'error|Error' "$WORK/build.log" | head -n 40 >&2 || true
  echo "---- last lines of the build log ----" >&2
  tail -n 40 "$WORK/build.log" >&2
  die "the CUDA build of grokalign_fast._C did not compile (log above)"
fi
grep -q nvcc "$WORK/build.log" || die "the build did not run nvcc: setup.py built the CPU-only extension"
log "built $(cd "$SRC" && ls grokalign_fast/_C*.so)"

# --- 4. import it; check the registrations and the CPU op -------------------------
log "importing it and checking the dispatcher"
(cd "$SRC" && "$VPY" - <<'EOF') || die "the built extension failed the import/registration check (see above)"
import glob
import re
import sys

import torch
import grokalign_fast._C as ext

print(f"  loaded {ext.__file__}")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


name = r'"(?:grokalign::)?([A-Za-z_][A-Za-z0-9_.]*)'
impl = r"\.impl\(\s*" + name
declared = re.findall(r"\.def\(\s*" + name + r"\(", read("csrc/grokalign.cpp"))
# Registration helpers in the shared headers, e.g. dual_linear::register_ops, which the CPU and
# CUDA files call inside their TORCH_LIBRARY_IMPL blocks: helper name -> the ops it registers.
helpers = {}
for f in glob.glob("csrc/common/*.h"):
    for m in re.finditer(r"void\s+(\w+)\s*\(\s*torch::Library&\s*\w+\s*\)\s*\{(.*?)\n\}", read(f), re.S):
        helpers[m.group(1)] = re.findall(impl, m.group(2))


def implemented(path):
    text = read(path)
    ops = set(re.findall(impl, text))
    for helper, names in helpers.items():
        if re.search(r"\b" + helper + r"\s*[<(]", text):
            ops.update(names)
    return ops


cpu = sorted({n for f in glob.glob("csrc/cpu/*.cpp") for n in implemented(f)})
cuda = sorted({n for f in glob.glob("csrc/cuda/*.cu") for n in implemented(f)})
autograd = sorted({n for f in glob.glob("csrc/autograd/*.cpp") for n in implemented(f)})
print(f"  registration helpers in csrc/common: {helpers or 'none'}")
if not declared:
    sys.exit("  no op schema found in csrc/grokalign.cpp")
errors = []
for op in sorted(set(cpu + cuda + autograd) - set(declared)):
    errors.append(f"{op} is implemented but has no schema in csrc/grokalign.cpp")
# Every op is registered per device, for the CPU and the CUDA key itself (no composite kernel, no
# hand device switch); the differentiable ones also for the Autograd key, in csrc/autograd (C++).
for op in declared:
    for key, ops in (("CPU", cpu), ("CUDA", cuda)):
        if op not in ops:
            errors.append(f"grokalign::{op} has no {key} kernel in csrc/{key.lower()}")
    # rademacher_ (an in-place random fill), max_pool2d_argmax (integer indices) and the backward ops
    # need none (probe_sqnorm_backward has one: it is differentiable again).
    if not op.endswith("_backward") and op not in ("rademacher_", "max_pool2d_argmax") and op not in autograd:
        errors.append(f"grokalign::{op} has no autograd kernel in csrc/autograd")
for key, ops in (("CPU", cpu), ("CUDA", cuda), ("Autograd", autograd)):
    for op in ops:
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"grokalign::{op}", key)
        print(f"  {'ok  ' if ok else 'FAIL'} {key:8} kernel registered: grokalign::{op}")
        if not ok:
            errors.append(f"no {key} kernel registered for grokalign::{op}")
    if not ops:
        errors.append(f"no source registers a {key} kernel: nothing to check")

# The CPU op still computes the right numbers in this build.
g = torch.randn(3, 5, 7, dtype=torch.float64)
grad = torch.randn(5, dtype=torch.float64)
numbers = {
    "probe_sqnorm": (torch.ops.grokalign.probe_sqnorm(g), g.pow(2).sum((0, 2)) / g.shape[0]),
    "probe_sqnorm_backward": (torch.ops.grokalign.probe_sqnorm_backward(g, grad),
                              2.0 / g.shape[0] * g * grad.view(1, -1, 1)),
}
for op, (got, want) in numbers.items():
    ok = torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    print(f"  {'ok  ' if ok else 'FAIL'} CPU  {op} against ATen")
    if not ok:
        errors.append(f"{op} on the CPU: max error {(got - want).abs().max().item():.3g}")
for e in errors:
    print(f"  error: {e}")
sys.exit(1 if errors else 0)
EOF
log "passed"
