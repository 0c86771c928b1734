"""The ``reference`` backend (the project's test oracle) against an independent float64 brute force.

tests/oracle.py recomputes ops 1-5 of DESIGN.md with Python loops and exactly rounded direct
differences; tests/selection.py decides, tie-aware, whether a selection is valid up to rounding
and whether a float64 selection is determined exactly (no near-tie), in which case the reference
must reproduce it bit for bit.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle as O  # noqa: E402
import selection as SEL  # noqa: E402

from hot_kernels import reference as R  # noqa: E402

F32, F64 = torch.float32, torch.float64
EPS = {F32: float(np.finfo(np.float32).eps), F64: float(np.finfo(np.float64).eps)}


# ---- inputs ------------------------------------------------------------------------------------


def make_x(seed, B, N, C, dtype=F64, kind="randn"):
    """Clips generated in float64 and rounded to ``dtype`` (the oracle sees the rounded values)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(B, N, C, generator=g, dtype=F64)
    elif kind == "smooth":  # a random walk: neighbouring frames close, like pose features
        x = torch.randn(B, N, C, generator=g, dtype=F64).cumsum(1) * 0.3
    elif kind == "offset":  # a large common offset: Gram-form distances cancel
        x = torch.randn(B, N, C, generator=g, dtype=F64) * 0.5 \
            + 4.0 * torch.randn(B, 1, C, generator=g, dtype=F64)
    elif kind == "padded":  # edge-padded clip: duplicated first and last frames
        x = torch.randn(B, N, C, generator=g, dtype=F64).cumsum(1) * 0.3
        if N >= 5:
            x[:, :3] = x[:, 3:4]
        if N >= 8:
            x[:, -2:] = x[:, -3:-2]
    else:
        raise ValueError(kind)
    return x.to(dtype)


