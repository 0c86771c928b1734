"""The public ops: validate, choose the backend (hot_kernels/_dispatch.py), run.

Every function takes ``backend=`` ("reference", "cpu", "cuda", "triton"); without it the backend
comes from ``hot_kernels.use_backend``, ``HOT_KERNELS_BACKEND`` or the device default. Semantics
are those of hot_kernels/reference.py (and DESIGN.md); the shapes are in each docstring.

The selection ops (knn_density, dpc_delta, topf_select, dpc_knn) are not differentiable, as in
HoT: their outputs never require grad. pairwise_distance, the gather of token_pruning_cluster and
token_recovering_attention, token_recovering_interpolation and merge_tokens are.
"""
from __future__ import annotations

import math

import torch

from . import _dispatch, _eager, _ops, reference
from . import _validate as V

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
    "compose_indices",
]


def _impl(backend: str, *tensors):
    """Where a call on a compiled backend goes: the C++ kernels directly (hot_kernels/_eager.py)
    when nothing needs to see a torch.library op (plain eager execution), else the ops
    (hot_kernels/_ops.py). Both have the same functions, arguments and results."""
    return _eager if _eager.applies(backend, *tensors) else _ops


def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """x (B, N, C), y (B, M, C) or None -> D (B, N, M) = ||x_i - y_j|| / sqrt(C), dtype of x.

    y=None means y = x: D is then bit-symmetric with an exactly zero diagonal. Differentiable in
    x and y; the gradient at zero distance is 0."""
    op = "pairwise_distance"
    V.points(op, x)
    if y is not None:
        V.points(op, y, "y")
        if y.shape[0] != x.shape[0] or y.shape[2] != x.shape[2]:
            V.fail(op, f"y must be (B, M, C) with B = {x.shape[0]} and C = {x.shape[2]} like x, got {tuple(y.shape)}")
        if y.dtype != x.dtype:
            V.fail(op, f"y is {y.dtype} but x is {x.dtype}; both must have one dtype")
        V.same_device(op, "x", x, y=y)
    name = _dispatch.resolve(op, x, backend)
    if name == "reference":
        D = reference.pairwise_distance(x, y)
    else:
        D = _impl(name, x, y).pairwise_distance(x, y, name)
    V.outputs(op, values=[("D", D)])
    return D


def knn_density(x: torch.Tensor, k: int, token_mask: torch.Tensor | None = None, *, log: bool = False,
                backend: str | None = None) -> torch.Tensor:
    """x (B, N, C) -> rho (B, N) = exp(-mean of the squares of the k smallest D[i, :]), self included.

    token_mask (B, N) bool, True = real: masked tokens are never neighbours and get rho = 0 (with
    fewer than k real tokens the mean runs over all real ones). log=True returns log rho, which
    keeps its order where exp() underflows. float32 for half inputs, else x's dtype."""
    op = "knn_density"
    V.points(op, x)
    k = V.integer(op, "k", k, 1, x.shape[1], f" (neighbours among the N = {x.shape[1]} tokens)")
    token_mask = V.token_mask(op, token_mask, x)
    V.boolean(op, "log", log)
    name = _dispatch.resolve(op, x, backend, k=k)
    x = x.detach()
    if name == "reference":
        rho = reference.knn_density(x, k, token_mask, log)
    else:
        rho = _impl(name, x, token_mask).knn_density(x, k, token_mask, log, name)
    V.outputs(op, log_values=[("log rho" if log else "rho", rho)])
    return rho


