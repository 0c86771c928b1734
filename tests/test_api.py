"""Dispatch, validation and the public API contract (backend-independent)."""
import os

import pytest
import torch

import hot_kernels as hk
from hot_kernels import _dispatch, _ext

HAS_CPU_EXT = _ext.C is not None


@pytest.mark.skipif(not (os.environ.get("CI") or os.environ.get("HOT_KERNELS_REQUIRE_EXT")),
                    reason="only CI (CI=true) or HOT_KERNELS_REQUIRE_EXT=1 requires the compiled extension")
def test_compiled_extension_is_built_in_ci():
    # CI installs with scripts/install.sh, which requires the extension to build.
    assert HAS_CPU_EXT, f"hot_kernels._C is not importable: {_ext.ERROR}"


# ---- dispatch ---------------------------------------------------------------------------------


def test_default_backend_on_cpu_is_cpu_when_built():
    x = torch.randn(2, 8, 4)
    assert _dispatch.resolve("dpc_knn", x) == ("cpu" if HAS_CPU_EXT else "reference")


def test_every_dispatched_op_has_a_default_order_on_each_device():
    # resolve() reads the per-op tables: an op missing from one would fail with a KeyError.
    ops = set(_dispatch._ext.ops_for_device("cpu")) | set(_dispatch.CUDA_PREFERENCE) | set(_dispatch.CPU_PREFERENCE)
    for table in (_dispatch.CPU_PREFERENCE, _dispatch.CUDA_PREFERENCE):
        assert set(table) == ops
        for op, order in table.items():
            assert order[-1] == "reference" and set(order) <= set(_dispatch.BACKENDS), op
    x = torch.randn(2, 8, 4)
    for op in _dispatch.CPU_PREFERENCE:
        assert _dispatch.resolve(op, x) == (_dispatch.CPU_PREFERENCE[op][0] if HAS_CPU_EXT else "reference")


def test_precedence_argument_over_context_over_env(monkeypatch):
    x = torch.randn(2, 8, 4)
    monkeypatch.setenv("HOT_KERNELS_BACKEND", "reference")
    assert _dispatch.resolve("dpc_knn", x) == "reference"
    if HAS_CPU_EXT:
        with hk.use_backend("cpu"):
            assert _dispatch.resolve("dpc_knn", x) == "cpu"
            assert _dispatch.resolve("dpc_knn", x, "reference") == "reference"
            with hk.use_backend("reference"):
                assert _dispatch.resolve("dpc_knn", x) == "reference"
            assert _dispatch.resolve("dpc_knn", x) == "cpu"
    monkeypatch.delenv("HOT_KERNELS_BACKEND")
    assert _dispatch.resolve("dpc_knn", x) == ("cpu" if HAS_CPU_EXT else "reference")