def make_mask(seed, B, N, kind):
    """None, or (B, N) bool masks: "random", or "mixed" = rows with random / exactly one real /
    no real token (cycling)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(10_000 + seed)
    m = torch.rand(B, N, generator=g) < 0.7
    if kind == "mixed":
        for b in range(B):
            if b % 3 == 1:
                m[b] = False
                m[b, int(torch.randint(N, (1,), generator=g))] = True
            elif b % 3 == 2:
                m[b] = False
    return m


def d2_bound(x, y=None):
    """Bound on the error of a Gram-form squared scaled distance (B, N, M): (C+8) eps
    (|x_i|^2 + |y_j|^2) / C, eps of the compute dtype (float32 for half inputs)."""
    X = O.as_f64(x)
    Y = X if y is None else O.as_f64(y)
    C = X.shape[-1]
    eps = EPS[F64] if x.dtype == F64 else EPS[F32]
    sx = (X * X).sum(-1) / C
    sy = (Y * Y).sum(-1) / C
    return (C + 8) * eps * (sx[:, :, None] + sy[:, None, :]) + 1e-300


def assert_distances_close(D, x, y=None):
    Dor = O.brute_distance(x, y)
    assert D.shape == Dor.shape
    Dt = D.detach().double().numpy()
    err = np.abs(Dt * Dt - Dor * Dor)
    tol = d2_bound(x, y)
    assert np.all(err <= tol), f"max |D^2 - D64^2| / bound = {np.max(err / tol):.3g}"


def rows_equal(a, b):
    a = np.asarray(a.numpy() if hasattr(a, "numpy") else a)
    return [bool(np.array_equal(a[r], b[r])) for r in range(len(b))]


def ambiguous_rows(amb):
    return {t[0] for t in amb}


# ---- 1. pairwise_distance ----------------------------------------------------------------------

KINDS = ["randn", "smooth", "offset", "padded"]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("seed", range(6))
def test_pairwise_distance_values(seed, dtype):
    B, N, C = 2, 3 + 3 * seed, [1, 3, 8, 16, 33, 64][seed]
    x = make_x(seed, B, N, C, dtype, KINDS[seed % 4])
    D = R.pairwise_distance(x)
    assert D.dtype == dtype and D.shape == (B, N, N)
    assert_distances_close(D, x)
    y = make_x(seed + 100, B, N + 2, C, dtype, "randn")
    Dxy = R.pairwise_distance(x, y)
    assert Dxy.dtype == dtype and Dxy.shape == (B, N, N + 2)
    assert_distances_close(Dxy, x, y)
    assert torch.all(Dxy >= 0) and torch.isfinite(Dxy).all()


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind", KINDS + ["constant"])
def test_pairwise_distance_bit_symmetric_zero_diagonal(kind, dtype):
    if kind == "constant":
        g = torch.Generator().manual_seed(7)
        x = torch.randn(3, 1, 24, generator=g, dtype=F64).expand(3, 17, 24).contiguous().to(dtype)
    else:
        x = make_x(11, 3, 17, 24, dtype, kind)
    D = R.pairwise_distance(x)
    assert torch.equal(D, D.transpose(1, 2)), "D must be bitwise symmetric"
    assert torch.all(D.diagonal(dim1=1, dim2=2) == 0)
    assert torch.isfinite(D).all() and torch.all(D >= 0)
    assert_distances_close(D, x)
    # The oracle is exactly symmetric too (the property the tie rule relies on).
    Dor = O.brute_distance(x)
    assert np.array_equal(Dor, Dor.transpose(0, 2, 1)) and np.all(np.diagonal(Dor, 0, 1, 2) == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pairwise_distance_half_inputs(dtype):
    x = make_x(3, 2, 9, 16, dtype, "smooth")
    D = R.pairwise_distance(x)
    assert D.dtype == dtype and torch.equal(D, D.transpose(1, 2))
    assert torch.all(D.diagonal(dim1=1, dim2=2) == 0)
    Dor = O.brute_distance(x)  # on the rounded inputs
    rel = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    tol = rel * Dor + np.sqrt(d2_bound(x))
    assert np.all(np.abs(D.double().numpy() - Dor) <= tol)


def _analytic_grad(X, W, Y=None):
    """Gradient of sum(W * D) in float64 with d||.||/d at 0 defined as 0 (loops)."""
    B, N, C = X.shape
    same = Y is None
    Yv = X if same else Y
    M = Yv.shape[1]
    gx = np.zeros_like(X)
    gy = np.zeros_like(Yv)
    for b in range(B):
        for i in range(N):
            for j in range(M):
                diff = X[b, i] - Yv[b, j]
                n = math.sqrt(float(np.dot(diff, diff)))
                if n == 0.0:
                    continue
                g = W[b, i, j] * diff / (n * math.sqrt(C))
                gx[b, i] += g
                if same:
                    gx[b, j] -= g
                else:
                    gy[b, j] -= g
    return gx, gy


def test_pairwise_distance_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(2, 4, 3, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: R.pairwise_distance(a), (x,))
    assert torch.autograd.gradcheck(lambda a, b: R.pairwise_distance(a, b), (x, y))
    # and against the closed form
    W = torch.randn(2, 5, 4, generator=g, dtype=F64)
    (R.pairwise_distance(x, y) * W).sum().backward()
    gx, gy = _analytic_grad(x.detach().numpy(), W.numpy(), y.detach().numpy())
    np.testing.assert_allclose(x.grad.numpy(), gx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(y.grad.numpy(), gy, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_pairwise_distance_gradient_at_zero_distance(dtype):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 6, 4, generator=g, dtype=F64)
    x0[0, 1] = x0[0, 0]  # duplicated frames
    x0[0, 4] = x0[0, 0]
    x0[1] = x0[1, 2]  # a constant clip: every distance is 0
    x = x0.to(dtype).requires_grad_()
    W = torch.randn(2, 6, 6, generator=g, dtype=F64)
    D = R.pairwise_distance(x)
    assert torch.isfinite(D).all()
    (D * W.to(dtype)).sum().backward()
    assert torch.isfinite(x.grad).all(), "zero distance must have a finite (zero) gradient"
    gx, _ = _analytic_grad(x.detach().double().numpy(), W.numpy())
    atol = 1e-7 if dtype == F64 else 5e-3
    np.testing.assert_allclose(x.grad.double().numpy(), gx, rtol=1e-4, atol=atol)
    assert torch.all(x.grad[1] == 0) or x.grad[1].abs().max() < atol  # constant clip: no gradient
    if dtype == F64:
        # Finite differences straddle the kink at zero distance, so check the smooth entries only.
        keep = torch.from_numpy(O.brute_distance(x0) > 0)
        xg = x0.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a: R.pairwise_distance(a)[keep], (xg,))


# ---- 2. knn_density ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("mask_kind", [None, "random", "mixed"])
@pytest.mark.parametrize("k", [1, 2, 3, "N"])
def test_knn_density(k, mask_kind, dtype):
    seed = {1: 0, 2: 1, 3: 2, "N": 3}[k] * 3 + [None, "random", "mixed"].index(mask_kind)
    B, N, C = 3, 13, 10
    kk = N if k == "N" else k
    x = make_x(seed, B, N, C, dtype, ["smooth", "randn", "padded"][seed % 3])
    mask = make_mask(seed, B, N, mask_kind)
    lr = R.knn_density(x, kk, token_mask=mask, log=True)
    rho = R.knn_density(x, kk, token_mask=mask)
    assert lr.shape == (B, N) and lr.dtype == dtype and rho.dtype == dtype
    lr_or = O.brute_log_density(x, kk, mask)
    real = O.as_mask(mask, B, N)
    lr_np = lr.double().numpy()
    assert np.all(lr_np[~real] == -np.inf) and np.all(rho.numpy()[~real] == 0)
    sq = (O.as_f64(x) ** 2).sum(-1) / C
    eps = EPS[dtype]
    tol = (C + 8) * eps * (sq + sq.max(axis=1, keepdims=True)) + 4 * eps * np.abs(lr_or) + 1e-300
    assert np.all(np.abs(lr_np[real] - lr_or[real]) <= tol[real])
    if kk == 1:
        assert np.all(lr_np[real] == 0)
    np.testing.assert_allclose(rho.double().numpy(), np.exp(lr_np), rtol=4 * eps, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_knn_density_mutual_neighbours_tie_bitwise(dtype):
    x = make_x(5, 4, 24, 16, dtype, "randn")
    lr = R.knn_density(x, 2, log=True)
    pairs = 0
    for b, S in enumerate(SEL.selection_intervals(x, k=2)):
        for i, j in zip(*np.nonzero(np.triu(S.robust))):
            pairs += 1
            assert lr[b, i].item() == lr[b, j].item(), (b, i, j)
            assert lr[b, i].item() == S.lr[i] or abs(lr[b, i].item() - S.lr[i]) <= 2 * S.tau[i]
    assert pairs >= 4  # random clips have mutual nearest neighbours


def test_knn_density_fewer_real_than_k():
    x = make_x(2, 2, 7, 5, F64)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, [1, 5]] = True
    mask[1, 3] = True
    lr = R.knn_density(x, 4, token_mask=mask, log=True)
    D = O.brute_distance(x)
    assert lr[0, 1].item() == pytest.approx(-D[0, 1, 5] ** 2 / 2, rel=1e-12)
    assert lr[0, 5].item() == lr[0, 1].item()
    assert lr[1, 3].item() == 0.0
    assert torch.isneginf(lr[0, [0, 2, 3, 4, 6]]).all() and torch.isneginf(lr[1, [0, 1, 2]]).all()
    np.testing.assert_allclose(lr.numpy(), O.brute_log_density(x, 4, mask), rtol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_knn_density_k_larger_than_n(masked):
    x = make_x(4, 1, 3, 4, F64)
    mask = torch.ones(1, 3, dtype=torch.bool) if masked else None
    lr = R.knn_density(x, 5, token_mask=mask, log=True)
    np.testing.assert_allclose(lr.numpy(), O.brute_log_density(x, 5, mask), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_knn_density_half_inputs_computed_in_float32(dtype):
    x = make_x(6, 2, 9, 8, dtype, "smooth")
    lr = R.knn_density(x, 2, log=True)
    assert lr.dtype == F32
    lr_or = O.brute_log_density(x, 2)  # on the rounded inputs
    sq = (O.as_f64(x) ** 2).sum(-1) / 8
    assert np.all(np.abs(lr.double().numpy() - lr_or) <= 64 * EPS[F32] * (sq + sq.max()) + 1e-7)


# ---- 3. dpc_delta ------------------------------------------------------------------------------


def _density(kind, x, seed, mask):
    B, N, _ = x.shape
    g = torch.Generator().manual_seed(20_000 + seed)
    if kind == "log_rho":
        return torch.from_numpy(O.brute_log_density(x, 2, mask))
    if kind == "rho":
        return torch.from_numpy(O.brute_density(x, 2, mask))
    d = torch.randint(0, 3, (B, N), generator=g).double()  # many exact ties
    if kind == "nan":
        d[torch.rand(B, N, generator=g) < 0.2] = math.nan
        d[torch.rand(B, N, generator=g) < 0.1] = -math.inf
    return d


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("density_kind", ["log_rho", "rho", "discrete", "nan"])
@pytest.mark.parametrize("seed", range(4))
def test_dpc_delta(seed, density_kind, dtype):
    B, N, C = 3, 6 + 4 * seed, 6
    x = make_x(seed, B, N, C, dtype, KINDS[seed])
    mask = make_mask(seed, B, N, [None, "random", "mixed", None][seed])
    dens = _density(density_kind, x, seed, mask)
    delta, parent = R.dpc_delta(x, dens, token_mask=mask)
    assert delta.shape == (B, N) and parent.shape == (B, N) and parent.dtype == torch.int64
    D = O.brute_distance(x)
    d_or, p_or = O.brute_delta(x, dens, mask, D=D)
    tol2 = d2_bound(x)
    Dlo = np.sqrt(np.maximum(D * D - tol2, 0)) * (1 - 4 * EPS[dtype])
    Dhi = np.sqrt(D * D + tol2) * (1 + 4 * EPS[dtype])
    real = O.as_mask(mask, B, N)
    key = dens.numpy().copy()
    key[np.isnan(key)] = -np.inf
    key[~real] = -np.inf
    dl = delta.double().numpy()
    pr = parent.numpy()
    exact_parents = 0
    for b in range(B):
        for i in range(N):
            higher = [j for j in range(N) if j != i and
                      (key[b, j] > key[b, i] or (key[b, j] == key[b, i] and j < i))]
            if not higher:  # the highest token
                assert p_or[b, i] == i and pr[b, i] == i
                R_ = np.flatnonzero(real[b])
                lo = Dlo[b][np.ix_(R_, R_)].max() if len(R_) else 0.0
                hi = Dhi[b][np.ix_(R_, R_)].max() if len(R_) else 0.0
                assert lo <= dl[b, i] <= hi, (b, i, dl[b, i], d_or[b, i])
                continue
            j = int(pr[b, i])
            assert j in higher, f"parent {j} of {i} is not higher (sample {b})"
            assert Dlo[b, i, j] <= dl[b, i] <= Dhi[b, i, j]
            assert Dlo[b, i, p_or[b, i]] <= dl[b, i] <= Dhi[b, i, p_or[b, i]]
            others = [t for t in higher if t != p_or[b, i]]
            if all(Dlo[b, i, t] > Dhi[b, i, p_or[b, i]] for t in others):
                assert j == p_or[b, i], (b, i, j, p_or[b, i])
                exact_parents += 1
    assert exact_parents >= N  # most parents are unambiguous


def test_dpc_delta_ties_and_top_token_by_hand():
    # Three tokens on a line at 0, 1, 3 (C = 1): D = |a - b|.
    x = torch.tensor([[[0.0], [1.0], [3.0]]], dtype=F64)
    dens = torch.tensor([[5.0, 5.0, 5.0]])  # all tied: order 0 > 1 > 2
    delta, parent = R.dpc_delta(x, dens)
    assert delta.tolist() == [[3.0, 1.0, 2.0]] and parent.tolist() == [[0, 0, 1]]
    dens = torch.tensor([[1.0, math.nan, 2.0]])  # NaN ranks lowest: order 2 > 0 > 1
    delta, parent = R.dpc_delta(x, dens)
    assert delta.tolist() == [[3.0, 1.0, 3.0]] and parent.tolist() == [[2, 0, 2]]
    mask = torch.tensor([[True, False, True]])  # masked 1 lowest; largest between real = 3
    delta, parent = R.dpc_delta(x, torch.tensor([[1.0, 9.0, 1.0]]), token_mask=mask)
    assert delta.tolist() == [[3.0, 1.0, 3.0]] and parent.tolist() == [[0, 0, 0]]
    mask = torch.zeros(1, 3, dtype=torch.bool)  # no real token: top gets 0
    delta, parent = R.dpc_delta(x, dens, token_mask=mask)
    assert delta.tolist() == [[0.0, 1.0, 2.0]] and parent.tolist() == [[0, 0, 1]]


# ---- 4. topf_select ----------------------------------------------------------------------------


@pytest.mark.parametrize("exclude_kind", [None, "int", "tensor"])
@pytest.mark.parametrize("sorted_", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_topf_select(seed, sorted_, exclude_kind):
    g = torch.Generator().manual_seed(seed)
    B, N = 4, 2 + 3 * seed
    for dtype in (F32, F64):
        score = torch.randint(-2, 3, (B, N), generator=g).to(dtype)  # many exact ties
        score[torch.rand(B, N, generator=g) < 0.15] = math.nan
        score[torch.rand(B, N, generator=g) < 0.1] = -math.inf
        score[torch.rand(B, N, generator=g) < 0.05] = math.inf
        if exclude_kind is None:
            exclude, fmax = None, N
        elif exclude_kind == "int":
            exclude, fmax = N // 2, N - 1
        else:
            exclude, fmax = torch.randint(0, N, (B,), generator=g), N - 1
        for f in sorted({1, max(1, fmax // 2), fmax}):
            idx = R.topf_select(score, f, sorted=sorted_, exclude=exclude)
            assert idx.dtype == torch.int64 and idx.shape == (B, f)
            expected = O.brute_topf(score, f, sorted=sorted_, exclude=exclude)
            assert np.array_equal(idx.numpy(), expected), (f, score, idx, expected)


def test_topf_select_by_hand():
    nan, inf = math.nan, math.inf
    s = torch.tensor([[1.0, 3.0, 3.0, nan, -inf, 2.0]])
    assert R.topf_select(s, 3).tolist() == [[1, 2, 5]]
    assert R.topf_select(s, 5, sorted=False).tolist() == [[1, 2, 5, 0, 4]]
    assert R.topf_select(s, 6, sorted=False).tolist() == [[1, 2, 5, 0, 4, 3]]
    assert R.topf_select(s, 5, sorted=False, exclude=2).tolist() == [[1, 5, 0, 4, 3]]
    assert R.topf_select(s, 2, exclude=torch.tensor([1])).tolist() == [[2, 5]]
    assert R.topf_select(torch.full((1, 4), nan), 2).tolist() == [[0, 1]]


# ---- 5. dpc_knn --------------------------------------------------------------------------------


def dpc_config(seed):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(2, 26))
    C = int(rng.choice([1, 2, 4, 8, 16, 32]))
    k = int(min(N, rng.choice([1, 2, 2, 2, 3, 5, N])))
    center = [None, None, "int", "tensor"][seed % 4]
    keep = bool(rng.random() < 0.7)
    fmax = N - 1 if (center is not None and not keep) else N
    f = int(max(1, min(fmax, rng.choice([1, N // 3, N // 2, N - 1, N]))))
    if center is not None and fmax < 1:
        center = None
        f = 1
    mask_kind = [None, None, "random", "mixed"][(seed // 4) % 4]
    sorted_ = bool(rng.random() < 0.6)
    kind = ["randn", "smooth", "offset"][seed % 3]
    c = None
    if center == "int":
        c = int(rng.integers(0, N))
    elif center == "tensor":
        c = torch.from_numpy(rng.integers(0, N, size=3))
    return dict(N=N, C=C, k=k, f=f, center=c, keep=keep, mask_kind=mask_kind, sorted=sorted_,
                kind=kind)


def run_and_check(x, f, k=2, mask=None, center=None, keep=True, sorted_=True):
    """Reference vs oracle: valid (check_selection, check_assignment) always; equal to the
    float64 oracle in every row the checker proves unambiguous (for the dtype's rounding).
    Returns the number of rows compared exactly."""
    B, N = x.shape[:2]
    idx, asg = R.dpc_knn(x, f, k, token_mask=mask, center=center, return_assignment=True,
                         sorted=sorted_, keep_center=keep)
    assert idx.dtype == torch.int64 and idx.shape == (B, f)
    assert asg.dtype == torch.int64 and asg.shape == (B, N)
    assert torch.equal(R.dpc_knn(x, f, k, token_mask=mask, center=center, sorted=sorted_,
                                 keep_center=keep), idx)
    oi, oa = O.brute_dpc_knn(x, f, k, mask, center, keep, sorted_, return_assignment=True)
    SEL.check_selection(x, idx, f, k, mask, center, keep, sorted=sorted_)
    SEL.check_assignment(x, idx, asg)
    amb_rows = ambiguous_rows(SEL.selection_ambiguities(x, oi, f, k, mask, center, keep,
                                                        sorted=sorted_))
    same = rows_equal(idx, oi)
    n_exact = 0
    for b in range(B):
        if b in amb_rows:
            continue
        n_exact += 1
        assert same[b], (f"row {b}: no near-tie, yet reference {idx[b].tolist()} != "
                         f"oracle {oi[b].tolist()}")
    asg_amb = ambiguous_rows(SEL.assignment_ambiguities(x, oi))
    for b in range(B):
        if same[b] and b not in asg_amb:
            assert np.array_equal(asg[b].numpy(), oa[b]), (b, asg[b], oa[b])
    return n_exact


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("seed", range(24))
def test_dpc_knn_random(seed, dtype):
    cfg = dpc_config(seed)
    B = 3
    x = make_x(seed, B, cfg["N"], cfg["C"], dtype, cfg["kind"])
    mask = make_mask(seed, B, cfg["N"], cfg["mask_kind"])
    n_exact = run_and_check(x, cfg["f"], cfg["k"], mask, cfg["center"], cfg["keep"], cfg["sorted"])
    if dtype == F64:
        assert n_exact >= 2, f"float64 random clips should mostly be free of near-ties ({cfg})"


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dpc_knn_padded_clips(k, dtype):
    """Edge-padded clips duplicate frames: exact density ties between identical frames."""
    x = make_x(40 + k, 3, 20, 12, dtype, "padded")
    for f in (1, 4, 7, 20):
        for sorted_ in (True, False):
            run_and_check(x, f, k, sorted_=sorted_)
    run_and_check(x, 7, k, center=10)
    run_and_check(x, 7, k, center=0, keep=False)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("center,keep,sorted_", [(None, True, True), (None, True, False),
                                                  (3, True, True), (3, True, False),
                                                  (3, False, True), (0, False, False)])
def test_dpc_knn_constant_clip(center, keep, sorted_, dtype):
    """All distances exactly 0: every score is 0 and ties go to the lowest indices."""
    B, N, f = 2, 9, 4
    for value in (0.0, 0.5):
        x = torch.full((B, N, 6), value, dtype=dtype)
        idx, asg = R.dpc_knn(x, f, 2, center=center, keep_center=keep, sorted=sorted_,
                             return_assignment=True)
        n_pick = f if center is None or not keep else f - 1
        picks = [i for i in range(N) if i != center][:n_pick]
        if center is not None and keep:
            picks = picks + [center]
        expected = sorted(picks) if sorted_ else picks
        assert idx.tolist() == [expected] * B
        exp_asg = [0] * N
        for p, t in enumerate(expected):
            exp_asg[t] = p
        assert asg.tolist() == [exp_asg] * B
        oi, oa = O.brute_dpc_knn(x, f, 2, None, center, keep, sorted_, return_assignment=True)
        assert np.array_equal(oi, idx.numpy()) and np.array_equal(oa, asg.numpy())


class _UnfriendlyBlas:
    """torch.baddbmm as a BLAS may legally compute it: every Gram entry off by up to C ulps of the
    operands' magnitude, differently at every position (so identical rows do *not* come out at
    exactly zero distance and G[i, j] != G[j, i]). Patched into hot_kernels.reference."""

    def __init__(self, monkeypatch):
        real = torch.baddbmm

        def baddbmm(inp, b1, b2, *, alpha=1.0, beta=1.0):
            out = real(inp, b1, b2, alpha=alpha, beta=beta)
            C = b1.shape[-1]
            g = torch.Generator().manual_seed(out.numel())
            noise = torch.rand(out.shape, generator=g, dtype=out.dtype).to(out.device) - 0.5
            mag = (b1 * b1).sum(-1)[:, :, None] + (b2 * b2).sum(-2)[:, None, :]
            return out + noise * (C * torch.finfo(out.dtype).eps) * mag

        monkeypatch.setattr(R.torch, "baddbmm", baddbmm)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_exact_duplicates_are_at_zero_distance_whatever_the_blas(monkeypatch, dtype):
    """The tie rule on exact duplicates must not depend on how the BLAS rounds the Gram matrix
    (issue: an AMD machine's MKL path left identical rows ~1e-4 apart and the oracle broke it)."""
    g = torch.Generator().manual_seed(5)
    row = torch.randn(2, 1, 24, generator=g, dtype=F64) * 30 + 7
    constant = row.expand(2, 11, 24).contiguous().to(dtype)
    padded = make_x(3, 2, 11, 24, dtype, "smooth")
    padded[:, :3] = padded[:, 3:4]  # edge padding: frames 0..3 identical
    _UnfriendlyBlas(monkeypatch)
    # The patch really perturbs: a plain Gram form would leave the duplicates apart.
    xs = constant.to(R.compute_dtype(dtype))
    sq = (xs * xs).sum(-1)
    raw = R.torch.baddbmm(sq[:, :, None] + sq[:, None, :], xs, xs.transpose(1, 2), alpha=-2.0)
    assert (raw != 0).any()
    D = R.pairwise_distance(constant)
    assert (D == 0).all()
    idx, asg = R.dpc_knn(constant, 4, 2, return_assignment=True)
    assert idx.tolist() == [[0, 1, 2, 3]] * 2 and asg[:, 4:].eq(0).all()
    Dp = R.pairwise_distance(padded)
    assert (Dp[:, :4, :4] == 0).all() and torch.equal(Dp, Dp.transpose(1, 2))
    assert (Dp[:, 4:, 4:].diagonal(dim1=1, dim2=2) == 0).all()
    off = ~torch.eye(7, dtype=torch.bool)
    assert (Dp[:, 4:, 4:][:, off] > 0).all(), "distinct frames must stay apart"
    # the gradient at the zero distances is 0, not rounding noise / tiny distance
    xg = padded.clone().requires_grad_()
    R.pairwise_distance(xg)[:, :4, :4].sum().backward()
    assert (xg.grad == 0).all()
    # and the selection equals the float64 brute force
    oi = O.brute_dpc_knn(padded, 5, 2, None, None, True, True)
    assert np.array_equal(oi, R.dpc_knn(padded, 5, 2).numpy())


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("k,f", [(1, 1), (1, 6), (1, 16), ("N", 1), ("N", 16), ("N", 6),
                                 (2, 1), (2, 16)])
def test_dpc_knn_k_and_f_extremes(k, f, dtype):
    N = 16
    kk = N if k == "N" else k
    x = make_x(50, 3, N, 8, dtype, "smooth")
    for sorted_ in (True, False):
        run_and_check(x, f, kk, sorted_=sorted_)
    if f == N:
        assert R.dpc_knn(x, f, kk).tolist() == [list(range(N))] * 3


def test_dpc_knn_k1_orders_by_index():
    # k = 1: every log rho is exactly 0, so token 0 is the top (delta = largest distance) and
    # every other token's delta is its distance to the nearest lower-index token.
    x = torch.tensor([[[0.0], [10.0], [10.5], [4.0], [20.0]]], dtype=F64)
    # deltas: [20, 10, 0.5, 4, 9.5] -> top-3 by score: 0, 1, 4
    assert R.dpc_knn(x, 3, k=1).tolist() == [[0, 1, 4]]
    assert R.dpc_knn(x, 3, k=1, sorted=False).tolist() == [[0, 1, 4]]
    assert R.dpc_knn(x, 4, k=1, sorted=False).tolist() == [[0, 1, 4, 3]]
    # the oracle agrees with the hand computation
    _, stats = O.brute_dpc_knn(x, 3, k=1, return_stats=True)
    assert stats["delta"].tolist() == [[20.0, 10.0, 0.5, 4.0, 9.5]]
    assert stats["parent"].tolist() == [[0, 0, 1, 0, 2]]
    assert O.brute_dpc_knn(x, 4, k=1, sorted=False).tolist() == [[0, 1, 4, 3]]
    # k = 2: log rho = -(nearest distance)^2 / 2 = -[4, .5, .5, 4, 9.5]^2 / 2. 1 and 2 are mutual
    # nearest neighbours and tie exactly: 1 (lower index) is the top (delta = largest = 20), 2's
    # parent is 1; 0 and 3 tie too: 0 is higher, 0's parent is 1 (10 < 10.5), 3's is 0 (4).
    lr = R.knn_density(x, 2, log=True)
    assert lr.tolist() == [[-8.0, -0.125, -0.125, -8.0, -45.125]]
    assert O.brute_log_density(x, 2).tolist() == lr.tolist()
    delta, parent = R.dpc_delta(x, lr)
    assert parent.tolist() == [[1, 1, 1, 0, 2]] and delta.tolist() == [[10.0, 20.0, 0.5, 4.0, 9.5]]
    assert O.brute_delta(x, lr)[1].tolist() == parent.tolist()


@pytest.mark.parametrize("dtype", [F32, F64])
def test_dpc_knn_single_token(dtype):
    x = make_x(1, 2, 1, 5, dtype)
    idx, asg = R.dpc_knn(x, 1, k=1, return_assignment=True)
    assert idx.tolist() == [[0], [0]] and asg.tolist() == [[0], [0]]
    assert R.dpc_knn(x, 1, k=1, center=0).tolist() == [[0], [0]]
    assert R.dpc_knn(x, 1, k=1, token_mask=torch.zeros(2, 1, dtype=torch.bool)).tolist() == [[0], [0]]


def test_dpc_knn_single_token_default_k():
    x = make_x(1, 2, 1, 5, F32)
    assert R.dpc_knn(x, 1).tolist() == [[0], [0]]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_dpc_knn_masks(dtype):
    B, N = 4, 12
    x = make_x(60, B, N, 8, dtype, "smooth")
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0] = torch.rand(N, generator=torch.Generator().manual_seed(3)) < 0.6
    mask[1, 7] = True  # all masked but one
    mask[2, [2, 5, 9]] = True  # fewer real tokens than f
    # mask[3]: fully masked
    for f in (1, 5, N):
        for sorted_ in (True, False):
            run_and_check(x, f, 2, mask, sorted_=sorted_)
    idx = R.dpc_knn(x, 5, 2, token_mask=mask, sorted=False)
    assert idx[1].tolist() == [7, 0, 1, 2, 3]  # the real token, then masked by index
    assert sorted(idx[2, :3].tolist()) == [2, 5, 9] and idx[2, 3:].tolist() == [0, 1]
    assert idx[3].tolist() == [0, 1, 2, 3, 4]
    n_real = int(mask[0].sum())
    assert all(mask[0, t] for t in idx[0, :min(5, n_real)].tolist())
    # masked tokens are not picked while real ones remain
    idx = R.dpc_knn(x, 2, 2, token_mask=mask)
    assert idx[2].tolist() in ([2, 5], [2, 9], [5, 9])
    run_and_check(x, 5, 2, mask, center=3)  # a masked center is still kept


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("sorted_", [True, False])
def test_dpc_knn_center(keep, sorted_, dtype):
    B, N, f = 3, 15, 5
    x = make_x(70, B, N, 8, dtype, "smooth")
    for center in (7, 0, N - 1, torch.tensor([0, 7, N - 1])):
        idx = R.dpc_knn(x, f, 2, center=center, keep_center=keep, sorted=sorted_)
        cs = [int(center)] * B if isinstance(center, int) else center.tolist()
        for b in range(B):
            row = idx[b].tolist()
            assert (cs[b] in row) == keep
            if keep and not sorted_:
                assert row[-1] == cs[b]
            if sorted_:
                assert row == sorted(row)
        run_and_check(x, f, 2, center=center, keep=keep, sorted_=sorted_)
    # keep_center=False picks f tokens by score with the center excluded: the same as the top-f
    # of the center-excluded ranking, i.e. center-kept's picks plus the next one.
    i_keep = R.dpc_knn(x, f, 2, center=7, keep_center=True, sorted=False)
    i_drop = R.dpc_knn(x, f, 2, center=7, keep_center=False, sorted=False)
    assert torch.equal(i_keep[:, :f - 1], i_drop[:, :f - 1])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_dpc_knn_nan_input(dtype):
    B, N, f = 4, 10, 4
    x = make_x(80, B, N, 6, dtype, "smooth")
    x[0, 3, 2] = math.nan  # one NaN token
    x[1] = math.nan  # a NaN sample
    x[2, 5] = math.inf  # an inf token
    # sample 3 stays finite
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 8] = False
    for kwargs in (dict(), dict(center=2), dict(center=2, keep_center=False), dict(token_mask=mask),
                   dict(sorted=False), dict(center=6, sorted=False)):
        for k in (1, 2, 4):
            idx, asg = R.dpc_knn(x, f, k, return_assignment=True, **kwargs)
            assert idx.shape == (B, f) and asg.shape == (B, N)
            for b in range(B):
                row = idx[b].tolist()
                assert len(set(row)) == f and all(0 <= t < N for t in row), row
                assert all(0 <= a < f for a in asg[b].tolist())
                for p, t in enumerate(row):
                    assert asg[b, t] == p
            c = kwargs.get("center")
            SEL.check_selection(x, idx, f, k, kwargs.get("token_mask"), c,
                                kwargs.get("keep_center", True), sorted=kwargs.get("sorted", True))
            # the finite sample is unaffected by its neighbours
            one = R.dpc_knn(x[3:], f, k, **{a: v for a, v in kwargs.items() if a != "token_mask"},
                            token_mask=None if "token_mask" not in kwargs else mask[3:])
            assert torch.equal(one[0], idx[3])


