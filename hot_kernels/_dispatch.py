"""The one choice point: which backend runs a call.

Order of precedence: an explicit ``backend=`` argument, else ``hot_kernels.use_backend(...)``,
else the ``HOT_KERNELS_BACKEND`` environment variable, else the default for the tensor's device.
A backend asked for in any of the first three ways must be able to run the call, or the call
raises :class:`BackendUnavailableError` saying what is missing: never a silent fallback. The
device default picks the first backend of its preference list that can run the call, and
``reference`` can run everything.

Each backend declares what it supports (:func:`refusal` returns the reason it cannot run a call,
or None), in the way of xformers' ``not_supported_reasons``.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import _environ, _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "HOT_KERNELS_BACKEND"

# Default backend order on CUDA tensors, per op. No GPU run has been recorded yet, so this is the
# order of the compiled paths (triton before cuda, as Triton kernels land first), not a measured
# one: benchmarks/results/ and the GPU issue replace it with the measured fastest per op.
CUDA_PREFERENCE = {
    "pairwise_distance": ("triton", "cuda", "reference"),
    "knn_density": ("triton", "cuda", "reference"),
    "dpc_delta": ("triton", "cuda", "reference"),
    "topf_select": ("triton", "cuda", "reference"),
    "dpc_knn": ("triton", "cuda", "reference"),
    "gather_frames": ("triton", "cuda", "reference"),
    "token_recovering_attention": ("triton", "cuda", "reference"),
    "token_recovering_interpolation": ("triton", "cuda", "reference"),
    "merge_tokens": ("triton", "cuda", "reference"),
}
# Default backend order on CPU tensors, per op: measured (`hot-kernels bench`, fp32, 2 threads,
# every default shape, forward and forward+backward, AMD EPYC Zen 4 and Zen 5, the avx2 path forced
# too: benchmarks/results/cpu-amd-epyc-zen5-2026-12-02/; Intel Xeon Ice Lake, AVX-512 and the avx2
# path with ATen and MKL on AVX2 as well: benchmarks/results/cpu-intel-xeon-icelake-2026-12-02-rows/;
# an Intel Xeon with AMX, both paths, after the eager fast path: .../cpu-intel-xeon-amx-2026-12-03-eager/,
# and with the AVX2 Gram kernel, B = 8 too: .../cpu-intel-xeon-amx-2026-12-03-avx2-gram/).
# The cpu backend is faster than the reference (the only other backend that runs on a CPU without
# the Triton interpreter) in every case there: dpc_knn 2.1-10x, token_pruning_cluster 2.4-6x, TRA
# 1.3-2.0x (the sub-ops of dpc_knn and token_pruning_cluster are timed through them, not one by
# one). So cpu comes first for every op. An op whose cpu kernel lost to the reference across its
# shapes would list reference first here.
CPU_PREFERENCE = {
    "pairwise_distance": ("cpu", "reference"),
    "knn_density": ("cpu", "reference"),
    "dpc_delta": ("cpu", "reference"),
    "topf_select": ("cpu", "reference"),
    "dpc_knn": ("cpu", "reference"),
    "gather_frames": ("cpu", "reference"),
    "token_recovering_attention": ("cpu", "reference"),
    "token_recovering_interpolation": ("cpu", "reference"),
    "merge_tokens": ("cpu", "reference"),
}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The GPU backends keep each row's k nearest neighbours in registers: k is bounded there (the
# published models use k = 2, TCFormer-style clustering k = 5). Larger k runs on cpu/reference.
GPU_MAX_K = 32


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for cannot run this call; the message says why."""


