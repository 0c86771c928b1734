"""Every backend that runs on this machine against the reference backend (the oracle).

Fresh random inputs per case; outputs poisoned before the kernels run (the ops allocate their
own outputs: torch's fill_uninitialized_memory makes every at::empty NaN while a test runs, and
the Triton wrappers fill theirs with NaN / -2^62 under HOT_KERNELS_POISON=1, which
tests/conftest.py sets), and every call is checked on full shape and on every element; tolerances
per dtype from TOL; selections compared exactly in float64 and tie-aware otherwise
(tests/selection.py proves a differing pick was a near-tie). Targets are (backend, device) pairs:
cpu and triton (interpreted) on CPU tensors here; cuda and triton on CUDA tensors with a GPU.
"""
import contextlib
import math

import pytest
import torch

import hot_kernels as hk
from targets import runnable
from hot_kernels import reference as R
from hot_kernels.functional import _dpc_knn
from selection import assert_same_or_near_tie, check_assignment, check_selection



class Target:
    """A backend and the device its inputs live on: tests build inputs on the CPU, ``run`` moves
    them to the device (differentiably) and brings the outputs back to the CPU for checking."""

    def __init__(self, backend: str, device: str, isa: str | None = None):
        self.backend, self.device, self.isa = backend, torch.device(device), isa

    def __repr__(self):
        # cpu-cpu is the path this CPU takes by default; cpu.avx2-cpu, cpu.generic-cpu the lower ones.
        return f"{self.backend}{'' if self.isa is None else '.' + self.isa}-{self.device.type}"

    def require(self, op: str, dtype: torch.dtype = torch.float32) -> None:
        why = hk.available_backends(self.device, op, dtype)[self.backend]
        if why is not None:
            pytest.skip(f"{self}: {why}")

    def to(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.to(o) for o in obj)
        return obj

    def run(self, fn, *args, **kwargs):
        with contextlib.nullcontext() if self.isa is None else hk.use_cpu_isa(self.isa):
            out = fn(*self.to(args), **{k: self.to(v) for k, v in kwargs.items()}, backend=self.backend)
            return _to_cpu(out)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    return obj


def _targets():
    """Every runnable (backend, device), and the cpu backend once more on each lower instruction-set
    path this CPU runs (AVX2 and generic code on an AVX-512 machine: CI tests every path whatever
    machine it gets)."""
    found = [Target(b, d) for b, d in runnable(backends_on_cpu=("cpu", "triton"))]
    if any(t.backend == "cpu" for t in found):
        found += [Target("cpu", "cpu", isa) for isa in hk.supported_cpu_isas()[1:]]
    return found


# Every test here runs with uninitialised memory poisoned (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("poison_uninitialised_memory")


BACKENDS = _targets()
if not BACKENDS:
    pytest.skip("no non-reference backend runs here", allow_module_level=True)


# Tolerances for values, per dtype of the input (forward, backward).
TOL = {
    torch.float64: dict(fwd=dict(rtol=1e-10, atol=1e-12), bwd=dict(rtol=1e-8, atol=1e-10)),
    torch.float32: dict(fwd=dict(rtol=2e-5, atol=2e-6), bwd=dict(rtol=1e-4, atol=1e-5)),
    torch.bfloat16: dict(fwd=dict(rtol=2e-2, atol=2e-2), bwd=dict(rtol=5e-2, atol=5e-2)),
    torch.float16: dict(fwd=dict(rtol=5e-3, atol=5e-3), bwd=dict(rtol=2e-2, atol=2e-2)),
}