def test_dpc_knn_float32_underflow():
    """Far-apart tokens: rho = exp(log rho) underflows to 0 in float32, every score is 0 and the
    lowest indices win; in float64 the scores are tiny but distinct."""
    x = make_x(90, 2, 12, 8, F64, "randn") * 30.0
    f = 4
    i32 = R.dpc_knn(x.float(), f)
    assert i32.tolist() == [[0, 1, 2, 3]] * 2
    SEL.check_selection(x.float(), i32, f)  # the checker models the underflow of float32 ...
    i64 = R.dpc_knn(x, f)
    assert np.array_equal(i64.numpy(), O.brute_dpc_knn(x, f))
    assert not np.array_equal(i64.numpy(), i32.numpy())
    with pytest.raises(AssertionError):  # ... and float64 has none
        SEL.check_selection(x, i32, f)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dpc_knn_half_inputs(dtype):
    x = make_x(95, 3, 18, 16, dtype, "smooth")
    for center in (None, 4):
        run_and_check(x, 6, 2, center=center, sorted_=False)


def test_dpc_knn_batch_independent():
    x = make_x(96, 5, 20, 16, F32, "offset")
    idx = R.dpc_knn(x, 7)
    for b in range(5):
        SEL.assert_same_or_near_tie(R.dpc_knn(x[b:b + 1], 7), idx[b:b + 1], x[b:b + 1], 7)


