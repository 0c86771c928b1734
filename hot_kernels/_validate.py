"""The one validation layer, shared by every op and backend, run in Python before dispatch.

Checks are cheap: shapes, dtypes, devices and Python scalars only, never a device sync (values
inside CUDA tensors are not read). Messages name the op, the argument, what was expected and what
was received.

``HOT_KERNELS_DEBUG=1`` adds value checks that do read values (and so synchronise a GPU): every
float input must be finite (a log-density may hold -inf, a score +-inf: both mean "never first"),
and :func:`outputs` checks every op's results in one place: float outputs finite (a log-density
may be -inf), index outputs in range and, for selections, f distinct values per row. Without it,
non-finite input is allowed and gives unspecified values, but index rows stay valid (DESIGN.md).
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

from . import _environ

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class HotKernelsInputError(ValueError):
    """Bad input to a hot_kernels op; the message names the argument."""


def fail(op: str, msg: str):
    raise HotKernelsInputError(f"hot_kernels.{op}: {msg}")


def debug_enabled() -> bool:
    return _environ.flag("HOT_KERNELS_DEBUG")


def _shape(t) -> str:
    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
    return str(shape)


def _got(v) -> str:
    """``type value`` of a bad scalar argument, for messages (short)."""
    text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(v).__name__} {text}"


def _non_finite(t: torch.Tensor, allow_neg_inf: bool = False, allow_pos_inf: bool = False) -> str | None:
    """What is wrong with t's values ("NaN", "+Inf", "-Inf"), or None. Reads the values."""
    if t.numel() == 0 or not t.is_floating_point():
        return None
    if bool(torch.isfinite(t).all()):
        return None
    found = []
    if bool(torch.isnan(t).any()):
        found.append("NaN")
    if not allow_pos_inf and bool((t == math.inf).any()):
        found.append("+Inf")
    if not allow_neg_inf and bool((t == -math.inf).any()):
        found.append("-Inf")
    return " and ".join(found) or None


def finite(op: str, name: str, t, *, allow_neg_inf: bool = False, allow_pos_inf: bool = False) -> None:
    """HOT_KERNELS_DEBUG=1 only: raise if the float tensor t holds NaN (or an infinity not allowed)."""
    if t is None or not isinstance(t, torch.Tensor) or not debug_enabled() or t.device.type == "meta":
        return
    bad = _non_finite(t.detach(), allow_neg_inf, allow_pos_inf)
    if bad is not None:
        fail(op, f"{name} has NaN or Inf values (found {bad}; HOT_KERNELS_DEBUG=1 checks that inputs are finite)")


