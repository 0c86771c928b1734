"""A tiny hourglass video pose transformer written against hot_kernels: the how-to in code.

Spatial attention over the J joints of each frame, temporal attention over the frames of each
joint; after ``prune_after`` blocks token pruning (TPC) keeps ``f`` representative frames, the
remaining blocks run on those, and token recovering attention (TRA) brings back all F frames
for the seq2seq 3D output. ``backend`` switches every hot_kernels call (e.g. "reference" vs
"cpu"), which is how the equality tests and the whole-model benchmark compare paths.

    python python/tiny_hourglass.py            # runs one forward and backward on random poses
"""
from __future__ import annotations

import torch
from torch import nn

import hot_kernels
from hot_kernels.nn import TokenPruningCluster, TokenRecoveringAttention


class Block(nn.Module):
    """Pre-norm self-attention + MLP over the second axis of (batch, tokens, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyHourglass(nn.Module):
    def __init__(self, frames=27, joints=17, dim=32, heads=4, depth=4, prune_after=1, keep=9, center=None):
        super().__init__()
        self.embed = nn.Linear(2, dim)
        self.joint_pos = nn.Parameter(torch.zeros(1, 1, joints, dim))
        self.frame_pos = nn.Parameter(torch.zeros(1, frames, 1, dim))
        self.spatial = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.temporal = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.prune_after = prune_after
        self.tpc = TokenPruningCluster(keep, k=2, center=center, embed_dim=dim)
        self.tra = TokenRecoveringAttention(dim, heads, length=frames)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3))

    def forward(self, poses):  # (B, F, J, 2) -> (B, F, J, 3), plus the kept frame indices
        x = self.embed(poses) + self.joint_pos + self.frame_pos
        index = None
        for i, (sp, tp) in enumerate(zip(self.spatial, self.temporal)):
            if i == self.prune_after:
                x, index = self.tpc(x)  # (B, f, J, C)
            B, Fr, J, C = x.shape
            x = sp(x.reshape(B * Fr, J, C)).reshape(B, Fr, J, C)
            x = tp(x.transpose(1, 2).reshape(B * J, Fr, C)).reshape(B, J, Fr, C).transpose(1, 2)
        B, f, J, C = x.shape
        seqs = x.transpose(1, 2).reshape(B * J, f, C)  # one sequence per joint
        full = self.tra(seqs)  # (B*J, F, C): the shared queries are projected once
        full = full.reshape(B, J, -1, C).transpose(1, 2)
        return self.head(full), index


def main():
    torch.manual_seed(0)
    model = TinyHourglass()
    poses = torch.randn(2, 27, 17, 2)
    for backend in ("reference", "cpu"):
        with hot_kernels.use_backend(backend):
            out, index = model(poses)
            out.square().mean().backward()
        print(f"{backend:<9} output {tuple(out.shape)}, kept frames of sample 0: {index[0].tolist()}")
        model.zero_grad()


if __name__ == "__main__":
    main()
