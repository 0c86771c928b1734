#!/usr/bin/env bash
# Run the GPU tests of the cuda and triton backends under compute-sanitizer (memcheck, racecheck,
# synccheck). Needs a CUDA device and compute-sanitizer on PATH (or under $CUDA_HOME/bin).
#
#   bash tests/gpu/sanitize.sh                 # every tool over the TPC/gather tests
#   TOOLS=memcheck K="dpc_knn" bash tests/gpu/sanitize.sh
#
# Triton kernels are launched through the driver like any other, so the sanitizer sees them too.
# Exit status: non-zero if any tool reports an error.
set -euo pipefail
cd "$(dirname "$0")/../.."
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
TOOLS=${TOOLS:-"memcheck racecheck synccheck"}
K=${K:-"(cuda-cuda or triton-cuda) and not token_recovering and not tra"}
status=0
for tool in $TOOLS; do
  echo "== compute-sanitizer --tool $tool"
  # Small shapes: the sanitizer slows kernels down by 10-100x.
  if ! "$SAN" --tool "$tool" --error-exitcode 99 --target-processes all \
      python -m pytest -q -x tests/test_backends.py -k "$K" -p no:cacheprovider; then
    echo "== $tool: FAILED"; status=1
  fi
done
exit $status