# use_backend() state: a plain module-level stack (readable by torch.compile's tracer).
_override: list[str] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Run every hot_kernels call inside the ``with`` block on backend ``name``.

    >>> with hot_kernels.use_backend("reference"):
    ...     index = hot_kernels.dpc_knn(x, 81)
    """
    _check_name(name, "use_backend(name)")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


CPU_ISA_ENV = "HOT_KERNELS_CPU_ISA"
CPU_ISAS = ("avx512", "avx2", "generic")


def supported_cpu_isas() -> tuple[str, ...]:
    """The instruction-set paths of the cpu backend's row kernels that this CPU runs, best first
    (x86-64 with AVX-512: ("avx512", "avx2", "generic"); without the compiled extension: ())."""
    return () if _ext.C is None else tuple(_ext.C.cpu_isas_supported())


def cpu_isa() -> str | None:
    """The path the cpu backend's row kernels take now: the best this CPU runs, unless lowered by
    ``HOT_KERNELS_CPU_ISA`` (read when the extension loads) or :func:`use_cpu_isa`. None without
    the compiled extension. Every path computes bitwise the same values except two fp32 kernels:
    the distance GEMM (hand-written kernels on "avx512" and "avx2", BLAS on "generic") and TRA's
    attention core (fused multiply-adds on "avx512" and "avx2", and each path's vector width in
    its row sums); each path agrees with the float64 reference to fp32 rounding."""
    return None if _ext.C is None else _ext.C.cpu_isa()


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """Run the cpu backend's kernels on instruction-set path ``name`` ("avx512", "avx2" or
    "generic") inside the ``with`` block: e.g. the AVX2 or generic code on an AVX-512 machine, to
    test or time it. Raises ValueError for a path this CPU cannot run. Process-wide (not per thread)."""
    if name not in CPU_ISAS:
        raise ValueError(f"use_cpu_isa(name): unknown CPU instruction-set path {name!r}; expected one of {', '.join(CPU_ISAS)}")
    if name not in supported_cpu_isas():
        have = ", ".join(supported_cpu_isas()) or "none (hot_kernels._C is not available)"
        raise ValueError(f"use_cpu_isa(name): this CPU cannot run the {name!r} path; it runs: {have}")
    previous = _ext.C.set_cpu_isa(name)
    try:
        yield
    finally:
        _ext.C.set_cpu_isa(previous)


def _check_cpu_isa_env() -> None:
    value = os.environ.get(CPU_ISA_ENV)
    if value and value not in CPU_ISAS:
        import warnings

        warnings.warn(f"hot_kernels: {CPU_ISA_ENV}={value!r} is not one of {', '.join(CPU_ISAS)}; ignored "
                      f"(the cpu backend takes the best path this CPU runs)", stacklevel=3)


_check_cpu_isa_env()


CPU_CACHE_ENV = "HOT_KERNELS_CPU_CACHE_MB"


def cpu_cache_info() -> dict[str, int]:
    """The cpu backend's buffer cache: ``{"bytes": held now, "limit": most it may hold}``.

    TRA's large internal tensors (K|V, the attention output and its gradients, what the forward keeps
    for the backward) come from buffers the process keeps between calls, up to the limit
    (``HOT_KERNELS_CPU_CACHE_MB``, default 64, or :func:`set_cpu_cache_limit`), so that no call pays
    the page faults of fresh memory; a tensor the user gets is never one of them. Both 0 without the
    compiled extension."""
    if _ext.C is None:
        return {"bytes": 0, "limit": 0}
    return {"bytes": int(_ext.C.cpu_cache_bytes()), "limit": int(_ext.C.cpu_cache_limit())}


def empty_cpu_cache() -> int:
    """Free the cached buffers of the cpu backend that no tensor uses now; returns the bytes freed."""
    return 0 if _ext.C is None else int(_ext.C.empty_cpu_cache())


def set_cpu_cache_limit(nbytes: int) -> int:
    """Let the cpu backend's buffer cache hold at most ``nbytes`` (0: no cache; what does not fit is
    allocated per call), freeing unused buffers above it; returns the previous limit."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_cpu_cache_limit(nbytes): expected an int >= 0, got {nbytes!r}")
    if _ext.C is None:
        return 0
    return int(_ext.C.set_cpu_cache_limit(nbytes))


def _check_cpu_cache_env() -> None:
    value = os.environ.get(CPU_CACHE_ENV)
    if value is not None and not (value.isascii() and value.isdigit() and int(value) <= 1 << 30):
        import warnings

        warnings.warn(f"hot_kernels: {CPU_CACHE_ENV}={value!r} is not a whole number of MB; ignored "
                      f"(the cpu backend's buffer cache keeps its default limit, 64 MB)", stacklevel=3)


_check_cpu_cache_env()