def test_unknown_backend_names_are_rejected(monkeypatch):
    x = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        hk.dpc_knn(x, 2, backend="gpu")
    with pytest.raises(ValueError, match="use_backend"):
        with hk.use_backend("fast"):
            pass
    monkeypatch.setenv("HOT_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="HOT_KERNELS_BACKEND"):
        hk.dpc_knn(x, 2)


@pytest.mark.skipif(not HAS_CPU_EXT or _ext.C.with_cuda, reason="needs a CPU-only build of the extension")
def test_asking_for_cuda_on_a_cpu_build_says_what_is_missing():
    x = torch.randn(1, 4, 3)
    with pytest.raises(hk.BackendUnavailableError,
                       match="the cuda backend needs hot_kernels._C built with CUDA; this build has: cpu"):
        hk.dpc_knn(x, 2, backend="cuda")


def test_explicit_request_never_falls_back(monkeypatch):
    x = torch.randn(1, 4, 3)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(hk.BackendUnavailableError, match="asked for by backend="):
        hk.dpc_knn(x, 2, backend="triton")
    monkeypatch.setenv("HOT_KERNELS_BACKEND", "triton")
    with pytest.raises(hk.BackendUnavailableError, match="asked for by HOT_KERNELS_BACKEND"):
        hk.dpc_knn(x, 2)


def test_available_backends_reports_reasons():
    table = hk.available_backends("cpu")
    assert table["reference"] is None
    assert set(table) == set(hk.BACKENDS)
    assert all(v is None or isinstance(v, str) and v for v in table.values())


# ---- validation: every message names the argument --------------------------------------------

BAD_TPC_CALLS = [
    (lambda x: hk.dpc_knn(x[0], 2), "x must be 3-D"),
    (lambda x: hk.dpc_knn(x.long(), 2), "x must be float16, bfloat16, float32 or float64"),
    (lambda x: hk.dpc_knn(x, 0), r"f must be in \[1, 8\]"),
    (lambda x: hk.dpc_knn(x, 9), r"f must be in \[1, 8\]"),
    (lambda x: hk.dpc_knn(x, 2.0), "f must be an int"),
    (lambda x: hk.dpc_knn(x, True), "f must be a Python int"),
    (lambda x: hk.dpc_knn(x, 2, k=0), r"k must be in \[1, 8\]"),
    (lambda x: hk.dpc_knn(x, 2, k=9), r"k must be in \[1, 8\]"),
    (lambda x: hk.dpc_knn(x, 2, center=8), r"center must be in \[0, 7\]"),
    (lambda x: hk.dpc_knn(x, 2, center=-1), r"center must be in \[0, 7\]"),
    (lambda x: hk.dpc_knn(x, 2, token_mask=torch.ones(3, 8)), "token_mask must be a bool tensor"),
    (lambda x: hk.dpc_knn(x, 2, token_mask=torch.ones(3, 7, dtype=torch.bool)), r"token_mask must have shape \(B, N\) = \(3, 8\)"),
    (lambda x: hk.dpc_knn(x, 2, token_mask=torch.ones(3, 8, dtype=torch.bool, device="meta")), "token_mask is on meta"),
    (lambda x: hk.dpc_knn(x[:, :0], 1), "at least one token"),
    (lambda x: hk.dpc_knn(x, 2, return_assignment=1), "return_assignment must be True or False"),
    (lambda x: hk.knn_density(x, 9), r"k must be in \[1, 8\]"),
    (lambda x: hk.dpc_delta(x, torch.rand(3, 7)), r"density must have shape \(B, N\)"),
    (lambda x: hk.dpc_delta(x, torch.rand(3, 8, device="meta")), "density is on meta"),
    (lambda x: hk.topf_select(torch.rand(3, 8), 8, exclude=1), r"f must be in \[1, 7\]"),
    (lambda x: hk.topf_select(torch.rand(3, 8), 2, exclude=8), r"exclude must be in \[0, 7\]"),
    (lambda x: hk.topf_select(torch.rand(3, 8), 2, exclude=torch.tensor([0, 1, 9])), r"exclude values must be in \[0, 7\]"),
    (lambda x: hk.topf_select(torch.rand(3, 8), 2, exclude=torch.zeros(2, dtype=torch.long)), r"exclude must have shape \(B,\)"),
    (lambda x: hk.topf_select(torch.arange(8)[None], 2), "score must be float16"),
    (lambda x: hk.pairwise_distance(x, torch.randn(3, 5, 4)), r"y must be \(B, M, C\) with B = 3 and C = 5"),
    (lambda x: hk.pairwise_distance(x, x.double()), "y is torch.float64 but x is torch.float32"),
    (lambda x: hk.token_pruning_cluster(x, 2), "x must be 4-D"),
    (lambda x: hk.token_pruning_cluster(x[:, :, None], 2, pos_embed=torch.zeros(1, 3, 5)),
     "pos_embed must have f = 2 tokens"),
    (lambda x: hk.compat.cluster_dpc_knn_center(x, 8, 2, 3), r"f must be in \[1, 7\]"),
]


@pytest.mark.parametrize("call,message", BAD_TPC_CALLS, ids=[m for _, m in BAD_TPC_CALLS])
def test_bad_tpc_input_raises_a_clear_error(call, message):
    x = torch.randn(3, 8, 5)
    with pytest.raises(hk.HotKernelsInputError, match=message):
        call(x)


def _tra_args(S=3, L=4, M=5, C=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(C, C, generator=g, dtype=dtype) for _ in range(4)]
    return dict(query=torch.randn(1, L, C, generator=g, dtype=dtype), x=torch.randn(S, M, C, generator=g, dtype=dtype),
                wq=w[0], bq=None, wk=w[1], bk=None, wv=w[2], bv=None, wo=w[3], bo=torch.zeros(C, dtype=dtype),
                num_heads=2)


BAD_TRA_CALLS = [
    (dict(num_heads=3), "num_heads = 3 must divide the width C = 8"),
    (dict(num_heads=0), r"num_heads must be in \[1, 8\]"),
    (dict(query=torch.randn(1, 4, 6)), "query width 6 does not match x width C = 8"),
    (dict(query=torch.randn(2, 4, 8)), r"query must be \(1, L, C\) \(shared\) or \(S, L, C\) with S = 3"),
    (dict(wq=torch.randn(8, 6)), r"wq must have shape \(8, 8\)"),
    (dict(wo=None), "wo must be a \\(8, 8\\) weight tensor, got None"),
    (dict(bk=torch.randn(7)), r"bk must have shape \(8,\)"),
    (dict(wv=torch.randn(8, 8, dtype=torch.float64)), "wv is torch.float64 but x is torch.float32"),
    (dict(x=torch.randn(3, 5, 8).int()), "x must be float16"),
    (dict(bo=torch.zeros(8, device="meta")), "bo is on meta"),
    (dict(scale="big"), "scale must be a float"),
]


@pytest.mark.parametrize("change,message", BAD_TRA_CALLS, ids=[m for _, m in BAD_TRA_CALLS])
def test_bad_tra_input_raises_a_clear_error(change, message):
    args = {**_tra_args(), **change}
    with pytest.raises(hk.HotKernelsInputError, match=message):
        hk.token_recovering_attention(**args)


def test_debug_mode_rejects_non_finite_input(monkeypatch):
    x = torch.randn(2, 6, 3)
    x[1, 2, 0] = float("nan")
    hk.dpc_knn(x, 3)  # unspecified values but valid indices: no error by default
    monkeypatch.setenv("HOT_KERNELS_DEBUG", "1")
    with pytest.raises(hk.HotKernelsInputError, match="x has NaN or Inf values"):
        hk.dpc_knn(x, 3)


def test_selection_outputs_never_require_grad():
    x = torch.randn(2, 9, 4, requires_grad=True)
    for backend in ["reference"] + (["cpu"] if HAS_CPU_EXT else []):
        assert not hk.knn_density(x, 2, backend=backend).requires_grad
        delta, _ = hk.dpc_delta(x, hk.knn_density(x, 2, backend=backend), backend=backend)
        assert not delta.requires_grad
        assert hk.dpc_knn(x, 3, backend=backend).dtype == torch.int64


def test_gpu_backends_refuse_k_above_32_and_the_default_falls_back():
    import hot_kernels._dispatch as D

    x = torch.randn(1, 40, 4)
    for backend in ("cuda", "triton"):
        why = D.refusal(backend, "dpc_knn", torch.device("cuda"), torch.float32, k=33)
        assert why is not None and "k <= 32" in why and "k = 33" in why
        assert D.refusal(backend, "dpc_knn", torch.device("cuda"), torch.float64) is not None  # float64: cpu/reference
    if hk.available_backends("cpu")["triton"] is None:  # under TRITON_INTERPRET=1 (tests/conftest.py)
        with pytest.raises(hk.BackendUnavailableError, match="supports k <= 32"):
            hk.dpc_knn(x, 5, 33, backend="triton")
        assert hk.dpc_knn(x, 5, 32, backend="triton").shape == (1, 5)


# ---- autocast and torch.compile entry conditions --------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_selection_ignores_autocast(backend):
    """Under torch.autocast the selections compute in x's dtype, as outside it (the published
    code's torch.cdist is on autocast's float32 list): the kept frames do not change."""
    if backend == "cpu" and not HAS_CPU_EXT:
        pytest.skip("hot_kernels._C not built")
    torch.manual_seed(0)
    x = torch.randn(3, 243, 128).cumsum(1) * 0.05  # smooth clips: many near-equal distances
    want = hk.dpc_knn(x, 81, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hk.dpc_knn(x, 81, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_tra_under_autocast_runs_in_the_autocast_dtype(backend):
    if backend == "cpu" and not HAS_CPU_EXT:
        pytest.skip("hot_kernels._C not built")
    torch.manual_seed(0)
    C = 32
    query, x = torch.randn(1, 9, C), torch.randn(6, 3, C)
    w = [torch.randn(C, C) / C**0.5 for _ in range(4)]
    args = (query, x, w[0], None, w[1], None, w[2], None, w[3], None)
    want = hk.token_recovering_attention(*args, num_heads=4, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hk.token_recovering_attention(*args, num_heads=4, backend=backend)
    assert got.dtype == torch.bfloat16
    err = float((got.float() - want).norm() / want.norm())
    assert err < 2e-2, f"bf16 autocast error {err:.2e}"


def test_compile_fullgraph_as_the_first_call_in_a_process():
    """The first hot_kernels call of a fresh process may be inside torch.compile(fullgraph=True):
    nothing on the dispatch path is left to initialise lazily (Dynamo cannot trace pybind)."""
    import subprocess
    import sys

    code = ("import torch, hot_kernels as hk\n"
            "f = torch.compile(lambda x: hk.dpc_knn(x, 4), fullgraph=True)\n"
            "x = torch.randn(2, 16, 8)\n"
            "assert torch.equal(f(x), hk.dpc_knn(x, 4))\n")
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if hk.available_backends("cpu")[b] is None])
def test_self_check_passes_on_every_backend_that_runs_here(backend):
    # `hot-kernels check`: every op once against the reference, in the dtype the backend takes.
    from hot_kernels import selfcheck

    results = dict(selfcheck.run(backend, torch.device("cpu")))
    assert results and all(v is None for v in results.values()), results
