"""Tie-aware checking of DPC-kNN selections against the float64 brute force (tests/oracle.py).

Every backend's tests use this: a backend computing in float32 (or with a Gram-matrix distance, or
tf32 on a GPU) may legitimately keep a different token than the float64 oracle where the decision
is within rounding. ``check_selection`` proves that a returned selection is valid *up to rounding*
and raises AssertionError (saying which token should have been picked, and why that is not a
near-tie) otherwise.

Error model (per sample, in float64, from the input x as given):

* squared scaled distances: the backend's D'^2[i,j] is within
  ``eps[i,j] = rtol * (|x_i|^2 + |x_j|^2) / C + atol`` of the true D^2[i,j] (the bound of a
  Gram-matrix evaluation, which cancels for near-duplicate frames); D[i,i] is exactly 0 and D is
  bit-symmetric in every backend (DESIGN.md requires both). Intervals
  ``D_lo = sqrt(max(0, D^2 - eps)) * (1 - rtol)``, ``D_hi = sqrt(D^2 + eps) * (1 + rtol)``.
* log-density: log rho' is within ``tau_i = rtol * (|x_i|^2/C + max_j |x_j|^2/C) + atol +
  rtol * |log rho_i|`` of the true value (the mean of the k smallest of values each perturbed by
  at most eps moves by at most eps, whichever neighbours get picked).

Density order ("is j higher than i" in the backend), for two real tokens i != j:

* definitely higher   if log rho_j - log rho_i >  tau_i + tau_j;
* definitely lower    if log rho_i - log rho_j >  tau_i + tau_j;
* a *robust exact tie* follows the index rule exactly (j higher iff j < i). Exact ties are
  robust when every backend must produce bitwise-equal log-densities: k_eff = min(k, #real) = 1
  (every log rho is exactly -0/1 = 0), or k_eff = 2 and i, j are each other's nearest neighbour
  with a margin (every other real token is definitely farther, D_lo > D_hi): then both log rho
  are -(0 + D_ij^2)/2 of the same bit-symmetric D_ij;
* otherwise (within tau_i + tau_j, e.g. duplicated frames, whose Gram-form distances are not
  exactly 0): a near-tie, j is *possibly* higher and possibly lower.

Masked tokens rank below every real token; among themselves by index (all log rho = -inf).

delta interval of a real token i, with P = possibly-higher and H = definitely-higher real tokens
(H within P): delta_hi = min_{j in H} D_hi[i,j] (if H is empty i may be the top token:
max(largest_hi, max_{j in P} D_hi[i,j])); delta_lo = min_{j in P} D_lo[i,j], also at most
largest_lo when H is empty; largest = the largest D between two real tokens. Score interval
``[delta_lo * exp(lr - tau) * (1 - rtol) - A, delta_hi * exp(lr + tau) * (1 + rtol) + A]`` with
``A = 2 * tiny * (1 + delta_hi)`` (subnormals / flush-to-zero of the compute dtype; tiny = its
smallest normal). A token whose rho certainly underflows to 0 in the compute dtype
(lr + tau < log(smallest subnormal) - 1), and every masked token, has score exactly 0.

Ranking (DESIGN.md): class (real with a number > masked > excluded center), then score, then
index. An unselected token u *definitely* ranks above a selected token s when its class is higher,
or (same class) score_lo(u) > score_hi(s), or both scores are exactly determined and equal (a
degenerate interval: masked tokens, underflowed scores) and u < s. A selection is valid iff no
unselected token definitely ranks above a selected one. Samples whose x is not all finite are
checked for index validity only (f distinct values in [0, N), the kept center).

Default tolerances by x.dtype: float64 rtol=1e-12, atol=1e-15 (float64 backends, Gram form
included); float32/float16/bfloat16 (computed in float32) rtol=1e-5, atol=1e-9 -- about 20x the
largest Gram-form float32 error measured on C = 16..2048 with large common offsets. A backend that
uses tf32 / bf16 tensor-core products for float32 inputs must pass a larger rtol (~2e-3).

The pairwise interval test is a necessary condition for validity, not a sufficient one (it cannot
see that two duplicated frames were both given the large score only one of them can have); the
tests of the reference also compare with the oracle exactly where no near-tie exists.
"""
from __future__ import annotations

import math

import numpy as np

try:  # tests/ as a package or as a plain directory on sys.path
    from . import oracle as O
except ImportError:  # pragma: no cover
    import oracle as O

