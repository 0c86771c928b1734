"""Registration: every compiled op is a ``torch.library`` custom op in namespace ``hot_kernels``.

Each op takes the already-resolved backend name as its last argument and calls that backend's
kernel (``hot_kernels._C`` for "cpu"/"cuda", ``hot_kernels.triton`` for "triton"). A fake (meta)
implementation gives output shapes without running anything, so ``torch.compile(fullgraph=True)``,
``torch.export`` and CUDA graphs see one op per call; autograd is registered where DESIGN.md makes
an op differentiable (pairwise_distance, gather_frames, token_recovering_attention,
token_recovering_interpolation, merge_tokens). The ``reference`` backend is
plain PyTorch and does not go through these ops.

Nothing here validates: hot_kernels/functional.py does, before it calls these.
"""
from __future__ import annotations

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
    buffers (and the selections would lose precision)."""
    return torch.autocast(t.device.type, enabled=False)


def _kernels(backend: str):
    """The module holding ``backend``'s kernel entry points (same function names for each)."""
    if backend in ("cpu", "cuda"):
        return _ext.C
    if backend == "triton":
        from . import triton as triton_backend

        return triton_backend
    raise ValueError(f"hot_kernels: backend {backend!r} has no compiled kernels")


# ---- pairwise_distance -----------------------------------------------------------------------


@torch.library.custom_op(f"{LIB}::pairwise_distance", mutates_args=())
def pairwise_distance(x: Tensor, y: Optional[Tensor], backend: str) -> Tensor:
    with _no_autocast(x):
        return _kernels(backend).pairwise_distance(x, y)


@pairwise_distance.register_fake
def _(x, y, backend):
    return x.new_empty((x.shape[0], x.shape[1], (x if y is None else y).shape[1]))


@torch.library.custom_op(f"{LIB}::pairwise_distance_backward", mutates_args=())
def pairwise_distance_backward(grad: Tensor, x: Tensor, y: Optional[Tensor], dist: Tensor,
                               backend: str) -> tuple[Tensor, Tensor]:
    with _no_autocast(grad):
        return tuple(_kernels(backend).pairwise_distance_backward(grad, x, y, dist))


@pairwise_distance_backward.register_fake
def _(grad, x, y, dist, backend):
    return torch.empty_like(x), (x.new_empty((0,)) if y is None else torch.empty_like(y))


def _pd_setup(ctx, inputs, output):
    x, y, backend = inputs
    ctx.backend = backend
    ctx.has_y = y is not None
    ctx.save_for_backward(x, y, output)


def _pd_backward(ctx, grad):
    x, y, dist = ctx.saved_tensors
    gx, gy = pairwise_distance_backward(grad.contiguous(), x, y if ctx.has_y else None, dist, ctx.backend)
    return gx, (gy if ctx.has_y else None), None


pairwise_distance.register_autograd(_pd_backward, setup_context=_pd_setup)


# ---- selection statistics and selections (not differentiable) ----------------------------------


@torch.library.custom_op(f"{LIB}::knn_density", mutates_args=())
def knn_density(x: Tensor, k: int, token_mask: Optional[Tensor], log: bool, backend: str) -> Tensor:
    with _no_autocast(x):
        return _kernels(backend).knn_density(x, k, token_mask, log)


@knn_density.register_fake
def _(x, k, token_mask, log, backend):
    return x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype))


@torch.library.custom_op(f"{LIB}::dpc_delta", mutates_args=())
def dpc_delta(x: Tensor, density: Tensor, token_mask: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    with _no_autocast(x):
        return tuple(_kernels(backend).dpc_delta(x, density, token_mask))


@dpc_delta.register_fake
def _(x, density, token_mask, backend):
    return x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype)), x.new_empty(x.shape[:2], dtype=torch.long)


@torch.library.custom_op(f"{LIB}::topf_select", mutates_args=())
def topf_select(score: Tensor, f: int, sorted: bool, exclude: Optional[Tensor], backend: str) -> Tensor:
    with _no_autocast(score):
        return _kernels(backend).topf_select(score, f, sorted, exclude)


@topf_select.register_fake
def _(score, f, sorted, exclude, backend):
    return score.new_empty((score.shape[0], f), dtype=torch.long)


@torch.library.custom_op(f"{LIB}::dpc_knn", mutates_args=())
def dpc_knn(x: Tensor, f: int, k: int, token_mask: Optional[Tensor], center: Optional[int], keep_center: bool,
            sorted: bool, return_assignment: bool, backend: str) -> tuple[Tensor, Tensor]:
    with _no_autocast(x):
        return tuple(_kernels(backend).dpc_knn(x, f, k, token_mask, center, keep_center, sorted, return_assignment))


@dpc_knn.register_fake
def _(x, f, k, token_mask, center, keep_center, sorted, return_assignment, backend):
    B, N = x.shape[:2]
    return (x.new_empty((B, f), dtype=torch.long),
            x.new_empty((B, N if return_assignment else 0), dtype=torch.long))


# ---- token_pruning_cluster's gather (differentiable in x and pos_embed) -----------------------------


@torch.library.custom_op(f"{LIB}::gather_frames", mutates_args=())
def gather_frames(x: Tensor, index: Tensor, pos_embed: Optional[Tensor], backend: str) -> Tensor:
    """x (B, F, J, C), index (B, f) -> (B, f, J, C) = x[b, index[b, t]] (+ pos_embed (1|B, f, C))."""
    with _no_autocast(x):
        return _kernels(backend).gather_frames(x, index, pos_embed)