def tensor(op: str, name: str, t, dims: str, *, ndim: int, float_=True, allow_neg_inf: bool = False,
           allow_pos_inf: bool = False, check_finite: bool = True) -> torch.Tensor:
    """A tensor of rank ``ndim`` (its axes named by ``dims``, e.g. "(B, N, C)") and float dtype;
    finite too under HOT_KERNELS_DEBUG=1 (check_finite=False: the caller checks that itself)."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor of shape {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        fail(op, f"{name} must be {ndim}-D {dims}, got shape {_shape(t)}")
    if float_ and t.dtype not in FLOAT_DTYPES:
        fail(op, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if float_ and check_finite:
        finite(op, name, t, allow_neg_inf=allow_neg_inf, allow_pos_inf=allow_pos_inf)
    return t


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on one device")


def integer(op: str, name: str, v, lo: int, hi: int, what: str = "") -> int:
    """A Python/NumPy integer (not a bool or float) in [lo, hi]."""
    if isinstance(v, bool) or isinstance(v, torch.Tensor):
        got = f"a {v.dim()}-D tensor" if isinstance(v, torch.Tensor) else _got(v)
        fail(op, f"{name} must be a Python int, got {got}")
    try:
        v = operator.index(v)
    except TypeError:
        fail(op, f"{name} must be an int, got {_got(v)}")
    if not lo <= v <= hi:
        fail(op, f"{name} must be in [{lo}, {hi}]{what}, got {v}")
    return v


def boolean(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        fail(op, f"{name} must be True or False, got {_got(v)}")
    return v


def points(op: str, x, name: str = "x") -> torch.Tensor:
    """x (B, N, C) float with N >= 1 and C >= 1 (B may be 0)."""
    x = tensor(op, name, x, "(B, N, C)", ndim=3)
    if x.shape[1] == 0:
        fail(op, f"{name} must have at least one token (N >= 1), got shape {_shape(x)}")
    if x.shape[2] == 0:
        fail(op, f"{name} must have at least one channel (C >= 1), got shape {_shape(x)}")
    return x


def token_mask(op: str, mask, x: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    B, N = x.shape[0], x.shape[1]
    if not isinstance(mask, torch.Tensor):
        fail(op, f"token_mask must be a bool tensor of shape (B, N) = ({B}, {N}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        fail(op, f"token_mask must be a bool tensor (True = real token), got {mask.dtype}; "
                  "use token_mask > 0 to convert a 0/1 mask")
    if tuple(mask.shape) != (B, N):
        fail(op, f"token_mask must have shape (B, N) = ({B}, {N}), got {_shape(mask)}")
    same_device(op, "x", x, token_mask=mask)
    return mask


def center(op: str, c, N: int) -> int | None:
    if c is None:
        return None
    return integer(op, "center", c, 0, N - 1, " (a token index of the N = %d tokens)" % N)


def exclude(op: str, ex, score: torch.Tensor) -> torch.Tensor | None:
    """int or (B,) integer tensor -> (B,) int64 tensor on score's device, or None."""
    if ex is None:
        return None
    B, N = score.shape
    if isinstance(ex, torch.Tensor):
        if ex.dtype.is_floating_point or ex.dtype == torch.bool or ex.dtype.is_complex:
            fail(op, f"exclude must be an int or an integer tensor of shape (B,) = ({B},), got {ex.dtype}")
        if tuple(ex.shape) != (B,):
            fail(op, f"exclude must have shape (B,) = ({B},), got {_shape(ex)}")
        same_device(op, "score", score, exclude=ex)
        if ex.device.type == "cpu" and ex.numel() and not bool(((ex >= 0) & (ex < N)).all()):
            bad = ex[(ex < 0) | (ex >= N)]
            fail(op, f"exclude values must be in [0, {N - 1}] (token indices), got {bad[:8].tolist()} "
                     f"among the {B} values")
        # Contiguous int64 (B values, cheap): a strided view (exclude[::2]) must not reach a kernel
        # that indexes exclude[b] as if it were dense (the triton wrapper did).
        return ex.to(torch.long).contiguous()
    if not isinstance(ex, numbers.Integral) or isinstance(ex, bool):
        fail(op, f"exclude must be an int or an integer tensor of shape (B,) = ({B},), got {_got(ex)}")
    v = integer(op, "exclude", ex, 0, N - 1, " (a token index)")
    return torch.full((B,), v, dtype=torch.long, device=score.device)


