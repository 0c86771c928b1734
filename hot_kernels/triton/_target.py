"""The GPU a Triton launch is for: compute capability and SM count of a tensor's device.

The launch wrappers (tpc.py, tra.py) read every device property their configuration depends on
through this module only. ``override`` makes them answer for another GPU: scripts/
triton_aot_compile.py calls the real wrappers with CPU tensors under ``override((9, 0), 132)``
and records the launches, so the configurations it compiles ahead of time for sm_90 / sm_80 are
exactly the ones the wrappers would pick there. Off CUDA and without an override both return None
(the wrappers then take their defaults: the sm_90 tuning).
"""
from __future__ import annotations

import contextlib
import functools

import torch

_OVERRIDE: tuple[tuple[int, int], int] | None = None


@contextlib.contextmanager
def override(capability: tuple[int, int], sm_count: int):
    """Within the block, every tensor is taken to live on a GPU of this capability and SM count."""
    global _OVERRIDE
    old, _OVERRIDE = _OVERRIDE, ((int(capability[0]), int(capability[1])), int(sm_count))
    try:
        yield
    finally:
        _OVERRIDE = old


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _props(index: int):
    p = torch.cuda.get_device_properties(index)
    return (p.major, p.minor), p.multi_processor_count


def capability(t: torch.Tensor) -> tuple[int, int] | None:
    """(major, minor) of t's GPU (e.g. (9, 0) for an H100/H200), None for a CPU tensor."""
    if _OVERRIDE is not None:
        return _OVERRIDE[0]
    return _props(_index(t))[0] if t.is_cuda else None


def sm_count(t: torch.Tensor) -> int | None:
    """Streaming multiprocessors of t's GPU, None for a CPU tensor."""
    if _OVERRIDE is not None:
        return _OVERRIDE[1]
    return _props(_index(t))[1] if t.is_cuda else None