def clip(B, N, C, seed, dtype=torch.float32, dup=True, smooth=False):
    """Random (B, N, C) clip; dup=True repeats the first frames (edge padding makes exact ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    if smooth:
        x = x.cumsum(1) / math.sqrt(N)
    if dup and N >= 4:
        x[:, :2] = x[:, 2:3]
    return x.to(dtype)


def close(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    torch.testing.assert_close(got, want, **tol, equal_nan=True)


# ---- pairwise_distance --------------------------------------------------------------------------


# Error model for distances (the bound of a Gram-form evaluation, which cancels for nearby
# frames): |D'^2 - D^2| <= GRAM_RTOL * (|x_i|^2 + |y_j|^2) / C, plus rounding of D itself. The
# reference in the backend's own dtype is *not* the yardstick near zero (its own Gram form is off
# by ~sqrt(eps) there): the reference run in float64 on the same input is.
GRAM_RTOL = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def close_distance(D, x, y=None):
    want = R.pairwise_distance(x.double(), None if y is None else y.double())
    yy = x if y is None else y
    C = x.shape[-1]
    sq_x, sq_y = x.double().square().sum(-1), yy.double().square().sum(-1)
    bound = GRAM_RTOL[x.dtype] * (sq_x[:, :, None] + sq_y[:, None, :]) / C
    out_rounding = 2 * torch.finfo(D.dtype).eps * want  # D is returned in x's dtype
    err = (D.double() - want).abs()
    allowed = torch.sqrt(want.square() + bound) - want + out_rounding + 1e-300
    assert D.dtype == x.dtype and D.shape == want.shape
    assert (err <= allowed).all(), f"max error {err.max().item():.3g}, worst excess {(err / allowed).max().item():.3g}x"


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,N,M,C", [(2, 7, 5, 3), (3, 33, 17, 64), (1, 1, 1, 1), (0, 4, 3, 2)])
def test_pairwise_distance(backend, dtype, B, N, M, C):
    backend.require("pairwise_distance", dtype)
    x, y = clip(B, N, C, 1, dtype), clip(B, M, C, 2, dtype, dup=False)
    D = backend.run(hk.pairwise_distance, x)
    close_distance(D, x)
    assert torch.equal(D, D.transpose(1, 2)), "D must be bit-symmetric"
    assert (D.diagonal(dim1=1, dim2=2) == 0).all(), "D[i, i] must be exactly 0"
    close_distance(backend.run(hk.pairwise_distance, x, y), x, y)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_distance_backward(backend, dtype):
    backend.require("pairwise_distance", dtype)
    x, y = clip(2, 9, 6, 3, dtype), clip(2, 4, 6, 4, dtype, dup=False)  # dup: zero distances
    g = torch.randn(2, 9, 9, dtype=dtype)
    for with_y in (False, True):
        leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
        ref = [x.clone().requires_grad_(), y.clone().requires_grad_()]
        yy, yr = (leaves[1], ref[1]) if with_y else (None, None)
        gg = torch.randn(2, 9, 4, dtype=dtype) if with_y else g
        backend.run(hk.pairwise_distance, leaves[0], yy).backward(gg)
        R.pairwise_distance(ref[0], yr).backward(gg)
        assert torch.isfinite(leaves[0].grad).all()
        close(leaves[0].grad, ref[0].grad, TOL[dtype]["bwd"])
        if with_y:
            close(leaves[1].grad, ref[1].grad, TOL[dtype]["bwd"])


# ---- knn_density, dpc_delta, topf_select ---------------------------------------------------------


def _mask(B, N, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "random":
        m = torch.rand(B, N, generator=g) > 0.3
    elif kind == "one-real":
        m = torch.zeros(B, N, dtype=torch.bool)
        m[:, N // 2] = True
    else:  # "all-masked"
        m = torch.zeros(B, N, dtype=torch.bool)
    return m


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "random", "one-real", "all-masked"])
@pytest.mark.parametrize("N,k", [(1, 1), (9, 1), (9, 9), (40, 2), (40, 5)])
def test_knn_density(backend, dtype, mask_kind, N, k):
    backend.require("knn_density", dtype)
    x = clip(3, N, 8, N + k, dtype)
    mask = _mask(3, N, k, mask_kind)
    for log in (False, True):
        got = backend.run(hk.knn_density, x, k, mask, log=log)
        want = R.knn_density(x, k, mask, log=log)
        close(got, want, TOL[dtype]["fwd"] if dtype != torch.float16 else TOL[torch.float32]["fwd"])


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_kind", ["none", "random", "one-real"])
@pytest.mark.parametrize("N", [1, 2, 13, 50])
def test_dpc_delta(backend, dtype, mask_kind, N):
    backend.require("dpc_delta", dtype)
    x = clip(3, N, 6, N, dtype, dup=False)
    mask = _mask(3, N, N, mask_kind)
    log_rho = R.knn_density(x, 2, mask, log=True)
    delta, parent = backend.run(hk.dpc_delta, x, log_rho, mask)
    want_delta, want_parent = R.dpc_delta(x, log_rho, mask)
    close(delta, want_delta, TOL[dtype]["fwd"])
    if dtype == torch.float64:  # no near-ties between distinct random points in float64
        assert torch.equal(parent, want_parent)
    else:  # the parent is a token at distance delta (a near-equal distance may pick another)
        D = R.pairwise_distance(x.double())
        at = D.gather(2, parent[..., None])[..., 0]
        has_higher = parent != torch.arange(N)
        close(at[has_higher].to(dtype), want_delta[has_higher], TOL[dtype]["fwd"])


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dpc_delta_ties_go_to_the_lower_index(backend, dtype):
    backend.require("dpc_delta", dtype)
    x = torch.randn(2, 6, 4, dtype=dtype)
    x[:, 3] = x[:, 1]  # 1 and 3 coincide: equal density, distance 0
    rho = torch.ones(2, 6, dtype=dtype)  # all tied: the order is the index order
    delta, parent = backend.run(hk.dpc_delta, x, rho)
    want_delta, want_parent = R.dpc_delta(x, rho)
    assert torch.equal(parent, want_parent)
    assert parent[0, 0] == 0 and parent[0, 3] == 1 and delta[0, 3] == 0
    close(delta, want_delta, TOL[dtype]["fwd"])


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("sorted_", [True, False])
def test_topf_select(backend, sorted_):
    backend.require("topf_select")
    g = torch.Generator().manual_seed(5)
    score = torch.randn(4, 30, generator=g)
    score[0, ::3] = 0.5  # many exact ties
    score[1, 4] = float("nan")
    score[1, 7] = -math.inf
    score[2] = float("nan")
    score[3, :] = 1.0
    for f in (1, 7, 29):
        for exclude in (None, 4, torch.tensor([0, 29, 4, 13])):
            got = backend.run(hk.topf_select, score, f, sorted_, exclude)
            assert torch.equal(got, R.topf_select(score, f, sorted_, exclude))
    assert torch.equal(backend.run(hk.topf_select, score, 30, sorted_), R.topf_select(score, 30, sorted_))
    assert backend.run(hk.topf_select, score[:0], 3).shape == (0, 3)


# ---- dpc_knn ----------------------------------------------------------------------------------------


DPC_CASES = [
    # B, N, C, f, k, mask, center, keep_center
    (2, 1, 3, 1, 1, "none", None, True),
    (3, 9, 4, 1, 2, "none", None, True),
    (3, 9, 4, 9, 9, "none", None, True),
    (2, 33, 16, 11, 2, "none", None, True),
    (2, 33, 16, 11, 5, "random", None, True),
    (2, 33, 16, 11, 2, "one-real", None, True),
    (2, 33, 16, 11, 2, "all-masked", None, True),
    (2, 33, 16, 11, 2, "none", 16, True),
    (2, 33, 16, 11, 2, "random", 16, False),
    (2, 81, 64, 27, 2, "none", 40, True),
    (1, 130, 24, 43, 3, "random", None, True),
]


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", DPC_CASES, ids=[str(c) for c in DPC_CASES])
def test_dpc_knn(backend, dtype, case):
    backend.require("dpc_knn", dtype)
    B, N, C, f, k, mask_kind, center, keep_center = case
    for seed in range(3):
        x = clip(B, N, C, seed, dtype, smooth=seed == 2)
        mask = _mask(B, N, seed, mask_kind)
        for sorted_ in (True, False):
            kw = dict(token_mask=mask, center=center, keep_center=keep_center, sorted=sorted_)
            if keep_center:
                got, asg = backend.run(hk.dpc_knn, x, f, k, mask, center, True, sorted=sorted_)
            elif not sorted_:  # the published convention: center excluded, best first
                got, asg = backend.run(hk.compat.cluster_dpc_knn_center, x, f, k, center, mask)
            else:
                got, asg = _to_cpu(_dpc_knn("dpc_knn", *backend.to((x, f, k, mask)), center, True, True, False,
                                           backend.backend))
            want, want_asg = R.dpc_knn(x, f, k, mask, center, True, sorted=sorted_, keep_center=keep_center)
            assert got.shape == (B, f) and got.dtype == torch.int64
            assert_same_or_near_tie(got, want, x, f, k, **kw)
            check_selection(x, got, f, k, **kw)
            check_assignment(x, got, asg)


@pytest.mark.parametrize("backend", [t for t in BACKENDS if t.backend == "cpu"], ids=str)
@pytest.mark.parametrize("B,N,C,mask_kind", [(1, 300, 3, "none"), (2, 517, 40, "random"), (1, 262, 1536, "none")])
def test_full_distance_block_past_one_column_chunk(backend, B, N, C, mask_kind):
    # The cpu paths' float32 Gram kernels walk the upper triangle in 256-column chunks with 4 x 4
    # (AVX-512) or 4 x 3 (AVX2) blocks of pairs; these N end mid-block and mid-chunk, and C = 1536
    # is the longest published reduction. Distances within the Gram-form error model, symmetric with
    # a zero diagonal; the selection and assignment equal to the reference's up to near-ties.
    backend.require("dpc_knn", torch.float32)
    x = clip(B, N, C, 7, torch.float32, dup=True)
    D = backend.run(hk.pairwise_distance, x)
    close_distance(D, x)
    assert torch.equal(D, D.transpose(1, 2)), "D must be bit-symmetric"
    assert (D.diagonal(dim1=1, dim2=2) == 0).all(), "D[i, i] must be exactly 0"
    f, mask = N // 3, _mask(B, N, 7, mask_kind)
    got, asg = backend.run(hk.dpc_knn, x, f, 2, mask, None, True)
    want, _ = R.dpc_knn(x, f, 2, mask, None, True)
    assert_same_or_near_tie(got, want, x, f, 2, token_mask=mask)
    check_selection(x, got, f, 2, token_mask=mask)
    check_assignment(x, got, asg)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_dpc_knn_float64_matches_the_reference_exactly(backend):
    backend.require("dpc_knn", torch.float64)
    # In float64, distinct random frames leave no near-ties: every pick must be identical.
    for seed in range(10):
        x = clip(4, 60, 12, seed, torch.float64, dup=seed % 2 == 0)
        assert torch.equal(backend.run(hk.dpc_knn, x, 20, 2), R.dpc_knn(x, 20, 2))


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dpc_knn_half_inputs(backend, dtype):
    backend.require("dpc_knn", dtype)
    x = clip(3, 50, 32, 7, dtype)
    got = backend.run(hk.dpc_knn, x, 17, 2)
    # Half inputs are computed in float32: judge against the float32 values of the rounded input.
    check_selection(x.float(), got, 17, 2, sorted=True)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_dpc_knn_non_finite_input_gives_valid_distinct_indices(backend):
    backend.require("dpc_knn")
    x = clip(4, 20, 5, 0)
    x[0, 3, 1] = float("nan")
    x[1] = float("nan")
    x[2, 5] = float("inf")
    x[3, :, 0] = -float("inf")
    for center in (None, 7):
        index, asg = backend.run(hk.dpc_knn, x, 8, 2, center=center, return_assignment=True)
        assert index.shape == (4, 8)
        assert ((index >= 0) & (index < 20)).all()
        assert all(len(set(row)) == 8 for row in index.tolist())
        assert ((asg >= 0) & (asg < 8)).all()
        if center is not None:
            assert (index == center).any(-1).all()


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_dpc_knn_layouts_give_the_same_result(backend):
    backend.require("dpc_knn")
    base = clip(3, 40, 24, 3)
    want = backend.run(hk.dpc_knn, base, 13, 2)
    on_device = backend.to(base)  # views made on the device itself (moving one would copy it)
    transposed = on_device.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, same values
    expanded = on_device[:1].expand(3, 40, 24)  # stride 0 over the batch
    assert not transposed.is_contiguous() and expanded.stride(0) == 0
    assert torch.equal(backend.run(hk.dpc_knn, transposed, 13, 2), want)
    assert torch.equal(backend.run(hk.dpc_knn, expanded, 13, 2), want[:1].expand(3, 13))
    assert backend.run(hk.dpc_knn, base[:0], 13, 2).shape == (0, 13)
    index, asg = backend.run(hk.dpc_knn, base[:0], 13, 2, return_assignment=True)
    assert index.shape == (0, 13) and asg.shape == (0, 40)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_determinism_bitwise(backend):
    backend.require("dpc_knn")
    x = clip(4, 70, 32, 11, smooth=True)
    first = backend.run(hk.dpc_knn, x, 23, 2, return_assignment=True)
    rho = backend.run(hk.knn_density, x, 2)
    delta = backend.run(hk.dpc_delta, x, rho)
    for _ in range(3):
        again = backend.run(hk.dpc_knn, x, 23, 2, return_assignment=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert torch.equal(backend.run(hk.knn_density, x, 2), rho)
        assert all(torch.equal(a, b) for a, b in zip(backend.run(hk.dpc_delta, x, rho), delta))


# ---- token_pruning_cluster ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos_batch", [1, 2])
def test_token_pruning_cluster(backend, dtype, pos_batch):
    backend.require("dpc_knn", dtype)
    backend.require("gather_frames", dtype)
    g = torch.Generator().manual_seed(pos_batch)
    x = torch.randn(2, 27, 5, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    x.data[:, 3] = x.data[:, 4]  # two identical frames: an exact density tie
    pos = torch.randn(pos_batch, 9, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    tol = TOL[dtype]
    for center in (None, 13):
        kept, index = backend.run(hk.token_pruning_cluster, x, 9, center=center, pos_embed=pos)
        want_kept, want_index = R.token_pruning_cluster(x, 9, center=center, pos_embed=pos)
        pooled = x.detach().to(torch.float32 if dtype == torch.bfloat16 else dtype).mean(2)
        assert_same_or_near_tie(index, want_index, pooled, 9, 2, center=center, sorted=True)
        check_selection(pooled, index, 9, 2, center=center, sorted=True)
        # The gather is judged on the frames this backend kept: exact copies plus pos_embed.
        want_kept = x.gather(1, index[:, :, None, None].expand(2, 9, 5, 8)) + pos[:, :, None, :]
        assert kept.dtype == dtype and kept.shape == (2, 9, 5, 8)
        close(kept, want_kept, tol["fwd"])
        grad = torch.randn(2, 9, 5, 8, generator=g, dtype=torch.float64).to(dtype)
        gx, gp = torch.autograd.grad(kept, (x, pos), grad)
        wx, wp = torch.autograd.grad(want_kept, (x, pos), grad)
        close(gx, wx, tol["bwd"])
        close(gp, wp, tol["bwd"])
        dropped = torch.ones(2, 27, dtype=torch.bool).scatter(1, index, False)
        assert (gx[dropped] == 0).all()
    if dtype == torch.float64:  # no near-ties in float64 here: the same frames as the reference
        assert torch.equal(backend.run(hk.token_pruning_cluster, x, 9)[1], R.token_pruning_cluster(x, 9)[1])


# ---- token_recovering_attention ---------------------------------------------------------------------


def tra_args(S, L, M, C, dtype, shared=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    b = (lambda: t(C, s=0.1)) if bias else (lambda: None)
    return [t(1 if shared else S, L, C), t(S, M, C), t(C, C, s=C ** -0.5), b(), t(C, C, s=C ** -0.5), b(),
            t(C, C, s=C ** -0.5), b(), t(C, C, s=C ** -0.5), t(C, s=0.1)]


def _tra_grads(fn, args, grad_out):
    leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
    out = fn(leaves)
    present = [a for a in leaves if a is not None]
    return out, torch.autograd.grad(out, present, grad_out)


TRA_CASES = [
    # S, L, M, C, heads, shared, bias, residual
    (3, 7, 5, 16, 2, True, False, True),
    (3, 7, 5, 16, 2, False, True, False),
    (2, 9, 4, 64, 2, True, True, True),       # head dim 32
    (2, 5, 11, 118, 2, True, True, True),     # head dim 59
    (4, 27, 9, 64, 1, False, False, True),    # head dim 64
    (1, 1, 1, 8, 8, True, True, False),       # head dim 1, one token each
]


def _check_tra(backend, dtype, S, L, M, C, H, shared, bias, residual, seed=0,
               yardstick=(torch.float16, torch.bfloat16)):
    """backend's TRA output and gradients against the float64 reference on the same (rounded)
    inputs. For a dtype in yardstick, an element outside the fixed tolerance is accepted when the
    normwise error is within twice the published path's own error in that dtype (where a gradient
    cancels, a few elements can miss any fixed tolerance by rounding alone)."""
    args = tra_args(S, L, M, C, dtype, shared, bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(S, L, C, generator=g, dtype=torch.float64).to(dtype)

    def ours(a):
        return backend.run(hk.token_recovering_attention, *a, num_heads=H, residual=residual)

    def ref(a):  # the reference in float64 on the same (rounded) inputs
        a64 = [t.double() if t is not None else None for t in a]
        return R.token_recovering_attention(*a64, num_heads=H, residual=residual)

    out, grads = _tra_grads(ours, args, grad_out)
    want, want_grads = _tra_grads(ref, args, grad_out.double())
    if dtype in yardstick:
        published = _tra_grads(lambda a: R.token_recovering_attention(*a, num_heads=H, residual=residual),
                               args, grad_out)
    tol = TOL[dtype]
    checks = [("out", out, want)] + [(f"grad {i}", g, w) for i, (g, w) in enumerate(zip(grads, want_grads))]
    for i, (what, got, exact) in enumerate(checks):
        assert got.dtype == dtype, what
        try:
            close(got.double(), exact.double(), tol["fwd" if i == 0 else "bwd"])
        except AssertionError:
            if dtype not in yardstick:
                raise
            theirs = published[0] if i == 0 else published[1][i - 1]
            ours_err, their_err = _rel_err(got, exact), _rel_err(theirs, exact)
            slack = 1e-6 if dtype == torch.float32 else 1e-3  # ~8 fp32 eps; 1/8 of bfloat16 eps
            assert ours_err <= 2 * their_err + slack, (
                f"{what}: relative error {ours_err:.3g} vs the published path's own {their_err:.3g} in {dtype}")


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TRA_CASES, ids=[str(c) for c in TRA_CASES])
def test_token_recovering_attention(backend, dtype, case):
    backend.require("token_recovering_attention", dtype)
    _check_tra(backend, dtype, *case)


@pytest.mark.parametrize("backend", [t for t in BACKENDS if t.backend == "cpu"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sequence"])
def test_tra_cpu_gemm_tiles_and_split_reductions(backend, dtype, shared):
    """Shapes that take the cpu backend's other fixed-order GEMM tilings (csrc/cpu/gemm_fixed.h):
    one-row-block outputs cut into column tiles (the K|V projection of S * M = 160 rows, the query
    projection) and (C, C) weight gradients over S * L = 1280 rows, whose reduction is cut into
    chunks added in order. Over 1280 rows an fp32 weight gradient cancels below the fixed atol at
    a few elements, so fp32 is a yardstick dtype here too."""
    _check_tra(backend, dtype, 8, 160, 20, 128, 4, shared, True, True, seed=3,
               yardstick=(torch.float32, torch.bfloat16))


# Shapes around the cpu backend's float32 attention core (csrc/cpu/attention_rows.cpp): keys padded
# to whole 16-lane vectors (M = 1, 16, 17) and more than one register pass of them (M = 97, 130 >
# 96); head widths that are not whole vectors (d = 20, 40) or several passes (d = 80); L below and
# not a multiple of the 4-row block; few (sequence, head) pairs (the rows then split into tasks); and
# M * d past the core's scratch bound (M = 4100, d = 64), where float32 runs on ATen's attention;
# a batch whose backward runs in two chunks of sequences (S * L * C past its 128 MB budget); and a
# clip whose backward tasks take their query rows in 13 chunks (P and dS of 3000 rows x 200 keys
# past the 512 KB per-task budget).
TRA_ROWS_CASES = [
    # S, L, M, C, heads, shared, bias, residual
    (3, 2, 1, 40, 2, True, True, True),
    (2, 13, 16, 160, 2, False, True, True),
    (5, 6, 17, 64, 4, True, False, False),
    (1, 70, 97, 80, 1, True, True, True),
    (2, 9, 130, 120, 3, False, False, True),
    (1, 3, 4100, 64, 1, True, True, True),
    (90, 1000, 8, 64, 2, False, False, True),  # no bk: its gradient is 0 in exact arithmetic, noise here
    (1, 3000, 200, 64, 1, True, False, True),  # no bk, as above
]


@pytest.mark.parametrize("backend", [t for t in BACKENDS if t.backend == "cpu"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TRA_ROWS_CASES, ids=[str(c) for c in TRA_ROWS_CASES])
def test_tra_cpu_attention_core_shapes(backend, dtype, case):
    # Over L = 1000 query rows an fp32 key gradient cancels at a few elements (as over the rows of
    # test_tra_cpu_gemm_tiles_and_split_reductions): fp32 is then a yardstick dtype too.
    long_rows = case[1] >= 1000
    _check_tra(backend, dtype, *case, seed=5,
               yardstick=(torch.float32, torch.bfloat16) if long_rows else (torch.bfloat16,))


@pytest.mark.parametrize("backend", [t for t in BACKENDS if t.backend == "cpu"], ids=str)
def test_tra_cpu_nan_in_one_sequence_stays_in_it(backend):
    """A NaN token makes its own sequence's output NaN (every query attends to it), as in the
    reference, and leaves the other sequences exact."""
    args = tra_args(4, 9, 7, 32, torch.float32, shared=True, bias=True)
    args[1][2, 3, 5] = float("nan")
    out = backend.run(hk.token_recovering_attention, *args, num_heads=2)
    want = R.token_recovering_attention(*[a.double() if a is not None else None for a in args], num_heads=2)
    assert out[2].isnan().all()
    keep = [0, 1, 3]
    close(out[keep].double(), want[keep], TOL[torch.float32]["fwd"])


def _rel_err(got, exact):
    """Normwise relative error of got against the float64 value."""
    exact = exact.double()
    return float((got.detach().double() - exact).norm() / exact.norm().clamp_min(1e-300))


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_tra_broadcast_query_is_projected_once_and_gets_the_summed_gradient(backend):
    backend.require("token_recovering_attention", torch.float64)
    S, L, M, C = 5, 6, 4, 16
    args = tra_args(S, L, M, C, torch.float64, shared=True)
    base = args[0].clone().requires_grad_()
    expanded = backend.to(base).expand(S, L, C)  # what einops.repeat / expand give the published model
    assert expanded.stride(0) == 0
    out = backend.run(hk.token_recovering_attention, expanded, *args[1:], num_heads=2)
    (g,) = torch.autograd.grad(out.square().sum(), base)
    base2 = args[0].clone().requires_grad_()
    want = R.token_recovering_attention(base2.expand(S, L, C), *args[1:], num_heads=2)
    (wg,) = torch.autograd.grad(want.square().sum(), base2)
    close(out, want, TOL[torch.float64]["fwd"])
    close(g, wg, TOL[torch.float64]["bwd"])


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_tra_determinism_bitwise(backend):
    backend.require("token_recovering_attention")
    args = tra_args(6, 20, 7, 32, torch.float32, shared=True)
    grad_out = torch.randn(6, 20, 32)

    def run():
        return _tra_grads(lambda a: backend.run(hk.token_recovering_attention, *a, num_heads=4), args, grad_out)

    out1, g1 = run()
    out2, g2 = run()
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ---- accuracy of the selection against float64 ------------------------------------------------------


def near_duplicate_clips(B, N, C, seed, offset=8.0):
    """Smooth clips far from the origin with near-duplicate frames: where a Gram-form distance
    cancels (|x|^2 >> d^2), which is what the published cdist does."""
    g = torch.Generator().manual_seed(seed)
    x = offset + torch.randn(B, N, C, generator=g, dtype=torch.float64).cumsum(1) / math.sqrt(N)
    src = torch.randint(0, N, (B, N // 4), generator=g)
    dst = torch.randint(0, N, (B, N // 4), generator=g)
    noise = 1e-4 * torch.randn(B, N // 4, C, generator=g, dtype=torch.float64)
    x.scatter_(1, dst[..., None].expand(-1, -1, C), x.gather(1, src[..., None].expand(-1, -1, C)) + noise)
    return x.float()


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_dpc_knn_agrees_with_float64_at_least_as_often_as_the_reference(backend):
    """Count the clips whose float32 selection differs from the float64 one (same input values),
    for this backend and for the reference's Gram-form cdist: the backend must not lose."""
    backend.require("dpc_knn")
    ours = theirs = 0
    for seed in range(12):
        x = near_duplicate_clips(4, 48, 32, seed)
        exact = R.dpc_knn(x.double(), 16, 2)
        ours += int((backend.run(hk.dpc_knn, x, 16, 2) != exact).any(-1).sum())
        theirs += int((R.dpc_knn(x, 16, 2) != exact).any(-1).sum())
    print(f"{backend}: {ours} of 48 clips differ from float64; reference: {theirs}")
    assert theirs > 0, "the clips no longer stress the Gram form: the comparison proves nothing"
    assert ours <= theirs
