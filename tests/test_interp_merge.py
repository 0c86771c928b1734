"""token_recovering_interpolation and merge_tokens: the reference against a float64 brute force
(tests/oracle.py), every backend that runs here against the reference (forward and backward, on
fresh inputs, outputs poisoned), determinism, gradcheck, registration (opcheck, torch.compile
fullgraph, torch.export), the nn module, and the bad-input battery.

Shapes are tiny (the triton backend runs interpreted on CPU here): the file takes ~1 min on 2 cores.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hot_kernels as hk
import oracle as O
from hot_kernels import _ext
from hot_kernels import reference as R
from targets import runnable

TARGETS = [(b, d) for b, d in runnable(backends_on_cpu=("cpu", "triton"))]
IDS = [f"{b}-{d}" for b, d in TARGETS]

TOL = {  # forward, backward (as tests/test_backends.py)
    torch.float64: (dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-8, atol=1e-10)),
    torch.float32: (dict(rtol=2e-5, atol=2e-6), dict(rtol=1e-4, atol=1e-5)),
    torch.bfloat16: (dict(rtol=2e-2, atol=2e-2), dict(rtol=5e-2, atol=5e-2)),
    torch.float16: (dict(rtol=5e-3, atol=5e-3), dict(rtol=2e-2, atol=2e-2)),
}


# Uninitialised memory poisoned in every test (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("poison_uninitialised_memory")


def require(backend, device, op, dtype):
    why = hk.available_backends(device, op, dtype)[backend]
    if why is not None:
        pytest.skip(f"{backend}-{device}: {why}")


def kept_index(B, F, f, seed, first=None, last=None):
    """(B, f) ascending distinct frame indices in [0, F); first / last (if given) are the ends."""
    g = torch.Generator().manual_seed(seed)
    ends = [e for e in (first, last) if e is not None][:f]
    lo = 0 if first is None else first + 1
    hi = F if last is None else last
    rows = []
    for _ in range(B):
        inner = lo + torch.randperm(hi - lo, generator=g)[:f - len(ends)]
        rows.append(torch.cat([inner, torch.tensor(ends, dtype=torch.long)]).sort().values)
    return torch.stack(rows) if B else torch.zeros(0, f, dtype=torch.long)


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    got = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), got


# ---- token_recovering_interpolation: the reference against the brute force ----------------------

# (B, F, f, rest, first, last): kept frames away from / at the ends, f = 1, f = F, 3-D and 4-D.
INTERP_CASES = [
    (2, 11, 4, (3, 5), None, None),
    (3, 9, 3, (6,), 2, 6),
    (1, 7, 1, (2, 3), None, None),
    (2, 6, 6, (4,), None, None),
    (2, 13, 2, (1, 7), 0, 12),
    (0, 5, 2, (3,), None, None),
]


@pytest.mark.parametrize("B,F,f,rest,first,last", INTERP_CASES)
def test_reference_interpolation_matches_brute_force(B, F, f, rest, first, last):
    index = kept_index(B, F, f, seed=F + f, first=first, last=last)
    x = randn(B, f, *rest, seed=f)
    got = R.token_recovering_interpolation(x, index, F)
    assert got.shape == (B, F, *rest) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), O.brute_token_recovering_interpolation(x, index, F), rtol=1e-13, atol=1e-14)
    # Backward: grad_x = W^T grad_out.
    g = randn(B, F, *rest, seed=99)
    _, (gx,) = grads(lambda a: hk.token_recovering_interpolation(a, index, F, backend="reference"), [x], g)
    W = O.brute_interpolation_weights(index, F)
    n = int(np.prod(rest))
    want = np.stack([W[b].T @ g[b].reshape(F, n).numpy() for b in range(B)]) if B else np.zeros((0, f, n))
    np.testing.assert_allclose(gx.numpy().reshape(B, f, n), want, rtol=1e-12, atol=1e-13)


def test_kept_frames_come_back_exactly():
    index = kept_index(3, 17, 5, seed=4)
    x = randn(3, 5, 2, 7, seed=5, dtype=torch.float32)
    for backend, device in [("reference", "cpu")] + TARGETS:
        require(backend, device, "token_recovering_interpolation", torch.float32)
        out = hk.token_recovering_interpolation(x.to(device), index.to(device), 17, backend=backend).cpu()
        assert torch.equal(out.gather(1, index[:, :, None, None].expand(-1, -1, 2, 7)), x), backend


# ---- every backend against the reference ---------------------------------------------------------


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [0, 1, 2, 4, 5])
def test_interpolation_backends_match_the_reference(backend, device, dtype, case):
    require(backend, device, "token_recovering_interpolation", dtype)
    B, F, f, rest, first, last = INTERP_CASES[case]
    index = kept_index(B, F, f, seed=case + 10, first=first, last=last)
    x = randn(B, f, *rest, seed=case + 20, dtype=dtype)
    g = randn(B, F, *rest, seed=case + 30, dtype=dtype)
    want, (want_gx,) = grads(lambda a: hk.token_recovering_interpolation(a, index, F, backend="reference"), [x], g)
    got, (got_gx,) = grads(lambda a: hk.token_recovering_interpolation(a.to(device), index.to(device), F,
                                                                       backend=backend).cpu(), [x], g)
    fwd, bwd = TOL[dtype]
    assert got.dtype == dtype and got_gx.dtype == dtype
    torch.testing.assert_close(got, want, **fwd)
    torch.testing.assert_close(got_gx, want_gx, **bwd)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_interpolation_is_deterministic_bitwise(backend, device):
    index = kept_index(2, 19, 5, seed=1).to(device)
    x = randn(2, 5, 3, 9, seed=2, dtype=torch.float32).to(device).requires_grad_()
    g = randn(2, 19, 3, 9, seed=3, dtype=torch.float32).to(device)
    runs = []
    for _ in range(2):
        out = hk.token_recovering_interpolation(x, index, 19, backend=backend)
        runs.append((out, *torch.autograd.grad(out, x, g)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.skipif(_ext.C is None, reason=f"hot_kernels._C not built: {_ext.ERROR}")
def test_interpolation_gradcheck_float64():
    index = kept_index(2, 8, 3, seed=5)
    x = randn(2, 3, 2, 3, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: hk.token_recovering_interpolation(a, index, 8, backend="cpu"), (x,))


def test_interpolation_module():
    m = hk.nn.TokenRecoveringInterpolation(12, backend="reference")
    index = kept_index(2, 12, 4, seed=7)
    x = randn(2, 4, 3, 5, seed=8, dtype=torch.float32)
    assert torch.equal(m(x, index), hk.token_recovering_interpolation(x, index, 12, backend="reference"))
    assert "length=12" in repr(m) and not list(m.parameters())


# ---- merge_tokens ----------------------------------------------------------------------------------


def merge_inputs(B, N, f, C, seed, dtype=torch.float64, weighted=True, zero_cluster=False):
    """x, index (distinct kept tokens), assignment (each kept token in its own cluster), weight."""
    g = torch.Generator().manual_seed(seed)
    x = randn(B, N, C, seed=seed, dtype=dtype)
    index = torch.stack([torch.randperm(N, generator=g)[:f] for _ in range(B)]) if B else torch.zeros(0, f, dtype=torch.long)
    assignment = torch.randint(0, f, (B, N), generator=g)
    assignment.scatter_(1, index, torch.arange(f).expand(B, f))
    weight = (torch.rand(B, N, generator=g, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    if zero_cluster and B:
        weight[0][assignment[0] == 0] = 0  # cluster 0 of sample 0 weighs nothing: its mean is 0
    return x, index, assignment, weight


MERGE_CASES = [  # (B, N, f, C, weighted, zero_cluster)
    (2, 13, 4, 6, True, False),
    (3, 9, 3, 5, False, False),
    (2, 11, 1, 4, True, False),
    (2, 7, 7, 3, True, False),
    (2, 10, 3, 17, True, True),
    (0, 6, 2, 4, True, False),
]


@pytest.mark.parametrize("B,N,f,C,weighted,zero_cluster", MERGE_CASES)
def test_reference_merge_matches_brute_force(B, N, f, C, weighted, zero_cluster):
    x, index, assignment, weight = merge_inputs(B, N, f, C, seed=N + f, weighted=weighted, zero_cluster=zero_cluster)
    got = R.merge_tokens(x, index, assignment, weight)
    assert got.shape == (B, f, C)
    np.testing.assert_allclose(got.numpy(), O.brute_merge_tokens(x, index, assignment, weight), rtol=1e-13, atol=1e-14)
    if zero_cluster:
        assert torch.equal(got[0, 0], torch.zeros(C, dtype=got.dtype))


def test_merge_gradients_match_the_brute_force():
    """d out[p] / d x_i = w_i / W_p and d out[p] / d w_i = (x_i - out[p]) / W_p, by finite-difference-free algebra."""
    B, N, f, C = 2, 9, 3, 4
    x, index, assignment, weight = merge_inputs(B, N, f, C, seed=3)
    g = randn(B, f, C, seed=4)
    out, (gx, gw) = grads(lambda a, w: hk.merge_tokens(a, index, assignment, w, backend="reference"), [x, weight], g)
    W = np.zeros((B, f))
    for b in range(B):
        for i in range(N):
            W[b, assignment[b, i]] += float(weight[b, i])
    for b in range(B):
        for i in range(N):
            p = int(assignment[b, i])
            np.testing.assert_allclose(gx[b, i].numpy(), float(weight[b, i]) / W[b, p] * g[b, p].numpy(), rtol=1e-12)
            want_w = float((g[b, p] * (x[b, i] - out[b, p])).sum()) / W[b, p]
            np.testing.assert_allclose(float(gw[b, i]), want_w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [0, 1, 2, 4, 5])
def test_merge_backends_match_the_reference(backend, device, dtype, case):
    require(backend, device, "merge_tokens", dtype)
    B, N, f, C, weighted, zero_cluster = MERGE_CASES[case]
    x, index, assignment, weight = merge_inputs(B, N, f, C, seed=case + 40, dtype=dtype, weighted=weighted,
                                                zero_cluster=zero_cluster)
    g = randn(B, f, C, seed=case + 50, dtype=dtype)
    inputs = [x] + ([weight] if weighted else [])

    def run(backend_, dev):
        def fn(a, *w):
            return hk.merge_tokens(a.to(dev), index.to(dev), assignment.to(dev), w[0].to(dev) if w else None,
                                   backend=backend_).cpu()
        return fn

    want, want_g = grads(run("reference", "cpu"), inputs, g)
    got, got_g = grads(run(backend, device), inputs, g)
    fwd, bwd = TOL[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **fwd)
    for a, b in zip(got_g, want_g):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **bwd)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_merge_is_deterministic_bitwise_and_agrees_with_dpc_knn(backend, device):
    x = randn(2, 21, 8, seed=6, dtype=torch.float32).to(device).requires_grad_()
    w = (randn(2, 21, seed=7, dtype=torch.float32).abs() + 0.1).to(device).requires_grad_()
    index, assignment = hk.dpc_knn(x.detach(), 6, return_assignment=True, backend="reference")
    g = randn(2, 6, 8, seed=8, dtype=torch.float32).to(device)
    runs = []
    for _ in range(2):
        out = hk.merge_tokens(x, index, assignment, w, backend=backend)
        runs.append((out, *torch.autograd.grad(out, [x, w], g)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.skipif(_ext.C is None, reason=f"hot_kernels._C not built: {_ext.ERROR}")
def test_merge_gradcheck_float64():
    x, index, assignment, weight = merge_inputs(2, 7, 3, 3, seed=9)
    f = lambda a, w: hk.merge_tokens(a, index, assignment, w, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), weight.requires_grad_()))


# ---- compat.merge_tokens (TCFormer / Chat-UniVi conventions) --------------------------------------


def published_merge(x, idx_cluster, cluster_num, token_weight=None):
    """The TCFormer / Chat-UniVi computation (our transcription): index_add of w x and of w, mean
    with 1e-6 added to each cluster's weight sum; token_weight (B, N, 1)."""
    B, N, C = x.shape
    if token_weight is None:
        token_weight = x.new_ones(B, N, 1)
    idx = idx_cluster + torch.arange(B)[:, None] * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1).index_add_(0, idx.reshape(B * N),
                                                                       token_weight.reshape(B * N, 1)) + 1e-6
    norm_weight = token_weight / all_weight[idx]
    merged = x.new_zeros(B * cluster_num, C).index_add_(0, idx.reshape(B * N), (x * norm_weight).reshape(B * N, C))
    return merged.reshape(B, cluster_num, C)


