"""Registration: every compiled op is a ``torch.library`` op in namespace ``hot_kernels``.

Each op takes the already-resolved backend name (hot_kernels/_dispatch.py chose it) as its last
argument and routes on it. The TPC ops (pairwise_distance, knn_density, dpc_delta, topf_select,
dpc_knn, gather_frames and their backwards) are ``torch.library.triton_op``s wherever Triton
compiles (not under TRITON_INTERPRET=1): their body runs the "triton" backend's wrapper, whose
kernels launch through ``wrap_triton``, so torch.compile / AOTInductor trace into the Triton
kernels, while "cpu"/"cuda" call an opaque ``hot_kernels::compiled_<op>`` custom op (the C++
kernels of ``hot_kernels._C``). torch.export keeps the public op whole either way. TRA
(token_recovering_attention and its backward) is registered the same way; the new ops
(token_recovering_interpolation, merge_tokens) are plain custom ops on every backend. A fake (meta)
implementation gives output shapes without running anything, so ``torch.compile(fullgraph=True)``,
``torch.export`` and CUDA graphs see one op per call; autograd is registered where DESIGN.md makes
an op differentiable (pairwise_distance, gather_frames, token_recovering_attention,
token_recovering_interpolation, merge_tokens). The ``reference`` backend is
plain PyTorch and does not go through these ops.

Nothing here validates: hot_kernels/functional.py does, before it calls these. In plain eager
execution functional.py calls the cpu/cuda kernels past these ops (hot_kernels/_eager.py), with the
setup and backward functions defined here.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from . import _ext
from .reference import compute_dtype

LIB = "hot_kernels"


def _no_autocast(t: Tensor):
    """Autocast off while a kernel runs. The op's inputs already have their final dtype (under
    autocast hot_kernels.functional casts TRA's inputs like nn.Linear would); the GEMMs inside the
    C++ and Triton wrappers must not be re-cast, or they would return bfloat16 into float32
    buffers (and the selections would lose precision). Outside autocast (the common case) no
    context is built: entering one costs about 10 us per call, a few % of a B = 1 selection."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _kernels(backend: str):
    """The module holding ``backend``'s kernel entry points (same function names for each)."""
    if backend in ("cpu", "cuda"):
        return _ext.C
    if backend == "triton":
        from . import triton as triton_backend

        return triton_backend
    raise ValueError(f"hot_kernels: backend {backend!r} has no compiled kernels")


