#!/usr/bin/env bash
# Run the GPU tests of the cuda and triton backends under compute-sanitizer (memcheck, racecheck,
# synccheck). Needs a CUDA device and compute-sanitizer on PATH (or under $CUDA_HOME/bin).
#
#   bash tests/gpu/sanitize.sh                      # every tool over every op (TPC, gather, TRA)
#   TOOLS=memcheck K="dpc_knn" bash tests/gpu/sanitize.sh
#   LARGE=0 bash tests/gpu/sanitize.sh              # skip the large-tensor memcheck pass
#   FOCUSED=1 TOOL_TIMEOUT=40 bash tests/gpu/sanitize.sh   # the focused subset only (scripts/gpu_check.sh)
#   DRY_RUN=1 bash tests/gpu/sanitize.sh            # print the commands, run nothing
#
# Passes:
#   1. each tool in $TOOLS over tests/test_backends.py and tests/test_robustness.py on the CUDA
#      targets (cuda-cuda, triton-cuda; filter $K): small shapes, every op, forward and backward,
#      bad/NaN/empty/strided inputs;
#   2. memcheck only (LARGE=1, the default) over the large-tensor tests of tests/test_gpu.py:
#      dpc_knn at N = 65536, pairwise_distance and TRA (S = 17408) with outputs past 2^31
#      elements -- the 64-bit offset paths. Slow under the sanitizer (tens of minutes).
# FOCUSED=1 replaces both by one pass per tool over `scripts/gpu_smoke.py --focused`: every entry
# point once per GPU backend in float32 and bfloat16 (TPC ops with a mask, a forced center,
# sorted=False, the assignment and a 4-D clip; TRA forward + backward at head dims 32, 64, 128),
# small shapes, each value also checked against the reference; memcheck runs with PyTorch's caching
# allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1), so an access past a tensor leaves its allocation.
# TOOL_TIMEOUT (seconds, 0 = none) limits each tool's run; a tool cut off by it counts as a failure.
#
# Triton kernels are launched through the driver like any other, so the sanitizer sees them too.
# Exit status: non-zero if any tool reports an error.
set -euo pipefail
cd "$(dirname "$0")/../.."
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
TOOLS=${TOOLS:-"memcheck racecheck synccheck"}
K=${K:-"cuda-cuda or triton-cuda"}
LARGE=${LARGE:-1}
LARGE_K=${LARGE_K:-"long_clip or 2_pow_31"}
FOCUSED=${FOCUSED:-0}
TOOL_TIMEOUT=${TOOL_TIMEOUT:-0}
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-python3}
status=0
sanitize() {  # tool, then the command to run under it
  local tool=$1; shift
  local cmd=("$SAN" --tool "$tool" --error-exitcode 99 "$@")
  [ "$TOOL_TIMEOUT" != "0" ] && cmd=(timeout --signal=INT --kill-after=10 "$TOOL_TIMEOUT" "${cmd[@]}")
  echo "== compute-sanitizer --tool $tool: ${*}"
  if [ "$DRY_RUN" = "1" ]; then
    echo "   (dry run) ${cmd[*]}"; return
  fi
  local t0=$SECONDS rc=0
  "${cmd[@]}" || rc=$?
  if [ $rc -eq 0 ]; then
    echo "== $tool: passed ($((SECONDS - t0)) s)"
  elif [ $rc -eq 124 ]; then
    echo "== $tool: FAILED: timed out after ${TOOL_TIMEOUT} s"; status=1
  else
    echo "== $tool: FAILED (exit $rc; 99: the sanitizer reported errors)"; status=1
  fi
}
if [ "$DRY_RUN" != "1" ] && [ ! -x "$SAN" ]; then
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"; exit 2
fi
if [ "$FOCUSED" = "1" ]; then
  for tool in $TOOLS; do
    if [ "$tool" = memcheck ]; then
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize "$tool" "$PY" scripts/gpu_smoke.py --focused
    else
      sanitize "$tool" "$PY" scripts/gpu_smoke.py --focused
    fi
  done
  exit $status
fi
for tool in $TOOLS; do
  # Small shapes: the sanitizer slows kernels down by 10-100x.
  sanitize "$tool" --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_backends.py tests/test_robustness.py -m "not large" -k "$K"
done
if [ "$LARGE" != "0" ]; then
  sanitize memcheck --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider tests/test_gpu.py -k "$LARGE_K"
fi
exit $status
