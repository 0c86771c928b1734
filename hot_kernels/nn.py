"""Modules: the two lines a new hourglass model needs.

``TokenPruningCluster`` keeps f representative frames after the first blocks; ``TokenRecoveringAttention``
recovers the full-length sequence after the last (``TokenRecoveringInterpolation`` does it without
parameters, by linear interpolation). They only hold parameters and call the ops in
hot_kernels.functional (which validate and dispatch).
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from .compat import CrossAttention

__all__ = ["TokenPruningCluster", "TokenRecoveringAttention", "TokenRecoveringInterpolation"]


class TokenPruningCluster(nn.Module):
    """TPC: x (B, F, J, C) -> (x_kept (B, f, J, C), index (B, f) ascending).

    Args:
        f: frames to keep.
        k: neighbours of the kNN density (HoT uses 2).
        center: a frame index always kept (the seq2frame "TPC-*" models), or None.
        embed_dim: if given, a learnable positional embedding (1, f, embed_dim) is added to the
            kept frames, broadcast over joints (zero-initialised).
        backend: the hot_kernels backend for every call ("reference" is plain PyTorch), or None
            for the usual choice (``use_backend``, ``HOT_KERNELS_BACKEND``, device default).
    """

    def __init__(self, f: int, k: int = 2, center: int | None = None, embed_dim: int | None = None, *,
                 backend: str | None = None):
        super().__init__()
        self.f, self.k, self.center, self.backend = f, k, center, backend
        self.pos_embed = nn.Parameter(torch.zeros(1, f, embed_dim)) if embed_dim else None

    def forward(self, x: torch.Tensor):
        return F.token_pruning_cluster(x, self.f, self.k, self.center, self.pos_embed, backend=self.backend)

    def extra_repr(self) -> str:
        return f"f={self.f}, k={self.k}, center={self.center}, pos_embed={self.pos_embed is not None}"


class TokenRecoveringAttention(CrossAttention):
    """TRA: x (S, M, C) kept tokens -> (S, length, C) full-length sequence.

    Holds the learnable, zero-initialised queries ``x_token`` (1, length, C) and the published
    cross-attention's ``linear_q/linear_k/linear_v/proj`` linears (it is a
    :class:`hot_kernels.compat.CrossAttention` plus ``x_token``), so a published checkpoint's
    parameters load unchanged. forward returns ``x_token + attention(x_token, x, x)``; the shared
    queries are projected once for all S sequences. Dropout p > 0 while training runs the
    reference path (with a warning): the fused kernels implement p = 0, what every published
    model uses.
    """

    def __init__(self, dim: int, num_heads: int = 8, length: int = 243, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, *,
                 backend: str | None = None):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, length, backend=backend)
        self.x_token = nn.Parameter(torch.zeros(1, length, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.x_token, x, residual=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, length={self.length}"


class TokenRecoveringInterpolation(nn.Module):
    """Recovery without parameters: x_kept (B, f, [J,] C), index (B, f) ascending -> (B, length,
    [J,] C) by linear interpolation over the frame index (see
    :func:`hot_kernels.token_recovering_interpolation`). An alternative to TRA at the end of an
    hourglass model, e.g. after several pruning stages (H2OT).

    Args:
        length: F, the number of frames to recover.
        backend: as for :class:`TokenPruningCluster`.
    """

    def __init__(self, length: int, *, backend: str | None = None):
        super().__init__()
        self.length, self.backend = length, backend

    def forward(self, x_kept: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.token_recovering_interpolation(x_kept, index, self.length, backend=self.backend)

    def extra_repr(self) -> str:
        return f"length={self.length}"
