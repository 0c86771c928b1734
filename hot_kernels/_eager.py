"""The eager fast path: the cpu/cuda backends' C++ kernels called directly, without the
``torch.library`` ops of hot_kernels/_ops.py around them.

A call through a torch.library op pays for two trips through the dispatcher (the public op and
its opaque ``compiled_`` op) and, when it is differentiable, for torch's generated autograd
wrapper: on a 2-core Xeon about 130 us per dpc_knn call (a third of its B = 1 time) and more
per TRA forward+backward, whose wrapper re-reads the op's 15-argument schema on every call and
materialises zero gradients for its three non-differentiable outputs. Those layers are what
torch.compile, torch.export, functorch transforms, dispatch modes and tensor subclasses need
to see one op per call; plain eager execution does not need them.

So hot_kernels.functional takes this path when :func:`applies` (nothing could observe the op)
and the ops otherwise. The kernels, their arguments and the autograd formulas (the setup and
backward functions registered on the ops) are the same ones, so both paths give bitwise the
same outputs and gradients (tests/test_eager.py). Under torch.profiler each call is labelled
with its op's name (``hot_kernels::dpc_knn``, ``hot_kernels::token_recovering_attention_backward``,
...), as on the op path. ``HOT_KERNELS_EAGER=0`` in the environment (read at import) turns the
fast path off: every call then goes through the ops.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ext, _ops

ENV_VAR = "HOT_KERNELS_EAGER"
ENABLED = os.environ.get(ENV_VAR, "1") not in ("0", "false", "False", "no", "off")

_PLAIN = (Tensor, torch.nn.Parameter)

# The torch functions every call asks, bound once: right after a large op has evicted the
# interpreter from the caches, each module-attribute chain (torch._C._functorch...) costs misses.
# torch.compile still recognises is_compiling by identity.
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_functorch_interpreter = torch._C._functorch.peek_interpreter_stack
_jit_tracing = torch._C._get_tracing_state
_profiling = torch._C._autograd._profiler_enabled
_autocast_on = torch.is_autocast_enabled


def applies(backend: str, *tensors) -> bool:
    """Whether a call on ``backend`` with these tensor arguments (None for absent ones) may skip
    the ops: a compiled backend (cpu, cuda), eager execution (not compiling, exporting or
    jit-tracing), no torch dispatch or torch function mode, no functorch transform (vmap, grad,
    jvp, functionalize), and every tensor a plain Tensor or Parameter (no subclass: FakeTensor,
    FunctionalTensor, DTensor, a user's __torch_function__ class)."""
    if backend not in ("cpu", "cuda") or not unobserved():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def unobserved() -> bool:
    """The fast path is on and nothing could observe an op call now: eager execution (not
    compiling, exporting or jit-tracing), no torch dispatch or function mode, no functorch
    transform (the tensor checks of :func:`applies` aside)."""
    if not ENABLED or _is_compiling():  # first: under Dynamo nothing below is traced
        return False
    return not (_dispatch_modes() or _function_modes() or _functorch_interpreter() is not None
                or _jit_tracing() is not None)


def _labelled(name: str):
    """Under torch.profiler, a range named like the op the call stands in for."""
    if torch._C._autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(f"{_ops.LIB}::{name}")
    return contextlib.nullcontext()


def _run(name: str, backend: str, first: Tensor, *args):
    """The C++ entry point ``name`` of hot_kernels._C, run as the op's ``compiled_`` body runs it.
    Without a profiler or autocast (the common case) no context manager is built: entering two
    cost about 20 us per call right after a large op had evicted the interpreter from the caches."""
    if not _profiling() and not _autocast_on(first.device.type):
        return getattr(_ext.C, name)(first, *args)
    with _labelled(name):
        return _ops._run_compiled(name, backend, first, *args)


def needs_graph(*tensors) -> bool:
    """Whether autograd will record this call: grad mode on and some tensor (None for an absent one)
    requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_DENSE_KEYS = (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)


def _batched(t) -> bool:
    """A gradient batched by autograd's own vmap (is_grads_batched): a Tensor by type, but without
    the dense CPU/CUDA key of a tensor with storage."""
    if t is None:
        return False
    keys = torch._C._dispatch_keys(t)
    return not any(keys.has(k) for k in _DENSE_KEYS)


def _autograd_function(name: str, setup, backward):
    """A torch.autograd.Function running op ``name``'s kernel with the op's own setup_context and
    backward, the backward kernel called directly as well. Its forward takes the op's arguments
    (backend last), so ``ctx.needs_input_grad`` lines up with the op's inputs."""
    def run_backward(*args):  # the ops' backward arguments, the backend last
        return _run(f"{name}_backward", args[-1], *args[:-1])

    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)  # no zero gradients for the non-differentiable outputs
        output = _run(name, inputs[-1], *inputs[:-1])
        output = tuple(output) if isinstance(output, (tuple, list)) else output
        setup(ctx, inputs, output)
        return output

    @once_differentiable
    def backward_fn(ctx, *grads):
        if grads[0] is None:  # the differentiable output (always the first) went unused: no gradient
            return (None,) * len(ctx.needs_input_grad)
        if not applies(ctx.backend, *grads) or any(_batched(g) for g in grads):
            # The backward itself is being transformed (vmapped: autograd.grad(...,
            # is_grads_batched=True), jacobian(vectorize=True)) or sees a mode or subclass: the
            # registered backward op, which the dispatcher can batch or trace.
            return backward(ctx, *grads)
        return backward(ctx, *grads, run_backward=run_backward)

    return type(f"{name}_eager", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_fn)})


