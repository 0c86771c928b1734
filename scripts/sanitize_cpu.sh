#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   bash scripts/sanitize_cpu.sh            # build (2-4 min on 2 cores), then the CPU tests (~1 min)
#   KEEP=1 bash scripts/sanitize_cpu.sh     # keep the work directory (its path is printed)
#   HOT_KERNELS_SANITIZE_DIR=/tmp/asan bash scripts/sanitize_cpu.sh   # reuse one (rebuilds what changed)
#
# What it does:
#   1. copies hot_kernels/, csrc/ and tests/ into a work directory (the normal in-place build of
#      hot_kernels/_C is never touched) and builds hot_kernels._C there with
#      -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer;
#   2. runs, from that copy (first on PYTHONPATH, checked), with the ASan runtime preloaded
#      (LD_PRELOAD=$(c++ -print-file-name=libasan.so); python itself is not instrumented):
#        - tests/test_backends.py on the cpu backend (-k cpu-cpu),
#        - tests/test_robustness.py on the cpu backend (bad / NaN / empty / strided inputs,
#          determinism; not the large-tensor tests),
#        - tests/test_fuzz.py on the cpu backend with the "quick" hypothesis profile;
#   3. fails (exit 1) on any test failure or any sanitizer report. ASAN_OPTIONS has
#      detect_leaks=0 (CPython and torch keep allocations alive at exit on purpose);
#      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1.
#
# CI: .ci/run runs this when HOT_KERNELS_CI_SANITIZE=1 (it is too slow for every CI run).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
CXX=${CXX:-c++}
export MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)

WORK=${HOT_KERNELS_SANITIZE_DIR:-}
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/hot_kernels_asan.XXXXXX")
  if [ "${KEEP:-0}" = "0" ]; then trap 'rm -rf "$WORK"' EXIT; fi
fi
mkdir -p "$WORK"
echo "== sanitizer build in $WORK"

# 1. The copy: sources and tests only (no compiled objects, no caches).
for d in hot_kernels csrc tests; do
  rm -rf "${WORK:?}/$d.new"
  cp -r "$ROOT/$d" "$WORK/$d.new"
  find "$WORK/$d.new" \( -name '__pycache__' -o -name '*.so' -o -name '.hypothesis' \) -prune -exec rm -rf {} +
  # Keep an existing build's objects valid: replace the tree only where it changed.
  if [ -d "$WORK/$d" ] && diff -r -q "$WORK/$d" "$WORK/$d.new" -x '*.so' -x '__pycache__' -x hot_kernels_build_info.h \
      >/dev/null 2>&1; then
    rm -rf "${WORK:?}/$d.new"
  else
    rm -rf "${WORK:?}/$d"
    mv "$WORK/$d.new" "$WORK/$d"
  fi
done
cp "$ROOT/pyproject.toml" "$WORK/"

FLAGS="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cat > "$WORK/build_asan.py" <<EOF
# Builds hot_kernels._C in place in this directory with the sanitizers (CPU sources only).
import glob, importlib.util, os
import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
import torch.utils.cpp_extension as ce

flags = "$FLAGS".split()
here = os.path.dirname(os.path.abspath(__file__))
# The build-info header (flags, and the stamp naming this torch) as hot_kernels/_build.py writes it.
spec = importlib.util.spec_from_file_location("hk_build", os.path.join(here, "hot_kernels", "_build.py"))
B = importlib.util.module_from_spec(spec)
spec.loader.exec_module(B)
os.environ["HOT_KERNELS_NO_CUDA"] = "1"
cfg = dict(B.config(torch, ce, os.path.join(here, "csrc")), cxx_flags=flags + ["-fopenmp"],
           link_flags=["-fsanitize=address,undefined", "-fopenmp"])
B.write_header(os.path.join(here, "csrc"), cfg, "scripts/sanitize_cpu.sh")
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
setup(name="hot_kernels_asan", script_args=["build_ext", "--inplace"],
      ext_modules=[CppExtension("hot_kernels._C", sources, include_dirs=[os.path.join(here, "csrc")],
                                extra_compile_args=flags + ["-fopenmp"],
                                extra_link_args=["-fsanitize=address,undefined", "-fopenmp"])],
      cmdclass={"build_ext": BuildExtension})
EOF
(cd "$WORK" && "$PY" build_asan.py > build.log 2>&1) || { tail -40 "$WORK/build.log"; echo "== sanitizer build FAILED"; exit 1; }
built=$(date +%s)
echo "== built in $(( built - start )) s"

# 2. The tests, from the copy, with the ASan runtime first.
LIBASAN=$("$CXX" -print-file-name=libasan.so)
[ -f "$LIBASAN" ] || { echo "no libasan.so for $CXX"; exit 1; }
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
# Reports also go to files (log_path): pytest captures fd 2, and a halted process never prints it.
REPORTS="$WORK/reports"
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86:alloc_dealloc_mismatch=0:detect_odr_violation=0:log_path=$REPORTS/asan:${ASAN_OPTIONS_EXTRA:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$REPORTS/ubsan"
export HOT_KERNELS_FUZZ=${HOT_KERNELS_FUZZ:-quick}
LOG="$WORK/tests.log"
cd "$WORK"
status=0
LD_PRELOAD="$LIBASAN" "$PY" - <<EOF || status=1
import hot_kernels, hot_kernels._C as C
assert C.__file__.startswith("$WORK"), C.__file__
assert hot_kernels.__file__.startswith("$WORK"), hot_kernels.__file__
assert "-fsanitize=address" in C.cxx_flags, C.cxx_flags
print("== using", C.__file__, "built with", C.cxx_flags)
EOF
if [ $status -eq 0 ]; then
  # --capture=sys: C-level stderr (a sanitizer report) reaches the terminal, not pytest's capture.
  LD_PRELOAD="$LIBASAN" "$PY" -m pytest -q -p no:cacheprovider --capture=sys -m "not large" -k "cpu-cpu" \
      tests/test_backends.py tests/test_robustness.py tests/test_fuzz.py 2>&1 | tee "$LOG" || status=1
fi
if [ -n "$(ls -A "$REPORTS")" ] || grep -qE "ERROR: AddressSanitizer|runtime error:" "$LOG" 2>/dev/null; then
  echo "== sanitizer reports:"
  cat "$REPORTS"/* 2>/dev/null | head -200
  status=1
fi
end=$(date +%s)
echo "== sanitize_cpu: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (build $(( built - start )) s, tests $(( end - built )) s)"
exit $status