@pytest.mark.parametrize("weighted", [True, False])
def test_compat_merge_tokens_matches_the_published_convention(weighted):
    x, index, assignment, weight = merge_inputs(2, 12, 4, 5, seed=11, dtype=torch.float32, weighted=weighted)
    tw = weight[..., None] if weighted else None
    want = published_merge(x, assignment, 4, tw)
    got = hk.compat.merge_tokens(x, assignment, 4, tw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # ... and agrees with hk.merge_tokens up to the 1e-6 in the denominator
    torch.testing.assert_close(got, hk.merge_tokens(x, index, assignment, weight), rtol=1e-5, atol=1e-5)


# ---- registration ------------------------------------------------------------------------------------

ops = torch.ops.hot_kernels
COMPILED = [b for b, d in TARGETS if d == "cpu" and b in ("cpu", "triton")]


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_interpolation_and_merge(backend):
    index = kept_index(2, 9, 3, seed=1)
    x = randn(2, 3, 2, 4, seed=2, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(ops.token_recovering_interpolation.default, (x, index, 9, backend))
    torch.library.opcheck(ops.token_recovering_interpolation.default, (x[:, :, 0].detach().requires_grad_(), index, 9,
                                                                       backend))
    xm, idx, asg, w = merge_inputs(2, 8, 3, 4, seed=3, dtype=torch.float32)
    torch.library.opcheck(ops.merge_tokens.default, (xm.requires_grad_(), asg, 3, w.requires_grad_(), backend))
    torch.library.opcheck(ops.merge_tokens.default, (xm, asg, 3, None, backend))


@pytest.mark.skipif(_ext.C is None, reason=f"hot_kernels._C not built: {_ext.ERROR}")
def test_compile_fullgraph_and_export():
    torch._dynamo.reset()
    index = kept_index(2, 9, 3, seed=1)
    x = randn(2, 3, 2, 4, seed=2, dtype=torch.float32).requires_grad_()
    xm, idx, asg, w = merge_inputs(2, 8, 3, 4, seed=3, dtype=torch.float32)
    xm.requires_grad_()
    w.requires_grad_()

    def step(x, index, xm, idx, asg, w):
        return (hk.token_recovering_interpolation(x, index, 9, backend="cpu").square().sum()
                + hk.merge_tokens(xm, idx, asg, w, backend="cpu").square().sum())

    assert torch._dynamo.explain(step)(x, index, xm, idx, asg, w).graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(step(x, index, xm, idx, asg, w), [x, xm, w])
    got = torch.autograd.grad(compiled(x, index, xm, idx, asg, w), [x, xm, w])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    class Recover(torch.nn.Module):
        def forward(self, x, index):
            return hk.token_recovering_interpolation(x, index, 9, backend="cpu")

    ep = torch.export.export(Recover(), (x.detach(), index))
    assert "hot_kernels.token_recovering_interpolation" in str(ep.graph)
    assert torch.equal(ep.module()(x.detach(), index), Recover()(x.detach(), index))


# ---- bad input --------------------------------------------------------------------------------------


def _ix(*rows):
    return torch.tensor(rows, dtype=torch.long)


X3 = torch.randn(2, 3, 4)
IX = _ix([0, 2, 5], [1, 3, 4])
BAD_INTERP = [
    (lambda: hk.token_recovering_interpolation(X3[0], IX, 6), r"x_kept must be a \(B, f, C\) or \(B, f, J, C\) tensor"),
    (lambda: hk.token_recovering_interpolation([1.0], IX, 6), "x_kept must be a .* tensor, got list"),
    (lambda: hk.token_recovering_interpolation(X3.long(), IX, 6), "x_kept must be float16, bfloat16, float32 or float64"),
    (lambda: hk.token_recovering_interpolation(X3[:, :0], IX[:, :0], 6), "at least one kept frame"),
    (lambda: hk.token_recovering_interpolation(X3, IX.float(), 6), r"index must be an integer \(int64\) tensor"),
    (lambda: hk.token_recovering_interpolation(X3, IX[:, :2], 6), r"index must have shape \(B, f\) = \(2, 3\)"),
    (lambda: hk.token_recovering_interpolation(X3, "0,1,2", 6), "index must be an int64 tensor"),
    (lambda: hk.token_recovering_interpolation(X3, IX, 2), r"F must be in \[3, "),
    (lambda: hk.token_recovering_interpolation(X3, IX, 6.0), "F must be an int"),
    (lambda: hk.token_recovering_interpolation(X3, IX, 5), r"index values must be frame indices in \[0, 4\]"),
    (lambda: hk.token_recovering_interpolation(X3, _ix([0, -1, 5], [1, 3, 4]), 6), r"index values must be frame indices"),
    (lambda: hk.token_recovering_interpolation(X3, _ix([0, 2, 5], [1, 4, 3]), 6), "index rows must be strictly ascending.*row 1"),
    (lambda: hk.token_recovering_interpolation(X3, _ix([0, 2, 2], [1, 3, 4]), 6), "index rows must be strictly ascending.*row 0"),
    (lambda: hk.token_recovering_interpolation(X3, IX.to("meta"), 6), "index is on meta"),
    (lambda: hk.token_recovering_interpolation(X3, IX, 6, backend="gpu"), "unknown backend 'gpu'"),
]


@pytest.mark.parametrize("call,message", BAD_INTERP, ids=[m for _, m in BAD_INTERP])
def test_bad_interpolation_input_raises_a_clear_error(call, message):
    with pytest.raises((hk.HotKernelsInputError, ValueError), match=message):
        call()


XM = torch.randn(2, 6, 3)
IM = _ix([0, 3], [5, 1])
AM = _ix([0, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0])
BAD_MERGE = [
    (lambda: hk.merge_tokens(XM[0], IM, AM), "x must be 3-D"),
    (lambda: hk.merge_tokens(XM.int(), IM, AM), "x must be float16, bfloat16, float32 or float64"),
    (lambda: hk.merge_tokens(XM, IM[0], AM), r"index must be a \(B, f\) int64 tensor"),
    (lambda: hk.merge_tokens(XM, IM.float(), AM), r"index must be an integer \(int64\) tensor"),
    (lambda: hk.merge_tokens(XM, IM[:1], AM), r"index must have shape \(B, f\) = \(2, 2\)"),
    (lambda: hk.merge_tokens(XM, torch.zeros(2, 0, dtype=torch.long), AM), r"index must keep f in \[1, 6\]"),
    (lambda: hk.merge_tokens(XM, IM, AM[:, :5]), r"assignment must have shape \(B, N\) = \(2, 6\)"),
    (lambda: hk.merge_tokens(XM, IM, AM.bool()), r"assignment must be an integer \(int64\) tensor"),
    (lambda: hk.merge_tokens(XM, _ix([0, 6], [5, 1]), AM), r"index values must be token indices in \[0, 5\]"),
    (lambda: hk.merge_tokens(XM, IM, AM + 1), r"assignment values must be cluster positions in \[0, 1\]"),
    (lambda: hk.merge_tokens(XM, _ix([1, 0], [5, 1]), AM), "each kept token must be in its own cluster"),
    (lambda: hk.merge_tokens(XM, IM, AM, torch.ones(2, 5)), r"weight must have shape \(B, N\) = \(2, 6\)"),
    (lambda: hk.merge_tokens(XM, IM, AM, torch.ones(2, 6, dtype=torch.float64)), "weight is torch.float64 but x is torch.float32"),
    (lambda: hk.merge_tokens(XM, IM, AM, torch.ones(2, 6, dtype=torch.long)), "weight must be float16"),
    (lambda: hk.merge_tokens(XM, IM, AM.to("meta")), "assignment is on meta"),
]


@pytest.mark.parametrize("call,message", BAD_MERGE, ids=[m for _, m in BAD_MERGE])
def test_bad_merge_input_raises_a_clear_error(call, message):
    with pytest.raises(hk.HotKernelsInputError, match=message):
        call()


def test_debug_mode_rejects_non_finite_input(monkeypatch):
    monkeypatch.setenv("HOT_KERNELS_DEBUG", "1")
    x = X3.clone()
    x[0, 1, 2] = float("nan")
    with pytest.raises(hk.HotKernelsInputError, match="x_kept has NaN or Inf values"):
        hk.token_recovering_interpolation(x, IX, 6)
    xm = XM.clone()
    xm[1, 0, 0] = float("inf")
    with pytest.raises(hk.HotKernelsInputError, match="x has NaN or Inf values"):
        hk.merge_tokens(xm, IM, AM)


def test_ops_exported():
    assert {"token_recovering_interpolation", "merge_tokens"} <= set(hk.__all__)
    assert hk.token_recovering_interpolation is hk.functional.token_recovering_interpolation
    assert "TokenRecoveringInterpolation" in hk.nn.__all__ and "merge_tokens" in hk.compat.__all__


# ---- bench cases ------------------------------------------------------------------------------------


def test_bench_cases_run_and_check_every_candidate_here():
    from hot_kernels import bench_cases as BC

    cases = BC.sweep_cases("cpu", {"N": [12], "C": [8]}, ops=("token_recovering_interpolation", "merge_tokens"))
    assert {(c.op, c.mode) for c in cases} == {(op, m) for op in ("token_recovering_interpolation", "merge_tokens")
                                               for m in ("forward", "forward+backward")}
    device = torch.device("cpu")
    for case in cases:
        assert BC.flop_model(case) > 0 and BC.byte_model(case) > 0 and case.title()
        inputs = BC.make_inputs(case, device)
        ran = 0
        ref_out = None
        for cand in BC.candidates(case, device, inputs, backends=["reference", "cpu"]):
            if cand.fn is None:
                continue
            out = cand.fn(inputs.args)
            ref_out = out if cand.label == "reference" else ref_out
            assert "rel. err" in BC.check_output(case, cand.label, inputs, out, ref_out)
            ran += 1
        assert ran >= 1
        # a wrong output is caught
        wrong = ref_out if case.mode == "forward" else ref_out[0]
        with pytest.raises(BC.CheckFailed):
            bad = wrong + 0.1 if case.mode == "forward" else (wrong + 0.1, ref_out[1])
            BC.check_output(case, "cpu", inputs, bad, ref_out)


@pytest.mark.skipif(_ext.C is None, reason=f"hot_kernels._C not built: {_ext.ERROR}")
def test_cpu_results_do_not_depend_on_the_thread_count():
    index = kept_index(3, 40, 9, seed=12)
    x = randn(3, 9, 4, 16, seed=13, dtype=torch.float32).requires_grad_()
    g = randn(3, 40, 4, 16, seed=14, dtype=torch.float32)
    xm, idx, asg, w = merge_inputs(3, 40, 9, 16, seed=15, dtype=torch.float32)
    xm.requires_grad_()
    w.requires_grad_()
    gm = randn(3, 9, 16, seed=16, dtype=torch.float32)
    saved = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, max(2, saved)):
            torch.set_num_threads(threads)
            out = hk.token_recovering_interpolation(x, index, 40, backend="cpu")
            merged = hk.merge_tokens(xm, idx, asg, w, backend="cpu")
            runs.append((out, *torch.autograd.grad(out, x, g), merged, *torch.autograd.grad(merged, [xm, w], gm)))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
