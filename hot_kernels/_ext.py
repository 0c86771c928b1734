"""Finds, or builds, the compiled extension hot_kernels._C for the torch that is running.

At import, without compiling anything:
  1. the ``_C`` installed with the package, if its build stamp (hot_kernels/_build.py, read from the
     file before it is loaded) says it was built for this torch;
  2. else one built earlier for this torch, flags and sources in the cache: ``$HOT_KERNELS_CACHE``
     (default ``~/.cache/hot_kernels``), one folder per build (:func:`build_dir`);
  3. else none yet: the cpu and cuda backends compile it on first use (:func:`ensure`, with
     ``torch.utils.cpp_extension.load``: a minute or more), unless ``HOT_KERNELS_JIT=0``.
     ``hot-kernels build`` compiles it ahead of time.
A build-isolated ``pip install .`` installs no ``_C`` (torch is not in its build environment); a
wheel moved to another torch carries a ``_C`` for the wrong torch. Both land in 3.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import threading
import time
import warnings

import torch

from . import _build

JIT_ENV = "HOT_KERNELS_JIT"
CACHE_ENV = "HOT_KERNELS_CACHE"
_NAME = f"{__package__}._C"

C = None  # the loaded module, or None
PATH: str | None = None  # its file
ORIGIN: str | None = None  # "installed", "cache" (built earlier for this torch) or "built" (in this process)
ERROR: str | None = None  # why C is None
INSTALLED_PROBLEM: str | None = None  # why the installed _C was not used (None: it was, or it is not needed)
_attempted = False  # a first-use build was tried in this process
_lock = threading.Lock()  # a second thread's first use waits for the build rather than falling back


def jit_enabled() -> bool:
    return os.environ.get(JIT_ENV, "1").strip() not in ("0", "false", "False", "no")


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hot_kernels")


def build_config() -> dict:
    """What a build of _C for this torch would be (flags, archs, source hash): its stamp and cache key."""
    from torch.utils import cpp_extension as ce

    return _build.config(torch, ce)


def build_dir(cfg: dict | None = None) -> str:
    """The cache folder of the build of _C for this torch, python, flags and sources."""
    return os.path.join(cache_root(), _build.cache_key(build_config() if cfg is None else cfg))


def stamp_problem(path: str) -> str | None:
    """Why the _C at ``path`` cannot be loaded into this torch (None if its stamp matches)."""
    stamp = _build.read_stamp(path)
    if stamp is None:
        return f"{path} has no build stamp (built by an older hot_kernels, for an unknown torch)"
    if stamp.get("torch") != torch.__version__:
        return f"{path} was built for torch {stamp.get('torch')}, but this is torch {torch.__version__}"
    return None


def installed_path() -> str | None:
    spec = importlib.util.find_spec(_NAME)
    return None if spec is None else spec.origin


def _import_file(path: str):
    spec = importlib.util.spec_from_file_location(_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_NAME] = module
    return module


def _set(module, path: str, origin: str) -> None:
    global C, PATH, ORIGIN, ERROR, _OPS
    C, PATH, ORIGIN, ERROR = module, path, origin, None
    _OPS = {d: frozenset(module.ops_for_device(d)) for d in ("cpu", "cuda")}


def _load_prebuilt() -> None:
    """Steps 1 and 2 of the module docstring; sets ERROR (and INSTALLED_PROBLEM) when neither works."""
    global ERROR, INSTALLED_PROBLEM
    path = installed_path()
    if path is None:
        INSTALLED_PROBLEM = ("this install has no compiled hot_kernels._C (built where torch was not importable, "
                             "e.g. pip's default isolated build, or without a C++ compiler)")
    else:
        INSTALLED_PROBLEM = stamp_problem(path)
        if INSTALLED_PROBLEM is None:
            try:
                return _set(importlib.import_module(_NAME), path, "installed")
            except ImportError as e:
                INSTALLED_PROBLEM = f"{path} did not load ({type(e).__name__}: {e})"
    try:
        cached = os.path.join(build_dir(), "_C.so")
    except Exception as e:  # noqa: BLE001 - e.g. HOT_KERNELS_REQUIRE_CUDA=1 refusing this machine
        ERROR = f"{INSTALLED_PROBLEM}; no build for this torch can be made here ({e})"
        return
    if os.path.exists(cached) and stamp_problem(cached) is None:
        try:
            return _set(_import_file(cached), cached, "cache")
        except ImportError as e:
            ERROR = f"{INSTALLED_PROBLEM}; the cached build {cached} did not load ({type(e).__name__}: {e})"
            return
    ERROR = INSTALLED_PROBLEM + (
        "; the cpu and cuda backends compile it for this torch on first use (or now: `hot-kernels build`)"
        if jit_enabled() else
        f"; {JIT_ENV}=0, so it is not compiled on first use: run `hot-kernels build` to compile it for this torch")


def compiler_problem() -> str | None:
    """Why _C cannot be compiled here (no C++ compiler, no ninja), or None."""
    cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension runs
    if shutil.which(cxx) is None:
        return (f"no C++ compiler: {cxx!r} is not on PATH. To get the 'cpu' and 'cuda' backends install one (g++ "
                "or clang++; CXX picks it), then run `hot-kernels build`; the 'reference' and 'triton' backends "
                "need none")
    if _ninja_dir() is None:
        return "ninja is not installed (pip install ninja)"
    return None


def _ninja_dir() -> str | None:
    try:
        import ninja

        return ninja.BIN_DIR
    except (ImportError, AttributeError):
        path = shutil.which("ninja")
        return None if path is None else os.path.dirname(path)


@contextlib.contextmanager
def _build_env(cfg: dict):
    """ninja on PATH (a venv's bin folder need not be) and the CUDA archs, for the build only."""
    saved = {k: os.environ.get(k) for k in ("PATH", "TORCH_CUDA_ARCH_LIST")}
    os.environ["PATH"] = _ninja_dir() + os.pathsep + os.environ.get("PATH", "")
    if cfg["with_cuda"]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cfg["cuda_archs"]
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_PROGRESS_EVERY = 2.0  # seconds between looks at the build folder


@contextlib.contextmanager
def _progress(directory: str, total: int):
    """A line on stderr each time another source has compiled (ninja writes one .o per source)."""
    stop, t0 = threading.Event(), time.time()

    def watch():
        seen = None
        while not stop.wait(_PROGRESS_EVERY):
            done = sum(f.endswith(".o") for f in os.listdir(directory))
            if done != seen:
                seen = done
                print(f"hot_kernels: ... {min(done, total)}/{total} sources compiled ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def build(force: bool = False):
    """Compile _C for this torch into its cache folder and load it (``hot-kernels build``; the first-use
    build). ``force``: compile even if a _C for this torch is loaded already. Returns the module."""
    from torch.utils import cpp_extension as ce

    if C is not None and not force:
        return C
    problem = compiler_problem()
    if problem is not None:
        raise RuntimeError(f"hot_kernels: cannot compile hot_kernels._C for torch {torch.__version__}: {problem}")
    cfg = build_config()
    directory = build_dir(cfg)
    if force:
        shutil.rmtree(directory, ignore_errors=True)
    _build.write_header(directory, cfg, "jit")
    sources = _build.sources(_build.source_dir(), cfg["with_cuda"])
    defines = [f"-D{m}" for m in _build.define_macros(cfg)]
    print(f"hot_kernels: compiling hot_kernels._C for torch {torch.__version__} "
          f"({'cpu + cuda' if cfg['with_cuda'] else 'cpu'}, {len(sources)} sources; a few minutes on 2 cores, "
          f"once: cached in {directory})", file=sys.stderr, flush=True)
    t0 = time.time()
    with _build_env(cfg), _progress(directory, len(sources)):
        module = ce.load(name="_C", sources=sources, extra_cflags=cfg["cxx_flags"] + defines,
                         extra_cuda_cflags=cfg["nvcc_flags"] + defines, extra_ldflags=cfg["link_flags"],
                         extra_include_paths=[_build.source_dir(), directory], build_directory=directory,
                         with_cuda=cfg["with_cuda"], verbose=False)
    print(f"hot_kernels: compiled in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    sys.modules[_NAME] = module
    _set(module, module.__file__, "built")
    return module


def ensure() -> None:
    """First use by the cpu or cuda backend: compile _C for this torch if there is none (tried once per
    process; HOT_KERNELS_JIT=0 turns it off). A failure is kept in ERROR and warned about."""
    global _attempted, ERROR
    if C is not None or _attempted or not jit_enabled():
        return
    with _lock:
        if C is not None or _attempted:
            return
        try:
            build()
        except Exception as e:  # noqa: BLE001 - any failure: say why, and the backend stays unavailable
            ERROR = f"{INSTALLED_PROBLEM}; compiling it for this torch failed ({type(e).__name__}: {e})"
            warnings.warn(f"hot_kernels: the 'cpu' and 'cuda' backends are unavailable: {ERROR}", stacklevel=3)
        finally:
            _attempted = True


# Read once at load, not per call: torch.compile cannot trace into the pybind call, so a first
# hot_kernels call inside a compiled region would otherwise break the graph.
_OPS: dict[str, frozenset[str]] = {}
_load_prebuilt()
if C is None and not jit_enabled():
    warnings.warn(f"hot_kernels: the compiled extension hot_kernels._C is not available ({ERROR}); only the "
                  "'reference' and 'triton' backends will run.", stacklevel=2)


def ops_for_device(device: str) -> frozenset[str]:
    """Names of the ops this build of _C implements for a device type ("cpu" or "cuda")."""
    return _OPS.get(device, frozenset())
