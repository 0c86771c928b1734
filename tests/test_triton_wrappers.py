"""The Triton backend's launch wrappers: interpreter compatibility, grid limits (large batches),
the device guard, the selection + assignment split. Small shapes under the interpreter (CPU), a
few checks only a GPU (or two) can make are marked ``gpu``."""
import types

import numpy as np
import pytest
import torch

import hot_kernels as hk

triton = pytest.importorskip("triton")
if hk.available_backends("cpu")["triton"] is not None and not torch.cuda.is_available():
    pytest.skip("the triton backend does not run here", allow_module_level=True)

from hot_kernels.triton import _interp_compat  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---- Triton 3.6's interpreter under numpy >= 2.4 (issue 15 item 7) ----------------------------------


def _fake_interp(tmp_path, name: str, index_src: str):
    """A module with an interpreter-like _patch_lang_tensor whose __index__ is index_src."""
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(f"def _patch_lang_tensor(tensor, scope):\n    f = lambda self: {index_src}\n")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interp_compat_patches_only_the_old_index(tmp_path):
    numpy_refuses = True
    try:
        int(np.ones(1))
        numpy_refuses = False
    except TypeError:
        pass
    # Triton 3.6's __index__ needs the fix exactly when numpy refuses; Triton >= 3.7's never does.
    assert _interp_compat._needs_patch(_fake_interp(tmp_path, "old", "int(self.handle.data)")) == numpy_refuses
    assert not _interp_compat._needs_patch(_fake_interp(tmp_path, "new", "int(self.handle.data.squeeze())"))
    assert not _interp_compat._needs_patch(types.SimpleNamespace())


def test_runtime_loop_bounds_run():
    """range() over runtime scalars (kernel arguments, as every TPC/TRA kernel has) under this
    Triton and numpy: the kernel sums x[0:n] in chunks of 4 and must match torch."""
    import triton.language as tl

    @triton.jit
    def chunk_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0))

    x = torch.randn(11, device=DEV)
    out = torch.full((1,), float("nan"), device=DEV)
    chunk_sum[(1,)](x, out, 11, BLOCK=4)
    torch.testing.assert_close(out[0], x.sum())


# ---- launch grids within CUDA's limits for any batch (issue 15 item 1) -------------------------------

CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


class _Recorder:
    """Stands in for a @triton.jit kernel: records the grid of each launch, runs nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid)))
        return launch


def _record_launches(monkeypatch):
    from hot_kernels.triton import tpc_kernels, tra_kernels

    log = []
    for mod in (tpc_kernels, tra_kernels):
        for name in dir(mod):
            if name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, _Recorder(name, log))
    return log


def test_grids_within_cuda_limits_at_large_batch(monkeypatch):
    """Every launch of every Triton wrapper at B = 70000 (past the 65535 of grid axes 1 and 2):
    one-axis grids, within axis 0's limit, and every sample covered."""
    from hot_kernels.triton import tpc, tra

    log = _record_launches(monkeypatch)
    B, N, C = 70000, 5, 4
    x = torch.randn(B, N, C)
    mask = torch.ones(B, N, dtype=torch.bool)
    tpc.pairwise_distance(x, None)
    tpc.pairwise_distance(x, x[:, :3])
    d = torch.rand(B, N, N)
    tpc.pairwise_distance_backward(d, x, None, d)
    tpc.pairwise_distance_backward(d[:, :, :3], x, x[:, :3], d[:, :, :3])
    tpc.knn_density(x, 2, mask, True)
    tpc.dpc_delta(x, torch.randn(B, N), None)
    tpc.topf_select(torch.randn(B, N), 2, True, None)
    tpc.dpc_knn(x, 2, 2, None, None, True, True, True)
    tpc.dpc_knn(x, 2, 2, None, None, True, False, True)
    clip = torch.randn(B, N, 2, C)
    idx = torch.zeros(B, 2, dtype=torch.long)
    tpc.gather_frames(clip, idx, torch.randn(1, 2, C))
    tpc.gather_frames_backward(torch.randn(B, 2, 2, C), idx, N, 1)
    S = B
    w = [torch.randn(C, C) for _ in range(4)]
    tra.token_recovering_attention(torch.randn(1, 3, C), torch.randn(S, 2, C), w[0], None, w[1], None, w[2], None,
                                   w[3], None, 2, 0.5, True)
    names = {n for n, _ in log}
    assert {"_pdist_kernel", "_pdist_bwd_kernel", "_density_kernel", "_delta_kernel", "_select_kernel",
            "_gather_kernel", "_gather_bwd_kernel", "_tra_fwd_kernel"} <= names
    for name, grid in log:
        assert len(grid) <= 3 and all(1 <= g <= lim for g, lim in zip(grid, CUDA_GRID_LIMITS)), (name, grid)
        # the batch lives on axis 0: at least one program per sample there (TRA's separate output
        # projection tiles the flattened (S*L, C) rows instead)
        if name != "_tra_out_kernel":
            assert grid[0] >= B, (name, grid)


