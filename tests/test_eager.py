"""The eager fast path (hot_kernels/_eager.py): in plain eager execution the cpu backend's C++
kernels run without the torch.library ops around them. It must give bitwise the ops' outputs and
gradients, keep the op names under the profiler, and step aside (the ops run) wherever something
needs to see the ops: torch.compile and export (tests/test_registration.py), dispatch and
torch-function modes, functorch transforms, jit tracing, tensor subclasses."""
import os
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import hot_kernels as hk
from hot_kernels import _eager, _ext

pytestmark = pytest.mark.skipif(_ext.C is None, reason=f"hot_kernels._C not built: {_ext.ERROR}")


def _profiled_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("hot_kernels::")}


def _tra_args(dtype, shared=True, S=3, L=7, M=5, C=16):
    g = torch.Generator().manual_seed(5)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    return [t(1 if shared else S, L, C), t(S, M, C), t(C, C, scale=0.3), t(C), t(C, C, scale=0.3), None,
            t(C, C, scale=0.3), t(C), t(C, C, scale=0.3), t(C)]


def _cases(dtype):
    """(name, fn() -> (outputs, differentiable inputs)) for every op with a cpu kernel."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 23, 12, generator=g, dtype=dtype)
    clip = torch.randn(2, 23, 3, 12, generator=g, dtype=dtype)
    pos = torch.randn(1, 7, 12, generator=g, dtype=dtype)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 17:] = False
    score = torch.randn(2, 23, generator=g, dtype=dtype)
    index = torch.tensor([[0, 3, 4, 9, 15, 20, 22], [1, 2, 5, 8, 11, 13, 16]])
    kept = torch.randn(2, 7, 3, 12, generator=g, dtype=dtype)
    weight = torch.rand(2, 23, generator=g, dtype=dtype)

    def grad_inputs(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    def pd():
        a, b = grad_inputs(x, x[:, :9] * 0.5)
        return [hk.pairwise_distance(a, b), hk.pairwise_distance(a)], [a, b]

    def selections():
        rho = hk.knn_density(x, 3, mask)
        log_rho = hk.knn_density(x, 2, log=True)
        delta, parent = hk.dpc_delta(x, log_rho, mask)
        return [rho, log_rho, delta, parent, hk.topf_select(score, 5), hk.topf_select(score, 5, False, exclude=2),
                *hk.dpc_knn(x, 7, 2, mask, center=4, return_assignment=True), hk.dpc_knn(x, 7, 3, sorted=False)], []

    def tpc():
        a, p = grad_inputs(clip, pos)
        return list(hk.token_pruning_cluster(a, 7, 2, center=11, pos_embed=p)), [a, p]

    def tra():
        args = _tra_args(dtype)
        return [hk.token_recovering_attention(*args, num_heads=4)], [a for a in args if a is not None]

    def tra_unshared_no_residual():
        args = _tra_args(dtype, shared=False)
        return [hk.token_recovering_attention(*args, num_heads=2, residual=False)], [a for a in args if a is not None]

    def interp():
        (a,) = grad_inputs(kept)
        return [hk.token_recovering_interpolation(a, index, 23)], [a]

    def merge():
        a, w = grad_inputs(x, weight)
        idx, assignment = hk.dpc_knn(x, 7, return_assignment=True)
        return [hk.merge_tokens(a, idx, assignment, w), hk.merge_tokens(a, idx, assignment)], [a, w]

    return dict(pd=pd, selections=selections, tpc=tpc, tra=tra, tra_unshared_no_residual=tra_unshared_no_residual,
                interp=interp, merge=merge)


def _run(case, dtype, eager: bool, monkeypatch):
    monkeypatch.setattr(_eager, "ENABLED", eager)
    outputs, inputs = _cases(dtype)[case]()
    grads = []
    if inputs:
        g = torch.Generator().manual_seed(11)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs
                   if o.is_floating_point() and o.requires_grad)
        grads = torch.autograd.grad(loss, inputs)
    return outputs, grads


CASES = ("pd", "selections", "tpc", "tra", "tra_unshared_no_residual", "interp", "merge")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_the_ops_bitwise(case, dtype, monkeypatch):
    got, got_grads = _run(case, dtype, True, monkeypatch)
    want, want_grads = _run(case, dtype, False, monkeypatch)
    assert len(got) == len(want) and len(got_grads) == len(want_grads)
    for a, b in zip(got + list(got_grads), want + list(want_grads)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    if case not in ("selections",):
        assert got_grads and all(g.abs().sum() > 0 for g in got_grads)


def test_fast_path_runs_in_plain_eager_under_the_ops_names(monkeypatch):
    # The ops' own implementation shows as hot_kernels::compiled_<op> under the profiler; the fast
    # path labels its direct calls with the public op's name only.
    outputs, inputs = _cases(torch.float32)["tra"]()
    names = _profiled_names(lambda: outputs[0].sum().backward())
    assert names == {"hot_kernels::token_recovering_attention_backward"}
    x = torch.randn(1, 12, 3, 8, requires_grad=True)
    names = _profiled_names(lambda: hk.token_pruning_cluster(x, 4)[0].sum().backward())
    assert names == {"hot_kernels::dpc_knn", "hot_kernels::gather_frames", "hot_kernels::gather_frames_backward"}
    monkeypatch.setattr(_eager, "ENABLED", False)
    names = _profiled_names(lambda: hk.token_pruning_cluster(x, 4)[0].sum().backward())
    assert {"hot_kernels::dpc_knn", "hot_kernels::compiled_dpc_knn", "hot_kernels::compiled_gather_frames"} <= names


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class _FunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_fast_path_steps_aside_where_the_ops_must_be_seen():
    x = torch.randn(2, 9, 4)
    assert _eager.applies("cpu", x, None, torch.nn.Parameter(x.clone()))
    for backend in ("reference", "triton"):
        assert not _eager.applies(backend, x)
    assert not _eager.applies("cpu", x.as_subclass(_Subclass))
    with _FunctionMode():
        assert not _eager.applies("cpu", x)
    with _Recorder() as recorder:
        assert not _eager.applies("cpu", x)
        hk.dpc_knn(x, 3)  # the op path: the dispatch mode sees the op
    assert "hot_kernels.dpc_knn" in recorder.ops
    seen = []
    torch.vmap(lambda row: seen.append(_eager.applies("cpu", row)) or row)(x)
    assert seen == [False]

    def traced(t):
        seen.append(_eager.applies("cpu", t))
        return t * 2

    torch.jit.trace(traced, (x,), check_trace=False)
    assert seen[-1] is False
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not _eager.applies("cpu", fake)
        assert hk.dpc_knn(fake, 3).shape == (2, 3)  # the op's fake implementation


def test_fast_path_keeps_autograd_semantics():
    args = _tra_args(torch.float64)
    out = hk.token_recovering_attention(*args, num_heads=4)
    grad_out = torch.randn_like(out).requires_grad_()
    (gx,) = torch.autograd.grad(out, args[1], grad_out, create_graph=True)
    # No double backward: a clear error (the op path raises that its backward has no autograd).
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        gx.sum().backward()
    out = hk.token_recovering_attention(*args, num_heads=4)
    with torch.no_grad():
        args[1].mul_(2)  # a saved input modified in place: autograd's version check catches it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # Without grad (or inside inference_mode) the kernels run without a graph, as on the op path.
    with torch.inference_mode():
        assert not hk.token_recovering_attention(*args, num_heads=4).requires_grad
    x = torch.randn(1, 12, 3, 8, requires_grad=True)
    with torch.no_grad():
        assert hk.token_pruning_cluster(x, 4)[0].grad_fn is None
    kept = hk.token_pruning_cluster(x, 4)[0]
    assert kept.grad_fn is not None and kept.requires_grad


@pytest.mark.parametrize("case", ["pd", "tpc", "interp", "merge", "tra", "tra_unshared_no_residual"])
def test_batched_gradients_take_the_ops_backward(case, monkeypatch):
    # autograd.grad(..., is_grads_batched=True) vmaps the backward pass over gradients that are
    # Tensors by type: the fast path's backward must hand them to the registered backward op (the
    # dispatcher batches it: TRA's backward through its own vmap rule, hot_kernels/_ops.py), never
    # to the C++ kernel. Each batched gradient equals the plain gradient of its own grad_output.
    g = torch.Generator().manual_seed(2)
    shape = _cases(torch.float64)[case]()[0][0].shape
    grad = torch.randn(3, *shape, generator=g, dtype=torch.float64)

    def run(eager):
        monkeypatch.setattr(_eager, "ENABLED", eager)
        outputs, inputs = _cases(torch.float64)[case]()
        return torch.autograd.grad(outputs[0], inputs, grad, is_grads_batched=True, allow_unused=True)

    def one(i):
        outputs, inputs = _cases(torch.float64)[case]()
        return torch.autograd.grad(outputs[0], inputs, grad[i], allow_unused=True)

    got, want = run(True), run(False)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    assert any(a is not None and a.shape[0] == 3 for a in got)
    singles = [one(i) for i in range(3)]
    for j, a in enumerate(got):
        if a is not None:
            torch.testing.assert_close(a, torch.stack([s[j] for s in singles]), rtol=1e-12, atol=1e-12)


_CHECKPOINT = """
import torch, hot_kernels as hk
from hot_kernels import _eager
torch.set_num_threads(2)  # the kernels' parallel regions copy the saved-tensor hooks to each thread
g = torch.Generator().manual_seed(5)
def t(*shape):
    return (torch.randn(*shape, generator=g) * 0.3).requires_grad_()
