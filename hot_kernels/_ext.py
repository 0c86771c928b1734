"""Loads the compiled extension hot_kernels._C, if this install has one.

A source install on a machine without a C++ compiler has none: the package still imports, with
the ``reference`` and ``triton`` backends only, and says once how to get the compiled ones.
"""
from __future__ import annotations

import importlib
import warnings

try:
    C = importlib.import_module("hot_kernels._C")

    ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    C = None
    ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(
        "hot_kernels: the compiled extension hot_kernels._C is not available "
        f"({ERROR}); only the 'reference' and 'triton' backends will run. To get the 'cpu' (and "
        "'cuda') backends, install a C++ compiler (and nvcc) and reinstall from source with "
        "`pip install --no-build-isolation .` over the torch you already have.",
        stacklevel=2,
    )

# Read once at import, not on first use: torch.compile cannot trace into the pybind call, so a
# first hot_kernels call inside a compiled region would otherwise break the graph.
_OPS: dict[str, frozenset[str]] = {} if C is None else {d: frozenset(C.ops_for_device(d)) for d in ("cpu", "cuda")}


def ops_for_device(device: str) -> frozenset[str]:
    """Names of the ops this build of _C implements for a device type ("cpu" or "cuda")."""
    return _OPS.get(device, frozenset())