def dpc_delta(x: torch.Tensor, density: torch.Tensor, token_mask: torch.Tensor | None = None, *,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C), density (B, N) -> (delta (B, N), parent (B, N) int64).

    delta_i = min D[i, j] over tokens j with higher density (ties -> lower index), parent_i that
    j (the lowest one at equal distance); the densest token gets the sample's largest distance
    between real tokens and is its own parent. density may be rho or log rho (same order)."""
    op = "dpc_delta"
    V.points(op, x)
    V.tensor(op, "density", density, "(B, N)", ndim=2, allow_neg_inf=True)  # log rho of a masked token: -inf
    if tuple(density.shape) != tuple(x.shape[:2]):
        V.fail(op, f"density must have shape (B, N) = {tuple(x.shape[:2])}, got {tuple(density.shape)}")
    V.same_device(op, "x", x, density=density)
    token_mask = V.token_mask(op, token_mask, x)
    name = _dispatch.resolve(op, x, backend)
    x, density = x.detach(), density.detach()
    if density.dtype in (torch.float16, torch.bfloat16):
        # Exact (same order, same ties), O(B N): the kernels then compare 32-bit keys only (the
        # Triton interpreter compared bfloat16 keys as raw bits: a wrong order for negative ones).
        density = density.float()
    if name == "reference":
        delta, parent = reference.dpc_delta(x, density, token_mask)
    else:
        delta, parent = _impl(name, x, density, token_mask).dpc_delta(x, density, token_mask, name)
    V.outputs(op, values=[("delta", delta)], indices=[("parent", parent, x.shape[1], False)])
    return delta, parent


def topf_select(score: torch.Tensor, f: int, sorted: bool = True, exclude=None, *,
                backend: str | None = None) -> torch.Tensor:
    """score (B, N) -> index (B, f) int64: the f largest scores per row, ties -> lower index,
    NaN below every number. sorted=True: ascending indices (temporal order); False: best first.
    exclude: int or (B,) integer tensor, a token never picked (then f <= N - 1)."""
    op = "topf_select"
    V.tensor(op, "score", score, "(B, N)", ndim=2, allow_neg_inf=True, allow_pos_inf=True)
    N = score.shape[1]
    if N == 0:
        V.fail(op, f"score must have at least one token (N >= 1), got shape {tuple(score.shape)}")
    V.boolean(op, "sorted", sorted)
    ex = V.exclude(op, exclude, score)
    f = V.integer(op, "f", f, 1, N - (ex is not None),
                  " (tokens to keep of N = %d%s)" % (N, ", one excluded" if ex is not None else ""))
    name = _dispatch.resolve(op, score, backend)
    score = score.detach()
    if name == "reference":
        index = reference.topf_select(score, f, sorted, ex)
    else:
        index = _impl(name, score, ex).topf_select(score, f, sorted, ex, name)
    V.outputs(op, indices=[("index", index, N, True)])
    return index


def _dpc_knn(op, x, f, k, token_mask, center, return_assignment, sorted, keep_center, backend):
    V.points(op, x)
    N = x.shape[1]
    center = V.center(op, center, N)
    f_max = N - 1 if (center is not None and not keep_center) else N
    f = V.integer(op, "f", f, 1, f_max, f" (tokens to keep of N = {N})")
    k = V.integer(op, "k", k, 1, N, f" (neighbours among the N = {N} tokens)")
    token_mask = V.token_mask(op, token_mask, x)
    V.boolean(op, "return_assignment", return_assignment)
    V.boolean(op, "sorted", sorted)
    name = _dispatch.resolve("dpc_knn", x, backend, k=k)
    x = x.detach()
    if name == "reference":
        out = reference.dpc_knn(x, f, k, token_mask, center, return_assignment, sorted=sorted,
                                keep_center=keep_center)
        index, assignment = out if return_assignment else (out, None)
    else:
        index, assignment = _impl(name, x, token_mask).dpc_knn(x, f, k, token_mask, center, keep_center, sorted,
                                                               return_assignment, name)
        assignment = assignment if return_assignment else None
    V.outputs(op, indices=[("index", index, N, True), ("assignment", assignment, f, False)])
    return index, assignment


def dpc_knn(x: torch.Tensor, f: int, k: int = 2, token_mask: torch.Tensor | None = None, center: int | None = None,
            return_assignment: bool = False, *, sorted: bool = True, backend: str | None = None):
    """The fused TPC selection: x (B, N, C) -> index (B, f) int64 [, assignment (B, N) int64].

    score = delta * rho (DPC-kNN with k neighbours); the f highest-score tokens, deterministic
    (ties -> lower index). token_mask (B, N) bool: masked tokens rank below every real token.
    center=c: token c is always kept (f - 1 picked with c excluded, then c added). sorted=True
    returns the kept indices ascending (what HoT models do next); False: best score first (a
    kept center last). assignment[i] = position in index of the kept token nearest to token i.
    Every index row holds f distinct values in [0, N), on any input (NaN included)."""
    if token_mask is None and _is_plain(x, 3) and _common_case(backend, "dpc_knn"):
        B, N, C = x.shape
        if (B and N and C and _selection_args(N, f, k, center) and type(return_assignment) is bool
                and type(sorted) is bool):
            index, assignment = _eager._run("dpc_knn", "cpu", x.detach(), f, k, None, center, True, sorted,
                                            return_assignment)
            return (index, assignment) if return_assignment else index
    index, assignment = _dpc_knn("dpc_knn", x, f, k, token_mask, center, return_assignment, sorted, True, backend)
    return (index, assignment) if return_assignment else index


def token_pruning_cluster(x: torch.Tensor, f: int, k: int = 2, center: int | None = None,
                          pos_embed: torch.Tensor | None = None, *, backend: str | None = None):
    """x (B, F, J, C) -> (x_kept (B, f, J, C), index (B, f) int64 ascending).

    Pools over joints (mean over J, in float32 for half inputs), selects f frames with dpc_knn
    (k neighbours; center forced if given), gathers them (differentiable in x: the backward
    scatter-adds into the kept frames) and adds pos_embed ((1 or B), f, C), broadcast over joints,
    if given (differentiable too). The selection itself is not differentiable (as in HoT)."""
    if (_is_plain(x, 4) and (pos_embed is None or _is_plain(pos_embed, 3))
            and _common_case(backend, "dpc_knn", "gather_frames")):
        B, Fr, J, C = x.shape
        if (B and Fr and J and C and _selection_args(Fr, f, k, center)
                and (pos_embed is None or (pos_embed.shape[0] in (1, B) and pos_embed.shape[1] == f
                                           and pos_embed.shape[2] == C and pos_embed.dtype is x.dtype
                                           and pos_embed.device == x.device))):
            index = _eager._run("dpc_knn", "cpu", x.detach(), f, k, None, center, True, True, False)[0]
            return _eager.gather_frames(x, index, pos_embed, "cpu"), index
    op = "token_pruning_cluster"
    V.tensor(op, "x", x, "(B, F, J, C)", ndim=4)
    B, Fr, J, C = x.shape
    if Fr == 0 or J == 0 or C == 0:
        V.fail(op, f"x must have F, J, C >= 1, got shape {tuple(x.shape)}")
    center = V.center(op, center, Fr)
    f = V.integer(op, "f", f, 1, Fr, f" (frames to keep of F = {Fr})")
    k = V.integer(op, "k", k, 1, Fr, f" (neighbours among the F = {Fr} frames)")
    if pos_embed is not None:
        V.tensor(op, "pos_embed", pos_embed, "(1, f, C)", ndim=3)
        if _autocast_dtype(x) is not None and pos_embed.dtype != x.dtype:
            # Under autocast x may come out of a Linear in the autocast dtype while pos_embed is a
            # float32 parameter; the published ``x += pos_embed`` keeps x's dtype, and so do we.
            pos_embed = pos_embed.to(x.dtype)
        V.same_device(op, "x", x, pos_embed=pos_embed)
        if pos_embed.shape[0] not in (1, B) or pos_embed.shape[2] != C:
            V.fail(op, f"pos_embed must be (1, f, C) or (B, f, C) with C = {C}, got {tuple(pos_embed.shape)}")
        if pos_embed.shape[1] != f:
            V.fail(op, f"pos_embed must have f = {f} tokens, got {tuple(pos_embed.shape)}")
        if pos_embed.dtype != x.dtype:
            V.fail(op, f"pos_embed is {pos_embed.dtype} but x is {x.dtype}; both must have one dtype")
    name = _dispatch.resolve("dpc_knn", x, backend, k=k)
    if name == "reference":
        x_kept, index = reference.token_pruning_cluster(x, f, k, center, pos_embed)
    else:
        # The selection reads (B, F, J, C) and pools over joints inside the kernel (no pooled copy).
        index, _ = _impl(name, x, pos_embed).dpc_knn(x.detach(), f, k, None, center, True, True, False, name)
        gather = _dispatch.resolve("gather_frames", x, backend)
        x_kept = _impl(gather, x, index, pos_embed).gather_frames(x, index, pos_embed, gather)
    V.outputs(op, values=[("x_kept", x_kept)], indices=[("index", index, Fr, True)])
    return x_kept, index


# ---- the common-case paths ------------------------------------------------------------------
#
# Right after a large op has evicted the interpreter from the caches (between a model's layers,
# and in the benchmark's round-robin) every Python call and lookup misses: the full path's
# validation helpers, dispatch and eager checks then cost 130-210 us per call (2-core Xeon),
# a third of a B = 1 dpc_knn and 7 % of a B = 1 TRA. dpc_knn, token_pruning_cluster and
# token_recovering_attention therefore first try their common case in a few steps: only calls
# that the full path would accept unchanged and run on the cpu backend's eager path (plain CPU
# tensors of a float dtype and valid shapes, Python ints and bools, backend None (the cpu backend
# the default) or "cpu", no mask, no HOT_KERNELS_DEBUG, no autocast where it would cast, nothing
# observing the call). For anything else the full path validates (with its messages) and
# dispatches as always.


def _is_plain(t, ndim: int) -> bool:
    """t is a plain float CPU Tensor or Parameter of rank ndim."""
    return (type(t) in _eager._PLAIN and t.dim() == ndim and t.dtype in V.FLOAT_DTYPES
            and t.device.type == "cpu")


def _selection_args(N: int, f, k, center) -> bool:
    """Python ints f and k in [1, N], center None or a Python int in [0, N): what the selection's
    full validation accepts unchanged (keep_center=True)."""
    return (type(f) is int and 1 <= f <= N and type(k) is int and 1 <= k <= N
            and (center is None or (type(center) is int and 0 <= center < N)))


def _common_case(backend, op: str, op2: str | None = None) -> bool:
    """Nothing observing the call (checked first: under torch.compile nothing after it is traced),
    no debug checks, and the cpu backend certainly the one that runs op (and op2) for ``backend``
    (None or "cpu")."""
    return (_eager.unobserved() and not V.debug_enabled() and _dispatch.runs_cpu(op, backend)
            and (op2 is None or _dispatch.runs_cpu(op2, backend)))


def _tra_common_case(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, scale, residual, backend):
    """token_recovering_attention's common case (backend None or "cpu", a shared or dense
    per-sequence query, weights and biases of x's dtype and shapes, an int num_heads dividing C,
    scale None or a finite float, no autocast), or None: take the full path."""
    if (type(residual) is not bool or type(num_heads) is not int or num_heads < 1 or not _is_plain(x, 3)
            or not _is_plain(query, 3)):
        return None
    dtype = x.dtype
    S, M, C = x.shape
    Sq, L, Cq = query.shape
    if (S == 0 or M == 0 or C == 0 or L == 0 or Cq != C or C % num_heads or query.dtype is not dtype
            or not (Sq == 1 or (Sq == S and query.stride(0) != 0))):
        return None
    for w in (wq, wk, wv, wo):
        if not _is_plain(w, 2) or w.shape != (C, C) or w.dtype is not dtype:
            return None
    for b in (bq, bk, bv, bo):
        if b is not None and (not _is_plain(b, 1) or b.shape != (C,) or b.dtype is not dtype):
            return None
    if scale is None:
        scale = (C // num_heads) ** -0.5
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    if torch.is_autocast_enabled("cpu") or not _common_case(backend, "token_recovering_attention"):
        return None
    tensors = (query, x, wq, bq, wk, bk, wv, bv, wo, bo)
    if _eager.needs_graph(*tensors):
        return _eager.token_recovering_attention(*tensors, num_heads, scale, residual, True, "cpu")[0]
    return _eager._run("token_recovering_attention", "cpu", *tensors, num_heads, scale, residual, False)[0]


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for t's device if autocast is on there, else None."""
    device_type = t.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def token_recovering_attention(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads: int, scale: float | None = None,
                               residual: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """TRA: query (1 or S, L, C) learnable tokens, x (S, M, C) kept tokens -> (S, L, C).

    Per head (d = C / num_heads): softmax(Q K^T * scale) V with Q = query wq^T + bq,
    K = x wk^T + bk, V = x wv^T + bv (nn.Linear layout; biases may be None); out = concat
    wo^T + bo, plus query when residual. scale defaults to d ** -0.5. A shared query (leading
    dim 1) is projected once, and its gradient is the sum over the S sequences. Differentiable in
    every input. Under autocast every float input is cast to the autocast dtype first, as
    nn.Linear and matmul would be (the op then runs, and returns, in that dtype)."""
    out = _tra_common_case(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, scale, residual, backend)
    if out is not None:
        return out
    op = "token_recovering_attention"
    cast = _autocast_dtype(x) if isinstance(x, torch.Tensor) else None
    if cast is not None:
        query, x, wq, bq, wk, bk, wv, bv, wo, bo = (
            t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in (query, x, wq, bq, wk, bk, wv, bv, wo, bo))
    weights = dict(wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=wo, bo=bo)
    num_heads, scale = V.tra_inputs(op, query, x, weights, num_heads, scale)
    V.boolean(op, "residual", residual)
    if query.shape[0] > 1 and query.stride(0) == 0:
        # A broadcast view (expand / einops.repeat of one learnable query): project it once. The
        # gradient still reaches the expanded tensor's base summed over the S sequences.
        query = query[:1]
    name = _dispatch.resolve(op, x, backend)
    if name == "reference" or x.shape[0] == 0:
        # S = 0 sequences: an empty (0, L, C) output (and zero weight gradients) on every backend,
        # computed by the plain PyTorch path rather than launching kernels over nothing.
        out = reference.token_recovering_attention(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, scale, residual)
    else:
        # keep: the backward will run, so the cpu backend keeps K|V and o for it (as autograd would
        # for nn.Linear + SDPA) instead of recomputing them.
        keep = _eager.needs_graph(query, x, wq, bq, wk, bk, wv, bv, wo, bo)
        out = _impl(name, query, x, wq, bq, wk, bk, wv, bv, wo, bo).token_recovering_attention(
            query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, scale, residual, keep, name)[0]
    V.outputs(op, values=[("out", out)])
    return out


def token_recovering_interpolation(x_kept: torch.Tensor, index: torch.Tensor, F: int, *,
                                   backend: str | None = None) -> torch.Tensor:
    """Recover F frames from the kept ones by linear interpolation over the frame index.

    x_kept (B, f, C) or (B, f, J, C), index (B, f) strictly ascending in [0, F) (as dpc_knn and
    token_pruning_cluster return it) -> (B, F, C) or (B, F, J, C), x_kept's dtype. Frame t with
    index[p] <= t < index[p + 1] is (1 - w) x_kept[p] + w x_kept[p + 1], w = (t - index[p]) /
    (index[p + 1] - index[p]); a kept frame comes back exactly; frames before the first / after the
    last kept one copy it. Differentiable in x_kept (each kept frame gathers its weighted share of
    the gradient: deterministic). One fused gather + lerp kernel on the compiled backends."""
    op = "token_recovering_interpolation"
    x_kept, index, F = V.interpolation_inputs(op, x_kept, index, F)
    name = _dispatch.resolve(op, x_kept, backend)
    if name == "reference":
        out = reference.token_recovering_interpolation(x_kept, index, F)
    else:
        out = _impl(name, x_kept, index).token_recovering_interpolation(x_kept, index, F, name)
    V.outputs(op, values=[("out", out)])
    return out


def merge_tokens(x: torch.Tensor, index: torch.Tensor, assignment: torch.Tensor, weight: torch.Tensor | None = None,
                 *, backend: str | None = None) -> torch.Tensor:
    """Merge each cluster of tokens into its weighted mean (TCFormer / Chat-UniVi token merging).

    x (B, N, C), index (B, f) the kept tokens and assignment (B, N) each token's cluster (a
    position in index), as ``dpc_knn(x, f, return_assignment=True)`` returns them; weight (B, N)
    per-token weights of x's dtype (None: 1) -> (B, f, C), x's dtype: out[b, p] = sum_i w_i x_i /
    sum_i w_i over the tokens i with assignment[b, i] == p (the cluster of kept token index[b, p],
    which contains it). A cluster whose weights sum to 0 gives 0. Differentiable in x and weight;
    deterministic (per-cluster and per-token gathers in a fixed order, no atomics)."""
    op = "merge_tokens"
    x, index, assignment, weight, f = V.merge_inputs(op, x, index, assignment, weight)
    return _cluster_mean(op, x, assignment, f, weight, backend)


def _cluster_mean(op, x, assignment, f, weight, backend):
    """merge_tokens on validated inputs, given the number of clusters f."""
    name = _dispatch.resolve("merge_tokens", x, backend)
    if name == "reference":
        out = reference.cluster_mean(x, assignment, f, weight)
    else:
        out = _impl(name, x, assignment, weight).merge_tokens(x, assignment, f, weight, name)[0]
    V.outputs(op, values=[("out", out)])
    return out


def compose_indices(*indices: torch.Tensor) -> torch.Tensor:
    """Map the kept indices of stacked pruning stages back to the original frames.

    indices: index_1 (B, f_1) into the F original frames, index_2 (B, f_2) into the f_1 frames
    stage 1 kept, ..., each as TokenPruningCluster / dpc_knn return them (positions in their own
    stage's input) -> (B, f_last) int64: the original frame of every token the last stage kept,
    out[b, t] = index_1[b, index_2[b, ... index_last[b, t]]]. Ascending stage indices give an
    ascending result (what token_recovering_interpolation needs). Plain gathers, any device."""
    op = "compose_indices"
    if len(indices) == 1 and isinstance(indices[0], (list, tuple)):
        indices = tuple(indices[0])
    if not indices:
        V.fail(op, "needs at least one index tensor (B, f)")
    first = indices[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        got = f"shape {tuple(first.shape)}" if isinstance(first, torch.Tensor) else type(first).__name__
        V.fail(op, f"index_1 must be a (B, f_1) int64 tensor, got {got}")
    out = V.index_tensor(op, "index_1", first, tuple(first.shape), "(B, f_1)")
    for s, idx in enumerate(indices[1:], start=2):
        B, f_prev = out.shape
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            got = f"shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            V.fail(op, f"index_{s} must be a (B, f_{s}) int64 tensor with B = {B}, got {got}")
        idx = V.index_tensor(op, f"index_{s}", idx, (B, idx.shape[1]), f"(B, f_{s})")
        V.same_device(op, "index_1", out, **{f"index_{s}": idx})
        if V._values_checked(idx):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= f_prev:
                V.fail(op, f"index_{s} values must be positions in [0, {f_prev - 1}] (the f_{s - 1} = {f_prev} tokens "
                           f"stage {s - 1} kept), got values in [{lo}, {hi}]")
        out = out.gather(1, idx)
    return out