__all__ = [
    "default_tolerances",
    "selection_intervals",
    "selection_violations",
    "check_selection",
    "assert_same_or_near_tie",
    "assignment_violations",
    "check_assignment",
    "selection_ambiguities",
    "assignment_ambiguities",
]


_F64_TINY = float(np.finfo(np.float64).tiny)
_F64_SUB = 5e-324
_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_SUB = float(np.float32(1.4e-45))


def _dtype_name(x) -> str:
    dt = getattr(x, "dtype", None)
    return str(dt).replace("torch.", "")


def _computes_in_f64(x) -> bool:
    return _dtype_name(x) == "float64"


def default_tolerances(x):
    """(rtol, atol) for an input of x's dtype (see the module docstring)."""
    if _computes_in_f64(x):
        return 1e-12, 1e-15
    return 1e-5, 1e-9


def _resolve_tols(x, rtol, atol):
    r0, a0 = default_tolerances(x)
    return (r0 if rtol is None else float(rtol)), (a0 if atol is None else float(atol))


# ---- per-sample float64 intervals -------------------------------------------------------------


class _Sample:
    """Float64 statistics and rounding intervals of one sample."""

    def __init__(self, X, real, k, rtol, atol, f64):
        N, C = X.shape
        self.N = N
        self.real = real
        self.finite = bool(np.all(np.isfinite(X)))
        self.rtol = rtol
        tiny, sub = (_F64_TINY, _F64_SUB) if f64 else (_F32_TINY, _F32_SUB)
        if not self.finite:
            return
        D = O.brute_distance(X[None])[0]
        self.D = D
        sq = np.array([math.fsum((X[i] * X[i]).tolist()) for i in range(N)]) / C
        eps = rtol * (sq[:, None] + sq[None, :]) + atol
        np.fill_diagonal(eps, 0.0)
        D2 = D * D
        self.Dlo = np.sqrt(np.maximum(D2 - eps, 0.0)) * (1.0 - rtol)
        self.Dhi = np.sqrt(D2 + eps) * (1.0 + rtol)
        np.fill_diagonal(self.Dlo, 0.0)
        np.fill_diagonal(self.Dhi, 0.0)

        R = np.flatnonzero(real)
        self.R = R
        n_real = len(R)
        k_eff = min(k, n_real)
        self.k_eff = k_eff
        lr = O.brute_log_density(X[None], k, real[None], D=D[None])[0]
        self.lr = lr
        sq_max = float(sq[R].max()) if n_real else 0.0
        tau = rtol * (sq + sq_max) + atol + rtol * np.abs(np.where(real, lr, 0.0))
        if k_eff == 1:
            tau = np.zeros(N)  # log rho = -(0^2)/1 exactly in every backend
        tau[~real] = 0.0
        self.tau = tau

        # Robust exact ties (see module docstring).
        robust = np.zeros((N, N), dtype=bool)
        if k_eff == 1:
            robust[np.ix_(R, R)] = True
        elif k_eff == 2:
            nn = {}
            for i in R:
                others = [j for j in R if j != i]
                j = min(others, key=lambda t: (D[i, t], t))
                rest = [t for t in others if t != j]
                unambiguous = all(self.Dlo[i, t] > self.Dhi[i, j] for t in rest)
                nn[i] = (j, unambiguous)
            for i in R:
                j, ok_i = nn[i]
                if nn[j][0] == i and ok_i and nn[j][1] and lr[i] == lr[j]:
                    robust[i, j] = robust[j, i] = True
        np.fill_diagonal(robust, False)
        self.robust = robust

        # possibly / definitely higher (real tokens only; masked ones are never higher than a real).
        idx = np.arange(N)
        band = tau[:, None] + tau[None, :]
        with np.errstate(invalid="ignore"):
            diff = lr[None, :] - lr[:, None]  # [i, j] = lr_j - lr_i (-inf - -inf: NaN, unused)
            definite = diff > band
            possible = diff >= -band
        lower_index = idx[None, :] < idx[:, None]  # [i, j]: j < i
        definite = np.where(robust, lower_index, definite)
        possible = np.where(robust, lower_index, possible)
        both_real = real[:, None] & real[None, :]
        definite &= both_real
        possible &= both_real
        np.fill_diagonal(definite, False)
        np.fill_diagonal(possible, False)
        self.definite, self.possible = definite, possible

        if n_real:
            largest_lo = float(self.Dlo[np.ix_(R, R)].max())
            largest_hi = float(self.Dhi[np.ix_(R, R)].max())
        else:
            largest_lo = largest_hi = 0.0
        dlo = np.zeros(N)
        dhi = np.zeros(N)
        for i in R:
            P, H = possible[i], definite[i]
            if H.any():
                dhi[i] = self.Dhi[i, H].min()
            else:
                dhi[i] = max(largest_hi, self.Dhi[i, P].max() if P.any() else 0.0)
            if P.any():
                dlo[i] = self.Dlo[i, P].min()
                if not H.any():
                    dlo[i] = min(dlo[i], largest_lo)
            else:
                dlo[i] = largest_lo
        self.dlo, self.dhi = dlo, dhi

        slo = np.zeros(N)
        shi = np.zeros(N)
        zero_below = math.log(sub) - 1.0
        for i in R:
            if lr[i] + tau[i] < zero_below:
                continue  # rho underflows to exactly 0: score exactly 0
            A = 2.0 * tiny * (1.0 + dhi[i])
            slo[i] = max(0.0, dlo[i] * math.exp(lr[i] - tau[i]) * (1.0 - rtol) - A)
            shi[i] = dhi[i] * math.exp(lr[i] + tau[i]) * (1.0 + rtol) + A
        self.slo, self.shi = slo, shi

    # -- ranking --

    def klass(self, i, exclude):
        if exclude is not None and i == exclude:
            return 0
        return 3 if self.real[i] else 1

    def definitely_above(self, u, s, exclude):
        """None, or why token u definitely ranks above token s."""
        cu, cs = self.klass(u, exclude), self.klass(s, exclude)
        names = {3: "real", 1: "masked", 0: "excluded"}
        if cu != cs:
            if cu > cs:
                return f"token {u} is {names[cu]} and token {s} is {names[cs]}"
            return None
        if cu == 1:  # masked: score exactly 0 for all, ties by index
            return (f"both are masked (score exactly 0), ties go to the lower index"
                    if u < s else None)
        if self.slo[u] > self.shi[s]:
            return (f"score({u}) >= {self.slo[u]:.9g} > {self.shi[s]:.9g} >= score({s}): "
                    f"definitely larger, not a near-tie ({self._why(u)}; {self._why(s)})")
        if (self.slo[u] == self.shi[u] == self.slo[s] == self.shi[s]) and u < s:
            return (f"scores of {u} and {s} are both exactly {self.slo[u]:.9g} (e.g. rho underflows "
                    f"to 0), ties go to the lower index")
        return None

    def _why(self, i):
        P = np.flatnonzero(self.possible[i])
        H = np.flatnonzero(self.definite[i])
        amb = [int(j) for j in P if not self.definite[i, j]]
        return (f"token {i}: log rho = {self.lr[i]:.9g} +- {self.tau[i]:.2g}, delta in "
                f"[{self.dlo[i]:.9g}, {self.dhi[i]:.9g}], definitely higher: {len(H)} tokens, "
                f"density near-ties: {amb[:8]}{'...' if len(amb) > 8 else ''}")


