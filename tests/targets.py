"""The (backend, device) pairs that run on this machine, for the per-backend test files."""
from __future__ import annotations

import torch

import hot_kernels as hk


def runnable(backends_on_cpu=("reference", "cpu", "triton"), backends_on_cuda=("cuda", "triton")):
    """[(backend, device type)]: the given CPU backends that run here, then the CUDA ones where a
    GPU exists (triton on CPU means the interpreter, TRITON_INTERPRET=1, set by conftest)."""
    found = [(b, "cpu") for b in backends_on_cpu if hk.available_backends("cpu")[b] is None]
    if torch.cuda.is_available():
        found += [(b, "cuda") for b in backends_on_cuda if hk.available_backends("cuda")[b] is None]
    return found
