"""Triton kernels of token_recovering_interpolation and merge_tokens (launch wrappers: interp_merge.py).

Every output element has one writer and every sum runs in a fixed order (gathers, no atomics), in
float32. Index-like inputs are trusted (validated on the host where that is free): whatever they
hold, the kernels only read and write in bounds.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _interp_fwd_kernel(
    x_ptr,    # (B, f, R) contiguous kept frames, R = J * C
    idx_ptr,  # (B, f) int64 contiguous, ascending frame indices
    out_ptr,  # (B, F, R) contiguous, x's dtype
    f, F, R, N_ITER,  # N_ITER = bits of f + 1: enough halvings for the binary search
    BLOCK: tl.constexpr,
):
    """Grid (B * F,): frame t of sample b = (1 - w) x[lo] + w x[hi] (see reference.interpolation_weights)."""
    r = tl.program_id(0).to(tl.int64)
    b = r // F
    t = r - b * F
    row = idx_ptr + b * f
    # Binary search for q = the number of kept frames at or before t (branch-free: fixed trip count).
    lo = b * 0
    hi = b * 0 + f
    for _ in range(N_ITER):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(row + tl.minimum(mid, f - 1))
        go_right = active & (v <= t)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(active & (v > t), mid, hi)
    q = lo
    inside = (q > 0) & (q < f)
    p_lo = tl.minimum(tl.where(q == 0, 0, q - 1), f - 1)
    p_hi = tl.where(inside, q, p_lo)
    i_lo = tl.load(row + p_lo)
    i_hi = tl.load(row + p_hi)
    span = (i_hi - i_lo).to(tl.float32)
    # Rounded division (not the fast approximate one): the same w as the CPU computes.
    w = tl.where(inside & (span > 0), tl.math.div_rn((t - i_lo).to(tl.float32), tl.maximum(span, 1.0)), 0.0)
    w0 = 1.0 - w
    a_ptr = x_ptr + (b * f + p_lo) * R
    c_ptr = x_ptr + (b * f + p_hi) * R
    o_ptr = out_ptr + r * R
    for r0 in range(0, R, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        m = offs < R
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(o_ptr + offs, (w0 * a + w * c).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _interp_bwd_kernel(
    g_ptr,    # (B, F, R) contiguous upstream gradient
    idx_ptr,  # (B, f) int64 contiguous, ascending
    gx_ptr,   # (B, f, R) contiguous, grad's dtype
    f, F, R,
    BLOCK: tl.constexpr,
):
    """Grid (B * f,): kept frame p gathers sum_t weight(t, p) grad[t] over the frames between its
    neighbours (every frame before the first / after the last kept one for the ends), t ascending.
    weight(t, p) is the forward's: w of the segment left of p, 1 at index[p], 1 - w right of it."""
    r = tl.program_id(0).to(tl.int64)
    b = r // f
    p = r - b * f
    row = idx_ptr + b * f
    i_p = tl.load(row + p)
    i_prev = tl.load(row + tl.maximum(p - 1, 0))
    i_next = tl.load(row + tl.minimum(p + 1, f - 1))
    t0 = tl.where(p == 0, 0, tl.maximum(i_prev + 1, 0))
    t1 = tl.where(p == f - 1, F - 1, tl.minimum(i_next - 1, F - 1))
    span_l = tl.maximum((i_p - i_prev).to(tl.float32), 1.0)
    span_r = tl.maximum((i_next - i_p).to(tl.float32), 1.0)
    o_ptr = gx_ptr + r * R
    for r0 in range(0, R, BLOCK):
        offs = r0 + tl.arange(0, BLOCK)
        m = offs < R
        acc = tl.zeros([BLOCK], tl.float32)
        for t in range(t0, t1 + 1):
            w_left = tl.where(p == 0, 1.0, tl.math.div_rn((t - i_prev).to(tl.float32), span_l))
            w_right = tl.where(p == f - 1, 1.0, 1.0 - tl.math.div_rn((t - i_p).to(tl.float32), span_r))
            wt = tl.where(t < i_p, w_left, tl.where(t == i_p, 1.0, w_right))
            g = tl.load(g_ptr + (b * F + t) * R + offs, mask=m, other=0.0).to(tl.float32)
            acc += wt * g
        tl.store(o_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _merge_fwd_kernel(
    x_ptr,     # (B, N, C) contiguous
    a_ptr,     # (B, N) int64 contiguous, cluster of each token (a position in [0, f))
    w_ptr,     # (B, N) contiguous weights (HAS_W), else unused
    out_ptr,   # (B, f, C) contiguous, x's dtype
    ws_ptr,    # (B, f) float32 weight sums
    N, f, C,
    HAS_W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
):
    """Grid (B * f,): out[b, p] = sum_{a_i = p} w_i x_i / sum_{a_i = p} w_i (0 if that sum is 0): a
    scan of the sample's assignment in token order (O(N) per cluster; no atomics)."""
    r = tl.program_id(0).to(tl.int64)
    b = r // f
    p = r - b * f
    a_row = a_ptr + b * N
    x_row = x_ptr + b * N * C
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        cok = cs < C
        acc = tl.zeros([BC], tl.float32)
        wsum = tl.zeros([BN], tl.float32)
        for n0 in range(0, N, BN):
            ns = n0 + tl.arange(0, BN)
            nok = ns < N
            a = tl.load(a_row + ns, mask=nok, other=-1)
            member = nok & (a == p)
            if HAS_W:
                w = tl.load(w_ptr + b * N + ns, mask=member, other=0.0).to(tl.float32)
            else:
                w = tl.where(member, 1.0, 0.0)
            xv = tl.load(x_row + ns.to(tl.int64)[:, None] * C + cs[None, :], mask=member[:, None] & cok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * xv, axis=0)
            wsum += w
        W = tl.sum(wsum, axis=0)
        inv = tl.where(W != 0.0, tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.where(W != 0.0, W, 1.0)), 0.0)
        tl.store(out_ptr + r * C + cs, (acc * inv).to(out_ptr.dtype.element_ty), mask=cok)
        if c0 == 0:
            tl.store(ws_ptr + r, W)


