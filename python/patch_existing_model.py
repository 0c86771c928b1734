"""Swap hot_kernels into an existing HoT checkout: the patch in three lines, checked.

``hot_style_model.py`` stands in for your repo's model file (e.g. ``model/mixste/hot_mixste.py``).
In your own training script the whole change is:

    import hot_kernels.patch
    import model.mixste.hot_mixste as hot_mixste
    hot_kernels.patch.patch_module(hot_mixste)     # TPC functions + Cross_Attention of that file

and, for a model that was built (or loaded) before that line:

    hot_kernels.patch.patch_model(model)           # its cross-attention submodules, weights kept

This script builds a model, runs it unpatched, patches it both ways and shows that the output,
the kept frames and the training gradients are the same, then undoes the patches.

    python python/patch_existing_model.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hot_style_model  # noqa: E402  (your model file)

import hot_kernels.patch  # noqa: E402


def step(model, poses, target):
    """One training step's output, kept frames and gradients."""
    model.zero_grad()
    out, index = model(poses)
    torch.nn.functional.mse_loss(out, target).backward()
    return out.detach(), index, {n: p.grad.clone() for n, p in model.named_parameters()}


def rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all gradients together (per parameter would divide by ~0 for the key
    bias, whose gradient is analytically zero: softmax ignores a per-row constant)."""
    diff = torch.cat([(a[n] - b[n]).flatten() for n in a])
    return float(diff.norm() / torch.cat([g.flatten() for g in b.values()]).norm())


def main():
    torch.manual_seed(0)
    model = hot_style_model.Model(frames=27, channel=32, token_num=9)
    poses, target = torch.randn(2, 27, 17, 2), torch.randn(2, 27, 17, 3)
    out0, index0, grads0 = step(model, poses, target)

    # 1. patch the model file: the TPC functions now run hot_kernels' fused dpc_knn ...
    with hot_kernels.patch.patch_module(hot_style_model) as replaced:
        print("patch_module replaced:", ", ".join(sorted(replaced)))
        # ... and the already built model's cross-attention runs the fused TRA op.
        print("patch_model swapped", hot_kernels.patch.patch_model(model), "cross-attention module(s)")
        out1, index1, grads1 = step(model, poses, target)
        hot_kernels.patch.unpatch_model(model)
    # leaving the `with` block restored the model file's own functions

    print("kept frames identical:", torch.equal(index0, index1))
    print(f"output max |diff|: {(out0 - out1).abs().max().item():.2e}")
    print(f"gradients of {len(grads0)} parameters, relative diff: {rel_diff(grads1, grads0):.2e}")
    print("model file restored:", hot_style_model.cluster_dpc_knn is not hot_kernels.compat.cluster_dpc_knn)


if __name__ == "__main__":
    main()
