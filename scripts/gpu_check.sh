#!/usr/bin/env bash
# The first GPU run, prepared (issue 14): one command for a bare GPU machine (one H200 here: torch,
# triton, pytest, hypothesis, numpy, nvcc, compute-sanitizer present; no network) that, in at most
# 8 minutes, builds hot_kernels._C with CUDA for the GPU's arch only (sm_90) and fails at once if
# the build would have no CUDA, then runs in priority order, each stage under its own time limit:
#   (a) smoke      every op x GPU backend x dtype vs the reference; the distance engine vs float64
#   (b) tests      the CUDA test targets (cuda-cuda, triton-cuda) and the GPU-only tests (-m gpu)
#   (c) sanitize   compute-sanitizer memcheck, racecheck, synccheck on a focused subset
#   (d) bench      hot-kernels bench --quick plus DESIGN.md's target cases
# and writes one results folder of at most 8 files: summary.json (per stage passed/failed/skipped
# and why, device, versions, wall times; rewritten after every stage), build.log, smoke.log,
# tests.log, sanitize.log, bench.log, bench.json, bench.png. Details: scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine; results in $OUT/gpu-check
#                                             # ($OUT set: the device tool's folder), else ./gpu-check-out
#   bash scripts/gpu_check.sh --dry-run       # any machine: the same plumbing, every GPU stage
#                                             # "skipped: no CUDA" (tests/test_gpu_check.py runs it in CI)
#   bash scripts/gpu_check.sh --out DIR --budget SECONDS
#
# Exit status: 0 if every stage that ran passed (dry run: if the plumbing worked), else 1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
