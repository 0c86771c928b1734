"""Launch wrappers of the Triton TPC kernels (hot_kernels/triton/tpc_kernels.py).

Entry points with the names and signatures of csrc/hot_kernels.h (the shared contract): inputs
arrive validated by hot_kernels/_validate.py; they may be non-contiguous or expanded (every
kernel takes strides). Outputs are allocated here with static shapes; nothing here syncs with
the device. Dtypes: float16, bfloat16, float32 (float64 is the CPU/reference backends' own),
float32 accumulation; statistics come back in float32, indices in int64.

Launches per call: pairwise_distance 1, its backward 1 (2 with y), knn_density 1, dpc_delta 2,
topf_select 1, dpc_knn 3 (density sweep, delta sweep, selection; + 1 for the assignment), gather_frames 1,
gather_frames_backward 2 (zero fill + scatter).

Tuning knobs (module attributes, read at each call): SWEEP_BM / SWEEP_BN (row / column tile of
the sweeps; the row tile shrinks for small grids, see _sweep_bm), BC_F32 / BC_HALF (channel
chunk), SWEEP_WARPS, SELECT_SINGLE_MAX (largest N whose selection sorts all keys in registers;
a bigger sort compiles slowly: ~20 s at 4096), SELECT_CHUNK (tokens per pass of the bisection
path), SELECT_ROUND (picks per sorted round of its best-first output), ASSIGN_BM / ASSIGN_BN /
ASSIGN_WARPS / ASSIGN_MAX_PROGRAMS (the assignment's tiles, warps and programs per sample), F32_DOT_PRECISION
("tf32x3" or "ieee"; the environment variable HOT_KERNELS_TRITON_F32_DOT sets it at import).
"""
from __future__ import annotations

import math
import os

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from . import _alloc, _target
from ._device import on_input_device
from . import tpc_kernels as K