_PairwiseDistance = _autograd_function("pairwise_distance", _ops._pd_setup, _ops._pd_backward)
_GatherFrames = _autograd_function("gather_frames", _ops._gather_setup, _ops._gather_backward)
_TokenRecoveringAttention = _autograd_function("token_recovering_attention", _ops._tra_setup, _ops._tra_backward)
_TokenRecoveringInterpolation = _autograd_function("token_recovering_interpolation", _ops._interp_setup,
                                                   _ops._interp_backward)
_MergeTokens = _autograd_function("merge_tokens", _ops._merge_setup, _ops._merge_backward)


# The ops of hot_kernels/_ops.py, same names and arguments (the backend last: "cpu" or "cuda").


def pairwise_distance(x: Tensor, y: Tensor | None, backend: str) -> Tensor:
    if needs_graph(x, y):
        return _PairwiseDistance.apply(x, y, backend)
    return _run("pairwise_distance", backend, x, y)


def knn_density(x: Tensor, k: int, token_mask: Tensor | None, log: bool, backend: str) -> Tensor:
    return _run("knn_density", backend, x, k, token_mask, log)


def dpc_delta(x: Tensor, density: Tensor, token_mask: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_run("dpc_delta", backend, x, density, token_mask))


def topf_select(score: Tensor, f: int, sorted: bool, exclude: Tensor | None, backend: str) -> Tensor:
    return _run("topf_select", backend, score, f, sorted, exclude)


def dpc_knn(x: Tensor, f: int, k: int, token_mask: Tensor | None, center: int | None, keep_center: bool,
            sorted: bool, return_assignment: bool, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_run("dpc_knn", backend, x, f, k, token_mask, center, keep_center, sorted, return_assignment))


def gather_frames(x: Tensor, index: Tensor, pos_embed: Tensor | None, backend: str) -> Tensor:
    if needs_graph(x, pos_embed):
        return _GatherFrames.apply(x, index, pos_embed, backend)
    return _run("gather_frames", backend, x, index, pos_embed)


def token_recovering_attention(query: Tensor, x: Tensor, wq: Tensor, bq: Tensor | None, wk: Tensor,
                               bk: Tensor | None, wv: Tensor, bv: Tensor | None, wo: Tensor, bo: Tensor | None,
                               num_heads: int, scale: float, residual: bool, keep: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tensors = (query, x, wq, bq, wk, bk, wv, bv, wo, bo)
    if keep and backend == "cpu":
        # One C++ autograd node (csrc/tra_autograd.cpp): the same kernels, saved tensors and backward
        # as _TokenRecoveringAttention, without its Python (about 0.7 ms per B = 1 forward+backward
        # when the interpreter is cold after the kernels). It keeps lse, K|V and o inside itself, so
        # they come back empty here (as from the backends that keep nothing).
        out = _ext.C.token_recovering_attention_autograd_cpu(*tensors, num_heads, scale, residual)
        empty = out.new_empty((0,))
        return out, empty, empty, empty
    if keep:  # functional computed it with needs_graph(*tensors): the backward will run
        return _TokenRecoveringAttention.apply(*tensors, num_heads, scale, residual, keep, backend)
    return tuple(_run("token_recovering_attention", backend, *tensors, num_heads, scale, residual, keep))


def token_recovering_interpolation(x: Tensor, index: Tensor, num_frames: int, backend: str) -> Tensor:
    if needs_graph(x):
        return _TokenRecoveringInterpolation.apply(x, index, num_frames, backend)
    return _run("token_recovering_interpolation", backend, x, index, num_frames)


def merge_tokens(x: Tensor, assignment: Tensor, num_clusters: int, weight: Tensor | None,
                 backend: str) -> tuple[Tensor, Tensor]:
    if needs_graph(x, weight):
        return _MergeTokens.apply(x, assignment, num_clusters, weight, backend)
    return tuple(_run("merge_tokens", backend, x, assignment, num_clusters, weight))