def _as_index(index):
    a = np.asarray(O._to_numpy(index))
    if a.ndim == 1:
        a = a[None]
    return a.astype(np.int64)


def _prep(x, token_mask):
    X = O.as_f64(x)
    if X.ndim != 3:
        raise ValueError(f"x must be (B, N, C), got shape {X.shape}")
    B, N, _ = X.shape
    return X, O.as_mask(token_mask, B, N)


def selection_intervals(x, k=2, token_mask=None, rtol=None, atol=None):
    """The per-sample statistics (list of objects with lr, tau, dlo, dhi, slo, shi, possible,
    definite, robust ...) the checker uses; handy when debugging a failure."""
    rtol, atol = _resolve_tols(x, rtol, atol)
    X, real = _prep(x, token_mask)
    f64 = _computes_in_f64(x)
    return [_Sample(X[b], real[b], k, rtol, atol, f64) for b in range(X.shape[0])]


def selection_violations(x, index, f, k=2, token_mask=None, center=None, keep_center=True,
                         rtol=None, atol=None, sorted=None, max_messages=5):
    """All reasons (strings) why ``index`` is not a valid selection; [] when it is valid."""
    rtol, atol = _resolve_tols(x, rtol, atol)
    X, real = _prep(x, token_mask)
    B, N, _ = X.shape
    idx = _as_index(index)
    msgs = []
    if idx.shape != (B, f):
        return [f"index has shape {tuple(idx.shape)}, expected {(B, f)}"]
    cs = O._centers(center, B)
    f64 = _computes_in_f64(x)
    for b in range(B):
        row = [int(v) for v in idx[b]]
        bad = [v for v in row if not 0 <= v < N]
        if bad:
            msgs.append(f"sample {b}: index {row} has values outside [0, {N}): {bad}")
            continue
        if len(set(row)) != f:
            msgs.append(f"sample {b}: index {row} does not hold {f} distinct values")
            continue
        c = None if cs is None else cs[b]
        if c is not None:
            if keep_center and c not in row:
                msgs.append(f"sample {b}: the center {c} is not kept: {row}")
                continue
            if not keep_center and c in row:
                msgs.append(f"sample {b}: the excluded center {c} was picked: {row}")
                continue
        picked = [v for v in row if not (keep_center and v == c)]
        if sorted is True and row != list(np.sort(row)):
            msgs.append(f"sample {b}: index {row} is not ascending (sorted=True)")
        if sorted is False and keep_center and c is not None and row[-1] != c:
            msgs.append(f"sample {b}: a kept center must come last when sorted=False: {row}")
        S = _Sample(X[b], real[b], k, rtol, atol, f64)
        if not S.finite:
            continue  # non-finite input: index validity only
        chosen = set(row)
        unpicked = [u for u in range(N) if u not in chosen and u != c]
        for s in picked:
            for u in unpicked:
                why = S.definitely_above(u, s, c)
                if why is not None:
                    msgs.append(f"sample {b}: token {u} should have been picked instead of token "
                                f"{s} (kept {row}): {why}")
                    break
            if len(msgs) >= max_messages:
                return msgs
        if sorted is False:  # best first: no later pick may definitely rank above an earlier one
            for p in range(len(picked)):
                for q in range(p + 1, len(picked)):
                    why = S.definitely_above(picked[q], picked[p], c)
                    if why is not None:
                        msgs.append(f"sample {b}: sorted=False order {row}: token {picked[q]} "
                                    f"must come before token {picked[p]}: {why}")
                        break
    return msgs[:max_messages]