@st.composite
def integer_clips(draw):
    """Small integer-valued clips: every squared distance is an exact integer in float64 (Gram
    form included), so the countless exact ties of a grid (equal distances, densities, scores)
    are exact in both implementations and must be broken the same way."""
    B = draw(st.integers(1, 2))
    N = draw(st.integers(1, 12))
    C = draw(st.integers(1, 4))
    vals = draw(st.lists(st.integers(-3, 3), min_size=B * N * C, max_size=B * N * C))
    x = torch.tensor(vals, dtype=F64).reshape(B, N, C)
    k = draw(st.integers(1, min(3, N)))
    f = draw(st.integers(1, N))
    mask = None
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * N, max_size=B * N))).reshape(B, N)
    center, keep = None, True
    if N >= 2 and draw(st.booleans()):
        center = draw(st.integers(0, N - 1))
        keep = draw(st.booleans())
        if not keep:
            f = min(f, N - 1)
    return x, k, f, mask, center, keep, draw(st.booleans())


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(integer_clips())
def test_dpc_knn_integer_grid_exact_ties(case):
    """On an integer grid squared distances are exact, so equal distances are equal bitwise in
    both implementations; with k <= 2 log rho = -(0 + D^2)/2 is then exact too, and every tie
    (density, score, distance) must be broken exactly as the oracle breaks it. With k = 3 sums of
    two rounded D^2 that are equal in exact arithmetic may round differently (a legitimate near-tie
    of 1 ulp), so there the selections must agree up to near-ties."""
    x, k, f, mask, center, keep, sorted_ = case
    idx, asg = R.dpc_knn(x, f, k, token_mask=mask, center=center, keep_center=keep,
                         sorted=sorted_, return_assignment=True)
    oi, oa, st_ = O.brute_dpc_knn(x, f, k, mask, center, keep, sorted_, return_assignment=True,
                                  return_stats=True)
    lr = R.knn_density(x, k, token_mask=mask, log=True)
    np.testing.assert_allclose(lr.numpy(), st_["log_rho"], rtol=1e-15, atol=0)
    delta, parent = R.dpc_delta(x, lr, token_mask=mask)
    d_or, p_or = O.brute_delta(x, lr, mask)  # the same order: parents must agree exactly
    assert parent.tolist() == p_or.tolist()
    np.testing.assert_allclose(delta.numpy(), d_or, rtol=1e-15, atol=0)
    if k <= 2:
        assert idx.tolist() == oi.tolist(), (idx, oi, st_["score"])
        assert asg.tolist() == oa.tolist()
    else:
        SEL.assert_same_or_near_tie(idx, oi, x, f, k, mask, center, keep, sorted=sorted_)
        SEL.check_assignment(x, idx, asg)
    SEL.check_selection(x.float(), idx, f, k, mask, center, keep, sorted=sorted_)


