"""Hypothesis fuzzing of every op on every backend that runs here, against the float64 oracle.

Inputs are drawn over shapes (B = 0..5, N = 1..300, C = 1..300, odd sizes included), k, f, masks
(random, all-masked-but-one, all masked), centers, exclude, dtypes (float16, bfloat16, float32 and,
on cpu/reference, float64), clip kinds (random, smooth, large offset, edge-padded, integer grid,
constant, duplicated frames) and layouts (contiguous, transposed, batch-expanded, strided views).
Each result is judged against tests/oracle.py (float64 brute force): values within the error model
of the backend's dtype, selections tie-aware (tests/selection.py: a pick may differ from the
oracle's only at a near-tie), topf_select exactly. TRA's backward is judged against the reference
run in float64. Triton runs under the interpreter here, so its shapes are capped (N, C <= 64).

Profiles (registered in tests/conftest.py):

    python -m pytest tests/test_fuzz.py                          # "ci": fixed examples, ~1.5 min here
    HOT_KERNELS_FUZZ=long python -m pytest tests/test_fuzz.py    # 10x the examples, random seeds (~6 min)
    python -m pytest tests/test_fuzz.py --hypothesis-profile=long --hypothesis-seed=123
    HOT_KERNELS_FUZZ=quick python -m pytest tests/test_fuzz.py   # a third (the sanitizer run)

Each test's example count is its base count scaled by the profile's max_examples / 100. A failure
prints the minimal example and a @reproduce_failure blob.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hot_kernels as hk
from targets import runnable
from hot_kernels import reference as R
from hot_kernels.compat import cluster_dpc_knn_center
from hot_kernels.functional import _dpc_knn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle as O  # noqa: E402
import selection as SEL  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


# ---- targets and budgets ---------------------------------------------------------------------------


class Target:
    def __init__(self, backend, device):
        self.backend, self.device = backend, torch.device(device)
        small = backend == "triton" and self.device.type == "cpu"  # the interpreter: keep it small
        self.max_n = 64 if small else 300
        self.max_c = 64 if small else 300
        self.max_b = 3 if small else 5
        self.max_k = 32 if backend in ("triton", "cuda") else 300
        self.dtypes = (F32, F16, BF16) if backend in ("triton", "cuda") else (F32, F64, F16, BF16)
        self.budget = 0.35 if small else 1.0

    def __repr__(self):
        return f"{self.backend}-{self.device.type}"


def _targets():
    return [Target(b, d) for b, d in runnable()]


TARGETS = _targets()
TARGET_IDS = [str(t) for t in TARGETS]


def examples(base: int, target: Target) -> int:
    """The example count of a test: base, scaled by the target and the profile (ci: 100)."""
    return max(2, round(base * target.budget * settings().max_examples / 100))


def fuzz(base):
    """Decorator: one hypothesis test per target, with its own example budget."""
    def deco(fn):
        def make(target):
            return settings(max_examples=examples(base, target))(given(data=st.data())(
                lambda data: fn(target, data)))

        cases = {str(t): make(t) for t in TARGETS}

        @pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
        def test(target):
            cases[str(target)]()

        test.__name__ = fn.__name__
        test.__doc__ = fn.__doc__
        return test

    return deco


# ---- drawing inputs -------------------------------------------------------------------------------------

KINDS = ("randn", "smooth", "offset", "padded", "integer", "constant", "duplicated")
LAYOUTS = ("contiguous", "transposed", "expanded", "strided")
ODD = (1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 243, 255, 256, 257, 300)
WORK = 6e6  # cap on N^2 C per sample, to bound the float64 oracle's time


def size(data, lo, hi, label):
    small = st.integers(lo, min(hi, 24))
    odd = st.sampled_from([v for v in ODD if lo <= v <= hi] or [lo])
    return data.draw(st.one_of(small, odd, st.integers(lo, hi)), label=label)


def make_clip(data, target, B, N, C, dtype, label="x"):
    """A (B, N, C) clip of a drawn kind and layout (values exact in dtype: the oracle sees them)."""
    kind = data.draw(st.sampled_from(KINDS), label=f"{label} kind")
    layout = data.draw(st.sampled_from(LAYOUTS), label=f"{label} layout")
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label=f"{label} seed")
    g = torch.Generator().manual_seed(seed)
    Bx = 1 if layout == "expanded" else B
    x = torch.randn(Bx, N, 2 * C if layout == "strided" else C, generator=g, dtype=F64)
    if kind == "smooth":
        x = x.cumsum(1) / math.sqrt(max(N, 1))
    elif kind == "offset":  # a large common offset: where a Gram-form distance cancels
        x = 0.3 * x + 6.0 * torch.randn(Bx, 1, x.shape[2], generator=g, dtype=F64)
    elif kind == "padded" and N >= 4:
        x = x.cumsum(1) * 0.3
        x[:, : N // 4] = x[:, N // 4: N // 4 + 1]
        x[:, -2:] = x[:, -3:-2]
    elif kind == "integer":
        x = torch.randint(-3, 4, x.shape, generator=g).to(F64)
    elif kind == "constant":
        x = x[:, :1].expand_as(x).clone()
    elif kind == "duplicated":
        rep = int(torch.randint(2, 5, (1,), generator=g))
        x = x[:, torch.arange(N) // rep]
    x = x.to(dtype).to(target.device)
    if layout == "strided":
        x = x[:, :, ::2]
    elif layout == "expanded":
        x = x.expand(B, N, C)
    elif layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def draw_shape(data, target, max_b=None):
    B = data.draw(st.integers(0, target.max_b if max_b is None else max_b), label="B")
    N = size(data, 1, target.max_n, "N")
    C = size(data, 1, target.max_c, "C")
    C = max(1, min(C, int(WORK // (N * N)) or 1))
    return B, N, C


def draw_mask(data, target, B, N):
    kind = data.draw(st.sampled_from(["none", "none", "random", "one-real", "all-masked", "mixed"]), label="mask")
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="mask seed"))
    m = torch.rand(B, N, generator=g) < 0.6
    if kind in ("one-real", "mixed"):
        rows = range(B) if kind == "one-real" else range(0, B, 2)
        for b in rows:
            m[b] = False
            m[b, int(torch.randint(0, N, (1,), generator=g))] = True
    elif kind == "all-masked":
        m[:] = False
    if kind == "mixed" and B > 1:
        m[1] = False
    return m.to(target.device)


def draw_dtype(data, target):
    return data.draw(st.sampled_from(target.dtypes), label="dtype")


def cpu(t):
    return None if t is None else t.detach().cpu()


# ---- tolerances ---------------------------------------------------------------------------------------------

GRAM_RTOL = {F64: 1e-13, F32: 1e-5, BF16: 1e-5, F16: 1e-5}


def _sq_norms(x):
    X = O.as_f64(x)
    return (X * X).sum(-1)


def check_distance(D, x, y=None):
    """D within the Gram-form error bound of the float64 distance, plus the rounding of D."""
    want = O.brute_distance(x, y)
    C = x.shape[-1]
    sq_x = _sq_norms(x)
    sq_y = sq_x if y is None else _sq_norms(y)
    bound = GRAM_RTOL[x.dtype] * (sq_x[:, :, None] + sq_y[:, None, :]) / C
    got = O.as_f64(D)
    out_rounding = 2 * float(torch.finfo(D.dtype).eps) * want
    allowed = np.sqrt(want * want + bound) - want + out_rounding + 1e-300
    err = np.abs(got - want)
    assert np.all(err <= allowed), f"max error {err.max():.3g}, worst excess {(err / allowed).max():.3g}x"


# ---- the tests ------------------------------------------------------------------------------------------------


@fuzz(30)
def test_fuzz_pairwise_distance(target, data):
    B, N, C = draw_shape(data, target)
    dtype = draw_dtype(data, target)
    x = make_clip(data, target, B, N, C, dtype)
    with_y = data.draw(st.booleans(), label="with y")
    y = make_clip(data, target, B, size(data, 1, min(target.max_n, 64), "M"), C, dtype, "y") if with_y else None
    D = hk.pairwise_distance(x, y, backend=target.backend)
    assert D.shape == (B, N, N if y is None else y.shape[1]) and D.dtype == dtype
    D, xc, yc = cpu(D), cpu(x), cpu(y)
    check_distance(D, xc, yc)
    if y is None:
        assert torch.equal(D, D.transpose(1, 2)), "D must be bit-symmetric"
        assert (D.diagonal(dim1=1, dim2=2) == 0).all()
    if dtype == F64 and not with_y:  # the backward, where float64 leaves no cancellation to speak of
        kind_ok = bool((D + torch.eye(N, dtype=F64) > 1e-3).all())  # no (near-)duplicate frames
        if kind_ok:
            leaf = x.detach().clone().requires_grad_()
            g = torch.randn(B, N, N, dtype=F64, generator=torch.Generator().manual_seed(1)).to(target.device)
            (got,) = torch.autograd.grad(hk.pairwise_distance(leaf, backend=target.backend), leaf, g)
            ref = xc.clone().requires_grad_()
            (want,) = torch.autograd.grad(R.pairwise_distance(ref), ref, g.cpu())
            torch.testing.assert_close(cpu(got), want, rtol=1e-8, atol=1e-10)


@fuzz(30)
def test_fuzz_knn_density(target, data):
    B, N, C = draw_shape(data, target)
    dtype = draw_dtype(data, target)
    x = make_clip(data, target, B, N, C, dtype)
    k = data.draw(st.integers(1, min(N, target.max_k)), label="k")
    mask = draw_mask(data, target, B, N)
    log = data.draw(st.booleans(), label="log")
    got = cpu(hk.knn_density(x, k, mask, log=log, backend=target.backend))
    assert got.shape == (B, N) and got.dtype == (F64 if dtype == F64 else F32)
    eps = float(torch.finfo(got.dtype).eps)
    tiny = float(torch.finfo(got.dtype).tiny)
    for b, S in enumerate(SEL.selection_intervals(cpu(x), k, cpu(mask))):
        real = S.real
        g = got[b].double().numpy()
        assert np.all(g[~real] == (-math.inf if log else 0.0)), "masked tokens: log rho = -inf, rho = 0"
        lr, tau = S.lr[real], S.tau[real]
        if log:
            assert np.all(np.abs(g[real] - lr) <= tau + 4 * eps * np.abs(lr) + 1e-300), (g[real], lr, tau)
        else:
            want = np.exp(lr)
            assert np.all(np.abs(g[real] - want) <= want * (np.expm1(tau) + 4 * eps) + 2 * tiny), (g[real], want)


@fuzz(30)
def test_fuzz_dpc_delta(target, data):
    B, N, C = draw_shape(data, target)
    dtype = draw_dtype(data, target)
    x = make_clip(data, target, B, N, C, dtype)
    mask = draw_mask(data, target, B, N)
    dkind = data.draw(st.sampled_from(["log_rho", "rho", "ties", "random", "with-nan"]), label="density")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="density seed"))
    if dkind in ("log_rho", "rho"):
        density = hk.knn_density(x, min(2, N), mask, log=dkind == "log_rho", backend=target.backend)
    else:
        density = torch.randint(0, 3, (B, N), generator=g).double() if dkind == "ties" else torch.randn(B, N, generator=g,
                                                                                                       dtype=F64)
        if dkind == "with-nan":
            density[torch.rand(B, N, generator=g) < 0.3] = math.nan
            density[torch.rand(B, N, generator=g) < 0.2] = -math.inf
        density = density.to(data.draw(st.sampled_from([F32, dtype]), label="density dtype")).to(target.device)
    delta, parent = hk.dpc_delta(x, density, mask, backend=target.backend)
    delta, parent = cpu(delta), cpu(parent)
    assert delta.shape == parent.shape == (B, N) and parent.dtype == torch.int64
    assert delta.dtype == (F64 if dtype == F64 else F32)
    eps = 4 * float(torch.finfo(delta.dtype).eps)
    real = O.as_mask(cpu(mask), B, N)
    dens = O.as_f64(cpu(density))
    for b, S in enumerate(SEL.selection_intervals(cpu(x), 1, cpu(mask))):
        key = O._key(dens[b], real[b])
        R_ = np.flatnonzero(real[b])
        largest_lo = S.Dlo[np.ix_(R_, R_)].max() if len(R_) else 0.0
        largest_hi = S.Dhi[np.ix_(R_, R_)].max() if len(R_) else 0.0
        idx = np.arange(N)
        # higher[i, j]: token j is higher than token i (key_j > key_i, or equal and j < i)
        higher = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
        lo_all = np.where(higher, S.Dlo, np.inf).min(1)
        hi_all = np.where(higher, S.Dhi, np.inf).min(1)
        for i in range(N):
            d, p = float(delta[b, i]), int(parent[b, i])
            if not higher[i].any():
                assert p == i, f"sample {b}: token {i} is the highest, parent {p}"
                assert largest_lo * (1 - eps) <= d <= largest_hi * (1 + eps), (b, i, d, largest_lo, largest_hi)
                continue
            lo, hi = lo_all[i], hi_all[i]
            assert lo * (1 - eps) <= d <= hi * (1 + eps), f"sample {b} token {i}: delta {d} not in [{lo}, {hi}]"
            assert 0 <= p < N and higher[i, p], f"sample {b} token {i}: parent {p} is not higher"
            assert S.Dlo[i, p] * (1 - eps) <= d <= S.Dhi[i, p] * (1 + eps), f"sample {b} token {i}: parent {p} not at delta"


@fuzz(40)
def test_fuzz_topf_select(target, data):
    """Exactly the oracle's indices: no rounding is involved (ties, NaN, +-inf, exclude)."""
    B = data.draw(st.integers(0, target.max_b), label="B")
    N = size(data, 1, target.max_n, "N")
    dtype = draw_dtype(data, target)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="seed"))
    kind = data.draw(st.sampled_from(["randn", "ties", "constant", "special"]), label="kind")
    if kind == "ties":
        score = torch.randint(-2, 3, (B, N), generator=g).double()
    elif kind == "constant":
        score = torch.full((B, N), 0.25, dtype=F64)
    else:
        score = torch.randn(B, N, generator=g, dtype=F64)
    if kind == "special":
        u = torch.rand(B, N, generator=g)
        score[u < 0.15] = math.nan
        score[(u >= 0.15) & (u < 0.25)] = math.inf
        score[(u >= 0.25) & (u < 0.35)] = -math.inf
    score = score.to(dtype).to(target.device)
    if data.draw(st.booleans(), label="transposed"):
        score = score.t().contiguous().t()
    ex_kind = data.draw(st.sampled_from(["none", "int", "tensor"] if N > 1 else ["none"]), label="exclude")
    exclude = None
    if ex_kind == "int":
        exclude = data.draw(st.integers(0, N - 1), label="exclude int")
    elif ex_kind == "tensor":
        exclude = torch.randint(0, N, (B,), generator=g).to(target.device)
    f = data.draw(st.integers(1, N - (exclude is not None)), label="f")
    sorted_ = data.draw(st.booleans(), label="sorted")
    got = cpu(hk.topf_select(score, f, sorted_, exclude, backend=target.backend))
    want = O.brute_topf(cpu(score), f, sorted_, cpu(exclude) if isinstance(exclude, torch.Tensor) else exclude)
    assert got.shape == (B, f) and got.dtype == torch.int64
    assert np.array_equal(got.numpy(), want), (got, want)


