"""The CUDA TPC kernels, run on the CPU under the emulator of tests/cuda_emulation/.

csrc/cuda/tpc_distance.cu, tpc_select.cu and gather_frames.cu (host glue and kernels, unchanged) are
compiled once per session as plain C++ with -DTPC_EMULATE against tests/cuda_emulation/tpc_emu.h:
each CUDA thread is a std::thread, scheduled cooperatively at barriers and warp collectives, with
nvcuda::wmma emulated in the mma.sync fragment layouts (3xTF32 and native float16/bfloat16
products), shared memory poisoned at every block. What that does and does not prove:
tests/cuda_emulation/README.md.

Checked here against the float64 oracle / the reference (tie-aware for selections, tests/selection.py),
on small shapes (the emulator does ~10^5 thread switches per second): pairwise distance (every
engine, self and cross, 2 x 2 tiles, duplicates, a NaN row, offset data) and its backward; k-NN
density (masks; the 4-, 16- and 33-candidate kernels); delta (masks, ties); top-f (sorted and
best first, ties, NaN, exclude; the shared-memory and global-memory sorts); the fused dpc_knn (masks,
center kept or excluded, sorted=False, assignment, pooled 4-D input, NaN rows, offset half data);
gather_frames forward and backward; token_recovering_interpolation and merge_tokens (interp_merge.cu)
forward and backward against the reference. Outputs are NaN-poisoned before the call (deterministic
fill), and a few runs are compared bitwise under other thread/block schedules.
Skips, saying why, only when the host toolchain cannot build a torch C++ extension at all.
"""
import os

import pytest
import torch

from hot_kernels import reference as R
import oracle as O
from selection import assert_same_or_near_tie, check_assignment, check_selection
from test_cuda_emulation import build_emulation, poison_empty, same_bits  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("tpc_cuda_common.cuh", "tpc_distance.cu", "tpc_select.cu", "gather_frames.cu", "interp_merge.cu", "hot_kernels.h",
        "tpc_emu.h", "tra_emu.h", "tpc_ext.cpp")
HALF = (torch.float16, torch.bfloat16)

# tests/test_backends.py's forward tolerances (float32 for the densities of half inputs, as there).
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
# Relative error bound of a squared distance from the Gram form (test_backends' GRAM_RTOL), and of
# the half engines' staging: x - x0 rounded once to the half type (relative 2^-11 / 2^-8 per
# coordinate) for the pairs the kernel keeps from the Gram form (d^2 >= (|a_i|^2 + |a_j|^2) / 32).
GRAM_RTOL = {torch.float32: 1e-5, torch.float16: 2 ** -11 * 8, torch.bfloat16: 2 ** -8 * 8}


# ---- build ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tpc(tmp_path_factory):
    """torch.ops.hot_kernels_tpc_emu, built once per session in a scratch directory."""
    return build_emulation(tmp_path_factory, "hot_kernels_tpc_emu", "tpc_ext.cpp", "TPC_EMULATE", OURS)


def run(tpc, op, *args, policy=0, seed=1, fma=False):
    """torch.ops.hot_kernels_tpc_emu.<op>(*args) under the given schedule policy and Gram engine."""
    tpc.set_policy(policy, seed)
    tpc.set_force_fma(fma)
    try:
        return getattr(tpc, op)(*args)
    finally:
        tpc.set_force_fma(False)


# ---- inputs -----------------------------------------------------------------------------------