def tra_inputs(op, query, x, weights: dict, num_heads, scale):
    """Validate token_recovering_attention's inputs; returns (num_heads, scale)."""
    # The HOT_KERNELS_DEBUG switch is read once here, not once per tensor (ten environment reads
    # were about a quarter of this function's time, which counts at TRA's B = 1 shapes).
    debug = debug_enabled()
    x = tensor(op, "x", x, "(S, M, C)", ndim=3, check_finite=debug)
    query = tensor(op, "query", query, "(1 or S, L, C)", ndim=3, check_finite=debug)
    S, M, C = x.shape  # S = 0 is allowed: an empty (0, L, C) output
    if M == 0:
        fail(op, f"x must have at least one token (M >= 1), got shape {_shape(x)}")
    if C == 0:
        fail(op, f"x must have at least one channel (C >= 1), got shape {_shape(x)}")
    if query.shape[2] != C:
        fail(op, f"query width {query.shape[2]} does not match x width C = {C} (query {_shape(query)}, x {_shape(x)})")
    if query.shape[0] not in (1, S):
        fail(op, f"query must be (1, L, C) (shared) or (S, L, C) with S = {S}, got {_shape(query)}")
    if query.shape[1] == 0:
        fail(op, f"query must have at least one token (L >= 1), got {_shape(query)}")
    if query.dtype != x.dtype:
        fail(op, f"query is {query.dtype} but x is {x.dtype}; all inputs must have one dtype")
    same_device(op, "x", x, query=query)
    num_heads = integer(op, "num_heads", num_heads, 1, C)
    if C % num_heads:
        fail(op, f"num_heads = {num_heads} must divide the width C = {C}")
    for name, w in weights.items():
        is_bias = name.startswith("b")
        if w is None:
            if not is_bias:
                fail(op, f"{name} must be a ({C}, {C}) weight tensor, got None")
            continue
        want = (C,) if is_bias else (C, C)
        if not isinstance(w, torch.Tensor):
            fail(op, f"{name} must be a tensor of shape {want}, got {type(w).__name__}")
        if tuple(w.shape) != want:
            fail(op, f"{name} must have shape {want} for C = {C}, got {_shape(w)}")
        if w.dtype != x.dtype:
            fail(op, f"{name} is {w.dtype} but x is {x.dtype}; all inputs must have one dtype")
        if w.device != x.device:
            same_device(op, "x", x, **{name: w})
        if debug:
            finite(op, name, w)
    if scale is not None:
        if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real):
            fail(op, f"scale must be a float (a Python or NumPy number) or None, got "
                     f"{'a tensor' if isinstance(scale, torch.Tensor) else _got(scale)}")
        scale = float(scale)
        if not math.isfinite(scale):
            fail(op, f"scale must be a finite number, got {scale}")
    else:
        scale = (C // num_heads) ** -0.5
    return num_heads, scale


# ---- HOT_KERNELS_DEBUG=1: the output checks, for every op in one place ---------------------------


def outputs(op: str, *, values=(), log_values=(), indices=()) -> None:
    """Debug checks of an op's results (a no-op unless ``HOT_KERNELS_DEBUG=1``).

    values: (name, tensor) pairs that must be finite; log_values: the same, -inf allowed (log rho
    of a masked or underflowed token); indices: (name, tensor, hi, distinct) with every value in
    [0, hi) and, when distinct, no value repeated within a row. An input that already passed the
    finite-input checks giving a non-finite output (an overflow, a kernel bug) raises here."""
    if not debug_enabled():
        return
    for name, t in values:
        bad = None if t is None else _non_finite(t.detach())
        if bad is not None:
            fail(op, f"output {name} has NaN or Inf values (found {bad}) for finite input (HOT_KERNELS_DEBUG=1 "
                     "check; an overflow in the input's dtype?)")
    for name, t in log_values:
        bad = None if t is None else _non_finite(t.detach(), allow_neg_inf=True)
        if bad is not None:
            fail(op, f"output {name} has NaN or Inf values (found {bad}) for finite input (HOT_KERNELS_DEBUG=1 check)")
    for name, t, hi, distinct in indices:
        if t is None or t.numel() == 0 or t.device.type == "meta":
            continue
        if t.dtype != torch.long:
            fail(op, f"output {name} is {t.dtype}, expected int64 (HOT_KERNELS_DEBUG=1 check)")
        lo_v, hi_v = int(t.min()), int(t.max())
        if lo_v < 0 or hi_v >= hi:
            fail(op, f"output {name} has values in [{lo_v}, {hi_v}], outside [0, {hi}) (HOT_KERNELS_DEBUG=1 check)")
        if distinct and t.shape[-1] > 1:
            srt = t.sort(dim=-1).values
            if bool((srt[..., 1:] == srt[..., :-1]).any()):
                fail(op, f"output {name} repeats a value within a row (HOT_KERNELS_DEBUG=1 check)")


# ---- token_recovering_interpolation and merge_tokens ------------------------------------------------


def index_tensor(op: str, name: str, t, shape: tuple, dims: str) -> torch.Tensor:
    """An integer (not bool) tensor of exactly ``shape`` (axes named by ``dims``) -> contiguous int64."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be an int64 tensor of shape {dims} = {shape}, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        fail(op, f"{name} must be an integer (int64) tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        fail(op, f"{name} must have shape {dims} = {tuple(shape)}, got {_shape(t)}")
    return t.to(torch.long).contiguous()


def _values_checked(t: torch.Tensor) -> bool:
    """Values of index-like inputs are read on CPU tensors (cheap, no sync) and, under
    HOT_KERNELS_DEBUG=1, on any device, in eager calls; on a GPU and inside torch.compile they are
    otherwise trusted (the kernels stay in bounds whatever they hold, with unspecified values)."""
    if t.numel() == 0 or t.device.type == "meta" or torch.compiler.is_compiling():
        return False  # (a value check inside a compiled graph would break it: eager calls check)
    return t.device.type == "cpu" or debug_enabled()


def interpolation_inputs(op: str, x_kept, index, num_frames):
    """x_kept (B, f, C) or (B, f, J, C), index (B, f) strictly ascending in [0, F), F an int >= f.
    Returns (x_kept, index as contiguous int64, F)."""
    if not isinstance(x_kept, torch.Tensor) or x_kept.dim() not in (3, 4):
        got = f"shape {_shape(x_kept)}" if isinstance(x_kept, torch.Tensor) else type(x_kept).__name__
        fail(op, f"x_kept must be a (B, f, C) or (B, f, J, C) tensor, got {got}")
    tensor(op, "x_kept", x_kept, "(B, f, [J,] C)", ndim=x_kept.dim())
    B, f = x_kept.shape[:2]
    if f == 0 or any(s == 0 for s in x_kept.shape[2:]):
        fail(op, f"x_kept must have at least one kept frame and J, C >= 1, got shape {_shape(x_kept)}")
    index = index_tensor(op, "index", index, (B, f), "(B, f)")
    same_device(op, "x_kept", x_kept, index=index)
    num_frames = integer(op, "F", num_frames, f, 2 ** 31 - 1, f" (frames to recover; at least the f = {f} kept)")
    if _values_checked(index):
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= num_frames:
            fail(op, f"index values must be frame indices in [0, {num_frames - 1}] (F = {num_frames}), got values "
                     f"in [{lo}, {hi}]")
        if f > 1 and not bool((index[:, 1:] > index[:, :-1]).all()):
            row = int((index[:, 1:] <= index[:, :-1]).any(1).nonzero()[0])
            fail(op, f"index rows must be strictly ascending (kept frames in temporal order, as dpc_knn / "
                     f"token_pruning_cluster return them), row {row} is {index[row, :12].tolist()}"
                     f"{' ...' if f > 12 else ''}")
    return x_kept, index, num_frames


def merge_inputs(op: str, x, index, assignment, weight, num_clusters=None):
    """x (B, N, C); index (B, f) kept tokens in [0, N); assignment (B, N) in [0, f) with each kept
    token in its own cluster (assignment[b, index[b, p]] == p); weight (B, N) of x's dtype or None.
    With index None, f = num_clusters and the own-cluster check is skipped (compat.merge_tokens).
    Returns (x, index, assignment, weight, f) with the integer tensors contiguous int64."""
    x = points(op, x)
    B, N, _ = x.shape
    if index is None:
        f = integer(op, "cluster_num", num_clusters, 1, N, f" (clusters of the N = {N} tokens)")
    else:
        if not isinstance(index, torch.Tensor) or index.dim() != 2:
            got = f"shape {_shape(index)}" if isinstance(index, torch.Tensor) else type(index).__name__
            fail(op, f"index must be a (B, f) int64 tensor of kept token indices, got {got}")
        f = index.shape[1]
        index = index_tensor(op, "index", index, (B, f), "(B, f)")
        if not 1 <= f <= N:
            fail(op, f"index must keep f in [1, {N}] tokens (of N = {N}), got f = {f}")
        same_device(op, "x", x, index=index)
    assignment = index_tensor(op, "assignment", assignment, (B, N), "(B, N)")
    same_device(op, "x", x, assignment=assignment)
    if weight is not None:
        tensor(op, "weight", weight, "(B, N)", ndim=2)
        if tuple(weight.shape) != (B, N):
            fail(op, f"weight must have shape (B, N) = ({B}, {N}), got {_shape(weight)}")
        if weight.dtype != x.dtype:
            fail(op, f"weight is {weight.dtype} but x is {x.dtype}; both must have one dtype")
        same_device(op, "x", x, weight=weight)
    if _values_checked(assignment):
        lo, hi = int(assignment.min()), int(assignment.max())
        if lo < 0 or hi >= f:
            fail(op, f"assignment values must be cluster positions in [0, {f - 1}] (positions in index), got "
                     f"values in [{lo}, {hi}]")
        if index is not None:
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= N:
                fail(op, f"index values must be token indices in [0, {N - 1}], got values in [{lo}, {hi}]")
            own = assignment.gather(1, index)
            if not bool((own == torch.arange(f, device=own.device)).all()):
                fail(op, "each kept token must be in its own cluster (assignment[b, index[b, p]] == p, as dpc_knn's "
                         "return_assignment gives it)")
    return x, index, assignment, weight, f