def test_grid_past_axis0_limit_raises():
    from hot_kernels.triton import tpc

    with pytest.raises(ValueError, match="launch grid"):
        tpc._grid(2 ** 31)


def test_folded_grids_small_case():
    """Several row/column tiles per sample and several samples (the folded program ids decoded
    back into (sample, tile)) against the reference backend."""
    from hot_kernels.triton import tpc

    g = torch.Generator().manual_seed(15)
    B, N, C = 3, 37, 5
    x = torch.randn(B, N, C, generator=g)
    y = torch.randn(B, 21, C, generator=g)
    old = (tpc.SWEEP_BM, tpc.SWEEP_BN, tpc.PDIST_BLOCK)
    try:
        tpc.SWEEP_BM = tpc.SWEEP_BN = tpc.PDIST_BLOCK = 16  # 3 tiles per sample along N
        for args in ((x,), (x, y)):
            torch.testing.assert_close(hk.pairwise_distance(*args, backend="triton"),
                                       hk.pairwise_distance(*args, backend="reference"), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hk.knn_density(x, 3, backend="triton"), hk.knn_density(x, 3, backend="reference"),
                                   rtol=1e-4, atol=1e-5)
        lr = hk.knn_density(x, 2, log=True, backend="reference")
        d_t, p_t = hk.dpc_delta(x, lr, backend="triton")
        d_r, p_r = hk.dpc_delta(x, lr, backend="reference")
        torch.testing.assert_close(d_t, d_r, rtol=1e-4, atol=1e-5)
        assert torch.equal(p_t, p_r)
        clip = torch.randn(B, 9, 3, C, generator=g, requires_grad=True)
        index = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(B)])
        pos = torch.randn(1, 4, C, generator=g, requires_grad=True)
        gout = torch.randn(B, 4, 3, C, generator=g)
        outs = []
        for gather in (lambda: torch.ops.hot_kernels.gather_frames(clip, index, pos, "triton"),
                       lambda: clip[torch.arange(B)[:, None], index] + pos[:, :, None, :]):
            o = gather()
            outs.append((o, *torch.autograd.grad(o, (clip, pos), gout)))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b)
    finally:
        tpc.SWEEP_BM, tpc.SWEEP_BN, tpc.PDIST_BLOCK = old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_large_batch_runs_on_gpu():
    """B = 70000 launches and matches the reference on a GPU (the limit the folding removes)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, C = 70000, 6, 4
    x = torch.randn(B, N, C, device="cuda", generator=g)
    torch.testing.assert_close(hk.pairwise_distance(x, backend="triton"), hk.pairwise_distance(x, backend="reference"),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hk.knn_density(x, 2, backend="triton"), hk.knn_density(x, 2, backend="reference"),
                               rtol=1e-4, atol=1e-5)
    idx_t, asg_t = hk.dpc_knn(x, 3, 2, return_assignment=True, backend="triton")
    assert idx_t.shape == (B, 3) and asg_t.shape == (B, N)
    assert ((idx_t >= 0) & (idx_t < N)).all() and ((asg_t >= 0) & (asg_t < 3)).all()
    clip = torch.randn(B, N, 2, C, device="cuda", generator=g)
    out, kept = hk.token_pruning_cluster(clip, 3, backend="triton")
    torch.testing.assert_close(out, clip[torch.arange(B, device="cuda")[:, None], kept])


# ---- device guard (issue 15 item 2) -------------------------------------------------------------------


ENTRY_POINTS = ("pairwise_distance", "pairwise_distance_backward", "knn_density", "dpc_delta", "topf_select",
                "dpc_knn", "gather_frames", "gather_frames_backward", "token_recovering_attention",
                "token_recovering_attention_backward", "token_recovering_interpolation",
                "token_recovering_interpolation_backward", "merge_tokens", "merge_tokens_backward")


def test_every_entry_point_is_device_guarded():
    import hot_kernels.triton as T

    for name in ENTRY_POINTS:
        assert getattr(getattr(T, name), "device_guarded", False), name


def test_device_guard_enters_the_inputs_device(monkeypatch):
    """With a mock torch.cuda.device: a cuda:1 input makes device 1 current for the wrapper's body
    (and restores the previous one after), a CPU input enters nothing."""
    from hot_kernels.triton._device import on_input_device

    state = {"current": 0, "entered": []}

    class FakeDevice:
        def __init__(self, dev):
            self.idx = torch.device(dev).index

        def __enter__(self):
            self.prev, state["current"] = state["current"], self.idx
            state["entered"].append(self.idx)

        def __exit__(self, *exc):
            state["current"] = self.prev
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    seen = []

    @on_input_device
    def body(t, k, *, flag):
        seen.append((state["current"], k, flag))
        return k

    cuda1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    assert body(cuda1, 7, flag=True) == 7
    assert seen[-1] == (1, 7, True) and state["current"] == 0 and state["entered"] == [1]
    body(torch.zeros(1), 3, flag=False)
    assert seen[-1] == (0, 3, False) and state["entered"] == [1]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_input_runs_there():
    """Inputs on cuda:1 while cuda:0 is current: every op matches the reference there, and device
    0 gets no allocation."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(3, 40, 16, device=dev, generator=g)
    before = torch.cuda.memory_allocated(0)
    torch.testing.assert_close(hk.pairwise_distance(x, backend="triton"), hk.pairwise_distance(x, backend="reference"),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hk.knn_density(x, 2, backend="triton"), hk.knn_density(x, 2, backend="reference"),
                               rtol=1e-4, atol=1e-5)
    idx, asg = hk.dpc_knn(x, 8, 2, return_assignment=True, backend="triton")
    assert idx.device == dev and ((asg >= 0) & (asg < 8)).all()
    clip = torch.randn(3, 40, 2, 16, device=dev, generator=g, requires_grad=True)
    out, kept = hk.token_pruning_cluster(clip, 8, backend="triton")
    torch.testing.assert_close(out, clip[torch.arange(3, device=dev)[:, None], kept])
    out.sum().backward()
    C = 16
    w = [torch.randn(C, C, device=dev, generator=g) * 0.2 for _ in range(4)]
    q = torch.randn(1, 12, C, device=dev, generator=g)
    kv = torch.randn(3, 9, C, device=dev, generator=g)
    args = (q, kv, w[0], None, w[1], None, w[2], None, w[3], None)
    torch.testing.assert_close(hk.token_recovering_attention(*args, num_heads=2, backend="triton"),
                               hk.token_recovering_attention(*args, num_heads=2, backend="reference"),
                               rtol=1e-3, atol=1e-3)
    torch.cuda.synchronize(dev)
    assert torch.cuda.memory_allocated(0) == before
    assert torch.cuda.current_device() == 0