# ---- the checker itself is not vacuous -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("seed", range(4))
def test_checker_rejects_a_clearly_worse_pick(seed, dtype):
    x = make_x(seed, 1, 16, 8, dtype, "smooth")
    f = 5
    oi, st = O.brute_dpc_knn(x, f, return_stats=True)
    score = st["score"][0]
    row = oi[0].tolist()
    SEL.check_selection(x, oi, f)
    best = max(row, key=lambda t: score[t])
    worst = min((t for t in range(16) if t not in row), key=lambda t: score[t])
    bad = sorted([t for t in row if t != best] + [worst])
    with pytest.raises(AssertionError, match=f"instead of token {worst}"):
        SEL.check_selection(x, torch.tensor([bad]), f)
    with pytest.raises(AssertionError):
        SEL.assert_same_or_near_tie(oi, torch.tensor([bad]), x, f)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_checker_enforces_the_density_tie_rule(dtype):
    """A selection made with the opposite tie rule (ties to the *higher* index: the oracle on the
    time-reversed clip) differs because mutual nearest neighbours tie exactly in density; the
    checker must reject it (robust exact ties follow the index rule, not a tolerance)."""
    rejected = 0
    for seed in range(6):
        x = make_x(200 + seed, 1, 16, 8, dtype, "randn")
        f = 6
        oi = O.brute_dpc_knn(x, f)
        flipped = np.sort(15 - O.brute_dpc_knn(x.flip(1), f), axis=1)
        if np.array_equal(oi, flipped):
            continue
        with pytest.raises(AssertionError, match="should have been picked"):
            SEL.check_selection(x, flipped, f)
        rejected += 1
    assert rejected >= 3