def _traceable_triton() -> bool:
    """Whether the Triton kernels are compiled ones that Inductor can trace (not the interpreter,
    TRITON_INTERPRET=1, whose kernels run on CPU tensors and cannot be traced)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _public_op(name: str):
    """Decorator registering a TPC op that has a Triton path: ``torch.library.triton_op`` where
    the Triton kernels are traceable (torch.compile / AOTInductor then see the kernels of the
    "triton" backend, launched through wrap_triton in hot_kernels/triton/tpc.py), else a plain
    custom op. The body routes on the (already resolved) backend: "triton" runs the Triton
    wrapper in the body, "cpu"/"cuda" call the opaque ``compiled_<name>`` op (C++ kernels)."""
    if _traceable_triton():
        return torch.library.triton_op(f"{LIB}::{name}", mutates_args=())
    return torch.library.custom_op(f"{LIB}::{name}", mutates_args=())


def _compiled_op(name: str):
    """Decorator registering the opaque op of the C++ kernels ("cpu"/"cuda") of a TPC op."""
    return torch.library.custom_op(f"{LIB}::compiled_{name}", mutates_args=())


def _fake(*ops):
    """Register one fake implementation on several ops (a public op and its compiled_ op). A
    triton_op registers its body as its fake; the explicit one replaces it (no kernel runs)."""
    def register(fn):
        for op in ops:
            op.register_fake(fn)
        return fn
    return register


def _run_triton(name: str, first: Tensor, *args):
    from . import triton as triton_backend

    with _no_autocast(first):
        return getattr(triton_backend, name)(first, *args)


def _run_compiled(name: str, backend: str, first: Tensor, *args):
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"hot_kernels: backend {backend!r} has no compiled kernels")
    with _no_autocast(first):
        return getattr(_ext.C, name)(first, *args)


# ---- pairwise_distance -----------------------------------------------------------------------


@_compiled_op("pairwise_distance")
def _c_pairwise_distance(x: Tensor, y: Optional[Tensor], backend: str) -> Tensor:
    return _run_compiled("pairwise_distance", backend, x, y)


@_public_op("pairwise_distance")
def pairwise_distance(x: Tensor, y: Optional[Tensor], backend: str) -> Tensor:
    if backend == "triton":
        return _run_triton("pairwise_distance", x, y)
    return _c_pairwise_distance(x, y, backend)


@_fake(pairwise_distance, _c_pairwise_distance)
def _(x, y, backend):
    return x.new_empty((x.shape[0], x.shape[1], (x if y is None else y).shape[1]))


@_compiled_op("pairwise_distance_backward")
def _c_pairwise_distance_backward(grad: Tensor, x: Tensor, y: Optional[Tensor], dist: Tensor,
                                  backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_run_compiled("pairwise_distance_backward", backend, grad, x, y, dist))


@_public_op("pairwise_distance_backward")
def pairwise_distance_backward(grad: Tensor, x: Tensor, y: Optional[Tensor], dist: Tensor,
                               backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return tuple(_run_triton("pairwise_distance_backward", grad, x, y, dist))
    return _c_pairwise_distance_backward(grad, x, y, dist, backend)


@_fake(pairwise_distance_backward, _c_pairwise_distance_backward)
def _(grad, x, y, dist, backend):
    return torch.empty_like(x), (x.new_empty((0,)) if y is None else torch.empty_like(y))


def _pd_setup(ctx, inputs, output):
    x, y, backend = inputs
    ctx.backend = backend
    ctx.has_y = y is not None
    ctx.save_for_backward(x, y, output)


def _pd_backward(ctx, grad, run_backward=None):
    x, y, dist = ctx.saved_tensors
    run_backward = run_backward or pairwise_distance_backward
    gx, gy = run_backward(grad.contiguous(), x, y if ctx.has_y else None, dist, ctx.backend)
    return gx, (gy if ctx.has_y else None), None


pairwise_distance.register_autograd(_pd_backward, setup_context=_pd_setup)


# ---- selection statistics and selections (not differentiable) ----------------------------------


@_compiled_op("knn_density")
def _c_knn_density(x: Tensor, k: int, token_mask: Optional[Tensor], log: bool, backend: str) -> Tensor:
    return _run_compiled("knn_density", backend, x, k, token_mask, log)


@_public_op("knn_density")
def knn_density(x: Tensor, k: int, token_mask: Optional[Tensor], log: bool, backend: str) -> Tensor:
    if backend == "triton":
        return _run_triton("knn_density", x, k, token_mask, log)
    return _c_knn_density(x, k, token_mask, log, backend)


@_fake(knn_density, _c_knn_density)
def _(x, k, token_mask, log, backend):
    return x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype))


@_compiled_op("dpc_delta")
def _c_dpc_delta(x: Tensor, density: Tensor, token_mask: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_run_compiled("dpc_delta", backend, x, density, token_mask))


@_public_op("dpc_delta")
def dpc_delta(x: Tensor, density: Tensor, token_mask: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return tuple(_run_triton("dpc_delta", x, density, token_mask))
    return _c_dpc_delta(x, density, token_mask, backend)


@_fake(dpc_delta, _c_dpc_delta)
def _(x, density, token_mask, backend):
    return x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype)), x.new_empty(x.shape[:2], dtype=torch.long)


@_compiled_op("topf_select")
def _c_topf_select(score: Tensor, f: int, sorted: bool, exclude: Optional[Tensor], backend: str) -> Tensor:
    return _run_compiled("topf_select", backend, score, f, sorted, exclude)


@_public_op("topf_select")
def topf_select(score: Tensor, f: int, sorted: bool, exclude: Optional[Tensor], backend: str) -> Tensor:
    if backend == "triton":
        return _run_triton("topf_select", score, f, sorted, exclude)
    return _c_topf_select(score, f, sorted, exclude, backend)


@_fake(topf_select, _c_topf_select)
def _(score, f, sorted, exclude, backend):
    return score.new_empty((score.shape[0], f), dtype=torch.long)


@_compiled_op("dpc_knn")
def _c_dpc_knn(x: Tensor, f: int, k: int, token_mask: Optional[Tensor], center: Optional[int], keep_center: bool,
               sorted: bool, return_assignment: bool, backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_run_compiled("dpc_knn", backend, x, f, k, token_mask, center, keep_center, sorted,
                               return_assignment))


@_public_op("dpc_knn")
def dpc_knn(x: Tensor, f: int, k: int, token_mask: Optional[Tensor], center: Optional[int], keep_center: bool,
            sorted: bool, return_assignment: bool, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return tuple(_run_triton("dpc_knn", x, f, k, token_mask, center, keep_center, sorted, return_assignment))
    return _c_dpc_knn(x, f, k, token_mask, center, keep_center, sorted, return_assignment, backend)


@_fake(dpc_knn, _c_dpc_knn)
def _(x, f, k, token_mask, center, keep_center, sorted, return_assignment, backend):
    B, N = x.shape[:2]
    return (x.new_empty((B, f), dtype=torch.long),
            x.new_empty((B, N if return_assignment else 0), dtype=torch.long))


def _fold_vmap_into_batch(op):
    """Register op's vmap rule for torch.func.vmap: the selection ops treat the samples of their
    batch dim B independently, and every tensor argument and output leads with B, so the vmapped
    dim is folded into B (V x B samples) and the op runs once. (torch's generic fallback would run it
    once per vmapped entry and warn about a missing batching rule.)"""
    def rule(info, in_dims, *args):
        V = info.batch_size
        # every tensor argument as (V, B, ...): the vmapped dim first, an unbatched one expanded
        lead = [(a.expand(V, *a.shape) if d is None else a.movedim(d, 0)) if isinstance(a, Tensor) else a
                for a, d in zip(args, in_dims)]
        B = next(a.shape[1] for a in lead if isinstance(a, Tensor))
        out = op(*(a.reshape(V * B, *a.shape[2:]) if isinstance(a, Tensor) else a for a in lead))
        if isinstance(out, tuple):
            return tuple(t.reshape(V, B, *t.shape[1:]) for t in out), (0,) * len(out)
        return out.reshape(V, B, *out.shape[1:]), 0

    op.register_vmap(rule)


for _selection_op in (knn_density, dpc_delta, topf_select, dpc_knn):
    _fold_vmap_into_batch(_selection_op)


# ---- token_pruning_cluster's gather (differentiable in x and pos_embed) -----------------------------


@_compiled_op("gather_frames")
def _c_gather_frames(x: Tensor, index: Tensor, pos_embed: Optional[Tensor], backend: str) -> Tensor:
    return _run_compiled("gather_frames", backend, x, index, pos_embed)


@_public_op("gather_frames")
def gather_frames(x: Tensor, index: Tensor, pos_embed: Optional[Tensor], backend: str) -> Tensor:
    """x (B, F, J, C), index (B, f) -> (B, f, J, C) = x[b, index[b, t]] (+ pos_embed (1|B, f, C))."""
    if backend == "triton":
        return _run_triton("gather_frames", x, index, pos_embed)
    return _c_gather_frames(x, index, pos_embed, backend)


@_fake(gather_frames, _c_gather_frames)
def _(x, index, pos_embed, backend):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2], x.shape[3]))


@_compiled_op("gather_frames_backward")
def _c_gather_frames_backward(grad: Tensor, index: Tensor, num_frames: int, pos_batch: int,
                              backend: str) -> tuple[Tensor, Tensor]:
    return tuple(_run_compiled("gather_frames_backward", backend, grad, index, num_frames, pos_batch))


@_public_op("gather_frames_backward")
def gather_frames_backward(grad: Tensor, index: Tensor, num_frames: int, pos_batch: int,
                           backend: str) -> tuple[Tensor, Tensor]:
    """-> (grad_x (B, num_frames, J, C), grad_pos (pos_batch, f, C), or empty when pos_batch == 0)."""
    if backend == "triton":
        return tuple(_run_triton("gather_frames_backward", grad, index, num_frames, pos_batch))
    return _c_gather_frames_backward(grad, index, num_frames, pos_batch, backend)


@_fake(gather_frames_backward, _c_gather_frames_backward)
def _(grad, index, num_frames, pos_batch, backend):
    B, f, J, C = grad.shape
    return (grad.new_empty((B, num_frames, J, C)),
            grad.new_empty((pos_batch, f, C) if pos_batch else (0,)))


def _gather_setup(ctx, inputs, output):
    x, index, pos_embed, backend = inputs
    ctx.backend, ctx.num_frames = backend, x.shape[1]
    ctx.pos_batch = 0 if pos_embed is None else pos_embed.shape[0]
    ctx.save_for_backward(index)


def _gather_backward(ctx, grad, run_backward=None):
    (index,) = ctx.saved_tensors
    run_backward = run_backward or gather_frames_backward
    grad_x, grad_pos = run_backward(grad.contiguous(), index, ctx.num_frames, ctx.pos_batch, ctx.backend)
    return grad_x, None, (grad_pos if ctx.pos_batch else None), None


gather_frames.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---- token_recovering_attention --------------------------------------------------------------


@_compiled_op("token_recovering_attention")
def _c_token_recovering_attention(query: Tensor, x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                                  bk: Optional[Tensor], wv: Tensor, bv: Optional[Tensor], wo: Tensor,
                                  bo: Optional[Tensor], num_heads: int, scale: float, residual: bool, keep: bool,
                                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_run_compiled("token_recovering_attention", backend, query, x, wq, bq, wk, bk, wv, bv, wo, bo,
                               num_heads, scale, residual, keep))


@_public_op("token_recovering_attention")
def token_recovering_attention(query: Tensor, x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                               bk: Optional[Tensor], wv: Tensor, bv: Optional[Tensor], wo: Tensor,
                               bo: Optional[Tensor], num_heads: int, scale: float, residual: bool, keep: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out (S, L, C), lse (S, heads, L), kv, o): lse is the softmax statistic the backward needs.

    keep (the caller will differentiate): the cpu backend also returns K|V (S*M, 2C) and the
    attention output o (S*L, C) in the compute dtype, which its backward would otherwise recompute;
    the other backends (and keep=False) return empty tensors there."""
    if backend == "triton":
        out, lse = _run_triton("token_recovering_attention", query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads,
                               scale, residual)
        return out, lse, x.new_empty((0,)), x.new_empty((0,))
    return _c_token_recovering_attention(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, scale, residual,
                                         keep, backend)


