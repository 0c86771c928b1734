"""Pooled TPC input (B, N, J, C) on the triton backend: pooling inside every load vs pooling once
into a (B, N, C) float32 copy (issue 15 item 4). Under the interpreter here, on small shapes.

The two paths must agree bitwise (the pool kernel computes the mean exactly as the pooled loads
do), both must match the reference (tie-aware), and the rule must follow the traffic model.
"""
import pytest
import torch

import hot_kernels.triton as T
from hot_kernels import reference as R
from selection import assert_same_or_near_tie, check_assignment, check_selection

if T.IMPORT_ERROR is not None:
    pytest.skip(f"triton: {T.IMPORT_ERROR}", allow_module_level=True)

from hot_kernels.triton import tpc  # noqa: E402
from hot_kernels.triton import tpc_kernels  # noqa: E402


@pytest.fixture
def pool_once_mode():
    old = tpc.POOL_ONCE
    yield lambda v: setattr(tpc, "POOL_ONCE", v)
    tpc.POOL_ONCE = old


def _clip(B, N, J, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, N, 1, C, generator=g, dtype=torch.float64).cumsum(1) * 0.3
    x = base + torch.randn(B, N, J, C, generator=g, dtype=torch.float64)
    x[:, 5] = x[:, 6]  # duplicate frames: an exact density tie
    return x.to(dtype)


def _sequential_mean(x):
    v = x[:, :, 0].float()
    for j in range(1, x.shape[2]):
        v = v + x[:, :, j].float()
    return v / x.shape[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pool_kernel_is_the_sequential_mean(dtype, pool_once_mode):
    x = _clip(2, 21, 5, 40, dtype, 1)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous strides
    p = tpc._Points("dpc_knn", x)
    pool_once_mode("always")
    q = tpc._pool_once("dpc_knn", p, 2)
    assert q is not p and q.x.dtype == torch.float32 and q.x.shape == (2, 21, 40) and not q.pool
    assert torch.equal(q.x, _sequential_mean(x))


@pytest.mark.parametrize("dtype,masked", [(torch.float32, False), (torch.bfloat16, True)])
def test_both_paths_bitwise_equal_and_match_reference(dtype, masked, pool_once_mode):
    B, N, J, C, f, k = 2, 29, 3, 16, 9, 3
    x = _clip(B, N, J, C, dtype, 2 + masked)
    mask = None
    if masked:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0, -7:] = False
        mask[1, ::5] = False
    out = {}
    for mode in ("never", "always"):
        pool_once_mode(mode)
        index, asg = tpc.dpc_knn(x, f, k, mask, None, False, True, True)
        index_c, _ = tpc.dpc_knn(x, f, k, mask, N // 2, True, False, False)
        rho = tpc.knn_density(x, k, mask, True)
        delta, parent = tpc.dpc_delta(x, rho, mask)
        out[mode] = (index, asg, index_c, rho, delta, parent)
    for a, b in zip(out["never"], out["always"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    index, asg, index_c, rho, delta, parent = out["always"]
    pooled = _sequential_mean(x)
    want_rho = R.knn_density(pooled.double(), k, mask, log=True)
    fin = torch.isfinite(want_rho)
    assert torch.equal(fin, torch.isfinite(rho))
    torch.testing.assert_close(rho[fin].double(), want_rho[fin], rtol=1e-4, atol=1e-5)
    want_index, _ = R.dpc_knn(pooled.double(), f, k, mask, return_assignment=True)
    assert_same_or_near_tie(index, want_index, pooled, f, k, token_mask=mask, sorted=True)
    check_selection(pooled, index, f, k, token_mask=mask, sorted=True)
    check_assignment(pooled, index, asg)
    check_selection(pooled, index_c, f, k, token_mask=mask, center=N // 2, sorted=False)


def test_rule_follows_the_traffic_model(pool_once_mode):
    pool_once_mode("auto")
    # HoT-MixSTE: B = 64, N = 243, J = 17, C = 512, bf16 - the estimate: 5-10x less traffic
    t = tpc.pooled_traffic(64, 243, 17, 512, 2, 2, 64, 64)
    assert 5 < t["in_kernel"] / t["pool_once"] < 20
    x = torch.empty(64, 243, 17, 512, dtype=torch.bfloat16)
    assert tpc._use_pool_once(tpc._Points("dpc_knn", x), 2)
    # two joints of 16 bits: no more bytes per point than the float32 copy, which costs a pass
    t = tpc.pooled_traffic(4, 243, 2, 512, 2, 2, 64, 64)
    assert t["pool_once"] > t["in_kernel"]
    assert not tpc._use_pool_once(tpc._Points("dpc_knn", torch.empty(4, 243, 2, 512, dtype=torch.float16)), 2)
    # plain input: nothing to pool
    assert not tpc._use_pool_once(tpc._Points("dpc_knn", torch.empty(2, 50, 8)), 2)
    pool_once_mode("sometimes")
    with pytest.raises(ValueError, match="POOL_ONCE"):
        tpc._use_pool_once(tpc._Points("dpc_knn", x), 2)


def test_model_counts_tile_visits():
    # the in-kernel bytes against a direct count of the sweeps' loads
    B, N, J, C, e, k, bm, bn = 3, 50, 5, 12, 2, 4, 16, 32
    loads = 0
    for _ in range(2):  # density and delta sweeps
        for _b in range(B):
            for r0 in range(0, N, bm):
                for c0 in range(0, N, bn):
                    loads += bm + bn + 1  # row tile, column tile, pivot
    loads += B * N * 2 * (k - 1) + B * N * 2  # exact: kept neighbours and parents
    t = tpc.pooled_traffic(B, N, J, C, e, k, bm, bn)
    assert t["in_kernel"] == loads * J * C * e
    assert t["pool_once"] == B * N * J * C * e + B * N * C * 4 + loads * C * 4
    assert hasattr(tpc_kernels, "_pool_kernel")
