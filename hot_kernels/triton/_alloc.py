"""Output allocation of the Triton wrappers.

``empty`` is ``torch.empty``, except under ``HOT_KERNELS_POISON=1`` (the test suite sets it): then
floating buffers are filled with NaN and integer buffers with -2^62 before the kernels run, so an
element a kernel fails to write shows up in the results instead of passing by luck.
"""
from __future__ import annotations

import os

import torch

_INT_POISON = -(2 ** 62)


def poisoning() -> bool:
    return os.environ.get("HOT_KERNELS_POISON", "0") not in ("", "0")


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if dtype.is_floating_point else _INT_POISON)
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, dtype=t.dtype, device=t.device)