def check_selection(x, index, f, k=2, token_mask=None, center=None, keep_center=True,
                    rtol=None, atol=None, sorted=None):
    """Raise AssertionError unless ``index`` (B, f) is a valid dpc_knn selection for x up to
    rounding (see the module docstring). sorted=True/False also checks the order; None does not.
    Returns True when valid."""
    msgs = selection_violations(x, index, f, k, token_mask, center, keep_center, rtol, atol,
                                sorted)
    if msgs:
        r, a = _resolve_tols(x, rtol, atol)
        raise AssertionError(f"invalid selection (rtol={r:g}, atol={a:g}, k={k}):\n  "
                             + "\n  ".join(msgs))
    return True


def assert_same_or_near_tie(index_a, index_b, x, f=None, k=2, token_mask=None, center=None,
                            keep_center=True, rtol=None, atol=None, sorted=None):
    """Pass if index_a == index_b; otherwise both must be valid selections (check_selection)."""
    a, b = _as_index(index_a), _as_index(index_b)
    if a.shape == b.shape and np.array_equal(a, b):
        return True
    f = a.shape[1] if f is None else f
    rows = [r for r in range(min(len(a), len(b))) if not np.array_equal(a[r], b[r])]
    errs = []
    for name, idx in (("index_a", a), ("index_b", b)):
        msgs = selection_violations(x, idx, f, k, token_mask, center, keep_center, rtol, atol,
                                    sorted)
        if msgs:
            errs.append(f"{name} is not a valid selection:\n    " + "\n    ".join(msgs))
    if errs:
        raise AssertionError(f"selections differ in rows {rows} and not only at near-ties:\n  "
                             + "\n  ".join(errs))
    return True


def selection_ambiguities(x, index, f, k=2, token_mask=None, center=None, keep_center=True,
                          rtol=None, atol=None, sorted=None):
    """Where rounding could change a (valid) selection ``index``, e.g. the float64 oracle's: a list
    of (sample, token_a, token_b) pairs -- a picked and an unpicked token (or, with sorted=False,
    two picked tokens in returned order) that are not *definitely* in that rank order. Samples
    with non-finite x are reported as (sample, -1, -1). [] means every backend that is correct up
    to rounding must return exactly ``index``."""
    rtol, atol = _resolve_tols(x, rtol, atol)
    X, real = _prep(x, token_mask)
    B, N, _ = X.shape
    idx = _as_index(index)
    cs = O._centers(center, B)
    f64 = _computes_in_f64(x)
    out = []
    for b in range(B):
        S = _Sample(X[b], real[b], k, rtol, atol, f64)
        if not S.finite:
            out.append((b, -1, -1))
            continue
        c = None if cs is None else cs[b]
        row = [int(v) for v in idx[b]]
        picked = [v for v in row if not (keep_center and v == c)]
        chosen = set(row)
        for s in picked:
            for u in range(N):
                if u in chosen or u == c:
                    continue
                if S.definitely_above(s, u, c) is None:
                    out.append((b, s, u))
        if sorted is False:
            for p in range(len(picked) - 1):
                if S.definitely_above(picked[p], picked[p + 1], c) is None:
                    out.append((b, picked[p], picked[p + 1]))
    return out