C = 32
tra = [t(1, 27, C), t(3, 9, C), t(C, C), t(C), t(C, C), None, t(C, C), t(C), t(C, C), t(C)]
clip, pos = t(2, 40, 3, C), t(1, 10, C)
inputs = [a for a in tra if a is not None] + [clip, pos]
def block():
    kept = hk.token_pruning_cluster(clip, 10, pos_embed=pos)[0]
    d = hk.pairwise_distance(kept.mean(2))
    return hk.token_recovering_attention(*tra, num_heads=4).square().sum() + kept.square().sum() + d.sum()
want = torch.autograd.grad(block(), inputs)
for eager in (True, False):
    _eager.ENABLED = eager
    out = torch.utils.checkpoint.checkpoint(block, use_reentrant=False)
    got = torch.autograd.grad(out, inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), eager
    with torch.autograd.graph.save_on_cpu():
        got = torch.autograd.grad(block(), inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), eager
print("ok")
"""


def test_under_saved_tensor_hooks_both_paths_give_the_same_gradients():
    # torch.utils.checkpoint(use_reentrant=False) and save_on_cpu run with Python saved-tensor
    # hooks in the thread-local state that the kernels' OpenMP workers copy: with the GIL held
    # across a kernel call this deadlocked (both paths). A subprocess with a time limit, so a
    # regression fails here instead of hanging the suite.
    try:
        out = subprocess.run([sys.executable, "-c", _CHECKPOINT], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the kernels deadlocked under saved-tensor hooks")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_tra_common_case_takes_only_calls_the_full_path_would_accept(monkeypatch):
    """functional._tra_common_case runs a plain TRA call in a few Python steps, without the full
    path's validation and dispatch, with bitwise the full path's outputs and gradients (also when it
    names the cpu backend); every other call (another backend named, non-Python scalars, a bad shape or dtype, a broadcast query,
    S = 0, debug checks, autocast, another backend chosen) goes through the full path."""
    import numpy as np

    full_path = _count_full_path(monkeypatch)

    def run(args, **kw):
        out = hk.token_recovering_attention(*args, **{"num_heads": 4, **kw})
        leaves = [a for a in args if a is not None and a.requires_grad]
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out)) if out.requires_grad else ()
        return out.detach(), grads

    args = _tra_args(torch.float32)
    fast = run(args)
    with torch.no_grad():
        fast_no_grad = hk.token_recovering_attention(*args, num_heads=4)
    named = run(args, backend="cpu")
    with hk.use_backend("reference"):  # the named backend wins over use_backend
        named_over_block = run(args, backend="cpu")
    assert full_path == []
    monkeypatch.setenv("HOT_KERNELS_DEBUG", "1")  # adds finiteness checks only: the full path, same values
    full = run(args)
    monkeypatch.delenv("HOT_KERNELS_DEBUG")
    assert full_path
    assert torch.equal(fast[0], full[0]) and torch.equal(fast_no_grad, full[0])
    assert len(fast[1]) == 9 and all(torch.equal(a, b) for a, b in zip(fast[1], full[1]))
    for other in (named, named_over_block):
        assert torch.equal(other[0], full[0]) and all(torch.equal(a, b) for a, b in zip(other[1], full[1]))

    def through_full_path(fn, raises=None):
        _assert_full_path(full_path, fn, raises)

    detached = [a.detach() if a is not None else None for a in args]
    through_full_path(lambda: run(args, backend="reference"))
    through_full_path(lambda: run(args, backend="cuda"), raises=hk.BackendUnavailableError)
    through_full_path(lambda: run(args, backend="cpus"), raises=ValueError)
    through_full_path(lambda: run(args, scale=np.float32(0.3)))
    through_full_path(lambda: run(args, num_heads=np.int64(4)))
    through_full_path(lambda: run(args, residual=1), raises=hk.HotKernelsInputError)
    through_full_path(lambda: run(args[:3] + [torch.zeros(5)] + args[4:]), raises=hk.HotKernelsInputError)
    through_full_path(lambda: run([args[0].double()] + args[1:]), raises=hk.HotKernelsInputError)
    through_full_path(lambda: run(args, num_heads=3), raises=hk.HotKernelsInputError)
    through_full_path(lambda: run([detached[0].expand(3, -1, -1)] + detached[1:]))
    through_full_path(lambda: run([detached[0], detached[1][:0]] + detached[2:]))
    with hk.use_backend("reference"):
        through_full_path(lambda: run(args))
    monkeypatch.setenv("HOT_KERNELS_BACKEND", "reference")
    through_full_path(lambda: run(args))
    monkeypatch.delenv("HOT_KERNELS_BACKEND")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        through_full_path(lambda: run(args))
    monkeypatch.setattr(_eager, "ENABLED", False)
    through_full_path(lambda: run(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tra_cpp_node_equals_the_python_function_bitwise(dtype):
    """On the cpu backend the eager TRA with gradients is the C++ autograd node; the Python
    autograd.Function it replaces (still the cuda backend's eager path) must give bitwise its outputs
    and gradients, so it stays checked here on CPU too."""
    args = _tra_args(dtype)
    leaves = [a for a in args if a is not None]
    scale = (16 // 4) ** -0.5
    node = _eager.token_recovering_attention(*args, 4, scale, True, True, "cpu")[0]
    python = _eager._TokenRecoveringAttention.apply(*args, 4, scale, True, True, "cpu")[0]
    assert node.grad_fn is not None and python.grad_fn is not None
    assert type(node.grad_fn).__name__ != type(python.grad_fn).__name__  # two implementations
    g = torch.randn(node.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    assert torch.equal(node, python)
    for a, b in zip(torch.autograd.grad(node, leaves, g), torch.autograd.grad(python, leaves, g)):
        assert torch.equal(a, b)


def _assert_full_path(full_path, fn, raises=None):
    """fn() went through the full path (full_path: _count_full_path's list), or raised the full
    path's validation error ``raises`` (the common case never raises one)."""
    full_path.clear()
    if raises is None:
        fn()
        assert full_path
    else:
        with pytest.raises(raises):
            fn()


def _count_full_path(monkeypatch):
    """A list that grows by one per call of _dispatch.resolve: every full path that gets past its
    validation resolves the backend; no common case does."""
    from hot_kernels import _dispatch

    calls = []
    real = _dispatch.resolve

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(_dispatch, "resolve", counting)
    return calls


def _selection_calls():
    """{op: (plain call, [(unusual call, expected exception or None)], differentiable inputs)}; the
    plain call takes a ``backend`` argument (None or "cpu": both the common case)."""
    import numpy as np

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 30, 8, generator=g)
    clip = torch.randn(2, 30, 3, 8, generator=g, requires_grad=True)
    pos = torch.randn(1, 9, 8, generator=g, requires_grad=True)
    mask = torch.ones(2, 30, dtype=torch.bool)
    bad, unavailable = hk.HotKernelsInputError, hk.BackendUnavailableError
    dpc = (lambda backend=None: hk.dpc_knn(x, 9, 2, center=4, return_assignment=True, backend=backend),
           [(lambda: hk.dpc_knn(x, 9, backend="reference"), None), (lambda: hk.dpc_knn(x, 9, backend="cuda"), unavailable),
            (lambda: hk.dpc_knn(x, 9, token_mask=mask), None),
            (lambda: hk.dpc_knn(x, np.int64(9)), None), (lambda: hk.dpc_knn(x, 9, center=np.int32(3)), None),
            (lambda: hk.dpc_knn(x, 31), bad), (lambda: hk.dpc_knn(x, 9, 0), bad),
            (lambda: hk.dpc_knn(x, 9, center=30), bad), (lambda: hk.dpc_knn(x[0], 9), bad),
            (lambda: hk.dpc_knn(x, 9, return_assignment=1), bad), (lambda: hk.dpc_knn(x[:, :0], 1), bad),
            (lambda: hk.dpc_knn(x.to(torch.int32), 9), bad)], [])
    tpc = (lambda backend=None: hk.token_pruning_cluster(clip, 9, 2, center=4, pos_embed=pos, backend=backend),
           [(lambda: hk.token_pruning_cluster(clip, 9, backend="reference"), None),
            (lambda: hk.token_pruning_cluster(clip, 9, backend="cuda"), unavailable),
            (lambda: hk.token_pruning_cluster(clip, 9, pos_embed=pos[:, :8]), bad),
            (lambda: hk.token_pruning_cluster(clip, 9, pos_embed=pos.double()), bad),
            (lambda: hk.token_pruning_cluster(clip, 9, pos_embed=pos[0]), bad),
            (lambda: hk.token_pruning_cluster(clip, np.int64(9)), None),
            (lambda: hk.token_pruning_cluster(clip, 31), bad),
            (lambda: hk.token_pruning_cluster(clip, 9, center=-1), bad),
            (lambda: hk.token_pruning_cluster(clip[:, :, :0], 9), bad)], [clip, pos])
    return {"dpc_knn": dpc, "token_pruning_cluster": tpc}


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("op", ["dpc_knn", "token_pruning_cluster"])
def test_selection_common_case_takes_only_calls_the_full_path_would_accept(op, monkeypatch):
    """dpc_knn's and token_pruning_cluster's common case (see hot_kernels/functional.py) skips the
    full path with bitwise its results (and gradients), and every unusual call goes through it."""
    full_path = _count_full_path(monkeypatch)
    plain, unusual, leaves = _selection_calls()[op]
    fast = _flat(plain())
    named = _flat(plain("cpu"))
    assert full_path == []
    monkeypatch.setenv("HOT_KERNELS_DEBUG", "1")  # adds value checks only: the full path, same values
    full = _flat(plain())
    monkeypatch.delenv("HOT_KERNELS_DEBUG")
    assert full_path
    assert len(fast) == len(full) and all(torch.equal(a, b) for a, b in zip(fast, full))
    assert len(named) == len(full) and all(torch.equal(a, b) for a, b in zip(named, full))
    if leaves:  # the gather's gradients too
        g_fast = torch.autograd.grad(fast[0].sum(), leaves)
        g_full = torch.autograd.grad(full[0].sum(), leaves)
        assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(g_fast, g_full))
    for call, raises in unusual:
        _assert_full_path(full_path, call, raises)
    for switch in ("HOT_KERNELS_DEBUG", "HOT_KERNELS_BACKEND"):
        monkeypatch.setenv(switch, "1" if switch == "HOT_KERNELS_DEBUG" else "reference")
        full_path.clear()
        plain()
        assert full_path
        monkeypatch.delenv(switch)
    with hk.use_backend("reference"):
        full_path.clear()
        plain()
        assert full_path
    monkeypatch.setattr(_eager, "ENABLED", False)
    full_path.clear()
    plain()
    assert full_path