@triton.jit
def _merge_bwd_kernel(
    g_ptr,     # (B, f, C) contiguous upstream gradient
    x_ptr,     # (B, N, C) contiguous
    a_ptr,     # (B, N) int64 contiguous
    w_ptr,     # (B, N) weights (HAS_W)
    out_ptr,   # (B, f, C) the forward's output
    ws_ptr,    # (B, f) float32 weight sums
    gx_ptr,    # (B, N, C) contiguous, x's dtype
    gw_ptr,    # (B, N) contiguous (W_GRAD)
    N, f, C,
    HAS_W: tl.constexpr, W_GRAD: tl.constexpr, BC: tl.constexpr,
):
    """Grid (B * N,): token i of cluster p = a_i: grad_x[i] = (w_i / W_p) g[p], grad_w[i] =
    <g[p], x_i - out[p]> / W_p (both 0 for a token in no cluster or in a cluster of weight sum 0)."""
    r = tl.program_id(0).to(tl.int64)
    b = r // N
    p = tl.load(a_ptr + r)
    ok = (p >= 0) & (p < f)
    pc = tl.minimum(tl.maximum(p, 0), f - 1)
    W = tl.load(ws_ptr + b * f + pc)
    ok = ok & (W != 0.0)
    inv = tl.where(ok, tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.where(ok, W, 1.0)), 0.0)
    if HAS_W:
        wi = tl.load(w_ptr + r).to(tl.float32)
    else:
        wi = 1.0
    s = wi * inv
    g_row = g_ptr + (b * f + pc) * C
    o_row = out_ptr + (b * f + pc) * C
    dot = tl.zeros([BC], tl.float32)
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        cok = cs < C
        g = tl.load(g_row + cs, mask=cok, other=0.0).to(tl.float32)
        tl.store(gx_ptr + r * C + cs, (s * g).to(gx_ptr.dtype.element_ty), mask=cok)
        if W_GRAD:
            xv = tl.load(x_ptr + r * C + cs, mask=cok, other=0.0).to(tl.float32)
            ov = tl.load(o_row + cs, mask=cok, other=0.0).to(tl.float32)
            dot += g * (xv - ov)
    if W_GRAD:
        tl.store(gw_ptr + r, (tl.sum(dot, axis=0) * inv).to(gw_ptr.dtype.element_ty))
