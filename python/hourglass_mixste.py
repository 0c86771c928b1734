"""HourglassMixSTE: a MixSTE-style hourglass video pose transformer built on hot_kernels.

This file is the how-to for putting hot_kernels into your own model. It is written from the
description in the HoT paper ("Hourglass Tokenizer for Efficient Transformer-Based 3D Human Pose
Estimation", CVPR 2024), not copied from its repository. The model lifts a clip of 2D poses to 3D:

    poses (B, F, J, 2)
      -> Linear embedding + joint and frame positional embeddings      x: (B, F, J, C)
      -> blocks 0 .. prune_after-1, each: spatial block (attention over the J joints of every
         frame, then MLP) and temporal block (attention over the F frames of every joint,
         then MLP)                                                       x: (B, F, J, C)
      -> TPC, token pruning cluster: keep the f most representative frames
         (hot_kernels.nn.TokenPruningCluster)                            x: (B, f, J, C)
      -> blocks prune_after .. depth-1 on the kept frames only           x: (B, f, J, C)
      -> TRA, token recovering attention: F learnable queries attend to the f kept frames of
         each joint, one sequence per joint (hot_kernels.nn.TokenRecoveringAttention)
                                                          (B*J, f, C) -> (B*J, F, C)
      -> LayerNorm + Linear head                                         out: (B, F, J, 3)

Pruning 243 frames to 81 after 3 of 8 blocks makes the 5 remaining blocks three times cheaper;
TRA gives the full-length (seq2seq) output back. Everything hourglass-specific is the two
hot_kernels modules, built in ``__init__`` and called in ``forward``:

    self.tpc = TokenPruningCluster(keep, k=2, embed_dim=dim)      # + pos embedding of kept frames
    self.tra = TokenRecoveringAttention(dim, heads, length=frames)
    ...
    x, index = self.tpc(x)                                         # (B, F, J, C) -> (B, f, J, C)
    x = self.tra(x.transpose(1, 2).reshape(B * J, f, C))           # -> (B*J, F, C)

``use_hot_kernels=False`` runs both modules on ``backend="reference"`` (plain PyTorch, what the
published code computes); True uses the default dispatch: the C++ ``cpu`` backend on CPU
tensors, the fused GPU kernels on CUDA tensors. Both give the same outputs, kept frames and
gradients, and the same state_dict, so weights move freely between the two.

    python python/hourglass_mixste.py               # small model, a few seconds on CPU
    python python/hourglass_mixste.py --published   # the published size (243 frames, C = 512)
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from hot_kernels.nn import TokenPruningCluster, TokenRecoveringAttention

__all__ = ["Attention", "Block", "HourglassMixSTE", "demo"]


class Attention(nn.Module):
    """Multi-head self-attention: x (N, T, C) -> (N, T, C), N sequences of T tokens."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads = {heads} must divide dim = {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, C = x.shape
        # (N, T, 3C) -> three (N, heads, T, C/heads)
        q, k, v = self.qkv(x).reshape(N, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(N, T, C))


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP, both residual) along one axis of x (B, F, J, C).

    axis="joints": spatial, every frame's J joints are one sequence (B*F sequences of J tokens).
    axis="frames": temporal, every joint's F frames are one sequence (B*J sequences of F tokens).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, axis: str):
        super().__init__()
        if axis not in ("joints", "frames"):
            raise ValueError(f"axis must be 'joints' or 'frames', got {axis!r}")
        self.axis = axis
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis == "frames":
            x = x.transpose(1, 2)  # (B, J, F, C): a joint's frames are contiguous after reshape
        shape = x.shape
        seq = x.reshape(-1, shape[2], shape[3])  # (sequences, tokens, C)
        seq = seq + self.attn(self.norm1(seq))
        seq = seq + self.mlp(self.norm2(seq))
        x = seq.reshape(shape)
        return x.transpose(1, 2) if self.axis == "frames" else x

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class HourglassMixSTE(nn.Module):
    """MixSTE-style hourglass VPT: poses (B, F, J, in_dim) -> 3D poses (B, F, J, 3).

    Args:
        frames: F, the clip length (input and output).
        joints: J.
        in_dim: features per joint of the input (2: x, y).
        dim: the width C.
        heads: attention heads of every block, and of TRA.
        depth: number of (spatial block, temporal block) pairs.
        mlp_ratio: MLP hidden width / dim.
        prune_after: TPC runs before block ``prune_after`` (after that many pairs ran on all
            frames); 0 prunes right after the embedding.
        keep: f, frames kept by TPC (and attended to by TRA).
        k: neighbours of TPC's kNN density.
        center: a frame TPC always keeps (the seq2frame "TPC-*" variants), or None.
        use_hot_kernels: True runs TPC and TRA on hot_kernels' default dispatch (fused kernels);
            False runs them on ``backend="reference"``, plain PyTorch.

    The zero-initialised parameters (``tpc.pos_embed``, ``tra.x_token``, the positional
    embeddings) are learned; the defaults are the published HoT-MixSTE shape.
    """

    def __init__(self, frames: int = 243, joints: int = 17, in_dim: int = 2, dim: int = 512, heads: int = 8,
                 depth: int = 8, mlp_ratio: float = 2, prune_after: int = 3, keep: int = 81, k: int = 2,
                 center: int | None = None, use_hot_kernels: bool = True):
        super().__init__()
        if not 0 <= prune_after < depth:
            raise ValueError(f"prune_after = {prune_after} must be in [0, depth = {depth})")
        self.frames, self.joints, self.prune_after = frames, joints, prune_after
        backend = None if use_hot_kernels else "reference"

        self.embed = nn.Linear(in_dim, dim)
        self.joint_pos = nn.Parameter(torch.zeros(1, 1, joints, dim))
        self.frame_pos = nn.Parameter(torch.zeros(1, frames, 1, dim))
        self.blocks = nn.ModuleList(
            nn.Sequential(Block(dim, heads, mlp_ratio, "joints"), Block(dim, heads, mlp_ratio, "frames"))
            for _ in range(depth))
        # The hourglass: TPC keeps `keep` frames (plus a learnable positional embedding for the
        # kept tokens), TRA recovers `frames` frames from them.
        self.tpc = TokenPruningCluster(keep, k=k, center=center, embed_dim=dim, backend=backend)
        self.tra = TokenRecoveringAttention(dim, heads, length=frames, backend=backend)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3))

    def forward(self, poses: torch.Tensor, return_index: bool = False):
        """poses (B, F, J, in_dim) -> out (B, F, J, 3) [, index (B, keep): kept frames, ascending]."""
        x = self.embed(poses) + self.joint_pos + self.frame_pos  # (B, F, J, C)
        index = None
        for i, block in enumerate(self.blocks):
            if i == self.prune_after:
                x, index = self.tpc(x)  # (B, f, J, C)
            x = block(x)
        B, f, J, C = x.shape
        x = self.tra(x.transpose(1, 2).reshape(B * J, f, C))  # one sequence per joint -> (B*J, F, C)
        out = self.head(x.reshape(B, J, self.frames, C).transpose(1, 2))  # (B, F, J, 3)
        return (out, index) if return_index else out


