"""Modules: the two lines a new hourglass model needs.

``TokenPruningCluster`` keeps f representative frames after the first blocks; ``TokenRecoveringAttention``
recovers the full-length sequence after the last. Both only hold parameters and call the ops in
hot_kernels.functional (which validate and dispatch).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import functional as F
from . import reference

__all__ = ["TokenPruningCluster", "TokenRecoveringAttention"]


class TokenPruningCluster(nn.Module):
    """TPC: x (B, F, J, C) -> (x_kept (B, f, J, C), index (B, f) ascending).

    Args:
        f: frames to keep.
        k: neighbours of the kNN density (HoT uses 2).
        center: a frame index always kept (the seq2frame "TPC-*" models), or None.
        embed_dim: if given, a learnable positional embedding (1, f, embed_dim) is added to the
            kept frames, broadcast over joints (zero-initialised).
    """

    def __init__(self, f: int, k: int = 2, center: int | None = None, embed_dim: int | None = None):
        super().__init__()
        self.f, self.k, self.center = f, k, center
        self.pos_embed = nn.Parameter(torch.zeros(1, f, embed_dim)) if embed_dim else None

    def forward(self, x: torch.Tensor):
        return F.token_pruning_cluster(x, self.f, self.k, self.center, self.pos_embed)

    def extra_repr(self) -> str:
        return f"f={self.f}, k={self.k}, center={self.center}, pos_embed={self.pos_embed is not None}"


class TokenRecoveringAttention(nn.Module):
    """TRA: x (S, M, C) kept tokens -> (S, length, C) full-length sequence.

    Holds the learnable, zero-initialised queries ``x_token`` (1, length, C) and the published
    cross-attention's ``linear_q/linear_k/linear_v/proj`` linears, so a published checkpoint's
    parameters load unchanged. forward returns ``x_token + attention(x_token, x, x)``; the shared
    queries are projected once for all S sequences. Dropout p > 0 while training runs the
    reference path (with a warning): the fused kernels implement p = 0, what every published
    model uses.
    """

    def __init__(self, dim: int, num_heads: int = 8, length: int = 243, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TokenRecoveringAttention: num_heads = {num_heads} must divide dim = {dim}")
        self.dim, self.num_heads, self.length = dim, num_heads, length
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.attn_drop, self.proj_drop = attn_drop, proj_drop
        self.x_token = nn.Parameter(torch.zeros(1, length, dim))
        self.linear_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.linear_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.linear_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def attention(self, query: torch.Tensor, x: torch.Tensor, residual: bool) -> torch.Tensor:
        weights = (self.linear_q.weight, self.linear_q.bias, self.linear_k.weight, self.linear_k.bias,
                   self.linear_v.weight, self.linear_v.bias, self.proj.weight, self.proj.bias)
        if self.training and (self.attn_drop > 0 or self.proj_drop > 0):
            warnings.warn("TokenRecoveringAttention: dropout > 0 runs the reference path (the fused kernels "
                          "implement p = 0)", stacklevel=3)
            return reference.token_recovering_attention(query, x, *weights, self.num_heads, self.scale, residual,
                                                        self.attn_drop, self.proj_drop, training=True)
        return F.token_recovering_attention(query, x, *weights, self.num_heads, self.scale, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.x_token, x, residual=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, length={self.length}"