def test_checker_structural_rejections():
    x = make_x(300, 2, 10, 4, F64, "smooth")
    good = torch.from_numpy(O.brute_dpc_knn(x, 4))
    SEL.check_selection(x, good, 4, sorted=True)
    dup = good.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(AssertionError, match="distinct"):
        SEL.check_selection(x, dup, 4)
    with pytest.raises(AssertionError, match="outside"):
        SEL.check_selection(x, torch.tensor([[0, 1, 2, 10], good[1].tolist()]), 4)
    with pytest.raises(AssertionError, match="shape"):
        SEL.check_selection(x, good[:, :3], 4)
    with pytest.raises(AssertionError, match="not ascending"):
        SEL.check_selection(x, good.flip(1), 4, sorted=True)
    with pytest.raises(AssertionError, match="center"):
        SEL.check_selection(x, good, 4, center=int(np.setdiff1d(np.arange(10), good[0]).min()))
    ic = torch.from_numpy(O.brute_dpc_knn(x, 4, center=5, keep_center=False))
    SEL.check_selection(x, ic, 4, center=5, keep_center=False)
    with pytest.raises(AssertionError, match="excluded center"):
        SEL.check_selection(x, torch.from_numpy(O.brute_dpc_knn(x, 4, center=5)), 4, center=5,
                            keep_center=False)
    iu = torch.from_numpy(O.brute_dpc_knn(x, 4, center=5, sorted=False))
    SEL.check_selection(x, iu, 4, center=5, sorted=False)
    with pytest.raises(AssertionError, match="last"):
        SEL.check_selection(x, iu.roll(1, dims=1), 4, center=5, sorted=False)
    # masks: a masked token may not be picked over a real one; masked ones go by index
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, :7] = False  # 3 real tokens: 7, 8, 9
    im = torch.from_numpy(O.brute_dpc_knn(x, 5, mask=mask))
    assert im.tolist() == [[0, 1, 7, 8, 9]] * 2
    SEL.check_selection(x, im, 5, token_mask=mask)
    with pytest.raises(AssertionError, match="masked"):
        SEL.check_selection(x, torch.tensor([[0, 1, 2, 7, 8]] * 2), 5, token_mask=mask)
    with pytest.raises(AssertionError, match="lower index"):
        SEL.check_selection(x, torch.tensor([[0, 2, 7, 8, 9]] * 2), 5, token_mask=mask)
    # a NaN sample is checked for index validity only, but that is checked
    xn = x.clone()
    xn[1] = math.nan
    SEL.check_selection(xn, torch.tensor([good[0].tolist(), [9, 3, 1, 0]]), 4)
    with pytest.raises(AssertionError, match="distinct"):
        SEL.check_selection(xn, torch.tensor([good[0].tolist(), [3, 3, 1, 0]]), 4)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_checker_accepts_identical_frames_either_way(dtype):
    """Identical frames are interchangeable (their order is decided by rounding): swapping a
    picked duplicate for an unpicked copy of it is accepted."""
    swapped_any = False
    for seed in range(4):
        x = make_x(400 + seed, 1, 14, 6, dtype, "padded")  # frames 0..3 identical
        for f in (3, 5, 8):
            oi = O.brute_dpc_knn(x, f)[0].tolist()
            dup = [t for t in oi if t <= 3]
            free = [t for t in range(4) if t not in oi]
            if dup and free:
                alt = sorted([t for t in oi if t != dup[0]] + [free[0]])
                SEL.check_selection(x, torch.tensor([alt]), f)
                SEL.assert_same_or_near_tie(torch.tensor([oi]), torch.tensor([alt]), x, f)
                swapped_any = True
    assert swapped_any