@gather_frames.register_fake
def _(x, index, pos_embed, backend):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2], x.shape[3]))


@torch.library.custom_op(f"{LIB}::gather_frames_backward", mutates_args=())
def gather_frames_backward(grad: Tensor, index: Tensor, num_frames: int, pos_batch: int,
                           backend: str) -> tuple[Tensor, Tensor]:
    """-> (grad_x (B, num_frames, J, C), grad_pos (pos_batch, f, C), or empty when pos_batch == 0)."""
    with _no_autocast(grad):
        return tuple(_kernels(backend).gather_frames_backward(grad, index, num_frames, pos_batch))


@gather_frames_backward.register_fake
def _(grad, index, num_frames, pos_batch, backend):
    B, f, J, C = grad.shape
    return (grad.new_empty((B, num_frames, J, C)),
            grad.new_empty((pos_batch, f, C) if pos_batch else (0,)))


def _gather_setup(ctx, inputs, output):
    x, index, pos_embed, backend = inputs
    ctx.backend, ctx.num_frames = backend, x.shape[1]
    ctx.pos_batch = 0 if pos_embed is None else pos_embed.shape[0]
    ctx.save_for_backward(index)


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    grad_x, grad_pos = gather_frames_backward(grad.contiguous(), index, ctx.num_frames, ctx.pos_batch, ctx.backend)
    return grad_x, None, (grad_pos if ctx.pos_batch else None), None


gather_frames.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---- token_recovering_attention --------------------------------------------------------------


@torch.library.custom_op(f"{LIB}::token_recovering_attention", mutates_args=())
def token_recovering_attention(query: Tensor, x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                               bk: Optional[Tensor], wv: Tensor, bv: Optional[Tensor], wo: Tensor,
                               bo: Optional[Tensor], num_heads: int, scale: float, residual: bool,
                               backend: str) -> tuple[Tensor, Tensor]:
    """-> (out (S, L, C), lse (S, heads, L)): lse is the softmax statistic the backward needs."""
    with _no_autocast(x):
        out, lse = _kernels(backend).token_recovering_attention(query, x, wq, bq, wk, bk, wv, bv, wo, bo,
                                                                num_heads, scale, residual)
    return out, lse


@token_recovering_attention.register_fake
def _(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, scale, residual, backend):
    S, _, C = x.shape
    L = query.shape[1]
    return x.new_empty((S, L, C)), x.new_empty((S, num_heads, L), dtype=compute_dtype(x.dtype))


@torch.library.custom_op(f"{LIB}::token_recovering_attention_backward", mutates_args=())
def token_recovering_attention_backward(grad_out: Tensor, query: Tensor, x: Tensor, wq: Tensor, bq: Optional[Tensor],
                                        wk: Tensor, bk: Optional[Tensor], wv: Tensor, bv: Optional[Tensor],
                                        wo: Tensor, bo: Optional[Tensor], lse: Tensor, num_heads: int,
                                        scale: float, residual: bool, backend: str) -> list[Tensor]:
    """-> [d_query, d_x, d_wq, d_bq, d_wk, d_bk, d_wv, d_bv, d_wo, d_bo]; a missing bias's is empty."""
    with _no_autocast(grad_out):
        return list(_kernels(backend).token_recovering_attention_backward(
            grad_out, query, x, wq, bq, wk, bk, wv, bv, wo, bo, lse, num_heads, scale, residual))


@token_recovering_attention_backward.register_fake
def _(grad_out, query, x, wq, bq, wk, bk, wv, bv, wo, bo, lse, num_heads, scale, residual, backend):
    def bias_grad(b):
        return x.new_empty((0,)) if b is None else torch.empty_like(b)

    return [torch.empty_like(query), torch.empty_like(x), torch.empty_like(wq), bias_grad(bq),
            torch.empty_like(wk), bias_grad(bk), torch.empty_like(wv), bias_grad(bv),
            torch.empty_like(wo), bias_grad(bo)]


def _tra_setup(ctx, inputs, output):
    *tensors, num_heads, scale, residual, backend = inputs
    ctx.num_heads, ctx.scale, ctx.residual, ctx.backend = num_heads, scale, residual, backend
    ctx.save_for_backward(*tensors, output[1])  # absent biases are saved (and come back) as None
    ctx.mark_non_differentiable(output[1])


def _tra_backward(ctx, grad_out, _grad_lse):
    *tensors, lse = ctx.saved_tensors
    grads = token_recovering_attention_backward(grad_out.contiguous(), *tensors, lse, ctx.num_heads, ctx.scale,
                                                ctx.residual, ctx.backend)
    # An absent bias gets an empty gradient from the kernel: autograd wants None for it.
    grads = [None if t is None else g for g, t in zip(grads, tensors)]
    return (*grads, None, None, None, None)


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


def _interp_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    grad_x = token_recovering_interpolation_backward(grad.contiguous(), index, ctx.num_kept, ctx.backend)
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


def _merge_backward(ctx, grad, _grad_wsum):
    x, assignment, weight, out, wsum = ctx.saved_tensors
    weight_grad = ctx.has_weight and ctx.needs_input_grad[3]
    gx, gw = merge_tokens_backward(grad.contiguous(), x, assignment, weight if ctx.has_weight else None, out, wsum,
                                   weight_grad, ctx.backend)
    return gx, None, None, (gw if weight_grad else None), None


merge_tokens.register_autograd(_merge_backward, setup_context=_merge_setup)
