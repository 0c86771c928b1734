"""The CUDA sources compile with nvcc for sm_80 and sm_90, on any machine that has nvcc.

On a CPU-only machine nothing built here can run, but a compile error in csrc/cuda is caught
before a GPU ever sees it. Skips (and says so) only when nvcc is absent. The registration file
csrc/hot_kernels.cpp is also syntax-checked as a CUDA build compiles it (-DHOT_KERNELS_WITH_CUDA),
with the host C++ compiler, so that its CUDA dispatch lines are checked against csrc/hot_kernels.h.

A CPU-only torch wheel ships the c10/cuda headers without the one file its CMake generates
(c10/cuda/impl/cuda_cmake_macros.h); the test supplies that file in a scratch include directory.
CUDA sources therefore include only c10/cuda and ATen core headers, not ATen/cuda/CUDAContext.h
(which pulls in cuBLAS/cuSPARSE headers that a bare nvcc install lacks).
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch.utils.cpp_extension as ce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
NVCC = shutil.which("nvcc") or (os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None)
if NVCC is not None and not os.path.exists(NVCC):
    NVCC = None


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda/*.cu is empty"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine: CUDA sources not compile-checked")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[os.path.basename(s) for s in CUDA_SOURCES])
def test_cuda_source_compiles_for_sm80_and_sm90(source, tmp_path):
    shim = tmp_path / "include" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [os.path.join(ROOT, "csrc"), *ce.include_paths(), str(tmp_path / "include"),
                sysconfig.get_paths()["include"]]
    cmd = [NVCC, "-c", source, "-o", str(tmp_path / "out.o"), "-std=c++20", "--expt-relaxed-constexpr",
           "-DHOT_KERNELS_WITH_CUDA", "-gencode", "arch=compute_80,code=sm_80",
           "-gencode", "arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC",
           "--threads", "2"]  # the two archs compile in parallel
    cmd += [f"-I{p}" for p in includes]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0, f"nvcc failed on {os.path.basename(source)}:\n" + "\n".join(errors[:40] or [proc.stderr[-4000:]])
    assert (tmp_path / "out.o").stat().st_size > 0
    print(f"compiled {os.path.basename(source)} for sm_80 and sm_90 with {NVCC}", file=sys.stderr)


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler on this machine: registration file not checked")
def test_registration_compiles_with_cuda_entry_points(tmp_path):
    # The build-info header is generated at build time (hot_kernels/_build.py), never in csrc/: a stand-in.
    (tmp_path / "hot_kernels_build_info.h").write_text(
        '#pragma once\n#define HOT_KERNELS_CXX_FLAGS ""\n#define HOT_KERNELS_NVCC_FLAGS ""\n#define HOT_KERNELS_CUDA_ARCHS ""\n'
        '#define HOT_KERNELS_BUILD_STAMP "HOT_KERNELS_BUILD_STAMP:{}"\n')
    includes = [os.path.join(ROOT, "csrc"), str(tmp_path), *ce.include_paths(), sysconfig.get_paths()["include"]]
    cmd = [CXX, "-fsyntax-only", "-std=c++20", "-DHOT_KERNELS_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           os.path.join(ROOT, "csrc", "hot_kernels.cpp")]
    cmd += [f"-I{p}" for p in includes]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0, "hot_kernels.cpp (with HOT_KERNELS_WITH_CUDA) does not compile:\n" + "\n".join(
        errors[:40] or [proc.stderr[-4000:]])
