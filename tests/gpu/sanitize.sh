#!/usr/bin/env bash
# Run the GPU tests of the cuda and triton backends under compute-sanitizer (memcheck, racecheck,
# synccheck). Needs a CUDA device and compute-sanitizer on PATH (or under $CUDA_HOME/bin).
#
#   bash tests/gpu/sanitize.sh                      # every tool over every op (TPC, gather, TRA)
#   TOOLS=memcheck K="dpc_knn" bash tests/gpu/sanitize.sh
#   LARGE=0 bash tests/gpu/sanitize.sh              # skip the large-tensor memcheck pass
#
# Passes:
#   1. each tool in $TOOLS over tests/test_backends.py and tests/test_robustness.py on the CUDA
#      targets (cuda-cuda, triton-cuda; filter $K): small shapes, every op, forward and backward,
#      bad/NaN/empty/strided inputs;
#   2. memcheck only (LARGE=1, the default) over the large-tensor tests of tests/test_gpu.py:
#      dpc_knn at N = 65536, pairwise_distance and TRA (S = 17408) with outputs past 2^31
#      elements -- the 64-bit offset paths. Slow under the sanitizer (tens of minutes).
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
status=0
run() {  # tool, then pytest arguments
  local tool=$1; shift
  echo "== compute-sanitizer --tool $tool: $*"
  if ! "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
      python -m pytest -q -x -p no:cacheprovider "$@"; then
    echo "== $tool: FAILED ($*)"; status=1
  fi
}
for tool in $TOOLS; do
  # Small shapes: the sanitizer slows kernels down by 10-100x.
  run "$tool" tests/test_backends.py tests/test_robustness.py -m "not large" -k "$K"
done
if [ "$LARGE" != "0" ]; then
  run memcheck tests/test_gpu.py -k "$LARGE_K"
fi
exit $status
