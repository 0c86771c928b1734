"""Build hot_kernels, with its compiled extension hot_kernels._C where torch is importable here.

How _C is built (sources, flags, CUDA archs, the build stamp naming the torch it is for) is defined
once, in hot_kernels/_build.py, which the first-use build for the running torch uses too.

  pip install .                        torch is not in pip's isolated build environment: the
                                       pure-Python package (plus csrc/, shipped as hot_kernels/_csrc);
                                       the cpu/cuda backends compile _C for the torch they run with
                                       on first use (or `hot-kernels build`). Never downloads torch.
  pip install --no-build-isolation .   _C is compiled now, against the torch installed here.

The C++ CPU kernels (csrc/cpu/*.cpp) always; where nvcc and a CUDA build of torch are both present,
the CUDA kernels (csrc/cuda/*.cu) too. Whether CUDA is built is decided from CUDA_HOME and
torch.version.cuda, never from whether a GPU is present at install time.

Environment:
  HOT_KERNELS_NO_EXT=1       build no extension (reference and triton backends, plus the first-use build)
  HOT_KERNELS_NO_CUDA=1      build the CPU half only, even where CUDA is available
  HOT_KERNELS_REQUIRE_EXT=1  fail the install if the extension does not build here (default: say so and go on)
  HOT_KERNELS_REQUIRE_CUDA=1 fail at once unless the CUDA kernels will be compiled in (nvcc found, a CUDA
                             torch, the same CUDA major version); implies HOT_KERNELS_REQUIRE_EXT=1
  HOT_KERNELS_NATIVE=1       add -march=native (faster CPU kernels; the build then runs on this CPU only)
  HOT_KERNELS_DEBUG_BUILD=1  -O0 -g, with -fsanitize=address,undefined
  TORCH_CUDA_ARCH_LIST       CUDA archs (default here: 8.0;9.0+PTX, PTX so that newer GPUs JIT it)
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import importlib.util
import os
import shutil
import sys
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_build_module():
    """hot_kernels/_build.py by file path: the package itself is not importable before it is built."""
    spec = importlib.util.spec_from_file_location("hot_kernels_build", os.path.join(ROOT, "hot_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_build_module()


def _require_ext() -> bool:
    return B.flag("HOT_KERNELS_REQUIRE_EXT") or B.flag(B.REQUIRE_CUDA)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as hot_kernels/_csrc, so that an installed hot_kernels can compile
    _C for the torch it runs with. An editable install reads csrc/ from the checkout instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not os.path.isdir(CSRC):
            return
        dst = os.path.join(self.build_lib, "hot_kernels", "_csrc")
        for rel in B.source_files(CSRC):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(CSRC, rel), os.path.join(dst, rel))


def _extensions():
    if B.flag("HOT_KERNELS_NO_EXT"):
        return []
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        if _require_ext():
            raise RuntimeError("hot_kernels: HOT_KERNELS_REQUIRE_EXT=1 but torch is not importable in this build "
                               "environment: install torch first and use `pip install --no-build-isolation .`")
        print("hot_kernels: torch is not importable in this build environment (pip's isolated build): building "
              "the pure-Python package. The 'cpu' and 'cuda' backends compile hot_kernels._C for the torch they run "
              "with on first use (or run `hot-kernels build`); `pip install --no-build-isolation .` compiles it now.",
              file=sys.stderr)
        return []
    cfg = B.config(torch, ce, CSRC)  # raises at once under HOT_KERNELS_REQUIRE_CUDA=1 where CUDA would not build
    generated = os.path.join(ROOT, "build", "hot_kernels_gen")
    B.write_header(generated, cfg, "setup.py")
    if cfg["with_cuda"]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cfg["cuda_archs"]
        ext_cls, extra = ce.CUDAExtension, {"cxx": cfg["cxx_flags"], "nvcc": cfg["nvcc_flags"]}
    else:
        ext_cls, extra = ce.CppExtension, {"cxx": cfg["cxx_flags"]}
    return [ext_cls(
        name="hot_kernels._C",
        sources=[os.path.relpath(s, ROOT) for s in B.sources(CSRC, cfg["with_cuda"])],
        include_dirs=[CSRC, generated],
        define_macros=[(m, None) for m in B.define_macros(cfg)],
        extra_compile_args=extra,
        extra_link_args=cfg["link_flags"],
    )]


def _optional_build_ext(base):
    class OptionalBuildExt(base):
        """Builds hot_kernels._C; if that fails (no C++ compiler, say), installs without it and says so."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure makes the extension optional
                self._give_up(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._give_up(e)

        def _give_up(self, e):
            if _require_ext():
                raise
            msg = (f"hot_kernels: the compiled extension hot_kernels._C did not build ({type(e).__name__}: {e}). "
                   "Installing without it: the 'reference' and 'triton' backends run as they are; the 'cpu' and "
                   "'cuda' backends compile hot_kernels._C on first use, which needs a C++ compiler (and nvcc for "
                   "CUDA): install one, then run `hot-kernels build` (or reinstall).")
            print(msg, file=sys.stderr)
            warnings.warn(msg)

    return OptionalBuildExt


ext_modules = _extensions()
cmdclass = {"build_py": BuildPyWithSources}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = _optional_build_ext(BuildExtension)
setup(ext_modules=ext_modules, cmdclass=cmdclass)