# ---- selection once, then the assignment (issue 15 item 5) ---------------------------------------------


class _Spy:
    """Wraps a @triton.jit kernel: records each launch's grid, then launches it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.parametrize("single", [True, False], ids=["sort", "bisection"])
def test_selection_once_then_assignment(monkeypatch, single):
    """dpc_knn with the assignment: one selection program per sample, then the assignment over
    several programs per sample (each over several row tiles); both valid against the float64
    brute force (tie-aware), the selection the same as without the assignment."""
    from hot_kernels.triton import tpc, tpc_kernels
    from hot_kernels import reference as R
    from hot_kernels.functional import _dpc_knn
    from selection import assert_same_or_near_tie, check_assignment, check_selection

    sel, asg_log = [], []
    monkeypatch.setattr(tpc_kernels, "_select_kernel", _Spy(tpc_kernels._select_kernel, sel))
    monkeypatch.setattr(tpc_kernels, "_assign_kernel", _Spy(tpc_kernels._assign_kernel, asg_log))
    monkeypatch.setattr(tpc, "ASSIGN_BM", 16)  # 3-5 row tiles of 16 (N = 40, 70)
    monkeypatch.setattr(tpc, "ASSIGN_MAX_PROGRAMS", 2)  # 2 programs per sample, 2-3 tiles each
    if not single:
        monkeypatch.setattr(tpc, "SELECT_SINGLE_MAX", 32)
        monkeypatch.setattr(tpc, "SELECT_CHUNK", 32)
    g = torch.Generator().manual_seed(5)
    B, N, C, f = 2, 70 if single else 40, 8, 9
    x = torch.randn(B, N, C, generator=g)
    mask = torch.rand(B, N, generator=g) > 0.2
    combos = ((True, None, True), (False, 7, False)) if single else ((False, 7, True),)
    for sorted_, center, keep in combos:
        sel.clear()
        asg_log.clear()
        index, asg = _dpc_knn("dpc_knn", x, f, 2, mask, center, True, sorted_, keep, "triton")
        assert sel == [(B,)] and asg_log == [(B * 2,)]
        kw = dict(token_mask=mask, center=center, keep_center=keep, sorted=sorted_)
        want, _ = R.dpc_knn(x, f, 2, mask, center, True, sorted=sorted_, keep_center=keep)
        assert_same_or_near_tie(index, want, x, f, 2, **kw)
        check_selection(x, index, f, 2, **kw)
        check_assignment(x, index, asg)


# ---- registration: triton_op + wrap_triton (issue 15 item 6) ------------------------------------------

# Run without the interpreter (the ops are then triton_ops) on fake CUDA tensors: AOT autograd's
# functionalization (what torch.compile / AOTInductor do before Inductor) must decompose each TPC
# op into its Triton kernels. No kernel runs; nothing here needs a GPU.
_TRACE_SCRIPT = r"""
import contextlib, json
import torch
import hot_kernels
from hot_kernels.triton import tpc
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode

from hot_kernels.triton import _target
_GPU = _target.override((9, 0), 132)
_GPU.__enter__()  # no CUDA device here: what the wrappers would query (an H100/H200)
torch.cuda.device = lambda dev: contextlib.nullcontext()  # nor a device to enter
ops = torch.ops.hot_kernels


class Model(torch.nn.Module):
    def forward(self, x, clip, idx, pos, g, q, xs, wq, bq, wk, bk, wv, bv, wo, bo):
        w = (wq, bq, wk, bk, wv, bv, wo, bo)
        index, asg = ops.dpc_knn(x, 4, 2, None, None, True, True, True, "triton")
        d = ops.pairwise_distance(x, None, "triton")
        gx, _ = ops.pairwise_distance_backward(d, x, None, d, "triton")
        rho = ops.knn_density(x, 2, None, True, "triton")
        delta, parent = ops.dpc_delta(x, rho, None, "triton")
        top = ops.topf_select(delta, 3, False, None, "triton")
        kept = ops.gather_frames(clip, idx, pos, "triton")
        gc, gp = ops.gather_frames_backward(g, idx, 10, 1, "triton")
        out, lse, kv, o = ops.token_recovering_attention(q, xs, *w, 2, 0.25, True, True, "triton")
        grads = ops.token_recovering_attention_backward(out, q, xs, *w, lse, kv, o, 2, 0.25, True, "triton")
        return index, asg, gx, parent, top, kept, gc, gp, out, *grads


with FakeTensorMode(allow_non_fake_inputs=True):
    dev = "cuda"
    args = [torch.empty(2, 40, 8, device=dev), torch.empty(2, 10, 3, 8, device=dev),
            torch.zeros(2, 4, dtype=torch.long, device=dev), torch.empty(1, 4, 8, device=dev),
            torch.empty(2, 4, 3, 8, device=dev), torch.empty(1, 5, 32, device=dev, dtype=torch.bfloat16),
            torch.empty(3, 4, 32, device=dev, dtype=torch.bfloat16)]
    args += [torch.empty(*s, device=dev, dtype=torch.bfloat16) for s in [(32, 32), (32,)] * 4]
    gm, _ = aot_export_module(Model(), args, trace_joint=False)
nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
print(json.dumps({
    "kernels": [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                for n in nodes if "kernel_idx" in n.kwargs],
    "opaque": [str(n.target) for n in nodes if "hot_kernels" in str(n.target)],
}))
"""


def _without_interpreter_env():
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run traces and runs them for real (test_gpu.py)")
def test_triton_ops_decompose_into_their_kernels():
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=_without_interpreter_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["opaque"] == []  # no hot_kernels op left opaque: Inductor sees every kernel
    assert got["kernels"] == ["_density_kernel", "_delta_kernel", "_select_kernel", "_assign_kernel",
                              "_pdist_kernel", "_pdist_bwd_kernel", "_density_kernel", "_density_kernel",
                              "_delta_kernel", "_select_kernel", "_gather_kernel", "_gather_bwd_kernel",
                              "_tra_fwd_kernel", "_tra_bwd_kv_kernel", "_tra_bwd_dq_kernel"]


def test_export_example_model_with_triton_backend():
    """torch.export of the python/ HourglassMixSTE on the triton backend (interpreted here):
    the exported program holds the hot_kernels ops and reproduces the eager forward."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    from hourglass_mixste import HourglassMixSTE

    torch.manual_seed(0)
    model = HourglassMixSTE(frames=9, joints=3, keep=4, dim=16, heads=2, depth=2, prune_after=1,
                            use_hot_kernels=True).eval()
    x = torch.randn(2, 9, 3, 2)
    with hk.use_backend("triton"), torch.no_grad():
        want = model(x)
        ep = torch.export.export(model, (x,))
        got = ep.module()(x)
    targets = {str(n.target) for n in ep.graph.nodes}
    assert {"hot_kernels.dpc_knn.default", "hot_kernels.gather_frames.default",
            "hot_kernels.token_recovering_attention.default"} <= targets
    torch.testing.assert_close(got, want)