@fuzz(30)
def test_fuzz_dpc_knn(target, data):
    B, N, C = draw_shape(data, target)
    dtype = draw_dtype(data, target)
    x = make_clip(data, target, B, N, C, dtype)
    k = data.draw(st.integers(1, min(N, target.max_k, 8)), label="k")
    mask = draw_mask(data, target, B, N)
    center = data.draw(st.one_of(st.none(), st.integers(0, N - 1)), label="center")
    keep_center = center is None or N == 1 or data.draw(st.booleans(), label="keep_center")
    f = data.draw(st.integers(1, N if keep_center else N - 1), label="f")
    sorted_ = data.draw(st.booleans(), label="sorted")
    want_asg = data.draw(st.booleans(), label="return_assignment")
    if keep_center:
        out = hk.dpc_knn(x, f, k, mask, center, want_asg, sorted=sorted_, backend=target.backend)
        index, asg = out if want_asg else (out, None)
    elif not sorted_:  # the published convention: cluster_dpc_knn_center
        index, asg = cluster_dpc_knn_center(x, f, k, center, mask, backend=target.backend)
    else:
        index, asg = _dpc_knn("dpc_knn", x, f, k, mask, center, want_asg, True, False, target.backend)
    index = cpu(index)
    assert index.shape == (B, f) and index.dtype == torch.int64
    xc = cpu(x)
    # Half inputs are computed in float32: judge against the float32 values of the rounded input.
    xj = xc.float() if dtype in (F16, BF16) else xc
    SEL.check_selection(xj, index, f, k, cpu(mask), center, keep_center, sorted=sorted_)
    if asg is not None:
        SEL.check_assignment(xj, index, cpu(asg))


