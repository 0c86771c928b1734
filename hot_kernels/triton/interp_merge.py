"""Launch wrappers of token_recovering_interpolation and merge_tokens on the triton backend (kernels:
interp_merge_kernels.py). Each flattens shapes, allocates outputs (NaN-poisoned under
HOT_KERNELS_POISON=1) and launches once: forward and backward are one launch each.

Tuning knobs (module attributes, read at each call): INTERP_BLOCK (values per step of a frame row,
J * C), MERGE_BN / MERGE_BC (token and channel tiles of the cluster scan).
"""
from __future__ import annotations

import torch

from . import _alloc
from . import interp_merge_kernels as K
from ._device import on_input_device
from .tpc import _check_dtype, _np2

__all__ = ["token_recovering_interpolation", "token_recovering_interpolation_backward", "merge_tokens",
           "merge_tokens_backward"]

INTERP_BLOCK = 1024
MERGE_BN = 32
MERGE_BC = 128


@on_input_device
def token_recovering_interpolation(x: torch.Tensor, index: torch.Tensor, num_frames: int) -> torch.Tensor:
    """x (B, f, [J,] C), index (B, f) int64 ascending -> (B, num_frames, [J,] C) in x's dtype."""
    _check_dtype("token_recovering_interpolation", x, "x_kept")
    B, f = x.shape[:2]
    out = _alloc.empty((B, int(num_frames), *x.shape[2:]), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    R = x[0, 0].numel()
    block = max(16, min(INTERP_BLOCK, _np2(R)))
    K._interp_fwd_kernel[(B * int(num_frames),)](
        x.contiguous(), index.contiguous(), out, f, int(num_frames), R, int(f).bit_length() + 1,
        BLOCK=block, num_warps=4,
    )
    return out


@on_input_device
def token_recovering_interpolation_backward(grad: torch.Tensor, index: torch.Tensor, num_kept: int) -> torch.Tensor:
    """grad (B, F, [J,] C) -> grad_x (B, num_kept, [J,] C): each kept frame's weighted sum of grad."""
    _check_dtype("token_recovering_interpolation_backward", grad, "grad")
    B, F = grad.shape[:2]
    gx = _alloc.empty((B, int(num_kept), *grad.shape[2:]), dtype=grad.dtype, device=grad.device)
    if gx.numel() == 0:
        return gx
    if F == 0:
        return gx.zero_()
    R = gx[0, 0].numel()
    block = max(16, min(INTERP_BLOCK, _np2(R)))
    K._interp_bwd_kernel[(B * int(num_kept),)](
        grad.contiguous(), index.contiguous(), gx, int(num_kept), F, R, BLOCK=block, num_warps=4,
    )
    return gx


@on_input_device
def merge_tokens(x: torch.Tensor, assignment: torch.Tensor, f: int, weight: torch.Tensor | None):
    """x (B, N, C), assignment (B, N) int64 in [0, f), weight (B, N) or None -> (out (B, f, C) in x's
    dtype, wsum (B, f) float32)."""
    _check_dtype("merge_tokens", x)
    B, N, C = x.shape
    f = int(f)
    out = _alloc.empty((B, f, C), dtype=x.dtype, device=x.device)
    wsum = _alloc.empty((B, f), dtype=torch.float32, device=x.device)
    if B == 0 or f == 0:
        return out, wsum
    bc = max(16, min(MERGE_BC, _np2(C)))
    bn = max(16, min(MERGE_BN, _np2(N)))
    K._merge_fwd_kernel[(B * f,)](
        x.contiguous(), assignment.contiguous(), x if weight is None else weight.contiguous(), out, wsum, N, f, C,
        HAS_W=weight is not None, BN=bn, BC=bc, num_warps=4,
    )
    return out, wsum


@on_input_device
def merge_tokens_backward(grad, x, assignment, weight, out, wsum, weight_grad: bool):
    """-> (grad_x (B, N, C), grad_weight (B, N) or an empty (0, 0) tensor when not weight_grad)."""
    _check_dtype("merge_tokens_backward", x)
    B, N, C = x.shape
    f = grad.shape[1]
    gx = _alloc.empty((B, N, C), dtype=x.dtype, device=x.device)
    gw = _alloc.empty((B, N) if weight_grad else (0, 0), dtype=x.dtype, device=x.device)
    if B == 0 or N == 0:
        return gx, gw
    if f == 0:
        gx.zero_()
        return gx, gw.zero_()
    bc = max(16, min(MERGE_BC, _np2(C)))
    K._merge_bwd_kernel[(B * N,)](
        grad.contiguous(), x.contiguous(), assignment.contiguous(), x if weight is None else weight.contiguous(),
        out.contiguous(), wsum.contiguous(), gx, gw if weight_grad else gx, N, f, C,
        HAS_W=weight is not None, W_GRAD=bool(weight_grad), BC=bc, num_warps=4,
    )
    return gx, gw
