"""HourglassH2OT: hierarchical token pruning (several TPC stages) in a MixSTE-style video pose transformer.

Written from the description of H2OT ("Hierarchical Hourglass Tokenizer", TPAMI 2025, arXiv
2509.06956, the HoT authors), not from its code: instead of one pruning step, the frame tokens are
pruned in several stages at increasing depth (e.g. 243 -> 121 -> 81 -> 27 frames), so that the
deeper, more expensive part of the network runs on fewer and fewer frames, and the full-length
sequence is recovered once at the end. Everything hierarchical is hot_kernels:

    poses (B, F, J, 2)
      -> embedding + joint / frame positional embeddings                    x: (B, F, J, C)
      -> blocks; before block prune_at[s], stage s keeps keep[s] of the frames it gets
         (hot_kernels.nn.TokenPruningCluster, with its own positional embedding)
                                      (B, F, J, C) -> (B, 121, J, C) -> (B, 81, J, C) -> (B, 27, J, C)
      -> recovery of the F frames from the last stage's tokens:
           recover="tra":    token recovering attention, F learnable queries per joint
                             (hot_kernels.nn.TokenRecoveringAttention)       (B*J, 27, C) -> (B*J, F, C)
           recover="interp": linear interpolation over the original frame index of the kept tokens
                             (hot_kernels.nn.TokenRecoveringInterpolation; no parameters)
      -> LayerNorm + Linear head                                            out: (B, F, J, 3)

Each stage returns the kept positions *among its own input*; ``hot_kernels.compose_indices`` maps
them back to original frames (what interpolation needs, and what ``return_index`` gives).

``use_hot_kernels=False`` runs every hot_kernels module on ``backend="reference"`` (plain PyTorch);
True uses the default dispatch; ``backend=`` picks one backend explicitly (e.g. "triton").

    python python/hourglass_h2ot.py                # small model, a few seconds on CPU
    python python/hourglass_h2ot.py --published    # 243 frames, C = 512, 243 -> 121 -> 81 -> 27
"""
from __future__ import annotations

import torch
from torch import nn

import hot_kernels as hk
from hot_kernels.nn import TokenPruningCluster, TokenRecoveringAttention, TokenRecoveringInterpolation
from hourglass_mixste import Block, demo

__all__ = ["HourglassH2OT", "SMALL"]


class HourglassH2OT(nn.Module):
    """Hierarchical hourglass VPT: poses (B, F, J, in_dim) -> 3D poses (B, F, J, 3).

    Args:
        frames, joints, in_dim, dim, heads, depth, mlp_ratio, k: as for HourglassMixSTE.
        keep: frames kept by each pruning stage, decreasing (e.g. (121, 81, 27) of 243).
        prune_at: the block before which each stage prunes, increasing, in [0, depth).
        recover: "tra" (token recovering attention, learnable queries) or "interp" (linear
            interpolation over the original frame index of the last stage's tokens).
        use_hot_kernels: True runs the hot_kernels modules on the default dispatch, False on
            ``backend="reference"`` (plain PyTorch).
        backend: an explicit hot_kernels backend for every module (overrides use_hot_kernels).
    """

    def __init__(self, frames: int = 243, joints: int = 17, in_dim: int = 2, dim: int = 512, heads: int = 8,
                 depth: int = 8, mlp_ratio: float = 2, keep=(121, 81, 27), prune_at=(2, 4, 6), k: int = 2,
                 recover: str = "tra", use_hot_kernels: bool = True, backend: str | None = None):
        super().__init__()
        keep, prune_at = tuple(keep), tuple(prune_at)
        if len(keep) != len(prune_at) or not keep:
            raise ValueError(f"keep {keep} and prune_at {prune_at} must be non-empty and of one length (one per stage)")
        if any(b <= a for a, b in zip(prune_at, prune_at[1:])) or not 0 <= prune_at[0] or prune_at[-1] >= depth:
            raise ValueError(f"prune_at {prune_at} must increase within [0, depth = {depth})")
        if any(b > a for a, b in zip((frames,) + keep, keep)):
            raise ValueError(f"keep {keep} must not increase, starting from at most frames = {frames}")
        if recover not in ("tra", "interp"):
            raise ValueError(f"recover must be 'tra' or 'interp', got {recover!r}")
        self.frames, self.joints, self.keep, self.prune_at, self.recover = frames, joints, keep, prune_at, recover
        backend = backend if backend is not None else (None if use_hot_kernels else "reference")

        self.embed = nn.Linear(in_dim, dim)
        self.joint_pos = nn.Parameter(torch.zeros(1, 1, joints, dim))
        self.frame_pos = nn.Parameter(torch.zeros(1, frames, 1, dim))
        self.blocks = nn.ModuleList(
            nn.Sequential(Block(dim, heads, mlp_ratio, "joints"), Block(dim, heads, mlp_ratio, "frames"))
            for _ in range(depth))
        self.tpc_stages = nn.ModuleList(TokenPruningCluster(f, k=k, embed_dim=dim, backend=backend) for f in keep)
        if recover == "tra":
            self.tra = TokenRecoveringAttention(dim, heads, length=frames, backend=backend)
        else:
            self.interp = TokenRecoveringInterpolation(frames, backend=backend)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3))

    def forward(self, poses: torch.Tensor, return_index: bool = False):
        """poses (B, F, J, in_dim) -> out (B, F, J, 3) [, index (B, keep[-1]): the original frames
        the last stage kept, ascending]."""
        x = self.embed(poses) + self.joint_pos + self.frame_pos  # (B, F, J, C)
        stage_indices = []
        stage = dict(zip(self.prune_at, self.tpc_stages))
        for i, block in enumerate(self.blocks):
            if i in stage:
                x, local = stage[i](x)  # (B, f_s, J, C); local: positions among this stage's input
                stage_indices.append(local)
            x = block(x)
        index = hk.compose_indices(*stage_indices)  # (B, f_last) original frames
        B, f, J, C = x.shape
        if self.recover == "tra":
            x = self.tra(x.transpose(1, 2).reshape(B * J, f, C))  # (B*J, F, C)
            x = x.reshape(B, J, self.frames, C).transpose(1, 2)
        else:
            x = self.interp(x, index)  # (B, F, J, C)
        out = self.head(x)
        return (out, index) if return_index else out


SMALL = dict(frames=27, keep=(15, 9, 5), prune_at=(1, 2, 3), dim=64, heads=4, depth=4)


def main(argv=None) -> None:
    demo(HourglassH2OT, SMALL, in_dim=2, argv=argv)


if __name__ == "__main__":
    main()
