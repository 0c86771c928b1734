"""The ``reference`` backend: plain PyTorch, the executable form of the semantics (the test oracle).

Every other backend is tested against these functions; they are themselves tested against an
independent float64 brute force (tests/oracle.py). They are also the "published eager path"
baseline of the benchmarks, so they compute what the published HoT code computes, in the same
way: one Gram-matrix distance matrix per call, then a chain of B x N x N tensor ops.

Semantics (DESIGN.md). x is (B, N, C); D[b, i, j] = ||x[b, i] - x[b, j]||_2 / sqrt(C), with
D[b, i, i] = 0 exactly and D[b, i, j] == D[b, j, i] bitwise. Token j is *higher* than token i
when rho_j > rho_i, or rho_j == rho_i and j < i (ties go to the lower index: deterministic, no
random noise). Densities are ordered by log-density (-mean d^2) so that the order stays
meaningful where exp() underflows. Selections rank by score, ties to the lower index; a NaN
score ranks below every number, a masked token below every real one, an excluded token never.

Dtypes: for the selection ops, float16/bfloat16 inputs are computed in float32; density, delta
and score outputs are then float32 (rounding them to 8 mantissa bits would invent ties).
float32/float64 are computed in their own precision. token_recovering_attention runs in the
input's dtype, as the published module does (tests judge low-precision backends against it run
on float64 copies of the same inputs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "pairwise_distance",
    "knn_density",
    "dpc_delta",
    "topf_select",
    "dpc_knn",
    "token_pruning_cluster",
    "token_recovering_attention",
    "token_recovering_interpolation",
    "merge_tokens",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the statistics of an input of this dtype are computed (and returned) in."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------------------------
# Building blocks that take a precomputed distance matrix: dpc_knn computes D once and shares it,
# as the published code does.
# ----------------------------------------------------------------------------------------------


def _distance(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """D (B, N, M) in the compute dtype of x, differentiable, bit-symmetric with a zero diagonal
    when y is None. Gram form, like torch.cdist on large inputs: d2 = |x|^2 + |y|^2 - 2 x.y.

    Exact duplicates are at distance exactly 0 whatever the BLAS: a GEMM need not round x_i.x_j to
    |x_i|^2 for identical rows, so the Gram form alone can leave them ~sqrt(eps) |x| apart (and the
    tie rule, and the gradient at zero distance, would then depend on the BLAS). Identical rows have
    bitwise-equal |x|^2 (each row is reduced by the same elementwise code: no BLAS) and a Gram d2
    within the GEMM's rounding bound of 0; every pair meeting both tests is set to exactly 0. A
    distinct pair can only pass both if its true d2 is itself within that bound, so this never
    moves a distance by more than the Gram form's own error."""
    dt = compute_dtype(x.dtype)
    # One layout whatever the caller's strides: the GEMMs and their backward then round the same
    # way for a transposed or expanded input as for its contiguous copy.
    xf = x.to(dt).contiguous()
    yf = xf if y is None else y.to(dt).contiguous()
    C = x.shape[-1]
    sq_x = (xf * xf).sum(-1)
    sq_y = sq_x if y is None else (yf * yf).sum(-1)
    sq_sum = sq_x[:, :, None] + sq_y[:, None, :]
    # Autocast off: under torch.autocast the GEMM would run in bfloat16/float16 and the selections
    # would change (torch.cdist, which the published code uses, is on autocast's float32 list too).
    with torch.autocast(x.device.type, enabled=False):
        d2 = torch.baddbmm(sq_sum, xf, yf.transpose(1, 2), alpha=-2.0)
    if y is None:
        # The GEMM need not give G[i, j] == G[j, i] bitwise; (a + b) * 0.5 is exactly symmetric,
        # which makes mutual nearest neighbours tie exactly in density (the tie rule needs that).
        d2 = (d2 + d2.transpose(1, 2)) * 0.5
    # Rounding bound of the Gram form (dot products of length C): |d2' - d2| <= 2 C eps (|x_i|^2 +
    # |y_j|^2); 4 C eps leaves room for the final additions.
    with torch.no_grad():
        bound = sq_sum * (4 * C * torch.finfo(dt).eps)  # +inf where |x|^2 overflows: no claim there
        same = (sq_x[:, :, None] == sq_y[:, None, :]) & (d2.abs() <= bound) & torch.isfinite(bound)
        if y is None:
            same |= torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    d2 = d2.masked_fill(same, 0.0).clamp_min(0.0)  # cancellation can make it slightly negative
    # sqrt with a zero gradient at zero distance (never NaN): the untaken branch is clamped.
    tiny = torch.finfo(dt).tiny
    dist = torch.where(d2 > 0, d2.clamp_min(tiny).sqrt(), torch.zeros_like(d2))
    return dist / math.sqrt(C)


