#!/usr/bin/env bash
# Install hot_kernels from this checkout, with its compiled extension, over the machine's torch.
#
# - A machine without torch gets the pinned CPU wheel (torch==2.13.0, a local file on the dev/CI
#   machines). A machine that already has torch keeps it: pip never replaces it (--no-deps,
#   --no-build-isolation), so a CUDA torch on a GPU box stays what it is.
# - The extension must build here (HOT_KERNELS_REQUIRE_EXT=1): a broken C++ build fails loudly.
#   Where nvcc and a CUDA torch are both present, the CUDA kernels are compiled in too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"
fi
# Build and test tools. Already-installed ones are left alone (works offline on a prepared box).
need=()
# matplotlib and pytest-benchmark are the benchmark tools (the [bench] extra): bench.png and the
# pytest-benchmark suites in benchmarks/; hot-kernels bench runs without them and says so.
for mod_pkg in setuptools:setuptools wheel:wheel ninja:ninja numpy:numpy pytest:pytest \
               hypothesis:hypothesis triton:triton matplotlib:matplotlib \
               pytest_benchmark:pytest-benchmark xdist:pytest-xdist; do
  mod=${mod_pkg%%:*}; pkg=${mod_pkg##*:}
  "$PY" -c "import $mod" 2>/dev/null || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  "$PY" -m pip install "${need[@]}"
fi
HOT_KERNELS_REQUIRE_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
