"""Drop-ins with the published HoT signatures and return conventions.

``cluster_dpc_knn`` and ``cluster_dpc_knn_center`` replace the functions of the same names in the
published model files (HoT's MixSTE/MotionBERT/MotionAGFormer TPC, and the center-forcing
TPC-MixSTE/MHFormer variants), running on the selected hot_kernels backend. Differences from the
published code, by design (DESIGN.md): ties are broken deterministically (lower index first)
instead of by U(0, 1e-6) noise, densities are ordered in log space, and the densest token's delta
is the largest distance between *real* tokens.
"""
from __future__ import annotations

import torch

from .functional import _dpc_knn

__all__ = ["cluster_dpc_knn", "cluster_dpc_knn_center"]


def _as_bool_mask(token_mask):
    # The published code accepts any numeric mask and uses token_mask > 0.
    if token_mask is None or (isinstance(token_mask, torch.Tensor) and token_mask.dtype == torch.bool):
        return token_mask
    return token_mask > 0


def cluster_dpc_knn(x, cluster_num, k, token_mask=None, *, backend=None):
    """x (B, N, C) -> (index_down (B, cluster_num), idx_cluster (B, N)), as published.

    index_down: the kept tokens in descending-score order (the models sort it afterwards);
    idx_cluster[b, i]: position in index_down of the kept token nearest to token i (each kept
    token maps to its own position)."""
    return _dpc_knn("cluster_dpc_knn", x, cluster_num, k, _as_bool_mask(token_mask), None, True,
                    sorted=False, keep_center=True, backend=backend)


def cluster_dpc_knn_center(x, cluster_num, k, center, token_mask=None, *, backend=None):
    """Like :func:`cluster_dpc_knn` with token ``center`` excluded from the pick, as published:
    cluster_num tokens other than center, descending score; idx_cluster relative to them. The
    published models then append center and sort (``hot_kernels.dpc_knn(x, f, center=c)`` does
    all of that in one call)."""
    return _dpc_knn("cluster_dpc_knn_center", x, cluster_num, k, _as_bool_mask(token_mask), center, True,
                    sorted=False, keep_center=False, backend=backend)
