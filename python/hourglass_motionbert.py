"""HourglassMotionBERT: a MotionBERT-style (dual-stream) hourglass video pose transformer on hot_kernels.

Written from the HoT paper's description of HoT-MotionBERT (CVPR 2024), not copied from any
repository. The backbone is a dual-stream spatio-temporal transformer: every layer runs

    ST stream: spatial block (attention over the J joints of each frame + MLP),
               then temporal block (attention over the frames of each joint + MLP)
    TS stream: temporal block, then spatial block

on the same input and fuses the two outputs with adaptive weights: a Linear(2C, 2) of the
concatenated streams, softmax over the 2, per token (initialised so both streams weigh 0.5).
The hourglass is the same two hot_kernels modules as in hourglass_mixste.py (the how-to; the
transformer ``Block`` and the demo are imported from there):

    poses (B, F, J, 3)  (x, y, confidence)
      -> Linear embedding + joint and frame positional embeddings      x: (B, F, J, C)
      -> dual-stream layers 0 .. prune_after-1 on all frames
      -> TPC keeps f frames (hot_kernels.nn.TokenPruningCluster)       x: (B, f, J, C)
      -> dual-stream layers prune_after .. depth-1 on the kept frames
      -> TRA recovers F frames, one sequence per joint
         (hot_kernels.nn.TokenRecoveringAttention)        (B*J, f, C) -> (B*J, F, C)
      -> LayerNorm, representation layer (Linear C -> dim_rep + Tanh), Linear head
                                                                         out: (B, F, J, 3)

Published shape (the defaults): C = 256, 5 layers, 8 heads, MLP ratio 4, 243 frames, pruned to
81 after the first layer, TRA with 8 heads of 32, representation width 512.

    python python/hourglass_motionbert.py               # small model, a few seconds on CPU
    python python/hourglass_motionbert.py --published   # the published size
"""
from __future__ import annotations

import torch
from torch import nn

from hot_kernels.nn import TokenPruningCluster, TokenRecoveringAttention

from hourglass_mixste import Block, demo

__all__ = ["DualStreamLayer", "HourglassMotionBERT"]


class DualStreamLayer(nn.Module):
    """x (B, F, J, C) -> (B, F, J, C): ST and TS streams on x, fused by learned per-token weights."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.st = nn.Sequential(Block(dim, heads, mlp_ratio, "joints"), Block(dim, heads, mlp_ratio, "frames"))
        self.ts = nn.Sequential(Block(dim, heads, mlp_ratio, "frames"), Block(dim, heads, mlp_ratio, "joints"))
        self.fuse = nn.Linear(2 * dim, 2)
        nn.init.zeros_(self.fuse.weight)  # equal logits: softmax gives 0.5 / 0.5 at initialisation
        nn.init.constant_(self.fuse.bias, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st, ts = self.st(x), self.ts(x)
        alpha = self.fuse(torch.cat([st, ts], dim=-1)).softmax(dim=-1)  # (B, F, J, 2)
        return st * alpha[..., 0:1] + ts * alpha[..., 1:2]


class HourglassMotionBERT(nn.Module):
    """MotionBERT-style hourglass VPT: poses (B, F, J, in_dim) -> 3D poses (B, F, J, 3).

    Args:
        frames: F, the clip length (input and output).
        joints: J.
        in_dim: features per joint of the input (3: x, y, confidence).
        dim: the width C.
        heads: attention heads of every block, and of TRA.
        depth: number of dual-stream layers.
        mlp_ratio: MLP hidden width / dim.
        prune_after: TPC runs before layer ``prune_after``; 0 prunes right after the embedding.
        keep: f, frames kept by TPC (and attended to by TRA).
        k: neighbours of TPC's kNN density.
        center: a frame TPC always keeps, or None.
        dim_rep: width of the representation layer (Linear + Tanh) before the head.
        use_hot_kernels: True runs TPC and TRA on hot_kernels' default dispatch (fused kernels);
            False runs them on ``backend="reference"``, plain PyTorch.
    """

    def __init__(self, frames: int = 243, joints: int = 17, in_dim: int = 3, dim: int = 256, heads: int = 8,
                 depth: int = 5, mlp_ratio: float = 4, prune_after: int = 1, keep: int = 81, k: int = 2,
                 center: int | None = None, dim_rep: int = 512, use_hot_kernels: bool = True):
        super().__init__()
        if not 0 <= prune_after < depth:
            raise ValueError(f"prune_after = {prune_after} must be in [0, depth = {depth})")
        self.frames, self.joints, self.prune_after = frames, joints, prune_after
        backend = None if use_hot_kernels else "reference"

        self.embed = nn.Linear(in_dim, dim)
        self.joint_pos = nn.Parameter(torch.zeros(1, 1, joints, dim))
        self.frame_pos = nn.Parameter(torch.zeros(1, frames, 1, dim))
        self.layers = nn.ModuleList(DualStreamLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.tpc = TokenPruningCluster(keep, k=k, center=center, embed_dim=dim, backend=backend)
        self.tra = TokenRecoveringAttention(dim, heads, length=frames, backend=backend)
        self.norm = nn.LayerNorm(dim)
        self.rep = nn.Sequential(nn.Linear(dim, dim_rep), nn.Tanh())
        self.head = nn.Linear(dim_rep, 3)

    def forward(self, poses: torch.Tensor, return_index: bool = False):
        """poses (B, F, J, in_dim) -> out (B, F, J, 3) [, index (B, keep): kept frames, ascending]."""
        x = self.embed(poses) + self.joint_pos + self.frame_pos  # (B, F, J, C)
        index = None
        for i, layer in enumerate(self.layers):
            if i == self.prune_after:
                x, index = self.tpc(x)  # (B, f, J, C)
            x = layer(x)
        B, f, J, C = x.shape
        x = self.tra(x.transpose(1, 2).reshape(B * J, f, C))  # one sequence per joint -> (B*J, F, C)
        x = x.reshape(B, J, self.frames, C).transpose(1, 2)  # (B, F, J, C)
        out = self.head(self.rep(self.norm(x)))  # (B, F, J, 3)
        return (out, index) if return_index else out


SMALL = dict(frames=27, keep=9, dim=64, heads=4, depth=3, prune_after=1, dim_rep=128)


def main(argv=None) -> None:
    demo(HourglassMotionBERT, SMALL, in_dim=3, argv=argv)


if __name__ == "__main__":
    main()
