"""A model file written the way the published HoT repos write theirs: the stand-in for *your*
checkout's model file in ``patch_existing_model.py`` and in the patch tests.

Plain eager PyTorch with the published names and conventions (our own code, not a copy):
module-level ``cluster_dpc_knn(x, cluster_num, k, token_mask=None)`` and
``cluster_dpc_knn_center(x, cluster_num, k, center, token_mask=None)`` returning
``(index_down, idx_cluster)`` (kept tokens best first; each token's nearest kept token as a
position into index_down), a ``Cross_Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop,
proj_drop, length)`` module with ``linear_q/linear_k/linear_v/proj`` and ``forward(x_1, x_2, x_3)``,
and models that call them the way HoT-MixSTE (TPC + TRA), TPC-MixSTE (center forced) and
MHFormer's cross-hypothesis blocks (keys and values from different tensors) do.

Two deliberate differences from the published functions, so that the patched and unpatched runs
can be compared index for index: density ties are broken by the lower index (hot_kernels' rule)
instead of by U(0, 1e-6) noise (the noise is still drawn, as published, and left unused), and
distances are computed bit-symmetrically (with k = 2 two frames that are each other's nearest
neighbour have exactly equal densities, and which of them is "denser" must not depend on rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def cluster_dpc_knn(x, cluster_num, k, token_mask=None):
    return _dpc_knn(x, cluster_num, k, None, token_mask)


def cluster_dpc_knn_center(x, cluster_num, k, center, token_mask=None):
    return _dpc_knn(x, cluster_num, k, center, token_mask)


def _dpc_knn(x, cluster_num, k, center, token_mask):
    with torch.no_grad():
        B, N, C = x.shape
        # torch.cdist would do, but it is not bit-symmetric: mutual nearest neighbours would get
        # densities that differ by rounding. (x_i - x_j)^2 summed in one order is.
        dist = (x[:, :, None, :] - x[:, None, :, :]).square().sum(-1).sqrt() / math.sqrt(C)
        if token_mask is not None:
            token_mask = token_mask > 0
            dist = dist * token_mask[:, None, :] + (dist.max() + 1) * (~token_mask[:, None, :])
        nearest, _ = torch.topk(dist, k=k, dim=-1, largest=False)
        density = (-(nearest ** 2).mean(dim=-1)).exp()
        # The published code adds this U(0, 1e-6) noise to break ties; here it is drawn and left
        # unused (ties go to the lower index below), so the random stream is the published one.
        torch.rand(density.shape, device=density.device, dtype=density.dtype)
        if token_mask is not None:
            density = density * token_mask
        # j is "higher" than i: denser, or as dense with a lower index
        idx = torch.arange(N, device=x.device)
        higher = (density[:, None, :] > density[:, :, None]) | (
            (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None]))
        dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
        delta = torch.where(higher, dist, dist_max).min(dim=-1)[0]
        score = delta * density
        if center is not None:
            score[:, center] = -math.inf
        _, index_down = torch.topk(score, k=cluster_num, dim=-1)
        to_kept = torch.gather(dist, 1, index_down[:, :, None].expand(B, cluster_num, N))
        idx_cluster = to_kept.argmin(dim=1)
        positions = torch.arange(cluster_num, device=x.device).expand(B, cluster_num)
        idx_cluster.scatter_(1, index_down, positions)
    return index_down, idx_cluster


class Cross_Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0., length=27):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.linear_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.linear_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.linear_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_1, x_2, x_3):
        B, N, C = x_1.shape
        M, H = x_2.shape[1], self.num_heads
        q = self.linear_q(x_1).reshape(B, N, H, C // H).transpose(1, 2)
        k = self.linear_k(x_2).reshape(B, M, H, C // H).transpose(1, 2)
        v = self.linear_v(x_3).reshape(B, M, H, C // H).transpose(1, 2)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm self-attention + MLP over the middle axis of (batch, tokens, C)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    """HoT-MixSTE in miniature: spatial/temporal blocks, TPC after ``layer_index`` blocks (keep
    ``token_num`` frames), TRA at the end (``x_token + cross_attention(x_token, x, x)``).
    With ``center_forced=True`` it is the seq2frame TPC variant instead: the center frame is always
    kept, no TRA, and it returns the kept frames' features."""

    def __init__(self, frames=27, joints=17, channel=32, num_heads=4, depth=3, token_num=9, layer_index=1,
                 center_forced=False, qkv_bias=True):
        super().__init__()
        self.center = (frames - 1) // 2
        self.token_num, self.layer_index, self.center_forced = token_num, layer_index, center_forced
        self.embed = nn.Linear(2, channel)
        self.spatial_pos = nn.Parameter(torch.randn(1, joints, channel) * 0.02)
        self.temporal_pos = nn.Parameter(torch.randn(1, frames, channel) * 0.02)
        self.spatial = nn.ModuleList(Block(channel, num_heads) for _ in range(depth))
        self.temporal = nn.ModuleList(Block(channel, num_heads) for _ in range(depth))
        if not center_forced:
            self.pos_embed_token = nn.Parameter(torch.randn(1, token_num, channel) * 0.02)
            self.x_token = nn.Parameter(torch.randn(1, frames, channel) * 0.02)
            self.cross_attention = Cross_Attention(channel, num_heads=num_heads, qkv_bias=qkv_bias, length=frames)
        self.head = nn.Sequential(nn.LayerNorm(channel), nn.Linear(channel, 3))

    def forward(self, x):  # (b, f, n, 2) -> ((b, f or token_num, n, 3), index (b, token_num))
        b, f, n, _ = x.shape
        x = self.embed(x) + self.spatial_pos[:, None] + self.temporal_pos[:, :, None]
        index = None
        for i, (sp, tp) in enumerate(zip(self.spatial, self.temporal)):
            if i == self.layer_index:
                x_knn = x.mean(dim=2)  # pool over joints: (b, f, c)
                batch = torch.arange(b, device=x.device)[:, None]
                if self.center_forced:
                    index, _ = cluster_dpc_knn_center(x_knn, self.token_num - 1, 2, self.center)
                    center = torch.full((b, 1), self.center, device=x.device, dtype=index.dtype)
                    index, _ = torch.sort(torch.cat([index, center], dim=-1))
                    x = x[batch, index]
                else:
                    index, _ = cluster_dpc_knn(x_knn, self.token_num, 2)
                    index, _ = torch.sort(index)
                    x = x[batch, index] + self.pos_embed_token[:, :, None]
            B, F, N, C = x.shape
            x = sp(x.reshape(B * F, N, C)).reshape(B, F, N, C)
            x = tp(x.transpose(1, 2).reshape(B * N, F, C)).reshape(B, N, F, C).transpose(1, 2)
        if not self.center_forced:
            B, F, N, C = x.shape
            x = x.transpose(1, 2).reshape(B * N, F, C)
            x_token = self.x_token.expand(B * N, -1, -1)  # what einops.repeat makes: a stride-0 view
            x = x_token + self.cross_attention(x_token, x, x)
            x = x.reshape(B, N, -1, C).transpose(1, 2)
        return self.head(x), index


class HypothesisMixing(nn.Module):
    """MHFormer's cross-hypothesis interaction in miniature: three cross-attentions whose queries,
    keys and values come from three different hypotheses (the unfused case)."""

    def __init__(self, channel=32, num_heads=4):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(channel) for _ in range(3))
        self.attn = nn.ModuleList(Cross_Attention(channel, num_heads=num_heads, qkv_bias=True) for _ in range(3))

    def forward(self, x_1, x_2, x_3):
        h = [norm(x) for norm, x in zip(self.norms, (x_1, x_2, x_3))]
        x_1 = x_1 + self.attn[0](h[1], h[2], h[0])
        x_2 = x_2 + self.attn[1](h[0], h[2], h[1])
        x_3 = x_3 + self.attn[2](h[0], h[1], h[2])
        return x_1, x_2, x_3