@fuzz(15)
def test_fuzz_token_pruning_cluster(target, data):
    B = data.draw(st.integers(0, min(target.max_b, 3)), label="B")
    F = size(data, 1, min(target.max_n, 128), "F")
    J = data.draw(st.integers(1, 5), label="J")
    C = size(data, 1, min(target.max_c, 64), "C")
    dtype = draw_dtype(data, target)
    x = make_clip(data, target, B, F, J * C, dtype).reshape(B, F, J, C) if B else torch.zeros(
        0, F, J, C, dtype=dtype, device=target.device)
    k = data.draw(st.integers(1, min(F, target.max_k, 5)), label="k")
    center = data.draw(st.one_of(st.none(), st.integers(0, F - 1)), label="center")
    f = data.draw(st.integers(1, F), label="f")
    pos_b = data.draw(st.sampled_from([0, 1, max(B, 1)]), label="pos batch")
    pos = (torch.randn(pos_b, f, C, dtype=F64, generator=torch.Generator().manual_seed(3)).to(dtype).to(target.device)
           if pos_b and (pos_b == 1 or pos_b == B) else None)
    leaf = x.detach().clone().requires_grad_()
    kept, index = hk.token_pruning_cluster(leaf, f, k, center, pos, backend=target.backend)
    assert kept.shape == (B, f, J, C) and kept.dtype == dtype and index.shape == (B, f)
    xc, index = cpu(x), cpu(index)
    pooled = xc.to(F64 if dtype == F64 else F32).mean(2)
    SEL.check_selection(pooled, index, f, k, center=center, sorted=True)
    want = xc.gather(1, index[:, :, None, None].expand(B, f, J, C))
    if pos is not None:
        want = want + cpu(pos)[:, :, None, :]
    if target.backend == "triton" and target.device.type == "cpu" and dtype == BF16:
        # The Triton interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to nearest,
        # like torch): up to one bfloat16 ulp apart.
        torch.testing.assert_close(cpu(kept), want, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(cpu(kept), want)
    grad = torch.randn(B, f, J, C, dtype=F64, generator=torch.Generator().manual_seed(4)).to(dtype)
    (gx,) = torch.autograd.grad(kept, leaf, grad.to(target.device))
    want_gx = torch.zeros(B, F, J, C, dtype=dtype).scatter(1, index[:, :, None, None].expand(B, f, J, C), grad)
    assert torch.equal(cpu(gx), want_gx)


# (rtol, atol relative to the largest |value| of the tensor, or of all the gradients): elementwise
# |got - want| <= rtol |want| + atol max|want|. Scaled because a saturated softmax (large scale * head dim) makes the gradients
# cancel: the lse-recomputing backward of the compiled backends then loses up to ~1e-4 of the
# largest gradient in float32 (the plain float32 autograd ~1e-6; float64 the same ratio).
TRA_TOL = {F64: dict(fwd=(1e-9, 1e-11), bwd=(1e-8, 1e-10)), F32: dict(fwd=(5e-5, 5e-5), bwd=(2e-4, 3e-4))}


def close_scaled(got, want, tol, what="", scale=None):
    rtol, arel = tol
    got, want = got.double(), want.double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if want.numel() == 0:
        return
    scale = float(want.abs().max()) if scale is None else scale
    allowed = rtol * want.abs() + arel * scale + 1e-300
    err = (got - want).abs()
    assert bool((err <= allowed).all()), (f"{what}: max error {float(err.max()):.3g}, worst excess "
                                          f"{float((err / allowed).max()):.3g}x (max |want| {float(want.abs().max()):.3g})")


@fuzz(20)
def test_fuzz_token_recovering_attention(target, data):
    S = data.draw(st.integers(0, 4), label="S")
    L = size(data, 1, 40, "L")
    M = size(data, 1, 40, "M")
    H = data.draw(st.integers(1, 4), label="heads")
    d = data.draw(st.integers(1, 16 if target.max_c <= 64 else 75), label="head dim")
    C = H * d
    dtype = data.draw(st.sampled_from([t for t in target.dtypes if t in (F32, F64, BF16)]), label="dtype")
    shared = data.draw(st.booleans(), label="shared")
    bias = data.draw(st.booleans(), label="bias")
    residual = data.draw(st.booleans(), label="residual")
    scale = data.draw(st.one_of(st.none(), st.floats(0.05, 2.0)), label="scale")
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype)

    w = C ** -0.5
    b = (lambda: t(C, s=0.1)) if bias else (lambda: None)
    args = [t(1 if shared else S, L, C), t(S, M, C), t(C, C, s=w), b(), t(C, C, s=w), b(), t(C, C, s=w), b(),
            t(C, C, s=w), t(C, s=0.1)]
    expand = shared and S > 1 and data.draw(st.booleans(), label="expanded query")
    leaves = [a.to(target.device).requires_grad_() if a is not None else None for a in args]
    inputs = list(leaves)
    if expand:  # a broadcast view of the shared query (what einops.repeat gives): projected once
        inputs[0] = leaves[0].expand(S, L, C)
    out = hk.token_recovering_attention(*inputs, num_heads=H, scale=scale, residual=residual, backend=target.backend)
    assert out.shape == (S, L, C) and out.dtype == dtype
    want = O.brute_token_recovering_attention(*[cpu(a) for a in args], num_heads=H, scale=scale, residual=residual)
    if dtype == BF16:  # normwise: bfloat16 rounds every input and output
        err = np.linalg.norm(O.as_f64(cpu(out)) - want) / max(np.linalg.norm(want), 1e-300)
        assert err <= 3e-2, err
        return
    close_scaled(cpu(out), torch.from_numpy(want), TRA_TOL[dtype]["fwd"], "out")
    gout = torch.randn(S, L, C, generator=g, dtype=F64)
    present = [a for a in leaves if a is not None]
    grads = torch.autograd.grad(out, present, gout.to(dtype).to(target.device), allow_unused=True)
    ref_leaves = [cpu(a).double().requires_grad_() if a is not None else None for a in args]
    ref_out = R.token_recovering_attention(*ref_leaves, num_heads=H, scale=scale, residual=residual)
    ref_present = [a for a in ref_leaves if a is not None]
    want_grads = torch.autograd.grad(ref_out, ref_present, gout.to(dtype).double(), allow_unused=True)
    want_grads = [torch.zeros_like(r) if w is None else w for w, r in zip(want_grads, ref_present)]
    # A gradient that is zero in exact arithmetic (bk: softmax ignores a per-query constant) is
    # rounding noise of the size of the others: judge every gradient on the scale of them all.
    scale = max([float(w.abs().max()) for w in want_grads if w.numel()] + [0.0])
    for i, (got_g, want_g) in enumerate(zip(grads, want_grads)):
        if got_g is None:
            got_g = torch.zeros_like(present[i])
        assert got_g.dtype == dtype
        close_scaled(cpu(got_g), want_g, TRA_TOL[dtype]["bwd"], f"gradient {i}", scale)
