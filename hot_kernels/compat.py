"""Drop-ins with the published HoT signatures and return conventions.

``cluster_dpc_knn`` and ``cluster_dpc_knn_center`` replace the functions of the same names in the
published model files (HoT's MixSTE/MotionBERT/MotionAGFormer TPC, and the center-forcing
TPC-MixSTE/MHFormer variants), running on the selected hot_kernels backend. ``CrossAttention``
replaces the published cross-attention module of TRA (same constructor, parameter names and
``forward(x_1, x_2, x_3)``), so a published checkpoint loads into it unchanged. Differences from the
published code, by design (DESIGN.md): ties are broken deterministically (lower index first)
instead of by U(0, 1e-6) noise, densities are ordered in log space, and the densest token's delta
is the largest distance between *real* tokens.

The random stream, by contrast, is kept: the published functions draw ``torch.rand(B, N)`` tie
noise on every call, so the drop-ins draw the same tensor (same shape, device, dtype, global
generator) and discard it. Every later random draw of a training step (dropout, DropPath,
augmentation) then sees the same generator state as in the unpatched run with the same seed.
Opt out per call with ``advance_rng=False`` or for the process with ``compat.ADVANCE_RNG = False``.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import _validate as V
from . import reference
from .functional import _cluster_mean, _dpc_knn, token_recovering_attention

__all__ = ["ADVANCE_RNG", "cluster_dpc_knn", "cluster_dpc_knn_center", "merge_tokens", "CrossAttention"]

# Default of the drop-ins' ``advance_rng``: draw (and discard) the published tie noise, so that the
# global RNG advances exactly as in the published code.
ADVANCE_RNG = True


def published_noise_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the published code's tie noise for input x: that of ``torch.cdist(x, x)``,
    which is float32 under autocast on x's device (cdist is on autocast's float32 list; float64
    is never cast) and x's dtype otherwise."""
    device_type = x.device.type
    if (x.dtype != torch.float64 and device_type in ("cpu", "cuda")
            and torch.is_autocast_enabled(device_type)):
        return torch.float32
    return x.dtype


def _advance_flag(op: str, advance_rng) -> bool:
    """advance_rng, or ADVANCE_RNG when it is None; a bool either way."""
    if advance_rng is None:
        return V.boolean(op, "compat.ADVANCE_RNG", ADVANCE_RNG)
    return V.boolean(op, "advance_rng", advance_rng)


def _draw_published_noise(x: torch.Tensor) -> None:
    """Draw the published ``torch.rand(B, N)`` tie noise from the global generator of x's device
    and discard it: the values are unused (the tie rule stays deterministic), only the generator
    state advances."""
    torch.rand(x.shape[:2], device=x.device, dtype=published_noise_dtype(x))


def _as_bool_mask(token_mask):
    # The published code accepts any numeric mask and uses token_mask > 0. Anything that is not a
    # numeric tensor goes on unchanged, for the validation layer to name.
    if isinstance(token_mask, torch.Tensor) and token_mask.dtype != torch.bool and not token_mask.is_complex():
        return token_mask > 0
    return token_mask


def cluster_dpc_knn(x, cluster_num, k, token_mask=None, *, backend=None, advance_rng=None):
    """x (B, N, C) -> (index_down (B, cluster_num), idx_cluster (B, N)), as published.

    index_down: the kept tokens in descending-score order (the models sort it afterwards);
    idx_cluster[b, i]: position in index_down of the kept token nearest to token i (each kept
    token maps to its own position). advance_rng (default ADVANCE_RNG): draw the published
    ``torch.rand(B, N)`` tie noise, unused, so the global RNG advances as in the published code."""
    advance = _advance_flag("cluster_dpc_knn", advance_rng)
    out = _dpc_knn("cluster_dpc_knn", x, cluster_num, k, _as_bool_mask(token_mask), None, True,
                   sorted=False, keep_center=True, backend=backend)
    if advance:
        _draw_published_noise(x)
    return out