def _tra_kept_shapes(x: Tensor, L: int, keep: bool, backend: str):
    """Shapes of the forward's kept K|V and o (see token_recovering_attention)."""
    S, M, C = x.shape
    if keep and backend == "cpu":
        return (S * M, 2 * C), (S * L, C)
    return (0,), (0,)


@_fake(token_recovering_attention, _c_token_recovering_attention)
def _(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, scale, residual, keep, backend):
    S, _, C = x.shape
    L = query.shape[1]
    kv_shape, o_shape = _tra_kept_shapes(x, L, keep, backend)
    kept_dtype = compute_dtype(x.dtype) if backend == "cpu" else x.dtype
    return (x.new_empty((S, L, C)), x.new_empty((S, num_heads, L), dtype=compute_dtype(x.dtype)),
            x.new_empty(kv_shape, dtype=kept_dtype), x.new_empty(o_shape, dtype=kept_dtype))


# TRA's ten gradients, a tuple of Tensors rather than a Tensor[] (list): the for-loop vmap
# fallbacks that batch an op without a batching rule (autograd's is_grads_batched and jacobian(
# vectorize=True), torch.func.vmap) handle only ops that return Tensors.
TraGrads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@_compiled_op("token_recovering_attention_backward")
def _c_token_recovering_attention_backward(grad_out: Tensor, query: Tensor, x: Tensor, wq: Tensor,
                                           bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor], wv: Tensor,
                                           bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor], lse: Tensor,
                                           kv: Tensor, o: Tensor, num_heads: int, scale: float, residual: bool,
                                           backend: str) -> TraGrads:
    return tuple(_run_compiled("token_recovering_attention_backward", backend, grad_out, query, x, wq, bq, wk, bk,
                              wv, bv, wo, bo, lse, kv, o, num_heads, scale, residual))