def _check_name(name, where: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def refusal(backend: str, op: str, device: torch.device, dtype: torch.dtype, k: int | None = None,
            build: bool = True) -> str | None:
    """Why ``backend`` cannot run ``op`` on tensors of this device and dtype, with k neighbours
    where the op has a k (None if it can). ``build``: the cpu and cuda backends may compile
    hot_kernels._C for this torch first, if there is none yet (hot_kernels/_ext.py)."""
    if dtype not in _FLOAT_DTYPES:
        return f"it needs float16, bfloat16, float32 or float64 input, got {dtype}"
    if backend == "reference":
        return None
    if backend == "cpu":
        if _ext.C is None and build and device.type == "cpu":
            _ext.ensure()
        if _ext.C is None:
            return f"the cpu backend needs the compiled extension hot_kernels._C, which is not available ({_ext.ERROR})"
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors; the input is on {device}"
        if op not in _ext.ops_for_device("cpu"):
            return f"this build's cpu backend has no {op}"
        return None
    if dtype == torch.float64 and backend in ("cuda", "triton"):
        return f"the {backend} backend computes in float16, bfloat16 or float32; float64 runs on the cpu and reference backends"
    if k is not None and k > GPU_MAX_K and backend in ("cuda", "triton"):
        return f"the {backend} backend supports k <= {GPU_MAX_K} neighbours, got k = {k} (cpu and reference take any k)"
    if backend == "cuda":
        if _ext.C is None and build and device.type == "cuda":
            _ext.ensure()
        if _ext.C is None:
            return f"the cuda backend needs the compiled extension hot_kernels._C, which is not available ({_ext.ERROR})"
        if not _ext.C.with_cuda:
            return "the cuda backend needs hot_kernels._C built with CUDA; this build has: cpu"
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors; the input is on {device}"
        if op not in _ext.ops_for_device("cuda"):
            return f"this build's cuda backend has no {op} yet"
        return None
    if backend == "triton":
        from . import triton as triton_backend

        if triton_backend.IMPORT_ERROR is not None:
            return f"the triton backend needs the triton package ({triton_backend.IMPORT_ERROR})"
        if device.type == "cpu" and not _triton_interpret():
            return "the triton backend runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend runs on CUDA tensors; the input is on {device}"
        if op not in triton_backend.OPS:
            return f"the triton backend has no {op} yet"
        return None
    return f"unknown backend {backend!r}"


def requested_backend(backend: str | None = None) -> tuple[str | None, str]:
    """(name, where it was asked for) of an explicitly requested backend, or (None, "")."""
    if backend is not None:
        _check_name(backend, "backend=")
        return backend, "backend="
    if _override:
        return _override[-1], "hot_kernels.use_backend()"
    env = _environ.get(ENV_VAR)
    if env:
        _check_name(env, ENV_VAR)
        return env, ENV_VAR
    return None, ""


def runs_cpu(op: str, backend: str | None = None) -> bool:
    """Whether :func:`resolve` certainly answers "cpu" for a float CPU tensor when the call passes
    ``backend`` (None or "cpu"): hot_kernels._C loaded with the op, and for no backend named also no
    :func:`use_backend` block or HOT_KERNELS_BACKEND and the cpu backend first in
    CPU_PREFERENCE[op]. False means only: ask resolve() (which may also build _C first, or raise).
    For fast paths that skip resolve()'s general walk."""
    if backend is None:
        if _override or CPU_PREFERENCE[op][0] != "cpu" or _environ.get(ENV_VAR):
            return False
    elif backend != "cpu":
        return False
    return _ext.C is not None and op in _ext.ops_for_device("cpu")


def resolve(op: str, t: torch.Tensor, backend: str | None = None, k: int | None = None) -> str:
    """The backend that runs ``op`` for input ``t`` (with k neighbours, for the ops that have a k):
    the requested one, which must be able to run the call, else the first of the device's
    defaults that can."""
    name, where = requested_backend(backend)
    if name is not None:
        why = refusal(name, op, t.device, t.dtype, k)
        if why is not None:
            raise BackendUnavailableError(f"hot_kernels.{op}: backend {name!r} (asked for by {where}) cannot run this call: {why}")
        return name
    preference = (CUDA_PREFERENCE if t.device.type == "cuda" else CPU_PREFERENCE)[op]
    reasons = []
    for candidate in preference + ("reference",):
        why = refusal(candidate, op, t.device, t.dtype, k)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise BackendUnavailableError(f"hot_kernels.{op}: no backend can run this call: " + "; ".join(reasons))


def available_backends(device: str | torch.device = "cpu", op: str = "dpc_knn",
                       dtype: torch.dtype = torch.float32, build: bool = False) -> dict[str, str | None]:
    """{backend: None if it can run ``op`` on this device and dtype, else the reason it cannot}.
    Compiles nothing unless ``build`` (the cpu and cuda backends, when hot_kernels._C for this torch
    is not built yet, then say they compile it on first use)."""
    device = torch.device(device)
    return {b: refusal(b, op, device, dtype, build=build) for b in BACKENDS}