__all__ = [
    "pairwise_distance",
    "pairwise_distance_backward",
    "knn_density",
    "dpc_delta",
    "topf_select",
    "dpc_knn",
    "gather_frames",
    "gather_frames_backward",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

F32_DOT_PRECISION = os.environ.get("HOT_KERNELS_TRITON_F32_DOT", "tf32x3")
SWEEP_BM = 64
SWEEP_BN = 64
SWEEP_WARPS = 4
BC_F32 = 32
BC_HALF = 64
SELECT_SINGLE_MAX = 2048
SELECT_CHUNK = 4096
SELECT_ROUND = 1024
ASSIGN_BM = 64
ASSIGN_BN = 32
ASSIGN_WARPS = 8  # with ASSIGN_BN = 32: no spills on sm_90 (ptxas, Triton 3.6; 4 warps x 64: 1 KB)
ASSIGN_MAX_PROGRAMS = 64
PDIST_BLOCK = 64
ROWMAX_CHUNK = 1024

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _block(n: int, cap: int, lo: int = 16) -> int:
    """A power-of-two block for an extent n: at least lo (tl.dot's minimum), at most cap."""
    return max(lo, min(cap, _np2(n)))


# CUDA caps grid axes 1 and 2 at 65535 (axis 0 at 2^31 - 1), and Triton does not check: every
# launch here has a one-axis grid with the batch folded in, the kernels split the program id.
MAX_GRID_X = 2 ** 31 - 1


def _grid(programs: int) -> tuple[int]:
    """A one-axis launch grid of ``programs`` programs (raises past CUDA's axis-0 limit)."""
    if programs > MAX_GRID_X:
        raise ValueError(f"hot_kernels (triton): {programs} programs exceed the launch grid's limit "
                         f"({MAX_GRID_X}); split the batch")
    return (int(programs),)


def _k(kernel):
    """kernel, launchable inside torch.library.triton_op: wrap_triton makes a compiled Triton
    kernel visible to make_fx / Inductor tracing (and launches it directly in eager mode)."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def _check_dtype(op: str, t: torch.Tensor, name: str = "x") -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"hot_kernels.{op} (triton): {name} must be float16, bfloat16 or float32, got {t.dtype} "
                        "(float64 runs on the cpu and reference backends)")


class _Points:
    """x (B, N, C), or (B, N, J, C) pooled over J inside the kernels' loads: sizes and strides."""

    def __init__(self, op: str, x: torch.Tensor):
        _check_dtype(op, x)
        self.x = x
        if x.dim() == 3:
            self.B, self.N, self.C = x.shape
            self.J = 1
            self.s_b, self.s_n, self.s_c = x.stride()
            self.s_j = 0
        elif x.dim() == 4:
            self.B, self.N, self.J, self.C = x.shape
            self.s_b, self.s_n, self.s_j, self.s_c = x.stride()
        else:
            raise ValueError(f"hot_kernels.{op} (triton): x must be (B, N, C) or (B, N, J, C), got {tuple(x.shape)}")
        self.pool = self.J > 1
        # Half points go to the tensor cores as they are. The interpreter's dot mishandles
        # bfloat16, so there bfloat16 takes the float32 path (the same products, exact in float32).
        self.native = (x.dtype != torch.float32 and not self.pool
                       and not (_INTERPRET and x.dtype == torch.bfloat16))
        self.bc = min(BC_HALF if self.native else BC_F32, _block(self.C, 1 << 30))
        self.sqrt_c = math.sqrt(self.C)

    def args(self):
        return (self.N, self.C, self.J, self.s_b, self.s_n, self.s_j, self.s_c)


def _mask_args(token_mask, like: torch.Tensor):
    """(tensor, stride_b, stride_n, present) for a (B, N) bool mask viewed as uint8 (no copy)."""
    if token_mask is None:
        return like, 0, 0, False
    m = token_mask if token_mask.dtype == torch.uint8 else token_mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


# ---- pooled input: pool inside the loads, or pool once into a (B, N, C) float32 copy -------------


def pooled_traffic(B: int, N: int, J: int, C: int, elem: int, k: int, bm: int, bn: int) -> dict:
    """Bytes the two selection sweeps (density, delta) and their exact recomputations load from the
    points of a pooled (B, N, J, C) input of elem-byte elements, by path:

    - "in_kernel": every load reads all J joints: each (row tile, column tile) visit loads both
      tiles and the pivot row (bm + bn + 1 points of J * C elements), twice (two sweeps), and the
      exact recomputation loads 2 points per kept neighbour (k - 1) and per parent;
    - "pool_once": one pass reads x (B * N * J * C elements) and writes the float32 mean
      (B * N * C * 4 bytes); the same loads then read C float32 values per point.

    An upper bound of the sweeps' traffic (the delta sweep skips column tiles with no higher
    token; caches absorb part of the re-reads), the same bound for both paths. The assignment
    (return_assignment) is left out: it reads the points once more per (row, picked) tile pair,
    which adds to the in-kernel path's side."""
    tiles = B * (-(-N // bm)) * (-(-N // bn))
    points = 2 * tiles * (bm + bn + 1) + 2 * B * N * (max(int(k) - 1, 0) + 1)
    in_kernel = points * J * C * elem
    pool_once = B * N * J * C * elem + B * N * C * 4 + points * C * 4
    return {"in_kernel": in_kernel, "pool_once": pool_once}


POOL_ONCE = "auto"  # "auto" (the smaller of pooled_traffic), "always", "never"
POOL_BR = 32


def _use_pool_once(p: "_Points", k: int) -> bool:
    if not p.pool or POOL_ONCE == "never":
        return False
    if POOL_ONCE == "always":
        return True
    if POOL_ONCE != "auto":
        raise ValueError(f"hot_kernels.triton.tpc.POOL_ONCE must be 'auto', 'always' or 'never', got {POOL_ONCE!r}")
    t = pooled_traffic(p.B, p.N, p.J, p.C, p.x.element_size(), k, _sweep_bm(p), _block(p.N, SWEEP_BN))
    return t["pool_once"] < t["in_kernel"]


def _pool_once(op: str, p: "_Points", k: int) -> "_Points":
    """p itself, or (by _use_pool_once) the points of a (B, N, C) float32 copy holding the mean
    over J: bitwise the values the pooled loads compute, so the results do not depend on the path."""
    if p.B == 0 or p.N == 0 or not _use_pool_once(p, k):
        return p
    out = _alloc.empty((p.B, p.N, p.C), dtype=torch.float32, device=p.x.device)
    n_rb = triton.cdiv(p.N, POOL_BR)
    _k(K._pool_kernel)[_grid(p.B * n_rb)](
        p.x, out, *p.args(), n_rb, BR=POOL_BR, BC=min(BC_F32 * 4, _block(p.C, 1 << 30)), num_warps=4,
    )
    return _Points(op, out)


# ---- the selection statistics and dpc_knn ---------------------------------------------------------


def _sweep_bm(p: _Points) -> int:
    """Row tile of the sweeps: SWEEP_BM, halved (down to 16) while the grid would have fewer than
    two programs per SM. A program's serial work (all column tiles) scales with its rows, so
    small batches get more, shorter programs."""
    bm = _block(p.N, SWEEP_BM)
    sms = _target.sm_count(p.x)
    if sms is not None:
        while bm > 16 and p.B * triton.cdiv(p.N, bm) < 2 * sms:
            bm //= 2
    return bm


def _density(p: _Points, mask, k: int, out, rowmax, want_dens: bool, want_max: bool, log: bool) -> None:
    m, m_b, m_n, has_mask = _mask_args(mask, p.x)
    ko = max(k - 1, 0) if want_dens else 0
    kp = _np2(max(ko, 1))
    bm = _sweep_bm(p)
    bn = _block(p.N, SWEEP_BN)
    grid = _grid(p.B * triton.cdiv(p.N, bm))
    _k(K._density_kernel)[grid](
        p.x, m, out if out is not None else rowmax, rowmax if rowmax is not None else out,
        *p.args(), m_b, m_n, p.sqrt_c,
        HAS_MASK=has_mask, POOL=p.pool, NATIVE=p.native, PREC=F32_DOT_PRECISION,
        KO=ko, KP=kp, WANT_DENS=want_dens, WANT_MAX=want_max, LOG=log,
        BM=bm, BN=bn, BC=p.bc, num_warps=SWEEP_WARPS,
    )


def _delta(p: _Points, key, mask, rowmax, out, parent, score: bool) -> None:
    m, m_b, m_n, has_mask = _mask_args(mask, p.x)
    bm = _sweep_bm(p)
    bn = _block(p.N, SWEEP_BN)
    grid = _grid(p.B * triton.cdiv(p.N, bm))
    _k(K._delta_kernel)[grid](
        p.x, key, m, rowmax, out, parent if parent is not None else out,
        *p.args(), m_b, m_n, key.stride(0), key.stride(1), p.sqrt_c,
        HAS_MASK=has_mask, POOL=p.pool, NATIVE=p.native, PREC=F32_DOT_PRECISION, SCORE=score,
        BM=bm, BN=bn, BC=p.bc, CH=_block(p.N, ROWMAX_CHUNK), num_warps=SWEEP_WARPS,
    )


def _select(score, mask, exclude, center: int, keep_center: bool, sorted: bool, f: int, n_pick: int,
            index) -> None:
    """index (B, f) <- the selection: one program per sample."""
    B, N = score.shape
    m, m_b, m_n, has_mask = _mask_args(mask, score)
    single = N <= SELECT_SINGLE_MAX
    nb = _block(N, 1 << 30) if single else _np2(SELECT_CHUNK)
    _k(K._select_kernel)[_grid(B)](
        score, m, exclude if exclude is not None else index, index,
        score.stride(0), score.stride(1), m_b, m_n, N, f, n_pick, center,
        HAS_MASK=has_mask, HAS_EXCL=exclude is not None, KEEP_CENTER=keep_center and center >= 0,
        SORTED=sorted, SINGLE=single, NB=nb, SB=_np2(SELECT_ROUND), num_warps=4 if nb <= 1024 else 8,
    )


def _assign(p: _Points, index, asg) -> None:
    """asg (B, N) <- each token's nearest kept token (a position in index[b]); up to
    ASSIGN_MAX_PROGRAMS programs per sample, each on its own rows."""
    f = index.shape[1]
    bm = _block(p.N, ASSIGN_BM)
    bn = _block(f, ASSIGN_BN)
    r = max(1, min(triton.cdiv(p.N, bm), ASSIGN_MAX_PROGRAMS))
    _k(K._assign_kernel)[_grid(p.B * r)](
        index, asg, p.x, p.s_b, p.s_n, p.s_j, p.s_c, p.N, p.C, p.J, f, r,
        POOL=p.pool, NATIVE=p.native, PREC=F32_DOT_PRECISION, BM=bm, BN=bn, BC=p.bc, num_warps=ASSIGN_WARPS,
    )


@on_input_device
def knn_density(x: torch.Tensor, k: int, token_mask: torch.Tensor | None, log: bool) -> torch.Tensor:
    """x (B, N, C) -> (B, N) float32: log rho (log=True) or rho. One launch."""
    p = _Points("knn_density", x)
    p = _pool_once("knn_density", p, int(k))
    out = _alloc.empty((p.B, p.N), dtype=torch.float32, device=x.device)
    if p.B == 0 or p.N == 0:
        return out
    _density(p, token_mask, int(k), out, None, want_dens=True, want_max=False, log=bool(log))
    return out


@on_input_device
def dpc_delta(x: torch.Tensor, density: torch.Tensor, token_mask: torch.Tensor | None):
    """x (B, N, C), density (B, N) (rho or log rho, any float dtype) -> (delta (B, N) float32,
    parent (B, N) int64). Two launches: the largest real distance per row, then the delta sweep."""
    p = _Points("dpc_delta", x)
    p = _pool_once("dpc_delta", p, 1)
    delta = _alloc.empty((p.B, p.N), dtype=torch.float32, device=x.device)
    parent = _alloc.empty((p.B, p.N), dtype=torch.long, device=x.device)
    if p.B == 0 or p.N == 0:
        return delta, parent
    rowmax = _alloc.empty((p.B, p.N), dtype=torch.float32, device=x.device)
    _density(p, token_mask, 1, None, rowmax, want_dens=False, want_max=True, log=True)
    _delta(p, density, token_mask, rowmax, delta, parent, score=False)
    return delta, parent


@on_input_device
def topf_select(score: torch.Tensor, f: int, sorted: bool, exclude: torch.Tensor | None) -> torch.Tensor:
    """score (B, N) -> index (B, f) int64: ascending (sorted) or best first. One launch."""
    _check_dtype("topf_select", score, "score")
    B, N = score.shape
    index = _alloc.empty((B, int(f)), dtype=torch.long, device=score.device)
    if B == 0 or f == 0:
        return index
    ex = None if exclude is None else exclude.to(device=score.device, dtype=torch.long).reshape(B)
    _select(score, None, ex, -1, False, bool(sorted), int(f), int(f), index)
    return index


@on_input_device
def dpc_knn(x: torch.Tensor, f: int, k: int, token_mask: torch.Tensor | None, center: int | None,
            keep_center: bool, sorted: bool, return_assignment: bool):
    """The fused TPC selection -> (index (B, f) int64, assignment (B, N) int64 or (B, 0)).

    x (B, N, C), or (B, N, J, C): selects on the joint-pooled clip (mean over J in float32 inside
    the loads). Three launches (four with the assignment), O(B * N) float32 intermediates, no
    N x N tensor: density sweep (log rho, largest real e per row), delta sweep (score = delta *
    rho), per-sample selection (one program per sample), then, when asked, the assignment (up to
    ASSIGN_MAX_PROGRAMS programs per sample reading the selection)."""
    p = _Points("dpc_knn", x)
    p = _pool_once("dpc_knn", p, int(k))
    B, N = p.B, p.N
    f = int(f)
    index = _alloc.empty((B, f), dtype=torch.long, device=x.device)
    asg = _alloc.empty((B, N if return_assignment else 0), dtype=torch.long, device=x.device)
    if B == 0 or N == 0 or f == 0:
        return index, asg
    c = -1 if center is None else int(center)
    n_pick = f - 1 if (c >= 0 and keep_center) else f
    log_rho = _alloc.empty((B, N), dtype=torch.float32, device=x.device)
    rowmax = _alloc.empty_like(log_rho)
    score = _alloc.empty_like(log_rho)
    _density(p, token_mask, int(k), log_rho, rowmax, want_dens=True, want_max=True, log=True)
    _delta(p, log_rho, token_mask, rowmax, score, None, score=True)
    _select(score, token_mask, None, c, bool(keep_center), bool(sorted), f, n_pick, index)
    if return_assignment:
        _assign(p, index, asg)
    return index, asg


# ---- pairwise_distance ----------------------------------------------------------------------------


@on_input_device
def pairwise_distance(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """x (B, N, C), y (B, M, C) or None -> D (B, N, M) in x's dtype (bit-symmetric with a zero
    diagonal when y is None). One launch."""
    _check_dtype("pairwise_distance", x)
    B, N, C = x.shape
    M = N if y is None else y.shape[1]
    out = _alloc.empty((B, N, M), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if y is not None and y.dtype != x.dtype:
        y = y.to(x.dtype)
    native = x.dtype != torch.float32 and not (_INTERPRET and x.dtype == torch.bfloat16)
    bc = min(BC_HALF if native else BC_F32, _block(C, 1 << 30))
    if y is None:
        bm = bn = _block(N, PDIST_BLOCK)
        yy = x
    else:
        bm, bn = _block(N, PDIST_BLOCK), _block(M, PDIST_BLOCK)
        yy = y
    grid = _grid(B * triton.cdiv(N, bm) * triton.cdiv(M, bn))
    _k(K._pdist_kernel)[grid](
        x, yy, out, N, M, C, *x.stride(), *yy.stride(), *out.stride(), math.sqrt(C),
        SELF=y is None, NATIVE=native, PREC=F32_DOT_PRECISION, BM=bm, BN=bn, BC=bc, num_warps=4,
    )
    return out


@on_input_device
def pairwise_distance_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, dist: torch.Tensor):
    """grad, dist (B, N, M) -> (grad_x (B, N, C), grad_y (B, M, C), or an empty tensor when y is
    None: grad_x then holds both roles of x). W = grad / (C * D), 0 where D == 0."""
    _check_dtype("pairwise_distance_backward", x)
    B, N, C = x.shape
    gx = _alloc.empty((B, N, C), dtype=x.dtype, device=x.device)
    if y is None:
        _pd_bwd(gx, x, x, x, grad, dist, sym=True, transpose=False)
        return gx, x.new_empty((0,))
    gy = _alloc.empty(tuple(y.shape), dtype=y.dtype, device=y.device)
    _pd_bwd(gx, x, y, x, grad, dist, sym=False, transpose=False)
    _pd_bwd(gy, y, x, x, grad, dist, sym=False, transpose=True)
    return gx, gy


def _pd_bwd(out, a, q, x, grad, dist, sym: bool, transpose: bool) -> None:
    B, NA, C = a.shape
    NQ = q.shape[1]
    if out.numel() == 0:
        return
    if NQ == 0:
        out.zero_()
        return
    g_b, g_i, g_j = grad.stride()
    d_b, d_i, d_j = dist.stride()
    if transpose:  # rows are y's points: W^T
        g_i, g_j = g_j, g_i
        d_i, d_j = d_j, d_i
    bm = _block(NA, 64)
    bn = _block(NQ, 32)
    bc = _block(C, 64)
    grid = _grid(B * triton.cdiv(NA, bm) * triton.cdiv(C, bc))
    # 8 warps, 2 stages: no register spills and 72 KiB of shared memory on sm_90 (ptxas).
    _k(K._pdist_bwd_kernel)[grid](
        out, a, q, x, grad, dist, NA, NQ, C, *a.stride(), *q.stride(), x.stride(0), x.stride(2),
        g_b, g_i, g_j, d_b, d_i, d_j, float(C),
        SYM=sym, PREC=F32_DOT_PRECISION, BM=bm, BN=bn, BC=bc, num_warps=8, num_stages=2,
    )


# ---- gather_frames ----------------------------------------------------------------------------------


@on_input_device
def gather_frames(x: torch.Tensor, index: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    """x (B, F, J, C), index (B, f) int64 (distinct values in [0, F)), pos_embed (1 or B, f, C) or
    None -> (B, f, J, C) in x's dtype: out[b, t] = x[b, index[b, t]] (+ pos_embed[0 or b, t] over
    the joints). One launch."""
    B, Fr, J, C = x.shape
    f = index.shape[1]
    out = _alloc.empty((B, f, J, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if pos_embed is not None:
        pos, p_b, p_t, p_c = pos_embed, *pos_embed.stride()
        if pos_embed.shape[0] == 1:
            p_b = 0
    else:
        pos, p_b, p_t, p_c = x, 0, 0, 0
    bc = _block(C, 128)
    bj = _block(J, max(1, 2048 // bc), lo=1)
    _k(K._gather_kernel)[_grid(B * f)](
        x, index, pos, out, f, J, C, *x.stride(), *index.stride(), p_b, p_t, p_c,
        HAS_POS=pos_embed is not None, BJ=bj, BC=bc, num_warps=4,
    )
    return out


@on_input_device
def gather_frames_backward(grad: torch.Tensor, index: torch.Tensor, num_frames: int, pos_batch: int):
    """grad (B, f, J, C) -> (grad_x (B, num_frames, J, C): zero except grad_x[b, index[b, t]] =
    grad[b, t]; grad_pos (pos_batch, f, C) = grad summed over J (and over B when pos_batch == 1),
    float32 sums in a fixed order, or an empty (0,) tensor when pos_batch == 0). Two launches."""
    B, f, J, C = grad.shape
    gx = torch.zeros((B, int(num_frames), J, C), dtype=grad.dtype, device=grad.device)
    if pos_batch == 0:
        gp = grad.new_empty((0,))
        mode = 0
    else:
        gp = _alloc.empty((int(pos_batch), f, C), dtype=grad.dtype, device=grad.device)
        mode = 2 if pos_batch == 1 else 1
        if pos_batch == 1 and (B == 0 or J == 0):
            gp.zero_()
    if B == 0 or f == 0 or J == 0 or C == 0:
        return gx, gp
    bc = _block(C, 128)
    bj = _block(J, max(1, 2048 // bc), lo=1)
    _k(K._gather_bwd_kernel)[_grid(B * f)](
        grad, index, gx, gp if mode else gx, B, f, int(num_frames), J, C, *grad.stride(), *index.stride(),
        POS=mode, BJ=bj, BC=bc, num_warps=4,
    )
    return gx, gp