def cluster_dpc_knn_center(x, cluster_num, k, center, token_mask=None, *, backend=None, advance_rng=None):
    """Like :func:`cluster_dpc_knn` with token ``center`` excluded from the pick, as published:
    cluster_num tokens other than center, descending score; idx_cluster relative to them. The
    published models then append center and sort (``hot_kernels.dpc_knn(x, f, center=c)`` does
    all of that in one call). advance_rng: as in :func:`cluster_dpc_knn`."""
    advance = _advance_flag("cluster_dpc_knn_center", advance_rng)
    out = _dpc_knn("cluster_dpc_knn_center", x, cluster_num, k, _as_bool_mask(token_mask), center, True,
                   sorted=False, keep_center=False, backend=backend)
    if advance:
        _draw_published_noise(x)
    return out


MERGE_EPS = 1e-6  # added to every cluster's weight sum by TCFormer and Chat-UniVi


def merge_tokens(x, idx_cluster, cluster_num, token_weight=None, *, backend=None):
    """Token merging in the convention of Chat-UniVi's ``merge_tokens(x, idx_cluster, cluster_num,
    token_weight=None)`` (TCFormer's ``merge_tokens(token_dict, idx_cluster, cluster_num,
    token_weight)`` computes the same ``x_merged`` from ``token_dict["x"]``): x (B, N, C),
    idx_cluster (B, N) cluster of each token in [0, cluster_num) (what ``cluster_dpc_knn`` returns),
    token_weight (B, N, 1) (or (B, N)) or None -> x_merged (B, cluster_num, C) =
    sum w_i x_i / (sum w_i + 1e-6) per cluster.

    Differences from :func:`hot_kernels.merge_tokens`: the clusters are given by idx_cluster and
    cluster_num (no kept-token index, so no check that each kept token is in its own cluster), the
    weights are (B, N, 1), and, as published, 1e-6 is added to each weight sum (an exact mean times
    W / (W + 1e-6); an empty or zero-weight cluster gives 0 in both). TCFormer's other outputs
    (idx_token, agg_weight, the merged token_dict) are not produced. Deterministic on every backend
    (the published index_add_ is not, on CUDA)."""
    op = "compat.merge_tokens"
    if isinstance(token_weight, torch.Tensor) and token_weight.dim() == 3 and token_weight.shape[2] == 1:
        token_weight = token_weight[..., 0]
    x, _, idx_cluster, token_weight, f = V.merge_inputs(op, x, None, idx_cluster, token_weight, cluster_num)
    mean = _cluster_mean(op, x, idx_cluster, f, token_weight, backend)
    if token_weight is None:
        W = torch.zeros(x.shape[0], f, dtype=mean.dtype, device=x.device).scatter_add_(
            1, idx_cluster, torch.ones_like(idx_cluster, dtype=mean.dtype))  # counts: exact in any order
    else:
        # sum of w per cluster = count * mean of w: differentiable in the weights, deterministic.
        counts = torch.zeros(x.shape[0], f, dtype=torch.float32, device=x.device).scatter_add_(
            1, idx_cluster, torch.ones_like(idx_cluster, dtype=torch.float32))
        mean_w = _cluster_mean(op, token_weight[..., None], idx_cluster, f, None, backend)[..., 0]
        W = counts.to(token_weight.dtype) * mean_w
    return mean * (W / (W + MERGE_EPS))[..., None]


def _weights(mod: nn.Module):
    return (mod.linear_q.weight, mod.linear_q.bias, mod.linear_k.weight, mod.linear_k.bias,
            mod.linear_v.weight, mod.linear_v.bias, mod.proj.weight, mod.proj.bias)


def _dropout_p(mod: nn.Module, name: str) -> float:
    drop = getattr(mod, name, None)
    return float(getattr(drop, "p", 0.0)) if isinstance(drop, nn.Module) else 0.0


def dropout_active(mod: nn.Module) -> bool:
    """True when a cross-attention module would drop something now (training with p > 0)."""
    return mod.training and (_dropout_p(mod, "attn_drop") > 0 or _dropout_p(mod, "proj_drop") > 0)