def clip(B, N, C, seed, dtype=torch.float32, dup=True, nan_row=None, offset=None):
    """Random (B, N, C) in float64 rounded to dtype. dup: frames 0 and 1 repeat frame 2 (exact
    duplicates); nan_row: (b, n) of a frame set to NaN; offset: "plus10" (x + 10) or "channel"
    (channel means 20..60, far above the unit spread)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    if offset == "plus10":
        x = x + 10
    elif offset == "channel":
        x = x + 20 + 40 * torch.rand(C, generator=g, dtype=torch.float64)
    if dup and N >= 4:
        x[:, :2] = x[:, 2:3]
    if nan_row is not None:
        x[nan_row] = float("nan")
    return x.to(dtype)


def mask_of(B, N, seed, kind):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(B, N, generator=g) > 0.3
    m = torch.zeros(B, N, dtype=torch.bool)
    if kind == "one-real":
        m[:, N // 2] = True
    return m  # "all-masked"


def assert_distance(D, x, y=None):
    """D (in x's dtype) against the float64 oracle on the same rounded inputs, within the Gram error
    model (test_backends.close_distance, with the half engines' staging error); pairs with a NaN
    frame (oracle: NaN) as the reference has them (its NaN -> 0 rule); self: bit-symmetric with an
    exactly zero diagonal."""
    want = torch.from_numpy(O.brute_distance(x, y))
    assert D.dtype == x.dtype and D.shape == want.shape
    nan = want.isnan()
    ref = R.pairwise_distance(x.double(), None if y is None else y.double()).to(D.dtype)
    assert same_bits(D[nan], ref[nan]), "pairs with a NaN frame differ from the reference"
    yy = x if y is None else y
    xs, ys = x.double(), yy.double()
    s = xs[:, :1]  # the kernels' shift (token 0 of x): translation invariant
    sq_x, sq_y = (xs - s).square().sum(-1), (ys - s).square().sum(-1)
    bound = GRAM_RTOL[x.dtype] * (sq_x[:, :, None] + sq_y[:, None, :]) / x.shape[-1]
    bound = bound.nan_to_num(0.0)  # a NaN frame's own diagonal: exactly 0
    allowed = torch.sqrt(want.square() + bound) - want + 2 * torch.finfo(D.dtype).eps * want + 1e-30
    err = (D.double() - want).abs()
    bad = ~nan & ~(err <= allowed)
    assert not bad.any(), f"{int(bad.sum())} distances off; worst excess {(err / allowed)[~nan].max().item():.3g}x"
    if y is None:
        assert same_bits(D, D.transpose(1, 2).contiguous()), "D is not bit-symmetric"
        assert (D.diagonal(dim1=1, dim2=2)[~nan.diagonal(dim1=1, dim2=2)] == 0).all()


# ---- the emulated wmma -------------------------------------------------------------------------


@pytest.mark.parametrize("tf32", [True, False], ids=["3xtf32", "float16"])
def test_wmma_gives_the_product(tpc, tf32):
    """One warp through the engine's own Mma::step (load, split into tf32 hi + lo, three mma_sync,
    store): the fragment layouts are one-to-one and 3xTF32 is float32-accurate."""
    K = 8 if tf32 else 16
    g = torch.Generator().manual_seed(3)
    a, bt = torch.randn(16, K, generator=g), torch.randn(16, K, generator=g)
    if not tf32:
        a, bt = a.half().float(), bt.half().float()
    got = tpc.wmma_selftest(a, bt, tf32).double()
    want = a.double() @ bt.double().T
    scale = a.double().abs() @ bt.double().abs().T
    assert ((got - want).abs() <= 4e-6 * scale + 1e-30).all(), (got - want).abs().max()
    if tf32:  # one tf32 product alone would be off by ~1e-3 relative: the hi/lo split is used
        one = (a.double() * 2 ** 13).round() / 2 ** 13
        assert not torch.allclose(got, one @ bt.double().T, rtol=1e-5, atol=0)


# ---- pairwise_distance ------------------------------------------------------------------------

PD_CASES = [  # B, N, M (None: self), C, NaN row; engine; offset
    pytest.param(1, 70, None, 20, (0, 5), "tc", None, torch.float32, id="self-2x2tiles-f32"),
    pytest.param(2, 9, 70, 40, None, "tc", None, torch.float32, id="cross-2chunks-f32"),
    pytest.param(1, 70, None, 20, (0, 5), "fma", None, torch.float32, id="self-fma-f32"),
    pytest.param(1, 70, None, 20, (0, 5), "tc", None, torch.float16, id="self-f16"),
    pytest.param(2, 9, 70, 40, None, "tc", None, torch.bfloat16, id="cross-bf16"),
    pytest.param(1, 40, None, 33, None, "fma", None, torch.bfloat16, id="self-fma-bf16"),
    pytest.param(1, 40, None, 24, None, "tc", "plus10", torch.float16, id="self-plus10-f16"),
    pytest.param(1, 40, None, 24, None, "tc", "channel", torch.float16, id="self-channel-f16"),
    pytest.param(1, 40, None, 24, None, "tc", "channel", torch.bfloat16, id="self-channel-bf16"),
    pytest.param(2, 9, 40, 24, None, "tc", "plus10", torch.bfloat16, id="cross-plus10-bf16"),
    pytest.param(1, 40, None, 24, None, "tc", "channel", torch.float32, id="self-channel-f32"),
]


@pytest.mark.parametrize("B,N,M,C,nan_row,engine,offset,dtype", PD_CASES)
def test_pairwise_distance(tpc, poison_empty, B, N, M, C, nan_row, engine, offset, dtype):
    x = clip(B, N, C, 1, dtype, nan_row=nan_row, offset=offset)
    y = None if M is None else clip(B, M, C, 2, dtype, offset=offset)
    before = tpc.stats()[5]
    D = run(tpc, "pairwise_distance", x, y, fma=engine == "fma")
    recomputed = tpc.stats()[5] - before
    assert_distance(D, x, y)
    # The exact recomputation must not hide a broken engine (a NaN Gram value counts as cancelling):
    # no more pairs than cancel with twice the margin in float64 (pairs with a NaN frame included).
    assert recomputed <= cancelling_pairs(x, y, margin=2.0), recomputed


def cancelling_pairs(x, y, margin):
    """Pairs (unordered when y is None) with d^2 * 32 / margin < |a_i|^2 + |a_j|^2 in float64, a = x -
    x's token 0 (the kernels' test for recomputing a pair exactly), or with a NaN frame."""
    xs = x.double()
    ys = xs if y is None else y.double()
    s = xs[:, :1].nan_to_num(0.0)
    sq_x, sq_y = (xs - s).square().sum(-1), (ys - s).square().sum(-1)
    d2 = torch.from_numpy(O.brute_distance(x, y)).square() * x.shape[-1]
    hit = (d2 * 32 / margin < sq_x[:, :, None] + sq_y[:, None, :]) | d2.isnan()
    if y is None:
        hit = hit.triu(1)
    return int(hit.sum())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("offset", ["plus10", "channel"])
def test_offset_half_inputs_rarely_take_the_exact_path(tpc, poison_empty, dtype, offset):
    """Half inputs are shifted by token 0 like float32 ones: with a common offset far above the
    spread, only a near-duplicate pair (the planted copy; frames 0, 1, 2 equal the shift, so they
    stage as exact zeros) falls back to the exact warp recomputation; unshifted, nearly all 780
    pairs would (|x|^2 >> d^2)."""
    x = clip(1, 40, 24, 3, dtype, offset=offset)
    x[0, 20] = x[0, 30]
    before = tpc.stats()[5]
    D = run(tpc, "pairwise_distance", x, None)
    recomputed = tpc.stats()[5] - before
    assert_distance(D, x)
    assert 1 <= recomputed <= cancelling_pairs(x, None, margin=2.0) < 20, recomputed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_y", [False, True], ids=["self", "cross"])
def test_pairwise_distance_backward(tpc, poison_empty, dtype, with_y):
    x = clip(2, 37, 70, 4, dtype, dup=False)
    y = clip(2, 33, 70, 5, dtype) if with_y else None
    g = torch.Generator().manual_seed(6)
    grad = torch.randn(2, 37, 33 if with_y else 37, generator=g).to(dtype)
    dist = R.pairwise_distance(x, y)
    gx, gy = run(tpc, "pairwise_distance_backward", grad, x, y, dist)
    leaves = [t.double().requires_grad_() for t in ((x,) if y is None else (x, y))]
    D = R.pairwise_distance(*leaves) if with_y else R.pairwise_distance(leaves[0])
    want = torch.autograd.grad(D, leaves, grad.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gx.double(), want[0], **tol)
    if with_y:
        torch.testing.assert_close(gy.double(), want[1], **tol)
    else:
        assert gy.numel() == 0


# ---- knn_density, dpc_delta, topf_select ------------------------------------------------------


@pytest.mark.parametrize("B,N,C,k,mask_kind,dtype", [
    (2, 40, 8, 3, "none", torch.float32),      # 4 candidates, 2 row tiles
    (2, 40, 8, 3, "random", torch.float32),
    (1, 40, 8, 6, "random", torch.float16),    # 16 candidates
    (1, 70, 12, 20, "none", torch.float32),    # 33 candidates, 2 column tiles
    (2, 9, 8, 2, "one-real", torch.bfloat16),
    (1, 9, 8, 9, "all-masked", torch.float32),
    (1, 40, 24, 2, "none", torch.float16),     # offset half data (x + 10), below
])
def test_knn_density(tpc, poison_empty, B, N, C, k, mask_kind, dtype):
    x = clip(B, N, C, k, dtype, offset="plus10" if (C == 24 and dtype in HALF) else None)
    mask = mask_of(B, N, k, mask_kind)
    got = run(tpc, "knn_density", x, k, mask, True)
    want = R.knn_density(x.double(), k, mask, log=True).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL[torch.float32], equal_nan=True)
    got_rho = run(tpc, "knn_density", x, k, mask, False)
    torch.testing.assert_close(got_rho, want.exp(), **TOL[torch.float32], equal_nan=True)


@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_dpc_delta(tpc, poison_empty, mask_kind):
    x = clip(2, 40, 6, 9, dup=False)
    mask = mask_of(2, 40, 9, mask_kind)
    log_rho = R.knn_density(x, 2, mask, log=True)
    delta, parent = run(tpc, "dpc_delta", x, log_rho, mask)
    want_delta, want_parent = R.dpc_delta(x.double(), log_rho.double(), mask)
    torch.testing.assert_close(delta, want_delta.float(), **TOL[torch.float32])
    assert torch.equal(parent, want_parent)  # distinct random points in float32: no near-ties


def test_dpc_delta_ties_go_to_the_lower_index(tpc, poison_empty):
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(2))
    x[:, 3] = x[:, 1]  # 1 and 3 coincide: distance 0
    rho = torch.ones(2, 6)  # all tied: the order is the index order
    delta, parent = run(tpc, "dpc_delta", x, rho, None)
    want_delta, want_parent = R.dpc_delta(x, rho)
    assert torch.equal(parent, want_parent)
    assert parent[0, 0] == 0 and parent[0, 3] == 1 and delta[0, 3] == 0
    torch.testing.assert_close(delta, want_delta, **TOL[torch.float32])


@pytest.mark.parametrize("sorted_", [True, False], ids=["sorted", "best-first"])
def test_topf_select(tpc, poison_empty, sorted_):
    g = torch.Generator().manual_seed(5)
    score = torch.randn(4, 30, generator=g)
    score[0, ::3] = 0.5  # many exact ties
    score[1, 4] = float("nan")
    score[1, 7] = -float("inf")
    score[2] = float("nan")
    score[3, :] = 1.0
    for f, exclude in ((7, None), (29, torch.tensor([0, 29, 4, 13])), (30, None)):
        got = run(tpc, "topf_select", score, f, sorted_, exclude)
        assert torch.equal(got, R.topf_select(score, f, sorted_, exclude)), (f, exclude)
    half = run(tpc, "topf_select", score[:2].half(), 11, sorted_, None)
    assert torch.equal(half, R.topf_select(score[:2].half(), 11, sorted_))


def test_topf_select_best_first_past_shared_memory(tpc, poison_empty):
    """f = 2100 > the 2048 keys topf_kernel sorts in shared memory: the global-memory sort."""
    g = torch.Generator().manual_seed(8)
    score = torch.randn(1, 2200, generator=g)
    score[0, 100:400] = 0.25  # a run of ties (index order)
    got = run(tpc, "topf_select", score, 2100, False, torch.tensor([17]))
    assert torch.equal(got, R.topf_select(score, 2100, False, torch.tensor([17])))


# ---- dpc_knn ----------------------------------------------------------------------------------

DPC_CASES = [  # B, N, C, f, k, mask, center, keep_center, sorted, assignment, dtype, extra
    pytest.param(2, 40, 16, 11, 2, "random", None, True, False, True, torch.float32, None, id="mask-bestfirst-asg"),
    pytest.param(2, 40, 16, 11, 2, "none", 16, False, False, False, torch.float32, None, id="center-excluded"),
    pytest.param(1, 70, 24, 23, 3, "none", 40, True, True, True, torch.float32, None, id="center-2coltiles-asg"),
    pytest.param(2, 33, 8, 11, 5, "random", 4, True, False, True, torch.float32, None, id="k5-mask-center"),
    pytest.param(2, 40, 32, 13, 2, "none", None, True, True, True, torch.float16, None, id="f16"),
    pytest.param(2, 40, 32, 13, 2, "none", None, True, False, False, torch.bfloat16, None, id="bf16-bestfirst"),
    pytest.param(2, 40, 32, 13, 2, "none", None, True, True, False, torch.float16, "plus10", id="f16-plus10"),
    pytest.param(2, 40, 32, 13, 2, "none", None, True, False, True, torch.bfloat16, "channel", id="bf16-channel"),
    pytest.param(1, 40, 8, 13, 2, "none", None, True, True, True, torch.float16, "pooled", id="f16-pooled-4d"),
    pytest.param(1, 1, 3, 1, 1, "none", None, True, True, True, torch.float32, None, id="N1"),
]


def dpc_input(B, N, C, dtype, extra, seed):
    if extra == "pooled":  # (B, N, J, C): the selection runs on the mean over J (3xTF32 engine)
        x = clip(B, N, 3 * C, seed).view(B, N, 3, C)
        x[:, :2] = x[:, 2:3]
        return x.to(dtype), x.to(dtype).float().mean(2)
    x = clip(B, N, C, seed, dtype, offset=extra)
    return x, x.float()


@pytest.mark.parametrize("B,N,C,f,k,mask_kind,center,keep_center,sorted_,asg,dtype,extra", DPC_CASES)
def test_dpc_knn(tpc, poison_empty, B, N, C, f, k, mask_kind, center, keep_center, sorted_, asg, dtype, extra):
    x, judged = dpc_input(B, N, C, dtype, extra, 0)
    mask = mask_of(B, N, 0, mask_kind)
    index, assignment = run(tpc, "dpc_knn", x, f, k, mask, center, keep_center, sorted_, asg)
    assert index.shape == (B, f) and index.dtype == torch.int64
    want, _ = R.dpc_knn(judged.double(), f, k, mask, center, True, sorted=sorted_, keep_center=keep_center)
    kw = dict(token_mask=mask, center=center, keep_center=keep_center, sorted=sorted_)
    # Half inputs are computed in float32: judged on the float32 values of the rounded (pooled) input.
    check_selection(judged, index, f, k, **kw)
    assert_same_or_near_tie(index, want, judged, f, k, **kw)
    if asg:
        assert assignment.shape == (B, N)
        check_assignment(judged, index, assignment)
    else:
        assert assignment.shape == (B, 0)


def test_dpc_knn_nan_rows_give_valid_distinct_indices(tpc, poison_empty):
    x = clip(3, 20, 5, 0)
    x[0, 3, 1] = float("nan")
    x[1] = float("nan")
    x[2, 5] = float("inf")
    for center in (None, 7):
        index, asg = run(tpc, "dpc_knn", x, 8, 2, None, center, True, False, True)
        assert index.shape == (3, 8)
        assert ((index >= 0) & (index < 20)).all()
        assert all(len(set(row)) == 8 for row in index.tolist())
        assert ((asg >= 0) & (asg < 8)).all()
        if center is not None:
            assert (index == center).any(-1).all()
    # The finite sample is still judged in full.
    check_selection(x[2:3, :5], run(tpc, "dpc_knn", x[2:3, :5].contiguous(), 3, 2, None, None, True, True,
                                    False)[0], 3, 2)


# ---- gather_frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pos_batch", [0, 1, 2])
def test_gather_frames(tpc, poison_empty, dtype, pos_batch):
    g = torch.Generator().manual_seed(pos_batch)
    x = torch.randn(2, 9, 3, 5, generator=g).to(dtype)
    index = torch.tensor([[0, 4, 8, 2], [7, 1, 3, 5]])
    pos = torch.randn(pos_batch, 4, 5, generator=g).to(dtype) if pos_batch else None
    out = run(tpc, "gather_frames", x, index, pos)
    ref = x[torch.arange(2)[:, None], index].float()
    if pos is not None:
        ref = ref + pos.float()[:, :, None, :]
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=0, atol=0)
    grad = torch.randn(2, 4, 3, 5, generator=g).to(dtype)
    gx, gpos = run(tpc, "gather_frames_backward", grad, index, 9, pos_batch)
    want_gx = torch.zeros(2, 9, 3, 5, dtype=dtype)
    want_gx[torch.arange(2)[:, None], index] = grad
    assert torch.equal(gx, want_gx)
    if pos_batch == 0:
        assert gpos.numel() == 0
    else:
        want_pos = grad.float().sum(2)
        want_pos = want_pos.sum(0, keepdim=True) if pos_batch == 1 else want_pos
        torch.testing.assert_close(gpos.float(), want_pos.to(dtype).float(), **TOL[dtype])


# ---- token_recovering_interpolation and merge_tokens (interp_merge.cu) ----------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_recovering_interpolation(tpc, poison_empty, dtype):
    g = torch.Generator().manual_seed(3)
    index = torch.tensor([[1, 4, 5, 9], [0, 2, 7, 10]])
    x = torch.randn(2, 4, 3, 5, generator=g).to(dtype)
    out = run(tpc, "token_recovering_interpolation", x, index, 11)
    torch.testing.assert_close(out.float(), R.token_recovering_interpolation(x, index, 11).float(), **TOL[dtype])
    x3 = x[:, :, 0].contiguous()  # (B, f, C) too
    torch.testing.assert_close(run(tpc, "token_recovering_interpolation", x3, index, 11).float(),
                               R.token_recovering_interpolation(x3, index, 11).float(), **TOL[dtype])
    grad = torch.randn(2, 11, 3, 5, generator=g).to(dtype)
    gx = run(tpc, "token_recovering_interpolation_backward", grad, index, 4)
    xd = x.double().requires_grad_()
    (want,) = torch.autograd.grad(R.token_recovering_interpolation(xd, index, 11), xd, grad.double())
    torch.testing.assert_close(gx.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("weighted", [True, False])
def test_merge_tokens(tpc, poison_empty, weighted):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 6, generator=g)
    assignment = torch.tensor([[0, 1, 2, 0, 1, 1, 2, 0, 0], [2, 2, 1, 0, 0, 1, 1, 2, 0]])
    index = torch.tensor([[0, 1, 2], [3, 2, 0]])
    w = torch.rand(2, 9, generator=g) + 0.1 if weighted else None
    if weighted:
        w[1][assignment[1] == 1] = 0  # a cluster of weight 0: merged to 0, zero gradients
    out, wsum = run(tpc, "merge_tokens", x, assignment, 3, w)
    torch.testing.assert_close(out, R.merge_tokens(x, index, assignment, w), **TOL[torch.float32])
    grad = torch.randn(2, 3, 6, generator=g)
    gx, gw = run(tpc, "merge_tokens_backward", grad, x, assignment, w, out, wsum, weighted)
    leaves = [x.double().requires_grad_()] + ([w.double().requires_grad_()] if weighted else [])
    want = torch.autograd.grad(R.merge_tokens(leaves[0], index, assignment, leaves[1] if weighted else None),
                               leaves, grad.double())
    torch.testing.assert_close(gx.double(), want[0], rtol=1e-5, atol=1e-6)
    if weighted:
        torch.testing.assert_close(gw.double(), want[1], rtol=1e-5, atol=1e-6)
    else:
        assert gw.numel() == 0


# ---- schedules --------------------------------------------------------------------------------


SCHEDULE_CASES = [
    pytest.param("pairwise_distance", lambda: (clip(1, 70, 20, 1, torch.float16, offset="plus10"), None), 1,
                 id="pd-f16-offset-1"),
    pytest.param("dpc_knn", lambda: (clip(2, 40, 16, 0), 11, 2, mask_of(2, 40, 0, "random"), None, True, False, True),
                 2, id="dpc-bestfirst-asg-2"),
    pytest.param("dpc_knn", lambda: (clip(1, 40, 16, 3, torch.bfloat16), 13, 5, None, 7, True, True, True), 1,
                 id="dpc-bf16-k5-1"),
]


@pytest.mark.parametrize("op,make,policy", SCHEDULE_CASES)
def test_schedule_independent(tpc, poison_empty, op, make, policy):
    """Bitwise the same outputs with threads and blocks run lowest id first (policy 0) and highest
    first (1) or at random (2); the shared-memory poison also differs (0xFF vs 0x7F): a missing
    barrier, a race between threads or a read of an unwritten shared slot changes the result."""
    args = make()
    a = run(tpc, op, *args, policy=0)
    b = run(tpc, op, *args, policy=policy, seed=11)
    a, b = (a,) if torch.is_tensor(a) else a, (b,) if torch.is_tensor(b) else b
    assert all(same_bits(u, v) for u, v in zip(a, b)), f"{op}: schedule-dependent results (policy 0 vs {policy})"
    stats = tpc.stats()
    assert stats[2] > 0 and stats[4] > 0  # threads switched, mma_sync ran
