"""The ``triton`` backend: Triton kernels, one file per op family (kernel, launch wrapper).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
``OPS`` names the ops this backend implements; the TPC and TRA kernels add themselves here.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401

    IMPORT_ERROR: str | None = None
except ImportError as e:
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

OPS: frozenset[str] = frozenset()
