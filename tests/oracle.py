"""An independent float64 brute force of the hot_kernels operations (DESIGN.md, "The operations").

This is the oracle the ``reference`` backend is tested against (tests/test_reference.py) and the
source of the float64 values behind the tie-aware selection checker (tests/selection.py). It is
written from the semantics in DESIGN.md with plain Python loops and numpy, in float64, and shares
no code with hot_kernels: torch is used only through the tensors' own conversion to numpy.

    D[b,i,j] = sqrt(sum_c (x[b,i,c] - y[b,j,c])^2) / sqrt(C)     (math.fsum: correctly rounded)

Each distance is computed from direct differences (no Gram-matrix cancellation) and the sum is
exactly rounded, so D is exactly symmetric ((a-b)^2 == (b-a)^2 and fsum does not depend on the
order) with an exactly zero diagonal; the upper triangle is computed and mirrored anyway.

Every function accepts torch tensors or numpy arrays and returns numpy arrays (float64 values,
int64 indices). NaN inputs are given *a* deterministic meaning (NaN sorts above every number among
"k smallest", a NaN density/score ranks as -inf) so that the functions never crash, but DESIGN.md
only requires index validity there; the tests compare values on finite inputs only.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "as_f64",
    "as_mask",
    "brute_distance",
    "brute_log_density",
    "brute_density",
    "brute_delta",
    "brute_rank",
    "brute_topf",
    "brute_dpc_knn",
    "brute_assignment",
    "brute_token_pruning_cluster",
    "brute_token_recovering_attention",
    "brute_interpolation_weights",
    "brute_token_recovering_interpolation",
    "brute_merge_tokens",
]


_sorted = sorted  # the builtin (the ``sorted`` arguments below shadow it)


# ---- conversions ---------------------------------------------------------------------------


def _to_numpy(a):
    """torch tensor (any dtype, any device) or array-like -> numpy array, no copy of semantics."""
    if hasattr(a, "detach"):  # a torch tensor: its own conversion only
        a = a.detach().cpu()
        if a.is_floating_point():
            a = a.double()  # numpy has no bfloat16; float64 holds every float16/bf16/f32 exactly
        return a.numpy()
    return np.asarray(a)


def as_f64(a) -> np.ndarray:
    return np.array(_to_numpy(a), dtype=np.float64, copy=True)


def as_mask(mask, B: int, N: int) -> np.ndarray:
    """token_mask (B, N) bool, True = real token; None -> all real."""
    if mask is None:
        return np.ones((B, N), dtype=bool)
    m = np.array(_to_numpy(mask), dtype=bool, copy=True)
    return m.reshape(B, N)


def _centers(center, B: int):
    if center is None:
        return None
    if isinstance(center, (int, np.integer)):
        return [int(center)] * B
    c = np.array(_to_numpy(center), dtype=np.int64).reshape(-1)
    if c.size == 1:
        return [int(c[0])] * B
    return [int(v) for v in c.reshape(B)]


def _sq_sum(diff: np.ndarray) -> float:
    if np.all(np.isfinite(diff)):
        return math.fsum((diff * diff).tolist())
    return float(np.sum(diff * diff))  # NaN / inf propagate


def _nan_last(v: float):
    return (math.isnan(v), v)


# ---- 1. pairwise_distance ------------------------------------------------------------------


def brute_distance(x, y=None) -> np.ndarray:
    """D (B, N, M) = ||x_i - y_j|| / sqrt(C) in float64; y defaults to x (then D[i,i] = 0 and D
    is exactly symmetric)."""
    X = as_f64(x)
    Y = X if y is None else as_f64(y)
    B, N, C = X.shape
    M = Y.shape[1]
    sc = math.sqrt(C)
    D = np.zeros((B, N, M), dtype=np.float64)
    for b in range(B):
        for i in range(N):
            for j in range(M):
                if y is None:
                    if j == i:
                        D[b, i, j] = 0.0
                        continue
                    if j < i:
                        D[b, i, j] = D[b, j, i]
                        continue
                D[b, i, j] = math.sqrt(_sq_sum(X[b, i] - Y[b, j])) / sc
    return D


# ---- 2. knn_density ------------------------------------------------------------------------


def brute_log_density(x, k: int, mask=None, D=None) -> np.ndarray:
    """log rho (B, N) = -mean of the squares of the k smallest D[i, :] (self included).

    mask (B, N) bool, True = real: masked columns are never neighbours; with fewer than k real
    tokens the mean runs over all real ones; masked rows get -inf."""
    if D is None:
        D = brute_distance(x)
    B, N, _ = D.shape
    real = as_mask(mask, B, N)
    out = np.empty((B, N), dtype=np.float64)
    for b in range(B):
        cols = [j for j in range(N) if real[b, j]]
        for i in range(N):
            if not real[b, i]:
                out[b, i] = -math.inf
                continue
            vals = sorted((float(D[b, i, j]) for j in cols), key=_nan_last)
            kk = min(k, len(vals))
            sq = [v * v for v in vals[:kk]]
            if all(math.isfinite(s) for s in sq):
                out[b, i] = -math.fsum(sq) / kk
            else:
                out[b, i] = -sum(sq) / kk
    return out


def brute_density(x, k: int, mask=None, D=None) -> np.ndarray:
    """rho = exp(log rho); 0 for masked tokens."""
    return np.exp(brute_log_density(x, k, mask, D))


# ---- 3. dpc_delta --------------------------------------------------------------------------


def _key(dens: np.ndarray, real: np.ndarray) -> np.ndarray:
    key = np.array(dens, dtype=np.float64, copy=True)
    key[np.isnan(key)] = -math.inf
    key[~real] = -math.inf
    return key


def _is_higher(key_row: np.ndarray, j: int, i: int) -> bool:
    """Token j is higher than token i."""
    return key_row[j] > key_row[i] or (key_row[j] == key_row[i] and j < i)


def brute_delta(x, dens, mask=None, D=None):
    """(delta (B, N) float64, parent (B, N) int64).

    j is higher than i iff key_j > key_i or (key_j == key_i and j < i), key = density with NaN and
    masked tokens as -inf. delta_i = min over higher j of D[i, j], parent_i = the lowest j attaining
    it. The highest token: delta = the largest D between two real tokens (0 if none), parent = i."""
    if D is None:
        D = brute_distance(x)
    B, N, _ = D.shape
    real = as_mask(mask, B, N)
    dens = as_f64(dens).reshape(B, N)
    delta = np.empty((B, N), dtype=np.float64)
    parent = np.empty((B, N), dtype=np.int64)
    for b in range(B):
        key = _key(dens[b], real[b])
        rows = [i for i in range(N) if real[b, i]]
        if rows:
            largest = float(np.max(D[b][np.ix_(rows, rows)]))  # includes the zero diagonal
        else:
            largest = 0.0
        for i in range(N):
            best, arg = None, -1
            for j in range(N):
                if j == i or not _is_higher(key, j, i):
                    continue
                d = float(D[b, i, j])
                if best is None or d < best:
                    best, arg = d, j
            if arg < 0:
                delta[b, i], parent[b, i] = largest, i
            else:
                delta[b, i], parent[b, i] = best, arg
    return delta, parent


# ---- 4. topf_select ------------------------------------------------------------------------


def brute_rank(score_row, klass_row) -> list:
    """Token indices best first: class desc, then score desc (NaN as -inf), then index asc."""
    n = len(score_row)

    def sort_key(i):
        s = float(score_row[i])
        s = -math.inf if math.isnan(s) else s
        return (-int(klass_row[i]), -s, i)

    return sorted(range(n), key=sort_key)


def _classes(score_row, real_row, exclude):
    """3 real with a number, 2 real with NaN, 1 masked, 0 excluded."""
    n = len(score_row)
    kl = []
    for i in range(n):
        if exclude is not None and i == exclude:
            kl.append(0)
        elif not real_row[i]:
            kl.append(1)
        elif math.isnan(float(score_row[i])):
            kl.append(2)
        else:
            kl.append(3)
    return kl


def brute_topf(score, f: int, sorted: bool = True, exclude=None) -> np.ndarray:
    """index (B, f): the f largest scores per row, ties to the lower index, NaN below every
    number, ``exclude`` (int or (B,)) never; ascending if sorted else best first."""
    S = as_f64(score)
    B, N = S.shape
    ex = _centers(exclude, B)
    out = np.empty((B, f), dtype=np.int64)
    real = np.ones(N, dtype=bool)
    for b in range(B):
        kl = _classes(S[b], real, None if ex is None else ex[b])
        pick = brute_rank(S[b], kl)[:f]
        if sorted:
            pick = _sorted(pick)
        out[b] = pick
    return out


# ---- 5. dpc_knn ----------------------------------------------------------------------------


def brute_assignment(D: np.ndarray, index) -> np.ndarray:
    """assignment[i] = position in ``index`` of the kept token nearest to i by D (ties to the lower
    position; NaN distances ignored, all-NaN -> 0); each kept token mapped to itself."""
    B, N, _ = D.shape
    index = np.asarray(index)
    f = index.shape[1]
    out = np.zeros((B, N), dtype=np.int64)
    for b in range(B):
        pos_of = {int(index[b, p]): p for p in range(f)}
        for i in range(N):
            if i in pos_of:
                out[b, i] = pos_of[i]
                continue
            best, arg = None, 0
            for p in range(f):
                d = float(D[b, i, int(index[b, p])])
                if math.isnan(d):
                    continue
                if best is None or d < best:
                    best, arg = d, p
            out[b, i] = arg
    return out


def brute_dpc_knn(x, f: int, k: int = 2, mask=None, center=None, keep_center: bool = True,
                  sorted: bool = True, return_assignment: bool = False, return_stats: bool = False):
    """The TPC selection in float64.

    log rho as brute_log_density; delta ordered by log rho; score = delta * exp(log rho). Ranking:
    class (real with a number > real with NaN score > masked > excluded center), then score desc,
    then index asc. center c: keep_center -> pick f-1 with c excluded, append c; else pick f with c
    excluded. sorted -> ascending; else best first, a kept center last.

    Returns index [, assignment] [, stats dict(D, log_rho, delta, parent, score)]."""
    X = as_f64(x)
    B, N, _ = X.shape
    real = as_mask(mask, B, N)
    D = brute_distance(X)
    log_rho = brute_log_density(X, k, real, D=D)
    delta, parent = brute_delta(X, log_rho, real, D=D)
    with np.errstate(invalid="ignore", over="ignore"):
        score = delta * np.exp(log_rho)
    cs = _centers(center, B)
    index = np.empty((B, f), dtype=np.int64)
    for b in range(B):
        c = None if cs is None else cs[b]
        kl = _classes(score[b], real[b], c)
        rank = brute_rank(score[b], kl)
        if c is None:
            pick = rank[:f]
        else:
            pick = rank[:f - 1] if keep_center else rank[:f]
            if keep_center:
                pick = pick + [c]
        if sorted:
            pick = _sorted(pick)
        index[b] = pick
    out = [index]
    if return_assignment:
        out.append(brute_assignment(D, index))
    if return_stats:
        out.append(dict(D=D, log_rho=log_rho, delta=delta, parent=parent, score=score))
    return out[0] if len(out) == 1 else tuple(out)


# ---- 6./7. (used by the tests of token_pruning_cluster / token_recovering_attention) --------


def brute_token_pruning_cluster(x, f: int, k: int = 2, center=None, pos_embed=None):
    """x (B, F, J, C): mean over joints in float64, brute_dpc_knn, gather, + pos_embed (1, f, C)."""
    X = as_f64(x)
    B, Fr, J, C = X.shape
    pooled = X.mean(axis=2)
    index = brute_dpc_knn(pooled, f, k, center=center)
    kept = np.empty((B, f, J, C), dtype=np.float64)
    for b in range(B):
        for p in range(f):
            kept[b, p] = X[b, index[b, p]]
    if pos_embed is not None:
        P = as_f64(pos_embed)
        kept = kept + P[:, :, None, :]
    return kept, index


def brute_token_recovering_attention(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads: int,
                                     scale=None, residual: bool = True) -> np.ndarray:
    """Cross-attention from query (1 or S, L, C) to x (S, M, C), per sequence and head, float64."""
    Qin = as_f64(query)
    X = as_f64(x)
    S, M, C = X.shape
    L = Qin.shape[1]
    H = num_heads
    d = C // H
    sc = d ** -0.5 if scale is None else float(scale)

    def lin(a, w, bias):
        W = as_f64(w)
        out = a @ W.T
        if bias is not None:
            out = out + as_f64(bias)
        return out

    out = np.empty((S, L, C), dtype=np.float64)
    for s in range(S):
        q_in = Qin[0] if Qin.shape[0] == 1 else Qin[s]
        Q = lin(q_in, wq, bq)
        K = lin(X[s], wk, bk)
        V = lin(X[s], wv, bv)
        O = np.empty((L, C), dtype=np.float64)
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            for l in range(L):
                logits = np.array([float(np.dot(Q[l, sl], K[m, sl])) * sc for m in range(M)])
                logits = logits - logits.max()
                w = np.exp(logits)
                w = w / w.sum()
                O[l, sl] = (w[:, None] * V[:, sl]).sum(axis=0)
        out[s] = lin(O, wo, bo)
        if residual:
            out[s] = out[s] + q_in
    return out


def brute_interpolation_weights(index, F):
    """index (B, f) ascending -> (B, F, f) float64: out[b, t] = sum_p W[b, t, p] x[b, p] by the
    definition (frames before the first / after the last kept one copy it; between kept frames
    index[p] <= t < index[p + 1], weights 1 - w and w with w = (t - index[p]) / (index[p+1] - index[p]))."""
    idx = np.array(_to_numpy(index), dtype=np.int64)
    B, f = idx.shape
    W = np.zeros((B, F, f))
    for b in range(B):
        row = [int(v) for v in idx[b]]
        for t in range(F):
            if t <= row[0]:
                W[b, t, 0] = 1.0
            elif t >= row[-1]:
                W[b, t, f - 1] = 1.0
            else:
                p = max(q for q in range(f) if row[q] <= t)
                w = (t - row[p]) / (row[p + 1] - row[p])
                W[b, t, p] += 1.0 - w
                W[b, t, p + 1] += w
    return W


def brute_token_recovering_interpolation(x_kept, index, F):
    """(B, f, [J,] C) -> (B, F, [J,] C) float64."""
    x = as_f64(x_kept)
    W = brute_interpolation_weights(index, F)
    B, f = x.shape[:2]
    flat = x.reshape(B, f, int(np.prod(x.shape[2:])))
    out = np.stack([W[b] @ flat[b] for b in range(B)]) if B else np.zeros((0, F, flat.shape[2]))
    return out.reshape(B, F, *x.shape[2:])


def brute_merge_tokens(x, index, assignment, weight=None):
    """(B, N, C) -> (B, f, C) float64: each cluster's weighted mean, math.fsum sums, 0 when a
    cluster's weights sum to 0."""
    xs = as_f64(x)
    a = np.array(_to_numpy(assignment), dtype=np.int64)
    B, N, C = xs.shape
    f = int(index.shape[1])
    w = np.ones((B, N)) if weight is None else as_f64(weight)
    out = np.zeros((B, f, C))
    for b in range(B):
        for p in range(f):
            members = [i for i in range(N) if a[b, i] == p]
            W = math.fsum(w[b, i] for i in members)
            if W == 0:
                continue
            for c in range(C):
                out[b, p, c] = math.fsum(w[b, i] * xs[b, i, c] for i in members) / W
    return out