def fused_cross_attention(mod: nn.Module, query: torch.Tensor, x: torch.Tensor, residual: bool) -> torch.Tensor:
    """The fused TRA op with the weights of any module shaped like the published cross-attention
    (``linear_q/linear_k/linear_v/proj`` linears, ``num_heads``, optional ``scale`` and
    ``backend``): query (1 or S, L, C), x (S, M, C) -> (S, L, C) [+ query]. Dropout is not applied."""
    scale = getattr(mod, "scale", None)
    return token_recovering_attention(query, x, *_weights(mod), mod.num_heads, scale, residual,
                                      backend=getattr(mod, "backend", None))


class CrossAttention(nn.Module):
    """The published TRA cross-attention: ``forward(x_1, x_2, x_3)`` -> (S, L, C) =
    proj(softmax(q k^T * scale) v) with q = linear_q(x_1) (x_1: (1 or S, L, C), e.g. the learnable
    x_token, expanded or not), k = linear_k(x_2), v = linear_v(x_3) (x_2, x_3: (S, M, C)). No
    residual: the published model adds ``x_token +`` itself.

    Runs as one fused hot_kernels op when x_2 and x_3 are the same tensor (every published model
    calls ``cross_attention(x_token, x, x)``); a query that is a stride-0 broadcast view is
    projected once. Distinct x_2 and x_3, or dropout p > 0 while training, run the plain PyTorch
    path (the latter with a warning: the fused kernels implement p = 0, what every published
    model uses).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, length: int = 27, *, backend: str | None = None):
        super().__init__()
        self.backend = backend  # None: the usual choice (use_backend, HOT_KERNELS_BACKEND, device default)
        name = type(self).__name__
        for arg, v in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        if dim % num_heads:
            raise ValueError(f"{name}: num_heads = {num_heads} must divide dim = {dim}")
        self.dim, self.num_heads, self.length = dim, num_heads, length
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.linear_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.linear_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.linear_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention(self, query: torch.Tensor, x: torch.Tensor, residual: bool) -> torch.Tensor:
        """(query (1 or S, L, C), x (S, M, C)) -> (S, L, C), plus query when residual."""
        if dropout_active(self):
            warnings.warn(f"{type(self).__name__}: dropout > 0 runs the reference path (the fused kernels "
                          "implement p = 0)", stacklevel=3)
            return reference.token_recovering_attention(query, x, *_weights(self), self.num_heads, self.scale,
                                                        residual, self.attn_drop.p, self.proj_drop.p, training=True)
        return fused_cross_attention(self, query, x, residual)

    def forward(self, x_1: torch.Tensor, x_2: torch.Tensor, x_3: torch.Tensor) -> torch.Tensor:
        if x_2 is x_3:
            return self.attention(x_1, x_2, residual=False)
        return self._unfused(x_1, x_2, x_3)

    def _unfused(self, x_1, x_2, x_3):
        """The published computation, for keys and values from different tensors."""
        op, C = "CrossAttention", self.dim
        V.tensor(op, "x_2", x_2, "(S, M, C)", ndim=3)
        S, M = x_2.shape[:2]
        for name, t in (("x_1", x_1), ("x_3", x_3)):
            V.tensor(op, name, t, "(S, L, C)" if name == "x_1" else "(S, M, C)", ndim=3)
        if x_2.shape[2] != C or x_3.shape != x_2.shape:
            bad = ("x_2", x_2) if x_2.shape[2] != C else ("x_3", x_3)
            V.fail(op, f"x_2 and x_3 must both be (S, M, C) with C = {C}, got {bad[0]} of shape {tuple(bad[1].shape)}"
                       + ("" if bad[0] == "x_2" else f" and x_2 of shape {tuple(x_2.shape)}"))
        if x_1.shape[0] not in (1, S) or x_1.shape[2] != C:
            V.fail(op, f"x_1 must be (1, L, C) or (S, L, C) with S = {S}, C = {C}, got {tuple(x_1.shape)}")
        L, H = x_1.shape[1], self.num_heads
        q = self.linear_q(x_1.expand(S, L, C)).reshape(S, L, H, C // H).transpose(1, 2)
        k = self.linear_k(x_2).reshape(S, M, H, C // H).transpose(1, 2)
        v = self.linear_v(x_3).reshape(S, M, H, C // H).transpose(1, 2)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(S, L, C)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