@_public_op("token_recovering_attention_backward")
def token_recovering_attention_backward(grad_out: Tensor, query: Tensor, x: Tensor, wq: Tensor, bq: Optional[Tensor],
                                        wk: Tensor, bk: Optional[Tensor], wv: Tensor, bv: Optional[Tensor],
                                        wo: Tensor, bo: Optional[Tensor], lse: Tensor, kv: Tensor, o: Tensor,
                                        num_heads: int, scale: float, residual: bool,
                                        backend: str) -> TraGrads:
    """-> (d_query, d_x, d_wq, d_bq, d_wk, d_bk, d_wv, d_bv, d_wo, d_bo); a missing bias's is empty.
    kv, o: what the forward kept (empty: recomputed; only the cpu backend keeps them)."""
    if backend == "triton":
        return tuple(_run_triton("token_recovering_attention_backward", grad_out, query, x, wq, bq, wk, bk, wv, bv,
                                wo, bo, lse, num_heads, scale, residual))
    return _c_token_recovering_attention_backward(grad_out, query, x, wq, bq, wk, bk, wv, bv, wo, bo, lse, kv, o,
                                                  num_heads, scale, residual, backend)


@_fake(token_recovering_attention_backward, _c_token_recovering_attention_backward)
def _(grad_out, query, x, wq, bq, wk, bk, wv, bv, wo, bo, lse, kv, o, num_heads, scale, residual, backend):
    def bias_grad(b):
        return x.new_empty((0,)) if b is None else torch.empty_like(b)

    return (torch.empty_like(query), torch.empty_like(x), torch.empty_like(wq), bias_grad(bq),
            torch.empty_like(wk), bias_grad(bk), torch.empty_like(wv), bias_grad(bv),
            torch.empty_like(wo), bias_grad(bo))