def test_check_assignment_rejects():
    x = make_x(500, 2, 10, 4, F64, "smooth")
    idx, asg = O.brute_dpc_knn(x, 3, return_assignment=True)
    SEL.check_assignment(x, idx, asg)
    D = O.brute_distance(x)
    bad = asg.copy()
    i = next(t for t in range(10) if t not in idx[0])
    far = int(np.argmax(D[0, i, idx[0]]))
    assert far != asg[0, i]
    bad[0, i] = far
    with pytest.raises(AssertionError, match="definitely nearer"):
        SEL.check_assignment(x, idx, bad)
    bad = asg.copy()
    bad[0, idx[0, 1]] = 0
    with pytest.raises(AssertionError, match="to itself"):
        SEL.check_assignment(x, idx, bad)
    bad = asg.copy()
    bad[1, 0] = 3
    with pytest.raises(AssertionError, match="outside"):
        SEL.check_assignment(x, idx, bad)


# ---- 6. token_pruning_cluster ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("center", [None, 4])
@pytest.mark.parametrize("with_pos", [False, True])
def test_token_pruning_cluster(with_pos, center, dtype):
    B, Fr, J, C, f = 2, 12, 3, 8, 5
    g = torch.Generator().manual_seed(600)
    x = (torch.randn(B, Fr, J, C, generator=g, dtype=F64).cumsum(1) * 0.3).to(dtype)
    x.requires_grad_()
    pos = torch.randn(1, f, C, generator=g, dtype=F64).to(dtype).requires_grad_() if with_pos else None
    kept, index = R.token_pruning_cluster(x, f, k=2, center=center, pos_embed=pos)
    assert kept.shape == (B, f, J, C) and index.shape == (B, f) and kept.dtype == dtype
    pooled = x.detach().mean(dim=2)
    SEL.check_selection(pooled, index, f, 2, center=center, sorted=True)
    bk, bi = O.brute_token_pruning_cluster(x, f, 2, center, pos)
    amb = ambiguous_rows(SEL.selection_ambiguities(pooled, bi, f, 2, center=center, sorted=True))
    for b in range(B):
        if b not in amb:
            assert index[b].tolist() == bi[b].tolist()
    X = x.detach()
    expected = torch.stack([X[b, index[b]] for b in range(B)])
    if pos is not None:
        expected = expected + pos.detach()[:, :, None, :]
    assert torch.equal(kept.detach(), expected)
    if dtype == F64 and all(index[b].tolist() == bi[b].tolist() for b in range(B)):
        np.testing.assert_allclose(kept.detach().numpy(), bk, rtol=0, atol=1e-15)
    # gradient: scatter-add into the kept frames only
    w = torch.randn(kept.shape, generator=g, dtype=F64).to(dtype)
    (kept * w).sum().backward()
    G = torch.zeros_like(X)
    for b in range(B):
        for p in range(f):
            G[b, index[b, p]] += w[b, p]
    assert torch.equal(x.grad, G)
    unkept = [(b, t) for b in range(B) for t in range(Fr) if t not in index[b].tolist()]
    assert unkept and all(torch.all(x.grad[b, t] == 0) for b, t in unkept)
    if pos is not None:
        torch.testing.assert_close(pos.grad, w.sum(dim=(0, 2))[None], rtol=1e-6, atol=1e-6)