def _log_density(D: torch.Tensor, k: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """log rho (B, N) = -mean of the squares of the k smallest D[i, :] (self included).

    Masked columns are never neighbours; if a sample has fewer than k real tokens the mean runs
    over all of its real tokens. Masked rows get -inf (rho = 0)."""
    k = min(k, D.shape[-1])  # fewer than k tokens: the mean runs over all of them
    if token_mask is None:
        nearest = D.topk(k, dim=-1, largest=False).values
        return -(nearest * nearest).mean(-1)
    Dm = D.masked_fill(~token_mask[:, None, :], math.inf)
    nearest = Dm.topk(k, dim=-1, largest=False).values
    is_real = torch.isfinite(nearest) | torch.isnan(nearest)  # masked columns are exactly +inf
    sq = torch.where(is_real, nearest * nearest, torch.zeros_like(nearest))
    count = token_mask.sum(-1, keepdim=True).clamp(min=1, max=k).to(D.dtype)
    log_rho = -sq.sum(-1) / count
    return log_rho.masked_fill(~token_mask, -math.inf)


def _rank_key(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Values for a "higher than" order: NaN ranks lowest (as -inf) and masked tokens too."""
    key = values.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if token_mask is not None:
        key = key.masked_fill(~token_mask, -math.inf)
    return key


def _delta(D: torch.Tensor, density: torch.Tensor, token_mask: torch.Tensor | None):
    """(delta, parent): delta_i = min over tokens j higher than i of D[i, j] (ties between equal
    distances to the lowest j), parent_i = that j. The highest token gets the sample's largest
    distance between real tokens (0 if it has none) and is its own parent."""
    B, N, _ = D.shape
    key = _rank_key(density, token_mask)
    idx = torch.arange(N, device=D.device)
    # higher[b, i, j]: token j is higher than token i.
    higher = (key[:, None, :] > key[:, :, None]) | (
        (key[:, None, :] == key[:, :, None]) & (idx[None, :] < idx[:, None])
    )
    Dh = D.masked_fill(~higher, math.inf)
    delta = Dh.min(dim=-1).values
    # The first j attaining the minimum (argmax returns the first maximal value).
    parent = ((Dh == delta[..., None]) & higher).to(torch.uint8).argmax(dim=-1)
    if token_mask is None:
        largest = D.flatten(1).max(dim=-1).values
    else:
        both_real = token_mask[:, :, None] & token_mask[:, None, :]
        largest = D.masked_fill(~both_real, -math.inf).flatten(1).max(dim=-1).values
        largest = torch.where(token_mask.any(-1), largest, torch.zeros_like(largest))
    has_higher = higher.any(dim=-1)
    delta = torch.where(has_higher, delta, largest[:, None].expand(B, N))
    parent = torch.where(has_higher, parent, idx[None, :].expand(B, N))
    return delta, parent


def _rank_order(score: torch.Tensor, klass: torch.Tensor) -> torch.Tensor:
    """Permutation (B, N) ranking tokens best first: by class (higher first), then by score
    (higher first, NaN as lowest within its class), then by lower index."""
    s = score.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    by_class = torch.sort(klass.gather(-1, order), dim=-1, descending=True, stable=True).indices
    return order.gather(-1, by_class)


def _select(score, f, sorted, exclude, token_mask):
    """Top-f of score per row -> (B, f) int64. exclude: (B,) int64 or None (never picked)."""
    B, N = score.shape
    # Class: 3 real with a number, 2 real with NaN, 1 masked, 0 excluded.
    klass = torch.where(torch.isnan(score), 2, 3).to(torch.int8)
    if token_mask is not None:
        klass = torch.where(token_mask, klass, torch.ones_like(klass))
    if exclude is not None:
        klass = klass.scatter(1, exclude.view(B, 1), 0)
    index = _rank_order(score, klass)[:, :f]
    if sorted:
        index = index.sort(dim=-1).values
    return index.contiguous()


def _as_exclude(exclude, B: int, device) -> torch.Tensor | None:
    if exclude is None:
        return None
    if isinstance(exclude, int):
        return torch.full((B,), exclude, dtype=torch.long, device=device)
    return exclude.to(device=device, dtype=torch.long).reshape(B)


# ----------------------------------------------------------------------------------------------
# The ops.
# ----------------------------------------------------------------------------------------------


def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """D (B, N, M) = ||x_i - y_j|| / sqrt(C), in the dtype of x; y defaults to x (then D is
    bit-symmetric with a zero diagonal). Differentiable in x and y; zero distance has gradient 0."""
    return _distance(x, y).to(x.dtype)


def knn_density(x: torch.Tensor, k: int, token_mask: torch.Tensor | None = None,
                log: bool = False) -> torch.Tensor:
    """rho (B, N) = exp(-mean of the squares of the k smallest D[i, :]), self included.

    token_mask (B, N) bool, True = real: masked columns are never neighbours (with fewer than k
    real tokens the mean runs over all real ones) and masked tokens get rho = 0. With log=True
    returns log rho (-inf for masked tokens). Not differentiable (selection statistic)."""
    with torch.no_grad():
        log_rho = _log_density(_distance(x, None), k, token_mask)
    return log_rho if log else log_rho.exp()


def dpc_delta(x: torch.Tensor, density: torch.Tensor, token_mask: torch.Tensor | None = None):
    """(delta (B, N), parent (B, N) int64): delta_i = min over tokens j higher than i (by
    ``density``; masked tokens rank lowest) of D[i, j], parent_i = that j; the highest token gets
    the sample's largest distance between real tokens and parent_i = i. ``density`` may be rho or
    log rho (same order). Not differentiable."""
    with torch.no_grad():
        return _delta(_distance(x, None), density, token_mask)


def topf_select(score: torch.Tensor, f: int, sorted: bool = True, exclude=None) -> torch.Tensor:
    """index (B, f) int64 of the f largest scores per row (ties to the lower index, NaN lowest).

    sorted=True returns the kept indices ascending (temporal order), else best first.
    exclude: int or (B,) int64, a token that is never picked (needs f <= N - 1)."""
    with torch.no_grad():
        return _select(score, f, sorted, _as_exclude(exclude, score.shape[0], score.device), None)


def dpc_knn(x: torch.Tensor, f: int, k: int = 2, token_mask: torch.Tensor | None = None,
            center: int | None = None, return_assignment: bool = False, sorted: bool = True,
            keep_center: bool = True):
    """The TPC selection: index (B, f) int64 [, assignment (B, N) int64].

    score = delta * rho with delta ordered by log-density; the f highest-score tokens (masked
    tokens below every real token). center=c: c is always kept (f - 1 picked with c excluded,
    then c added); keep_center=False instead only excludes c (f picked; compat's published
    convention). sorted=True: ascending order; sorted=False: best score first, a kept center
    last. assignment[i] = position in index of the kept token nearest to i by D (ties to the
    lower position), every kept token mapped to itself."""
    with torch.no_grad():
        B, N, _ = x.shape
        D = _distance(x, None)
        log_rho = _log_density(D, k, token_mask)
        delta, _ = _delta(D, log_rho, token_mask)
        score = delta * log_rho.exp()
        if center is None:
            index = _select(score, f, sorted, None, token_mask)
        else:
            exclude = _as_exclude(center, B, x.device)
            n_pick = f - 1 if keep_center else f
            index = _select(score, n_pick, False, exclude, token_mask)
            if keep_center:
                index = torch.cat([index, exclude[:, None]], dim=1)
            if sorted:
                index = index.sort(dim=-1).values
        if not return_assignment:
            return index
        to_kept = D.gather(2, index[:, None, :].expand(B, N, index.shape[1]))  # (B, N, f)
        assignment = to_kept.argmin(dim=-1)  # first minimum = lowest position
        positions = torch.arange(index.shape[1], device=x.device).expand(B, -1)
        assignment = assignment.scatter(1, index, positions)
        return index, assignment


def token_pruning_cluster(x: torch.Tensor, f: int, k: int = 2, center: int | None = None,
                          pos_embed: torch.Tensor | None = None):
    """x (B, F, J, C) -> (x_kept (B, f, J, C), index (B, f)): pool over joints (mean, in float32
    for half inputs), dpc_knn on the (B, F, C) clip, gather the kept frames (differentiable in
    x), add pos_embed (1, f, C) over joints if given. The selection itself is not differentiable."""
    B, Fr, J, C = x.shape
    # Pooled in the compute precision (float32 for half inputs), as every backend does.
    index = dpc_knn(x.detach().to(compute_dtype(x.dtype)).mean(dim=2), f, k, center=center)
    x_kept = x.gather(1, index[:, :, None, None].expand(B, index.shape[1], J, C))
    if pos_embed is not None:
        x_kept = x_kept + pos_embed[:, :, None, :]
    return x_kept, index


def token_recovering_attention(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads: int,
                               scale: float | None = None, residual: bool = True,
                               attn_drop: float = 0.0, proj_drop: float = 0.0,
                               training: bool = False):
    """TRA: cross-attention from query (1 or S, L, C) to x (S, M, C) -> (S, L, C).

    Per head (d = C / num_heads): softmax(Q K^T * scale) V with Q = query Wq^T + bq, etc.; then
    out = concat_h(.) Wo^T + bo, plus query when residual. Like the published code, a shared
    query (leading dim 1) is expanded to the S sequences before it is projected. Dropout applies
    only when training with p > 0 (every published model uses 0)."""
    S, M, C = x.shape
    L = query.shape[1]
    H = num_heads
    d = C // H
    scale = d ** -0.5 if scale is None else scale
    q_in = query.expand(S, L, C)
    q = F.linear(q_in, wq, bq).reshape(S, L, H, d).transpose(1, 2)
    k_ = F.linear(x, wk, bk).reshape(S, M, H, d).transpose(1, 2)
    v = F.linear(x, wv, bv).reshape(S, M, H, d).transpose(1, 2)
    attn = (q @ k_.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    if training and attn_drop > 0:
        attn = F.dropout(attn, attn_drop, training=True)
    o = (attn @ v).transpose(1, 2).reshape(S, L, C)
    out = F.linear(o, wo, bo)
    if training and proj_drop > 0:
        out = F.dropout(out, proj_drop, training=True)
    return q_in + out if residual else out


def interpolation_weights(index: torch.Tensor, num_frames: int, dtype: torch.dtype):
    """index (B, f) ascending -> (lo, hi (B, F) int64, w (B, F) of dtype): output frame t is
    (1 - w) x[lo] + w x[hi]. lo/hi are the kept positions around t (index[lo] <= t < index[hi]);
    before the first kept frame lo = hi = 0, at or after the last lo = hi = f - 1 (w = 0)."""
    B, f = index.shape
    t = torch.arange(num_frames, device=index.device).expand(B, num_frames).contiguous()
    q = torch.searchsorted(index.contiguous(), t, right=True)  # kept frames at or before t
    inside = (q > 0) & (q < f)
    lo = torch.where(q == 0, 0, q - 1).clamp(max=f - 1)
    hi = torch.where(inside, q, lo)
    i_lo, i_hi = index.gather(1, lo), index.gather(1, hi)
    span = (i_hi - i_lo).to(dtype)
    w = torch.where(inside & (span > 0), (t - i_lo).to(dtype) / span.clamp(min=1), torch.zeros((), dtype=dtype,
                                                                                                device=index.device))
    return lo, hi, w


def token_recovering_interpolation(x_kept: torch.Tensor, index: torch.Tensor, num_frames: int) -> torch.Tensor:
    """x_kept (B, f, C) or (B, f, J, C), index (B, f) ascending -> (B, F, C) or (B, F, J, C).

    Linear interpolation over the frame index: frame t between kept frames index[p] <= t <
    index[p + 1] is (1 - w) x[p] + w x[p + 1], w = (t - index[p]) / (index[p + 1] - index[p]);
    frames before the first / after the last kept one copy it. Computed in float32 for half
    inputs; differentiable in x_kept (the backward scatter-adds the weights)."""
    B, f = index.shape
    dt = compute_dtype(x_kept.dtype)
    lo, hi, w = interpolation_weights(index, num_frames, dt)
    rest = x_kept.shape[2:]
    R = math.prod(rest)
    xf = x_kept.to(dt).reshape(B, f, R)
    a = xf.gather(1, lo[:, :, None].expand(B, num_frames, R))
    c = xf.gather(1, hi[:, :, None].expand(B, num_frames, R))
    out = (1 - w)[:, :, None] * a + w[:, :, None] * c
    return out.reshape(B, num_frames, *rest).to(x_kept.dtype)


def merge_tokens(x: torch.Tensor, index: torch.Tensor, assignment: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, N, C), index (B, f), assignment (B, N) in [0, f), weight (B, N) or None -> (B, f, C).

    out[b, p] = sum_{i: assignment[b, i] = p} w_i x_i / sum_{same i} w_i (w = 1 when weight is
    None): each kept token's cluster mean. A cluster whose weights sum to 0 gives 0. Computed in
    float32 for half inputs; differentiable in x and weight."""
    return cluster_mean(x, assignment, index.shape[1], weight)


def cluster_mean(x: torch.Tensor, assignment: torch.Tensor, f: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """merge_tokens given the number of clusters f instead of the kept tokens' index."""
    B, N, C = x.shape
    dt = compute_dtype(x.dtype)
    w = torch.ones(B, N, dtype=dt, device=x.device) if weight is None else weight.to(dt)
    # index_add over the flattened (sample, cluster) slots, as TCFormer / Chat-UniVi merge (on CUDA
    # its atomic adds make the last bits order-dependent: this is the oracle, not a fast path).
    slot = (assignment + torch.arange(B, device=x.device)[:, None] * f).reshape(B * N)
    W = torch.zeros(B * f, dtype=dt, device=x.device).index_add(0, slot, w.reshape(B * N)).reshape(B, f)
    src = (w[:, :, None] * x.to(dt)).reshape(B * N, C)
    num = torch.zeros(B * f, C, dtype=dt, device=x.device).index_add(0, slot, src).reshape(B, f, C)
    safe = torch.where(W != 0, W, torch.ones((), dtype=dt, device=x.device))
    out = torch.where((W != 0)[:, :, None], num / safe[:, :, None], torch.zeros((), dtype=dt, device=x.device))
    return out.to(x.dtype)