# ---- assignment --------------------------------------------------------------------------------


def assignment_violations(x, index, assignment, rtol=None, atol=None, max_messages=5):
    """Reasons why ``assignment`` (B, N) is not "position in index of the nearest kept token by D
    (ties to the lower position), each kept token mapped to itself", up to rounding of D (the same
    D interval model as check_selection; distances within rounding are near-ties)."""
    rtol, atol = _resolve_tols(x, rtol, atol)
    X = O.as_f64(x)
    B, N, C = X.shape
    idx = _as_index(index)
    asg = _as_index(assignment)
    f = idx.shape[1]
    if asg.shape != (B, N):
        return [f"assignment has shape {tuple(asg.shape)}, expected {(B, N)}"]
    msgs = []
    for b in range(B):
        row = asg[b]
        if np.any((row < 0) | (row >= f)):
            msgs.append(f"sample {b}: assignment values outside [0, {f}): {row.tolist()}")
            continue
        kept = {int(v): p for p, v in enumerate(idx[b])}
        for t, p in kept.items():
            if 0 <= t < N and row[t] != p:
                msgs.append(f"sample {b}: kept token {t} (position {p}) is assigned to position "
                            f"{int(row[t])}, not to itself")
        if not np.all(np.isfinite(X[b])):
            continue
        S = _Sample(X[b], np.ones(N, dtype=bool), 1, rtol, atol, _computes_in_f64(x))
        for i in range(N):
            if i in kept:
                continue
            a = int(row[i])
            ta = int(idx[b, a])
            for p in range(f):
                tp = int(idx[b, p])
                if p == a:
                    continue
                if S.Dhi[i, tp] < S.Dlo[i, ta]:
                    msgs.append(f"sample {b}: token {i} assigned to position {a} (token {ta}, D in "
                                f"[{S.Dlo[i, ta]:.9g}, {S.Dhi[i, ta]:.9g}]) but position {p} (token "
                                f"{tp}, D <= {S.Dhi[i, tp]:.9g}) is definitely nearer")
                    break
                if (p < a and S.Dlo[i, tp] == S.Dhi[i, tp] == S.Dlo[i, ta] == S.Dhi[i, ta]):
                    msgs.append(f"sample {b}: token {i} is exactly as near to positions {p} and "
                                f"{a}; ties go to the lower position")
                    break
            if len(msgs) >= max_messages:
                return msgs
    return msgs[:max_messages]


def assignment_ambiguities(x, index, rtol=None, atol=None):
    """(sample, token) pairs whose nearest kept token could change with rounding of D (for a
    valid ``index``); [] means the assignment is determined exactly."""
    rtol, atol = _resolve_tols(x, rtol, atol)
    X = O.as_f64(x)
    B, N, _ = X.shape
    idx = _as_index(index)
    out = []
    for b in range(B):
        if not np.all(np.isfinite(X[b])):
            out.append((b, -1))
            continue
        S = _Sample(X[b], np.ones(N, dtype=bool), 1, rtol, atol, _computes_in_f64(x))
        kept = [int(v) for v in idx[b]]
        for i in range(N):
            if i in kept:
                continue
            d = [S.D[i, t] for t in kept]
            a = int(np.argmin(d))
            for p, t in enumerate(kept):
                if p == a:
                    continue
                exact = S.Dlo[i, t] == S.Dhi[i, t] == S.Dlo[i, kept[a]] == S.Dhi[i, kept[a]]
                if not (S.Dhi[i, kept[a]] < S.Dlo[i, t] or (exact and a < p)):
                    out.append((b, i))
                    break
    return out


def check_assignment(x, index, assignment, rtol=None, atol=None):
    """Raise AssertionError unless ``assignment`` is valid for ``index`` up to rounding."""
    msgs = assignment_violations(x, index, assignment, rtol, atol)
    if msgs:
        raise AssertionError("invalid assignment:\n  " + "\n  ".join(msgs))
    return True