def _tra_setup(ctx, inputs, output):
    *tensors, num_heads, scale, residual, _keep, backend = inputs
    ctx.num_heads, ctx.scale, ctx.residual, ctx.backend = num_heads, scale, residual, backend
    ctx.save_for_backward(*tensors, *output[1:])  # absent biases are saved (and come back) as None
    ctx.mark_non_differentiable(*output[1:])


def _tra_backward(ctx, grad_out, _grad_lse, _grad_kv, _grad_o, run_backward=None):
    *tensors, lse, kv, o = ctx.saved_tensors
    run_backward = run_backward or token_recovering_attention_backward
    grads = run_backward(grad_out.contiguous(), *tensors, lse, kv, o, ctx.num_heads, ctx.scale, ctx.residual,
                         ctx.backend)
    # An absent bias gets an empty gradient from the kernel: autograd wants None for it.
    grads = [None if t is None else g for g, t in zip(grads, tensors)]
    return (*grads, None, None, None, None, None)


token_recovering_attention.register_autograd(_tra_backward, setup_context=_tra_setup)


# ---- token_recovering_interpolation (differentiable in x) ------------------------------------------


@torch.library.custom_op(f"{LIB}::token_recovering_interpolation", mutates_args=())
def token_recovering_interpolation(x: Tensor, index: Tensor, num_frames: int, backend: str) -> Tensor:
    """x (B, f, [J,] C), index (B, f) ascending -> (B, num_frames, [J,] C)."""
    with _no_autocast(x):
        return _kernels(backend).token_recovering_interpolation(x, index, num_frames)


