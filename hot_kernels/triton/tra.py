"""Launch wrappers of the Triton token recovering attention (TRA) kernels (tra_kernels.py).

Entry points with the names, signatures and return lists of csrc/hot_kernels.h (the shared
contract, DESIGN.md op 7): inputs arrive validated by hot_kernels/_validate.py (one dtype, shapes
match, heads divide C) and may be non-contiguous (.contiguous() here). Dtypes float16, bfloat16,
float32; float32 accumulation and softmax statistics; outputs and gradients in the input dtype,
lse float32 (S, H, L). Static shapes, no host sync (CUDA-graph safe), no atomics: bitwise
deterministic for a given shape, device and knob setting (the knobs are plain module attributes,
no autotuner whose pick could differ between processes).

Algorithm (query (Sq, L, C) with Sq = 1 when shared, x (S, M, C), H heads of width D = C / H):

Forward - 4 launches (2 torch GEMMs, 2 Triton kernels):
  1. Q = query Wq^T + bq, a torch GEMM: for a shared query once, (L, C) - never S copies.
  2. [K | V] = x [Wk; Wv]^T + [bk; bv]: ONE torch GEMM (S*M, 2C) with the stacked weight. It is a
     plain projection that cuBLAS runs near peak; fused into the attention it would be recomputed
     for every L-block of a sequence (or serialise them).
  3. _tra_fwd_kernel, one program per (64 query rows, sequence), all heads in turn: flash-style
     attention over the M keys in BLOCK_N-key tiles (online softmax in exp2, float32 statistics;
     BLOCK_N is the tile of 16/32/64 that pads M least: 81 keys cost 96, not 128). Writes o
     (S, L, C) and lse (S, H, L) - the only saved statistic (never the S*H*L*M probabilities).
  4. _tra_out_kernel: out = o Wo^T + bo (+ query, the same L rows for every sequence when shared)
     as a Triton GEMM over the S*L rows with bias and residual in its epilogue, so the output is
     written once: a library GEMM (+ bias) would need a separate residual pass that reads and
     writes all of out again (2 x S*L*C elements, about as long as the GEMM itself at C = 512).
  For C <= FWD_FUSE_MAX_C (128) steps 3 and 4 are one kernel: each head's o (64, D) goes straight
  into a (64, C) float32 output tile by its D columns of Wo, so o never reaches memory. For wider
  C that tile does not fit in registers next to the attention state (measured with ptxas for
  sm_90: a 64 x 512 tile spills at 8 warps; a 64 x 256 tile needs 205 registers, i.e. one CTA
  per SM, and two column groups recompute the attention twice), so o makes one round trip.

Backward - shared query: 6 torch GEMMs (one the tiny query projection), 2 Triton kernels, small
fixed-order reductions:
  1. Q, [K | V] recomputed (2 GEMMs, as in the forward) and dO = grad_out Wo (1 GEMM).
  2. _tra_bwd_kv_kernel, one program per (head, sequence): K, V and the dK, dV accumulators of
     all the sequence's keys (next_pow2(M) <= 128) stay in registers while it walks the L query
     rows in 32-row blocks with keys as the tile rows (P^T = exp2(K Q^T * scale' - lse'), as in the
     Triton flash-attention tutorial's backward: no transposes of P or dS). On the way it forms
     o^T = V^T P^T (written once, for d_wo) and Delta = rowsum(P * dP) (for step 3), then
     dS = P (dP - Delta), dV += P^T dO, dK += dS^T Q, and for a per-sequence query dQ = dS K.
     It writes [dK | dV] (S, M, 2C) and float32 column sums of dK and dV per sequence (d_bk, d_bv).
     81 keys take a 128-row tile here: holding them as two tiles of 64 + 32 rows spilled (ptxas:
     255 registers + 112..256 B of stack at 32 or 64 query rows), 128 rows do not (200 registers).
  3. Shared query: _tra_bwd_dq_kernel, one program per (64 query rows, head, chunk of sequences):
     it loops over its chunk's sequences in order, rebuilding dS tile by tile (BLOCK_N keys) from
     lse and Delta and summing dS_s K_s in registers, and sums grad_out_s too when residual; one
     float32 partial per chunk, then a fixed-order sum over the chunks. The chunk count comes
     from the shape alone (DQ_TARGET_PROGRAMS), so the result does not depend on the device.
  4. GEMMs: d_wo and d_bo from ONE GEMM, grad_out^T [o | 1] (step 2 writes o with a ones column,
     so no extra pass over grad_out); d_x = [dK | dV] [Wk; Wv] and [d_wk; d_wv] = [dK | dV]^T x
     (one GEMM each); the shared query side is (L, C) float32 work: d_query = dQ Wq (+ the summed
     grad_out), d_wq = dQ^T query, d_bq = column sums of dQ. A per-sequence query instead takes
     d_query = grad_out + dQ Wq (one addmm) and d_wq = dQ^T query (two (S*L, C) GEMMs).
  Keys that do not fit one program (next_pow2(M) > 128, or > 64 for float32 / wide heads): o and
  Delta come from _tra_fwd_kernel in its o-only mode, dK/dV from step 2 per key chunk, and a
  per-sequence dQ from _tra_bwd_dq_kernel with chunks of one sequence.

Why torch GEMMs: the projections of x, dO and the weight gradients are large plain GEMMs
(K = C, or K = S*M / S*L) that cuBLAS runs near peak and deterministically; what the published
path spends on top of them - the per-sequence query projection, the S*H*L*M probabilities, the
head transposes, the residual pass - is what the Triton kernels remove.

Tuning knobs (module attributes, read at each call). The defaults are for the H100 (sm_90) at the
HoT shapes (L = 243, M = 81, D = 32/64, C = 256/512), chosen from ptxas register/spill/shared
memory counts (no GPU was at hand to time them; see the issue 4 report):
  FWD_BLOCK_L, FWD_WARPS, FWD_STAGES, KEY_TILES                      attention forward
  FWD_FUSE_MAX_C, FWD_FUSE_BLOCK_C, FWD_FUSE_WARPS                   fused output projection
  OUT_PROJ ("triton" | "torch"), OUT_BLOCK_R/C/K, OUT_WARPS, OUT_STAGES   output projection
  BWD_BLOCK_L, BWD_MAX_KEYS, BWD_CHUNK_KEYS, BWD_WARPS, BWD_STAGES   dK/dV kernel
  DQ_BLOCK_L, DQ_TARGET_PROGRAMS, DQ_WARPS, DQ_STAGES                dQ kernel
They hold for 16-bit inputs with D <= 64; _configs scales them down for float32 and wider heads
(shared memory: float32 tf32x3 tiles at the 16-bit sizes exceed the 227 KB of an H100 SM).
F32_DOT_PRECISION: "tf32x3" (float32 accuracy on tensor cores) or "ieee"; the environment variable
HOT_KERNELS_TRITON_F32_DOT sets it at import (as for the TPC kernels).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _alloc, _target
from ._device import on_input_device
from . import tra_kernels as K
from .tpc import _k  # wrap_triton: launches Inductor / AOTInductor can trace (torch.library.triton_op)

__all__ = ["token_recovering_attention", "token_recovering_attention_backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
F32_DOT_PRECISION = os.environ.get("HOT_KERNELS_TRITON_F32_DOT", "tf32x3")

FWD_BLOCK_L = 64
FWD_WARPS = 4  # 117 registers at D = 64 (bf16): four CTAs per SM
FWD_STAGES = 2
KEY_TILES = (16, 32, 64)
FWD_FUSE_MAX_C = 128
FWD_FUSE_BLOCK_C = 256
FWD_FUSE_WARPS = 8
OUT_PROJ = "triton"
OUT_BLOCK_R = 128
OUT_BLOCK_C = 128
OUT_BLOCK_K = 64
OUT_WARPS = 8  # 128 registers, 96 KB shared memory at 3 stages: two CTAs per SM
OUT_STAGES = 3
BWD_BLOCK_L = 32  # 200 registers at D = 64 with 128 keys and 8 warps (217 with dQ; 64 query rows: 255)
BWD_MAX_KEYS = 128
BWD_CHUNK_KEYS = 64
BWD_WARPS = 8
BWD_STAGES = 2
DQ_BLOCK_L = 64
DQ_TARGET_PROGRAMS = 1024
DQ_WARPS = 4  # 117 registers at D = 64: four CTAs per SM
DQ_STAGES = 2

# The backward writes o as (S*L, C + 16): column C holds ones (d_bo comes out of the d_wo GEMM),
# and a row stride divisible by 16 keeps the stores vectorised (C + 8 made them scalar: 2x registers).
_O_PAD = 16
_LOG2E = 1.4426950408889634


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows(n: int, cap: int) -> int:
    """Row tile for n rows: a power of two in [16, cap] (16 is tl.dot's smallest)."""
    return max(16, min(_np2(cap), _np2(n)))


def _key_tile(M: int, cap: int = 64) -> int:
    """BLOCK_N of the key loops: the tile of KEY_TILES (<= cap) that pads M least, the larger on
    ties: 81 keys -> 32 (96 keys of work, not 128)."""
    best_pad, best = None, 16
    for bn in sorted(t for t in KEY_TILES if t <= cap) or [16]:
        pad = _cdiv(M, bn) * bn
        if best_pad is None or pad <= best_pad:
            best_pad, best = pad, bn
    return best


def _prec(dtype: torch.dtype) -> str:
    """PREC of the kernels' dots: the float32 input precision, "tf32" (ignored) for 16-bit
    operands, and "upcast" for bfloat16 under the interpreter (its bfloat16 dot is wrong)."""
    if dtype == torch.float32:
        return F32_DOT_PRECISION
    if dtype == torch.bfloat16 and _INTERPRET:
        return "upcast"
    return "tf32"


def _configs(dtype: torch.dtype, D: int, C: int, L: int, M: int, arch: int | None = None) -> dict:
    """Block sizes, warps and stages of every kernel for this dtype and head width on sm_<arch>
    (None: off CUDA, taken as sm_90). The module knobs apply as they are to 16-bit inputs with
    D <= 64 on sm_90; a head row of more bytes (float32, or D > 64) gets smaller row tiles, fewer
    keys per backward program and fewer stages, so that the tiles fit the 227 KB of shared memory
    of an H100 SM (checked with ptxas for D = 16..256). Register spills (ptxas, Triton 3.6 and
    3.9, scripts/triton_aot_compile.py; issue 15 item 3) set the rest:
    - float32 never fuses the output projection: the (64, C) float32 output tile next to the
      float32 attention state spilled 12-1800 B at every head width, on sm_90 and sm_80, and
      smaller row tiles or fewer columns still spilled or recomputed the attention;
    - float32 heads of 128 take 16-row forward tiles (32 rows spilled 72-80 B);
    - sm_8x (64K registers as on sm_90, but fewer SMs and 163 KB of shared memory): float32
      forward and dQ tiles of 32 rows at D = 64 (64 rows: 72 / 652 B of spills), a 64-row float32
      output projection tile (128 rows: 960 B), 16 query rows in the 16-bit dK/dV kernel (32:
      104 B) and 8 warps in the float32 one (4: 292 B), 8 warps for the fused 16-bit forward at
      D = 64 (4: 32 B)."""
    elem = 4 if dtype == torch.float32 else 2
    sm8x = arch is not None and arch < 90
    bd = max(16, _np2(D))
    row = elem * bd  # bytes of one head row: 128 for bf16 D = 64
    fuse = C <= FWD_FUSE_MAX_C and elem == 2
    if elem == 4 and row > 256:  # float32 D > 64
        fwd_cap = 16
    elif elem == 4 and row > 128 and sm8x:  # float32 D = 64 on sm_8x
        fwd_cap = min(FWD_BLOCK_L, 32)
    else:
        fwd_cap = FWD_BLOCK_L if row <= 256 else (32 if row <= 512 else 16)
    fwd_l = _rows(L, fwd_cap)
    narrow_keys = 64 if row <= 256 else (32 if row <= 512 else 16)  # BLOCK_N cap of the key loops
    fuse_c = min(max(16, _np2(C)), _np2(FWD_FUSE_BLOCK_C))
    if elem == 2 and row <= 128:
        bwd = (16 if sm8x else BWD_BLOCK_L, BWD_MAX_KEYS, BWD_CHUNK_KEYS, BWD_WARPS, BWD_STAGES)
    elif elem == 2 and row <= 256:  # 16-bit D = 128
        bwd = (16, BWD_MAX_KEYS, BWD_CHUNK_KEYS, BWD_WARPS, 1)
    elif row <= 256:  # float32 D <= 64
        bwd = (16, 64, 64, 8 if sm8x else 4, 1)
    elif row <= 512:
        bwd = (16, 32, 32, 8, 1)
    else:  # heads wider than the contract's 128 (float32 D > 128): correct, not tuned
        bwd = (16, 16, 16, 4, 1)
    bwd_l, max_keys, chunk_keys, bwd_warps, bwd_stages = bwd
    full = max(16, _np2(M))
    block_m = full if full <= max_keys else max(16, _np2(chunk_keys))
    return dict(
        bd=bd,
        fuse=fuse,
        fwd=dict(BLOCK_L=fwd_l, BLOCK_N=_key_tile(M, narrow_keys), BLOCK_C=fuse_c if fuse else 16,
                 num_warps=FWD_WARPS if row <= 128 else 8,
                 fuse_warps=FWD_FUSE_WARPS if fwd_l * fuse_c * elem > 64 * 128 * 2 or (sm8x and bd == 64) else 4,
                 num_stages=FWD_STAGES if row <= 256 else 1),
        n_cg=_cdiv(C, fuse_c) if fuse else 1,
        out=dict(BLOCK_R=min(OUT_BLOCK_R, 64) if sm8x and elem == 4 else OUT_BLOCK_R, BLOCK_C=_rows(C, OUT_BLOCK_C), BLOCK_K=_rows(C, OUT_BLOCK_K if elem == 2 else 32),
                 num_warps=OUT_WARPS, num_stages=OUT_STAGES),
        bwd=dict(BLOCK_L=_rows(L, bwd_l), BLOCK_M=block_m, num_warps=bwd_warps if block_m >= 64 else 4,
                 num_stages=bwd_stages),
        n_mc=1 if full <= max_keys else _cdiv(M, block_m),
        dq=dict(BLOCK_L=_rows(L, (min(DQ_BLOCK_L, 32) if sm8x and elem == 4 and row > 128 else DQ_BLOCK_L)
                              if row <= 256 else (32 if row <= 512 else 16)),
                BLOCK_N=_key_tile(M, min(narrow_keys, 64 if row <= 128 else 32)),
                num_warps=DQ_WARPS if row <= 128 else 8, num_stages=DQ_STAGES),
    )


def _arch(x: torch.Tensor) -> int | None:
    """sm_<arch> of x's GPU as an int (90 for an H100), None off CUDA."""
    cap = _target.capability(x)
    return None if cap is None else 10 * cap[0] + cap[1]


def _project(query, x, wq, bq, wk, bk, wv, bv):
    """Q = query Wq^T + bq (once for a shared query) and [K | V] = x [Wk; Wv]^T + [bk; bv] (one GEMM)."""
    C = x.shape[2]
    Q = F.linear(query, wq, bq)  # (Sq, L, C)
    wkv = torch.cat([wk, wv], 0)  # (2C, C)
    if bk is None and bv is None:
        bkv = None
    else:
        zero = x.new_zeros((C,))
        bkv = torch.cat([zero if bk is None else bk, zero if bv is None else bv])
    KV = F.linear(x, wkv, bkv)  # (S, M, 2C)
    return Q.contiguous(), KV.contiguous(), wkv


def _launch_attention(cfg, Q, KV, out, lse, *, L, M, C, H, D, scale, wo=None, bo=None, res=None,
                      o_row_stride=None, do=None, delta=None):
    """_tra_fwd_kernel. With wo: the output projection (+ bo, + residual res) fused, out is the
    final (S, L, C) output. Without: out receives o (rows of stride o_row_stride); with do, Delta
    = rowsum(dO * o) goes to delta and lse is left as it is."""
    S = KV.shape[0]
    fuse = wo is not None
    f = cfg["fwd"]
    n_lb = _cdiv(L, f["BLOCK_L"])
    n_cg = cfg["n_cg"] if fuse else 1
    stride_ol = C if o_row_stride is None else o_row_stride
    dummy = lse
    _k(K._tra_fwd_kernel)[(n_lb * n_cg * S,)](
        Q, KV, wo if fuse else dummy, bo if bo is not None else dummy, res if res is not None else dummy,
        out, lse, do if do is not None else dummy, delta if delta is not None else dummy,
        L, M, C, H, D,
        0 if Q.shape[0] == 1 else L * C, C, M * 2 * C, 2 * C,
        (0 if res.shape[0] == 1 else L * C) if res is not None else 0, C,
        L * stride_ol, stride_ol, L * C, C,
        n_lb, n_cg, scale * _LOG2E,
        BLOCK_L=f["BLOCK_L"], BLOCK_N=f["BLOCK_N"], BLOCK_D=cfg["bd"], BLOCK_C=f["BLOCK_C"] if fuse else 16,
        FUSE_OUT=fuse, HAS_BO=bo is not None, HAS_RES=res is not None, HAS_DO=do is not None,
        WRITE_LSE=do is None, PREC=_prec(KV.dtype),
        num_warps=f["fuse_warps"] if fuse else f["num_warps"], num_stages=f["num_stages"],
    )


def _launch_out_proj(cfg, o, wo, bo, res, out, L):
    """out = o Wo^T + bo (+ res): _tra_out_kernel (OUT_PROJ "triton") or torch addmm + add_ ("torch")."""
    S, _, C = o.shape
    R = S * L
    if OUT_PROJ == "torch":
        o2, out2 = o.view(R, C), out.view(R, C)
        if bo is None:
            torch.mm(o2, wo.t(), out=out2)
        else:
            torch.addmm(bo, o2, wo.t(), out=out2)
        if res is not None:
            out += res  # broadcast over S for a shared query
        return
    c = cfg["out"]
    n_n = _cdiv(C, c["BLOCK_C"])
    dummy = out
    _k(K._tra_out_kernel)[(_cdiv(R, c["BLOCK_R"]) * n_n,)](
        o, wo, bo if bo is not None else dummy, res if res is not None else dummy, out,
        R, L, C, n_n,
        BLOCK_R=c["BLOCK_R"], BLOCK_C=c["BLOCK_C"], BLOCK_K=c["BLOCK_K"], EVEN_K=C % c["BLOCK_K"] == 0,
        HAS_BO=bo is not None, HAS_RES=res is not None, RES_SHARED=res is not None and res.shape[0] == 1,
        PREC=_prec(o.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"],
    )


@on_input_device
def token_recovering_attention(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, scale, residual):
    """-> [out (S, L, C) in x's dtype, lse (S, H, L) float32]; see the module docstring."""
    S, M, C = x.shape
    L = query.shape[1]
    H = int(num_heads)
    D = C // H
    scale = float(scale)
    query, x, wo = query.contiguous(), x.contiguous(), wo.contiguous()
    bo = None if bo is None else bo.contiguous()
    res = query if residual else None
    cfg = _configs(x.dtype, D, C, L, M, _arch(x))
    Q, KV, _ = _project(query, x, wq, bq, wk, bk, wv, bv)
    lse = _alloc.empty((S, H, L), dtype=torch.float32, device=x.device)
    out = _alloc.empty((S, L, C), dtype=x.dtype, device=x.device)
    if cfg["fuse"]:
        _launch_attention(cfg, Q, KV, out, lse, L=L, M=M, C=C, H=H, D=D, scale=scale, wo=wo, bo=bo, res=res)
    else:
        o = _alloc.empty((S, L, C), dtype=x.dtype, device=x.device)
        _launch_attention(cfg, Q, KV, o, lse, L=L, M=M, C=C, H=H, D=D, scale=scale)
        _launch_out_proj(cfg, o, wo, bo, res, out, L)
    return [out, lse]


@on_input_device
def token_recovering_attention_backward(grad_out, query, x, wq, bq, wk, bk, wv, bv, wo, bo, lse, num_heads, scale,
                                        residual):
    """-> [d_query, d_x, d_wq, d_bq, d_wk, d_bk, d_wv, d_bv, d_wo, d_bo]; see the module docstring.

    d_query has query's shape: for a shared query (1, L, C) the sum over the S sequences. A bias
    gradient is empty when that bias is None."""
    S, M, C = x.shape
    Sq, L = query.shape[0], query.shape[1]
    H = int(num_heads)
    D = C // H
    scale = float(scale)
    dtype, dev = x.dtype, x.device
    shared = Sq == 1
    G = grad_out.contiguous()
    query, x, wo, wq = query.contiguous(), x.contiguous(), wo.contiguous(), wq.contiguous()
    lse = lse.contiguous()
    cfg = _configs(dtype, D, C, L, M, _arch(x))
    Q, KV, wkv = _project(query, x, wq, bq, wk, bk, wv, bv)
    G2 = G.view(S * L, C)
    dO = torch.mm(G2, wo).view(S, L, C)  # out = o Wo^T  ->  dO = grad_out Wo

    # o with a ones column appended: grad_out^T [o | 1] gives d_wo and d_bo in one GEMM.
    o_aug = _alloc.empty((S, L, C + _O_PAD), dtype=dtype, device=dev)
    o_aug.narrow(-1, C, 1).fill_(1)
    o_aug.narrow(-1, C + 1, _O_PAD - 1).zero_()
    delta = _alloc.empty((S, H, L), dtype=torch.float32, device=dev)
    dKV = _alloc.empty((S, M, 2 * C), dtype=dtype, device=dev)
    n_mc = cfg["n_mc"]
    fused = n_mc == 1
    has_db = bk is not None or bv is not None
    dbkv = _alloc.empty((S, n_mc, 2 * C), dtype=torch.float32, device=dev) if has_db else delta
    dQ = None if shared else _alloc.empty((S, L, C), dtype=dtype, device=dev)
    prec = _prec(dtype)
    qk_scale = scale * _LOG2E
    stride_qs = 0 if shared else L * C

    if not fused:  # o and Delta first: each dK/dV program sees only a chunk of the keys
        _launch_attention(cfg, Q, KV, o_aug, lse, L=L, M=M, C=C, H=H, D=D, scale=scale, o_row_stride=C + _O_PAD,
                          do=dO, delta=delta)
    write_dq = fused and not shared
    b = cfg["bwd"]
    _k(K._tra_bwd_kv_kernel)[(n_mc * H * S,)](
        Q, KV, dO, lse, delta, o_aug, dQ if write_dq else delta, dKV, dbkv,
        L, M, C, H, D,
        stride_qs, C, M * 2 * C, 2 * C, L * C, C, L * (C + _O_PAD), C + _O_PAD, L * C, C,
        n_mc, qk_scale, scale,
        BLOCK_L=b["BLOCK_L"], BLOCK_M=b["BLOCK_M"], BLOCK_D=cfg["bd"], FUSED=fused, WRITE_DQ=write_dq,
        HAS_DB=has_db, PREC=prec, num_warps=b["num_warps"], num_stages=b["num_stages"],
    )

    r_part = None
    if shared or not fused:
        q = cfg["dq"]
        n_lb = _cdiv(L, q["BLOCK_L"])
        if shared:
            n_chunks = max(1, min(S, _cdiv(int(DQ_TARGET_PROGRAMS), n_lb * H)))
            chunk = _cdiv(S, n_chunks)
            n_chunks = _cdiv(S, chunk)
            dq_part = _alloc.empty((n_chunks, L, C), dtype=torch.float32, device=dev)
            r_part = _alloc.empty((n_chunks, L, C), dtype=torch.float32, device=dev) if residual else None
        else:
            chunk, n_chunks, dq_part = 1, S, dQ
        _k(K._tra_bwd_dq_kernel)[(n_lb * H * n_chunks,)](
            Q, KV, dO, lse, delta, G, dq_part, r_part if r_part is not None else delta,
            S, L, M, C, H, D, chunk,
            stride_qs, C, M * 2 * C, 2 * C, L * C, C, L * C, C, L * C, C,
            n_lb, qk_scale, scale,
            BLOCK_L=q["BLOCK_L"], BLOCK_N=q["BLOCK_N"], BLOCK_D=cfg["bd"], HAS_R=r_part is not None, PREC=prec,
            num_warps=q["num_warps"], num_stages=q["num_stages"],
        )

    d_wo_aug = torch.mm(G2.t(), o_aug.view(S * L, C + _O_PAD))  # (C, C + 16)
    d_wo = d_wo_aug.narrow(1, 0, C)
    d_bo = None if bo is None else d_wo_aug.select(1, C)

    dKV2 = dKV.view(S * M, 2 * C)
    d_x = torch.mm(dKV2, wkv).view(S, M, C)
    d_wkv = torch.mm(dKV2.t(), x.view(S * M, C))  # (2C, C) = [d_wk; d_wv]
    d_wk, d_wv = d_wkv.narrow(0, 0, C), d_wkv.narrow(0, C, C)
    d_bk = d_bv = None
    if has_db:
        d_bkv = dbkv.sum((0, 1))  # a fixed-order reduction of float32 partials
        d_bk = None if bk is None else d_bkv.narrow(0, 0, C)
        d_bv = None if bv is None else d_bkv.narrow(0, C, C)

    if shared:
        dq = dq_part.sum(0)  # (L, C) float32, a fixed-order sum of the chunk partials
        d_wq = torch.mm(dq.t(), query.select(0, 0).float())
        d_bq = None if bq is None else dq.sum(0)
        dquery = torch.mm(dq, wq.float())
        if residual:
            dquery += r_part.sum(0)
        d_query = dquery.unsqueeze(0)
    else:
        dQ2 = dQ.view(S * L, C)
        d_query = (torch.addmm(G2, dQ2, wq) if residual else torch.mm(dQ2, wq)).view(S, L, C)
        d_wq = torch.mm(dQ2.t(), query.view(S * L, C))
        d_bq = None if bq is None else dQ2.sum(0, dtype=torch.float32)
    # Outputs of the op may not alias one another: d_wk/d_wv, d_bk/d_bv and d_wo/d_bo are parts of
    # one GEMM's or one reduction's result, so each of those (C or C*C elements) gets its own copy;
    # the others are fresh tensors. (A fixed rule rather than a storage check: it traces.)
    def own(g):
        return None if g is None else g.to(dtype).clone(memory_format=torch.contiguous_format)

    def fresh(g):
        return None if g is None else g.to(dtype).contiguous()

    grads = [fresh(d_query), fresh(d_x), fresh(d_wq), fresh(d_bq), own(d_wk), own(d_bk), own(d_wv), own(d_bv),
             own(d_wo), own(d_bo)]
    return [x.new_empty((0,)) if g is None else g for g in grads]  # an absent bias's gradient: empty