# ------------------------------------------------------------------------------------------------
# Demo: one forward + backward with and without hot_kernels (shared with hourglass_motionbert.py).
# ------------------------------------------------------------------------------------------------

SMALL = dict(frames=27, keep=9, dim=64, heads=4, depth=4, prune_after=2)


def demo(model_cls, small: dict, in_dim: int, argv=None) -> None:
    """Build ``model_cls`` with use_hot_kernels True and False and identical weights, run one
    forward + backward on random poses with each, print shapes, kept frames, timings and the
    difference between the two paths."""
    parser = argparse.ArgumentParser(description=f"One training step of {model_cls.__name__} on random poses, "
                                                 "with and without hot_kernels.")
    parser.add_argument("--published", action="store_true", help="the published model size (default: small)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = {} if args.published else small

    torch.manual_seed(0)
    models = {flag: model_cls(**config, use_hot_kernels=flag).to(args.device) for flag in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    m = models[True]
    print(f"{model_cls.__name__}({', '.join(f'{k}={v}' for k, v in config.items()) or 'published size'}): "
          f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters, device {args.device}")
    poses = torch.randn(args.batch, m.frames, m.joints, in_dim, device=args.device)
    target = torch.randn(args.batch, m.frames, m.joints, 3, device=args.device)
    outs = {}
    for flag, model in models.items():
        for _ in range(2):  # the second step is timed: the first one includes one-time set-up
            model.zero_grad()
            if poses.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out, index = model(poses, return_index=True)
            F.mse_loss(out, target).backward()
            if poses.is_cuda:
                torch.cuda.synchronize()  # CUDA runs asynchronously: wait before reading the clock
            seconds = time.perf_counter() - t0
        outs[flag] = out.detach()
        name = "hot_kernels" if flag else "pure PyTorch"
        print(f"  {name:<12}: poses {tuple(poses.shape)} -> out {tuple(out.shape)}, index {tuple(index.shape)}, "
              f"forward+backward {seconds:.3f} s, x_token grad norm {model.tra.x_token.grad.norm():.3g}")
        print(f"  {'':<12}  kept frames of sample 0: {index[0].tolist()}")
    print(f"  max |hot_kernels - pure PyTorch| = {(outs[True] - outs[False]).abs().max():.2e}")


def main(argv=None) -> None:
    demo(HourglassMixSTE, SMALL, in_dim=2, argv=argv)


if __name__ == "__main__":
    main()
