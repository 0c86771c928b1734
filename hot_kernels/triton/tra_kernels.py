"""Triton kernels of token recovering attention (TRA), forward and backward.

Launched by hot_kernels/triton/tra.py, whose docstring describes the algorithm, what is fused and
the tuning knobs. Layouts (all row-major, the last dim contiguous):

  Q    (Sq, L, C)  projected query; Sq = 1 when shared (its sequence stride is then passed as 0,
                   so every sequence's program reads the same rows)
  KV   (S, M, 2C)  [K | V] from one GEMM: head h of K is columns h*D.., of V columns C + h*D..
  LSE  (S, H, L)   float32, natural-log log-sum-exp of the scaled logits of each query row
  DELTA(S, H, L)   float32, rowsum(dO_h * o_h) = rowsum(P * dP) per query row and head (backward)

Softmax runs in the log2 domain: logits are scaled by qk_scale = scale * log2(e) and exponentiated
with exp2; lse is stored in natural log (lse2 = lse * log2(e) when it is read back).
Every offset that involves a sequence index is formed in int64 (S * L * C passes 2^31 at S=17408).
No atomics anywhere: every output element is written by exactly one program, and every reduction
runs in a fixed order, so the kernels are bitwise deterministic.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """tl.dot with float32 accumulation. PREC is the input precision for float32 operands
    ("tf32x3", "ieee", ...; ignored for 16-bit ones), or "upcast": multiply float32 copies of the
    (already rounded) operands - the same products, exact in float32. The wrapper uses "upcast"
    only for bfloat16 under TRITON_INTERPRET, whose bfloat16 dot is wrong."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _cast(x, dtype: tl.constexpr, PREC: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Under the interpreter ("upcast", bfloat16 only) the
    float32 -> bfloat16 conversion truncates; it is done by hand there so that the interpreter
    rounds like the GPU (a truncation bias adds up in the S-long sums of the weight gradients)."""
    if PREC == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(dtype)
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _probs(q, k, lse2, rm, M, qk_scale, PREC: tl.constexpr):
    """P = softmax rows rebuilt from the saved statistic: exp2(q k^T * qk_scale - lse2), zero in
    the key columns past M (padding of the last key tile)."""
    sc = _mm(q, tl.trans(k), PREC) * qk_scale
    p = tl.exp2(sc - lse2[:, None])
    return tl.where((rm < M)[None, :], p, 0.0)


@triton.jit
def _tra_fwd_kernel(
    Q,  # (Sq, L, C) projected query
    KV,  # (S, M, 2C) [K | V]
    WO,  # (C, C) output projection weight (nn.Linear layout), read when FUSE_OUT
    BO,  # (C,) output bias, read when HAS_BO
    RES,  # (Sq, L, C) residual (the un-projected query), read when HAS_RES
    OUT,  # FUSE_OUT: (S, L, C) final output; else o (S, L, >= C) with row stride stride_ol
    LSE,  # (S, H, L) float32, written when WRITE_LSE
    DO,  # (S, L, C) dO = grad_out Wo, read when HAS_DO (backward recompute of o)
    DELTA,  # (S, H, L) float32, rowsum(dO_h * o_h), written when HAS_DO
    L, M, C, H, D,
    stride_qs, stride_ql, stride_kvs, stride_kvm, stride_rs, stride_rl,
    stride_os, stride_ol, stride_dos, stride_dol,
    n_lb, n_cg, qk_scale,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    FUSE_OUT: tl.constexpr, HAS_BO: tl.constexpr, HAS_RES: tl.constexpr, HAS_DO: tl.constexpr,
    WRITE_LSE: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (L-block, output-column group, sequence): flash-style attention over the M
    keys for every head in turn (online softmax over BLOCK_N key tiles). Then either the head's o
    (BLOCK_L, D) is stored (the forward for C > FWD_FUSE_MAX_C, followed by _tra_out_kernel; and
    the backward's recompute of o with HAS_DO, which also gives Delta = rowsum(dO * o)), or, with
    FUSE_OUT (narrow C), it is multiplied straight into the (BLOCK_L, BLOCK_C) output tile by its
    D columns of Wo, so o never reaches memory; bias and residual are added before the one store.
    Column groups (n_cg > 1) each recompute the attention; lse is written by group 0."""
    pid = tl.program_id(0).to(tl.int64)
    lb = pid % n_lb
    rest = pid // n_lb
    cg = rest % n_cg
    s = rest // n_cg

    rl = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    rd = tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    lmask = rl < L
    dmask = rd < D
    ldmask = lmask[:, None] & dmask[None, :]

    q_rows = Q + s * stride_qs + rl[:, None] * stride_ql + rd[None, :]
    kv_base = KV + s * stride_kvs
    if FUSE_OUT:
        rc = cg * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = rc < C
        acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)

    for h in range(H):
        q = tl.load(q_rows + h * D, mask=ldmask, other=0.0)
        m_i = tl.full((BLOCK_L,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_L,), dtype=tl.float32)
        o = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, M, BLOCK_N):
            rm = n0 + rn
            mmask = rm < M
            kv_ptr = kv_base + rm[:, None] * stride_kvm + h * D + rd[None, :]
            kvmask = mmask[:, None] & dmask[None, :]
            k = tl.load(kv_ptr, mask=kvmask, other=0.0)
            v = tl.load(kv_ptr + C, mask=kvmask, other=0.0)
            sc = _mm(q, tl.trans(k), PREC) * qk_scale
            sc = tl.where(mmask[None, :], sc, float("-inf"))
            # Every key tile holds at least one real key, so m_new is finite from the first tile on.
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            o = o * alpha[:, None] + _mm(_cast(p, v.dtype, PREC), v, PREC)
            m_i = m_new
        o = o / l_i[:, None]
        if WRITE_LSE:
            if cg == 0:
                tl.store(LSE + (s * H + h) * L + rl, (m_i + tl.log2(l_i)) * LN2, mask=lmask)
        if FUSE_OUT:
            # Wo[:, h*D : h*D + D] for this column group, (BLOCK_C, BLOCK_D); rows of d >= D are 0.
            wo = tl.load(WO + rc[:, None] * C + h * D + rd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            acc += _mm(_cast(o, wo.dtype, PREC), tl.trans(wo), PREC)
        else:
            o_ptr = OUT + s * stride_os + rl[:, None] * stride_ol + h * D + rd[None, :]
            tl.store(o_ptr, _cast(o, OUT.dtype.element_ty, PREC), mask=ldmask)
            if HAS_DO:
                do = tl.load(DO + s * stride_dos + rl[:, None] * stride_dol + h * D + rd[None, :], mask=ldmask,
                             other=0.0)
                delta = tl.sum(o * do.to(tl.float32), 1)
                tl.store(DELTA + (s * H + h) * L + rl, delta, mask=lmask)

    if FUSE_OUT:
        if HAS_BO:
            acc += tl.load(BO + rc, mask=cmask, other=0.0).to(tl.float32)[None, :]
        lcmask = lmask[:, None] & cmask[None, :]
        if HAS_RES:
            # stride_rs is 0 for a shared query: the same residual rows for every sequence.
            acc += tl.load(RES + s * stride_rs + rl[:, None] * stride_rl + rc[None, :], mask=lcmask,
                           other=0.0).to(tl.float32)
        tl.store(OUT + s * stride_os + rl[:, None] * stride_ol + rc[None, :], _cast(acc, OUT.dtype.element_ty, PREC),
                 mask=lcmask)


@triton.jit
def _tra_out_kernel(
    O,  # (R, C) o, R = S * L rows (row stride C)
    WO,  # (C, C) output projection weight (nn.Linear layout)
    BO,  # (C,) output bias, read when HAS_BO
    RES,  # residual rows (the un-projected query): (L, C) when RES_SHARED, else (R, C); read when HAS_RES
    OUT,  # (R, C) output
    R, L, C, n_n,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BO: tl.constexpr, HAS_RES: tl.constexpr, RES_SHARED: tl.constexpr, PREC: tl.constexpr,
):
    """out = o Wo^T + bo (+ residual): the output projection as a GEMM over the S*L rows with the
    bias and the residual in its epilogue, so the output is written once and never read back
    (a shared query's residual row for output row r is r % L). Row offsets are int64 scalars per
    tile plus int32 offsets inside it (R * C passes 2^31 at S = 17408)."""
    pid = tl.program_id(0).to(tl.int64)
    pn = pid % n_n  # the few column tiles of one row block run side by side: o is read once from HBM
    r0 = (pid // n_n) * BLOCK_R
    ri = tl.arange(0, BLOCK_R)
    rn = pn * BLOCK_C + tl.arange(0, BLOCK_C)
    rk = tl.arange(0, BLOCK_K)
    rmask = ri < R - r0
    nmask = rn < C
    a_ptr = O + r0 * C + (ri[:, None] * C + rk[None, :])
    b_ptr = WO + (rn[:, None] * C + rk[None, :])
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptr + k0, mask=rmask[:, None], other=0.0)
            b = tl.load(b_ptr + k0, mask=nmask[:, None], other=0.0)
        else:
            kmask = (k0 + rk) < C
            a = tl.load(a_ptr + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptr + k0, mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += _mm(a, tl.trans(b), PREC)
    if HAS_BO:
        acc += tl.load(BO + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if HAS_RES:
        if RES_SHARED:
            res_row = ((r0 % L).to(tl.int32) + ri) % L
            res_ptr = RES + (res_row[:, None] * C + rn[None, :])
        else:
            res_ptr = RES + r0 * C + (ri[:, None] * C + rn[None, :])
        acc += tl.load(res_ptr, mask=omask, other=0.0).to(tl.float32)
    tl.store(OUT + r0 * C + (ri[:, None] * C + rn[None, :]), _cast(acc, OUT.dtype.element_ty, PREC), mask=omask)


@triton.jit
def _tra_bwd_kv_kernel(
    Q,  # (Sq, L, C) projected query
    KV,  # (S, M, 2C) [K | V]
    DO,  # (S, L, C) dO = grad_out Wo (concatenated heads)
    LSE,  # (S, H, L) float32
    DELTA,  # (S, H, L) float32: written when FUSED, read otherwise
    O,  # (S, L, >= C) o, written when FUSED (row stride stride_ol)
    DQ,  # (S, L, C) dQ, written when WRITE_DQ (per-sequence query, all keys in one chunk)
    DKV,  # (S, M, 2C) [dK | dV]
    DBKV,  # (S, n_mc, 2C) float32 column sums of [dK | dV] per (sequence, key chunk), when HAS_DB
    L, M, C, H, D,
    stride_qs, stride_ql, stride_kvs, stride_kvm, stride_dos, stride_dol, stride_os, stride_ol,
    stride_dqs, stride_dql,
    n_mc, qk_scale, scale,
    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    FUSED: tl.constexpr, WRITE_DQ: tl.constexpr, HAS_DB: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (key chunk of BLOCK_M keys, head, sequence): its keys' K, V and the dK, dV
    accumulators stay in registers while it walks the L query rows in BLOCK_L blocks.

    Keys are the rows of every tile (P^T, dP^T, dS^T are (keys, query rows)), as in the Triton
    flash-attention tutorial's backward: dV += P^T dO and dK += dS^T Q take their left operand
    straight from registers, with no transposes of P or dS. With FUSED (all M keys in one chunk)
    each row block's o = P V and Delta are formed here too (o is written for d_wo, Delta for the
    dQ kernel), and for a per-sequence query (WRITE_DQ) dQ = dS K."""
    pid = tl.program_id(0).to(tl.int64)
    mc = pid % n_mc
    rest = pid // n_mc
    h = rest % H
    s = rest // H

    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    rm = mc * BLOCK_M + tl.arange(0, BLOCK_M)
    mdmask = (rm < M)[:, None] & dmask[None, :]
    kv_ptr = KV + s * stride_kvs + rm[:, None] * stride_kvm + h * D + rd[None, :]
    k = tl.load(kv_ptr, mask=mdmask, other=0.0)  # (BM, D)
    v = tl.load(kv_ptr + C, mask=mdmask, other=0.0)
    dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    qT_base = Q + s * stride_qs + h * D + rd[:, None]
    do_base = DO + s * stride_dos + h * D + rd[None, :]
    stat_base = (s * H + h) * L
    for l0 in range(0, L, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        lmask = rl < L
        dlmask = dmask[:, None] & lmask[None, :]
        qT = tl.load(qT_base + rl[None, :] * stride_ql, mask=dlmask, other=0.0)  # (D, BL)
        do = tl.load(do_base + rl[:, None] * stride_dol, mask=lmask[:, None] & dmask[None, :], other=0.0)  # (BL, D)
        # Rows past L get lse = +inf, hence P = 0: they contribute nothing anywhere.
        lse2 = tl.load(LSE + stat_base + rl, mask=lmask, other=float("inf")) * LOG2E

        pt = tl.exp2(_mm(k, qT, PREC) * qk_scale - lse2[None, :])  # P^T (BM, BL)
        pt = tl.where((rm < M)[:, None], pt, 0.0)
        dpt = _mm(v, tl.trans(do), PREC)  # dP^T = V dO^T
        pt16 = _cast(pt, do.dtype, PREC)
        if FUSED:
            # o^T = V^T P^T, written once for d_wo. Delta = rowsum(dO * o) is taken as
            # rowsum(P * dP), from the float32 P that dS uses below, so that the rows of dS sum to
            # zero to float32 rounding: o's P is rounded to the input dtype for the tensor cores,
            # which would leave a bias of that rounding's size in every dK row (and in d_bk).
            ot = _mm(tl.trans(v), pt16, PREC)
            delta = tl.sum(pt * dpt, 0)
            tl.store(O + s * stride_os + rl[None, :] * stride_ol + h * D + rd[:, None],
                     _cast(ot, O.dtype.element_ty, PREC), mask=dlmask)
            tl.store(DELTA + stat_base + rl, delta, mask=lmask)
        else:
            delta = tl.load(DELTA + stat_base + rl, mask=lmask, other=0.0)

        # dS = P * (dP - Delta); dV += P^T dO; dK += dS^T Q (scale applied at the end).
        dst16 = _cast(pt * (dpt - delta[None, :]), qT.dtype, PREC)
        dv += _mm(pt16, do, PREC)
        dk += _mm(dst16, tl.trans(qT), PREC)
        if WRITE_DQ:  # dQ^T = K^T dS^T
            dqt = _mm(tl.trans(k), dst16, PREC)
            tl.store(DQ + s * stride_dqs + rl[None, :] * stride_dql + h * D + rd[:, None],
                     _cast(dqt * scale, DQ.dtype.element_ty, PREC), mask=dlmask)

    dk = dk * scale
    dkv_ptr = DKV + s * stride_kvs + rm[:, None] * stride_kvm + h * D + rd[None, :]
    tl.store(dkv_ptr, _cast(dk, DKV.dtype.element_ty, PREC), mask=mdmask)
    tl.store(dkv_ptr + C, _cast(dv, DKV.dtype.element_ty, PREC), mask=mdmask)
    if HAS_DB:
        # Bias gradients: this program's column sums of dK, dV (rows past M are exactly 0), in float32.
        db_ptr = DBKV + (s * n_mc + mc) * (2 * C) + h * D + rd
        tl.store(db_ptr, tl.sum(dk, 0), mask=dmask)
        tl.store(db_ptr + C, tl.sum(dv, 0), mask=dmask)


@triton.jit
def _tra_bwd_dq_kernel(
    Q,  # (Sq, L, C) projected query
    KV,  # (S, M, 2C) [K | V]
    DO,  # (S, L, C) dO
    LSE,  # (S, H, L) float32
    DELTA,  # (S, H, L) float32
    G,  # (S, L, C) grad_out, summed over the chunk's sequences when HAS_R
    DQ,  # (n_chunks, L, C): shared query: float32 partial sums per chunk; per-sequence: dQ itself
    R,  # (n_chunks, L, C) float32 partial sums of grad_out per chunk, when HAS_R
    S, L, M, C, H, D, chunk,
    stride_qs, stride_ql, stride_kvs, stride_kvm, stride_dos, stride_dol, stride_gs, stride_gl,
    stride_dqs, stride_dql,
    n_lb, qk_scale, scale,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_R: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program per (L-block, head, chunk of sequences): dQ = sum over the chunk's sequences s
    (in order) of dS_s K_s, dS recomputed from the saved lse and Delta over BLOCK_N key tiles.

    A shared query (stride_qs = 0) has one Q tile for every sequence: the chunk's sum stays in
    registers and one float32 partial per chunk is written (the wrapper sums the partials in a
    fixed order) - S copies of dQ never exist. A per-sequence query runs with chunk = 1."""
    pid = tl.program_id(0).to(tl.int64)
    lb = pid % n_lb
    rest = pid // n_lb
    h = rest % H
    c = rest // H
    s0 = c * chunk
    s1 = tl.minimum(s0 + chunk, S)

    rl = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    rd = tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    lmask = rl < L
    dmask = rd < D
    ldmask = lmask[:, None] & dmask[None, :]

    # Shared query: stride_qs = 0, the same tile for every s; per-sequence: chunk = 1, s = s0.
    q = tl.load(Q + s0 * stride_qs + rl[:, None] * stride_ql + h * D + rd[None, :], mask=ldmask, other=0.0)
    dq = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_R:
        r = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for s64 in range(s0, s1):  # the loop variable is int64, as s0 is
        do = tl.load(DO + s64 * stride_dos + rl[:, None] * stride_dol + h * D + rd[None, :], mask=ldmask,
                     other=0.0)
        stat = (s64 * H + h) * L + rl
        lse2 = tl.load(LSE + stat, mask=lmask, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + stat, mask=lmask, other=0.0)
        kv_base = KV + s64 * stride_kvs + h * D + rd[None, :]
        for n0 in range(0, M, BLOCK_N):
            rm = n0 + rn
            kvmask = (rm < M)[:, None] & dmask[None, :]
            k = tl.load(kv_base + rm[:, None] * stride_kvm, mask=kvmask, other=0.0)
            v = tl.load(kv_base + rm[:, None] * stride_kvm + C, mask=kvmask, other=0.0)
            p = _probs(q, k, lse2, rm, M, qk_scale, PREC)
            ds = p * (_mm(do, tl.trans(v), PREC) - delta[:, None])
            dq += _mm(_cast(ds, k.dtype, PREC), k, PREC)
        if HAS_R:
            r += tl.load(G + s64 * stride_gs + rl[:, None] * stride_gl + h * D + rd[None, :], mask=ldmask,
                         other=0.0).to(tl.float32)
    out = c * stride_dqs + rl[:, None] * stride_dql + h * D + rd[None, :]
    tl.store(DQ + out, _cast((dq * scale), DQ.dtype.element_ty, PREC), mask=ldmask)
    if HAS_R:
        tl.store(R + out, r, mask=ldmask)
