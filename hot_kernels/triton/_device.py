"""The device guard of the Triton wrappers.

Triton launches on the *current* CUDA device (and its current stream); a ``cuda:1`` input while
device 0 is current would launch on the wrong GPU. ``on_input_device`` makes the first tensor
argument's device current for the whole wrapper (launches, allocations, torch GEMMs), like the
CUDA backend's ``c10::cuda::CUDAGuard``. CPU tensors (the interpreter) pass straight through.
"""
from __future__ import annotations

import contextlib
import functools

import torch


def device_of(t) -> contextlib.AbstractContextManager:
    """A context in which t's CUDA device is the current one (a no-op off CUDA)."""
    dev = t.device
    if dev.type == "cuda" and dev.index is not None:
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


def on_input_device(fn):
    """Decorator: run ``fn(t, ...)`` with t's device current (t: the first argument, a tensor)."""

    @functools.wraps(fn)
    def guarded(t, *args, **kwargs):
        with device_of(t):
            return fn(t, *args, **kwargs)

    guarded.device_guarded = True
    return guarded