# ---- 7. token_recovering_attention --------------------------------------------------------------


def tra_inputs(seed, S, L, M, C, shared, bias, dtype=F64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype)

    q = r(1 if shared else S, L, C)
    x = r(S, M, C)
    ws = [r(C, C, s=C ** -0.5) for _ in range(4)]
    bs = [r(C, s=0.1) if bias else None for _ in range(4)]
    return q, x, ws, bs


def tra_call(q, x, ws, bs, H, **kw):
    return R.token_recovering_attention(q, x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], ws[3],
                                        bs[3], H, **kw)


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_token_recovering_attention(shared, bias, residual, heads):
    S, L, M, C = 3, 5, 4, 8
    q, x, ws, bs = tra_inputs(700 + heads, S, L, M, C, shared, bias)
    for scale in (None, 0.7):
        out = tra_call(q, x, ws, bs, heads, scale=scale, residual=residual)
        assert out.shape == (S, L, C) and out.dtype == F64
        ref = O.brute_token_recovering_attention(q, x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2],
                                                 ws[3], bs[3], heads, scale, residual)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    q32, x32 = q.float(), x.float()
    ws32 = [w.float() for w in ws]
    bs32 = [None if b is None else b.float() for b in bs]
    out32 = tra_call(q32, x32, ws32, bs32, heads, residual=residual)
    assert out32.dtype == F32
    ref = O.brute_token_recovering_attention(q32, x32, ws32[0], bs32[0], ws32[1], bs32[1], ws32[2],
                                             bs32[2], ws32[3], bs32[3], heads, None, residual)
    np.testing.assert_allclose(out32.double().numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_token_recovering_attention_gradients(shared, bias):
    S, L, M, C, H = 2, 3, 2, 4, 2
    q, x, ws, bs = tra_inputs(800, S, L, M, C, shared, bias)
    leaves = [q, x] + ws + [b for b in bs if b is not None]
    for t in leaves:
        t.requires_grad_()

    def fn(*args):
        q_, x_ = args[0], args[1]
        w_ = list(args[2:6])
        b_ = list(args[6:]) if bias else [None] * 4
        return tra_call(q_, x_, w_, b_, H)

    assert torch.autograd.gradcheck(fn, tuple(leaves))
    if shared:
        # The shared query's gradient is the sum over the S sequences of the per-sequence ones.
        out = fn(*leaves)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        (gq,) = torch.autograd.grad(out, q, gout)
        qe = q.detach().expand(S, L, C).clone().requires_grad_()
        out_e = fn(qe, *leaves[1:])
        (gqe,) = torch.autograd.grad(out_e, qe, gout)
        torch.testing.assert_close(gq, gqe.sum(0, keepdim=True), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, out_e, rtol=0, atol=0)