@token_recovering_interpolation.register_fake
def _(x, index, num_frames, backend):
    return x.new_empty((x.shape[0], num_frames, *x.shape[2:]))


@torch.library.custom_op(f"{LIB}::token_recovering_interpolation_backward", mutates_args=())
def token_recovering_interpolation_backward(grad: Tensor, index: Tensor, num_kept: int, backend: str) -> Tensor:
    """grad (B, F, [J,] C) -> grad_x (B, num_kept, [J,] C)."""
    with _no_autocast(grad):
        return _kernels(backend).token_recovering_interpolation_backward(grad, index, num_kept)


@token_recovering_interpolation_backward.register_fake
def _(grad, index, num_kept, backend):
    return grad.new_empty((grad.shape[0], num_kept, *grad.shape[2:]))


def _interp_setup(ctx, inputs, output):
    x, index, num_frames, backend = inputs
    ctx.backend, ctx.num_kept = backend, x.shape[1]
    ctx.save_for_backward(index)


def _interp_backward(ctx, grad, run_backward=None):
    (index,) = ctx.saved_tensors
    run_backward = run_backward or token_recovering_interpolation_backward
    grad_x = run_backward(grad.contiguous(), index, ctx.num_kept, ctx.backend)
    return grad_x, None, None, None


token_recovering_interpolation.register_autograd(_interp_backward, setup_context=_interp_setup)


# ---- merge_tokens (differentiable in x and weight) ---------------------------------------------------


@torch.library.custom_op(f"{LIB}::merge_tokens", mutates_args=())
def merge_tokens(x: Tensor, assignment: Tensor, num_clusters: int, weight: Optional[Tensor],
                 backend: str) -> tuple[Tensor, Tensor]:
    """x (B, N, C), assignment (B, N) in [0, num_clusters) -> (out (B, num_clusters, C), wsum
    (B, num_clusters) the clusters' weight sums in the compute dtype, for the backward)."""
    with _no_autocast(x):
        return tuple(_kernels(backend).merge_tokens(x, assignment, num_clusters, weight))


@merge_tokens.register_fake
def _(x, assignment, num_clusters, weight, backend):
    B, C = x.shape[0], x.shape[2]
    return x.new_empty((B, num_clusters, C)), x.new_empty((B, num_clusters), dtype=compute_dtype(x.dtype))


@torch.library.custom_op(f"{LIB}::merge_tokens_backward", mutates_args=())
def merge_tokens_backward(grad: Tensor, x: Tensor, assignment: Tensor, weight: Optional[Tensor], out: Tensor,
                          wsum: Tensor, weight_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """-> (grad_x (B, N, C), grad_weight (B, N), or (0, 0) when weight_grad is False)."""
    with _no_autocast(grad):
        return tuple(_kernels(backend).merge_tokens_backward(grad, x, assignment, weight, out, wsum, weight_grad))


@merge_tokens_backward.register_fake
def _(grad, x, assignment, weight, out, wsum, weight_grad, backend):
    B, N = x.shape[:2]
    return torch.empty_like(x), x.new_empty((B, N) if weight_grad else (0, 0))


def _merge_setup(ctx, inputs, output):
    x, assignment, num_clusters, weight, backend = inputs
    ctx.backend, ctx.has_weight = backend, weight is not None
    ctx.save_for_backward(x, assignment, weight, output[0], output[1])
    ctx.mark_non_differentiable(output[1])


def _merge_backward(ctx, grad, _grad_wsum, run_backward=None):
    x, assignment, weight, out, wsum = ctx.saved_tensors
    weight_grad = ctx.has_weight and ctx.needs_input_grad[3]
    run_backward = run_backward or merge_tokens_backward
    gx, gw = run_backward(grad.contiguous(), x, assignment, weight if ctx.has_weight else None, out, wsum,
                          weight_grad, ctx.backend)
    return gx, None, None, (gw if weight_grad else None), None


merge_tokens.register_autograd(_merge_backward, setup_context=_merge_setup)