def test_environment_variable_turns_the_fast_path_off():
    code = "from hot_kernels import _eager; print(_eager.ENABLED)"
    for value, want in (("0", "False"), ("1", "True")):
        env = dict(os.environ, HOT_KERNELS_EAGER=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want



def _forwards():
    """{op: (fn(t) -> output(s), t)}: one forward per op as a function of one input tensor."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 23, 12, generator=g, dtype=torch.float64)
    clip = torch.randn(2, 23, 3, 12, generator=g, dtype=torch.float64)
    kept = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    index = torch.tensor([[0, 3, 4, 9, 15, 20, 22], [1, 2, 5, 8, 11, 13, 16]])
    kept_index, assignment = hk.dpc_knn(x, 7, return_assignment=True)  # a valid clustering of x's tokens
    tra = [a.detach() if a is not None else None for a in _tra_args(torch.float64)]
    return {
        "pairwise_distance": (lambda t: hk.pairwise_distance(t), x),
        "knn_density": (lambda t: hk.knn_density(t, 3, log=True), x),
        "dpc_delta": (lambda t: hk.dpc_delta(t, hk.knn_density(t, 2)), x),
        "topf_select": (lambda t: hk.topf_select(t[..., 0], 5), x),
        "dpc_knn": (lambda t: hk.dpc_knn(t, 7, 2, center=4, return_assignment=True), x),
        "token_pruning_cluster": (lambda t: hk.token_pruning_cluster(t, 7, 2), clip),
        "token_recovering_attention": (lambda t: hk.token_recovering_attention(tra[0], t, *tra[2:], num_heads=4),
                                       tra[1]),
        "token_recovering_interpolation": (lambda t: hk.token_recovering_interpolation(t, index, 23), kept),
        "merge_tokens": (lambda t: hk.merge_tokens(t, kept_index, assignment), x),
    }


@pytest.mark.parametrize("eager", [True, False], ids=["fast-path", "ops"])
@pytest.mark.parametrize("op", list(_forwards()))
def test_torch_func_vmap_over_every_forward(op, eager, monkeypatch):
    # torch.func.vmap over a batch of inputs equals the op on each input (ops without a batching
    # rule run once per entry; the fast path steps aside for the transform).
    monkeypatch.setattr(_eager, "ENABLED", eager)
    fn, t = _forwards()[op]
    ts = torch.stack([t, t.flip(1), t * 0.5])
    got = torch.func.vmap(fn)(ts)
    got = got if isinstance(got, tuple) else (got,)
    each = [fn(ts[i]) for i in range(3)]
    each = [e if isinstance(e, tuple) else (e,) for e in each]
    assert len(got) == len(each[0])
    for j, out in enumerate(got):
        assert out.shape[0] == 3
        for i in range(3):
            torch.testing.assert_close(out[i], each[i][j], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["knn_density", "dpc_delta", "topf_select", "dpc_knn"])
def test_torch_func_vmap_folds_into_one_kernel_call(op):
    # The selection ops' vmap rule (hot_kernels/_ops.py) folds the vmapped dim into the batch dim:
    # one kernel call for the whole vmapped batch (torch's fallback would make one per entry), also
    # with the vmapped dim not first and an unbatched mask next to it.
    fn, t = _forwards()[op]
    ts = torch.stack([t, t.flip(1), t * 0.5], dim=1)  # vmapped dim 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = torch.func.vmap(fn, in_dims=1)(ts)
    calls = [e.name for e in prof.events() if e.name.startswith("hot_kernels::compiled_")]
    assert len(calls) == (2 if op == "dpc_delta" else 1), calls  # dpc_delta's case also runs knn_density
    got = got if isinstance(got, tuple) else (got,)
    for i in range(3):
        want = fn(ts[:, i])
        want = want if isinstance(want, tuple) else (want,)
        for a, b in zip(got, want):
            assert torch.equal(a[i], b)
    mask = torch.rand(t.shape[:2], generator=torch.Generator().manual_seed(4)) > 0.3
    got = torch.func.vmap(lambda u: hk.dpc_knn(u, 7, 2, mask, return_assignment=True), in_dims=1)(ts)
    for i in range(3):
        for a, b in zip(got, hk.dpc_knn(ts[:, i], 7, 2, mask, return_assignment=True)):
            assert torch.equal(a[i], b)


DIFFERENTIABLE = ["pairwise_distance", "token_pruning_cluster", "token_recovering_attention",
                  "token_recovering_interpolation", "merge_tokens"]


@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_vectorized_jacobian_equals_the_plain_one(op):
    # jacobian(vectorize=True) batches the backward with autograd's own vmap: TRA's backward op
    # returns a tuple of Tensors (not a list) so that the for-loop fallback can batch it.
    fn, t = _forwards()[op]

    def first(u):
        out = fn(u)
        return out[0] if isinstance(out, tuple) else out

    plain = torch.autograd.functional.jacobian(first, t)
    vectorized = torch.autograd.functional.jacobian(first, t, vectorize=True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(vectorized, plain, rtol=1e-12, atol=1e-12)


def test_torch_func_grad_fails_only_by_torchs_open_bug():
    # Documented in the README (Gradients): torch.func.grad over a custom op with register_autograd
    # fails in torch itself (pytorch/pytorch#179652). Either that error, or (a torch with the fix)
    # the right gradient; then the README's note can go.
    fn, t = _forwards()["pairwise_distance"]
    try:
        got = torch.func.grad(lambda u: fn(u).square().sum())(t)
    except RuntimeError as e:
        assert "setup_context" in str(e)
        return
    leaf = t.clone().requires_grad_()
    (want,) = torch.autograd.grad(fn(leaf).square().sum(), leaf)
    torch.testing.assert_close(got, want)
