"""The one definition of how ``hot_kernels._C`` is built: sources, compiler flags, CUDA archs and the
build stamp. setup.py (which imports this file by path, before the package is installed) and the
first-use build for the running torch (``hot_kernels._ext``, ``hot-kernels build``) both use it, so
an ahead-of-time and a just-in-time ``_C`` are compiled the same way.

The build stamp is a JSON string compiled into ``_C`` (a generated header, HOT_KERNELS_BUILD_STAMP)
after the marker ``HOT_KERNELS_BUILD_STAMP:``: the torch it was built for, the flags and a hash of
the sources. :func:`read_stamp` finds it in the shared library's bytes without importing it, so a
``_C`` built for another torch is recognised before it is loaded (not by an undefined symbol).

No torch import at module level: setup.py loads this where torch may be missing.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Environment knobs (documented in setup.py and README.md).
NO_CUDA, REQUIRE_CUDA, NATIVE, DEBUG = ("HOT_KERNELS_NO_CUDA", "HOT_KERNELS_REQUIRE_CUDA", "HOT_KERNELS_NATIVE",
                                       "HOT_KERNELS_DEBUG_BUILD")
# PTX of the newest arch rides along, so GPUs newer than sm_90 JIT-compile it instead of failing
# with "no kernel image is available".
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
HEADER = "hot_kernels_build_info.h"  # generated; never in csrc/ (the JIT's sources may be read-only)
STAMP_MARKER = b"HOT_KERNELS_BUILD_STAMP:"
_SOURCE_EXTS = (".cpp", ".h", ".cu", ".cuh")


def flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def source_dir() -> str:
    """csrc/: shipped inside the package as hot_kernels/_csrc by a wheel, beside it in a checkout."""
    shipped = os.path.join(PACKAGE_DIR, "_csrc")
    return shipped if os.path.isdir(shipped) else os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")


def sources(src: str, with_cuda: bool) -> list[str]:
    """The translation units of _C, sorted: csrc/*.cpp, csrc/cpu/*.cpp and, with CUDA, csrc/cuda/*.cu."""
    out = sorted(glob.glob(os.path.join(src, "*.cpp")) + glob.glob(os.path.join(src, "cpu", "*.cpp")))
    if with_cuda:
        out += sorted(glob.glob(os.path.join(src, "cuda", "*.cu")))
    return out


def source_files(src: str) -> list[str]:
    """Every source and header under csrc/ (relative paths): what a wheel ships and the hash covers."""
    out = []
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith(_SOURCE_EXTS) and f not in (HEADER, "build_info.h"):
                out.append(os.path.relpath(os.path.join(dirpath, f), src))
    return sorted(out)


def source_hash(src: str) -> str:
    h = hashlib.sha256()
    for rel in source_files(src):
        h.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(src, rel), "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def cxx_flags() -> list[str]:
    debug = flag(DEBUG)
    cxx = ["-O0", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if debug else ["-O3", "-g0"]
    # No a * b + c -> fma contraction: the AVX2 and AVX-512 paths of the row kernels (which have FMA)
    # then round exactly as the generic path does (csrc/cpu/tpc_common.h, HK_MULTIVERSION).
    cxx += ["-ffp-contract=off", "-fopenmp"]  # the C++ standard is the one torch asks for (it adds it)
    if flag(NATIVE):
        cxx.append("-march=native")
    return cxx


def link_flags() -> list[str]:
    return ["-fopenmp"] + (["-fsanitize=address,undefined"] if flag(DEBUG) else [])


def nvcc_flags() -> list[str]:
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def cuda_archs() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS


def with_cuda(torch, ce) -> bool:
    """CUDA kernels are compiled in where nvcc (CUDA_HOME) and a CUDA torch are both present; whether a
    GPU is present does not matter. HOT_KERNELS_REQUIRE_CUDA=1 raises, saying why, where they would not be."""
    if flag(REQUIRE_CUDA):
        require_cuda(torch, ce)
    return ce.CUDA_HOME is not None and torch.version.cuda is not None and not flag(NO_CUDA)


def require_cuda(torch, ce) -> None:
    why = None
    if flag(NO_CUDA):
        why = "HOT_KERNELS_NO_CUDA is set too"
    elif torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU build (torch.version.cuda is None)"
    elif ce.CUDA_HOME is None:
        why = "nvcc was not found (set CUDA_HOME, or put nvcc on PATH)"
    else:
        nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc")
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
            nvcc_version = re.search(r"release (\d+)\.(\d+)", out).group(0).split()[1]
        except (OSError, subprocess.CalledProcessError, AttributeError) as e:
            why = f"{nvcc} --version failed ({e})"
        else:
            if nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
                why = (f"nvcc ({nvcc}) is CUDA {nvcc_version} but torch {torch.__version__} was built with CUDA "
                       f"{torch.version.cuda}: the CUDA major versions must match")
    if why is not None:
        raise RuntimeError(f"hot_kernels: HOT_KERNELS_REQUIRE_CUDA=1 but the CUDA kernels would not be built: {why}")


def config(torch, ce, src: str | None = None) -> dict:
    """Everything a build of _C depends on: the stamp it carries, and (hashed) its JIT cache key."""
    src = source_dir() if src is None else src
    cuda = with_cuda(torch, ce)
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag,
        "platform": sysconfig.get_platform(),
        "with_cuda": cuda,
        "cxx_flags": cxx_flags(),
        "nvcc_flags": nvcc_flags() if cuda else [],
        "link_flags": link_flags(),
        "cuda_archs": cuda_archs() if cuda else "",
        "sources": source_hash(src),
    }


def cache_key(cfg: dict) -> str:
    """Directory name of a JIT build: readable torch/python part, then a hash of the whole config."""
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return f"torch{cfg['torch']}-{cfg['python']}-{digest}"


def define_macros(cfg: dict) -> list[str]:
    return ["HOT_KERNELS_WITH_CUDA"] if cfg["with_cuda"] else []


def write_header(directory: str, cfg: dict, built_by: str) -> str:
    """Write ``directory``/hot_kernels_build_info.h (only if its content changes, so that ninja does
    not recompile for nothing); returns its path."""
    def c_str(s):  # a header rather than -D'...' string macros: no shell quoting across build tools
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    stamp = json.dumps(dict(cfg, built_by=built_by), sort_keys=True)
    text = ("// Generated by hot_kernels/_build.py; do not edit.\n#pragma once\n"
            f"#define HOT_KERNELS_CXX_FLAGS {c_str(' '.join(cfg['cxx_flags']))}\n"
            f"#define HOT_KERNELS_NVCC_FLAGS {c_str(' '.join(cfg['nvcc_flags']))}\n"
            f"#define HOT_KERNELS_CUDA_ARCHS {c_str(cfg['cuda_archs'])}\n"
            f"#define HOT_KERNELS_BUILD_STAMP {c_str(STAMP_MARKER.decode() + stamp)}\n")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, HEADER)
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)
    return path


def read_stamp(path: str) -> dict | None:
    """The build stamp compiled into the shared library at ``path`` (None if it has none)."""
    with open(path, "rb") as f:
        data = f.read()
    i = data.find(STAMP_MARKER)
    if i < 0:
        return None
    j = data.find(b"\0", i)
    try:
        return json.loads(data[i + len(STAMP_MARKER):j].decode())
    except ValueError:
        return None
