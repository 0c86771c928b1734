"""The cases of ``hot-kernels bench`` and of the pytest-benchmark suites in ``benchmarks/``.

One place defines what is timed: the published HoT shapes (DESIGN.md, "The shapes that occur"),
the sweeps, the candidates of each case (baselines and hot_kernels backends, with the reason when
one cannot run), their inputs, the check of every output against the reference, and the FLOP and
byte models. The harness that times them is :mod:`hot_kernels.benchmark`.

Ops (``Case.op``) and their shape parameters:

* ``dpc_knn``: x (B, N, C) -> index (B, f); k neighbours; ``center`` forced (or None).
* ``token_pruning_cluster``: x (B, N, J, C) (N frames) + pos_embed (1, f, C) -> (x_kept
  (B, f, J, C), index (B, f)); forward only (the selection is not differentiable).
* ``token_recovering_attention``: query (1, L, C) shared, x (S, M, C) with S = B * J sequences,
  ``heads`` heads; the published module's parameters (no q/k/v biases, a projection bias);
  ``mode`` "forward" or "forward+backward" (gradients of every input).
* ``token_recovering_interpolation``: x_kept (B, f, J, C), index (B, f) ascending -> (B, N, J, C);
  ``mode`` as TRA (the gradient of x_kept).
* ``merge_tokens``: x (B, N, C), the f kept tokens and assignment of dpc_knn on x, weight (B, N)
  -> (B, f, C); ``mode`` as TRA (gradients of x and weight).

Candidates: ``reference`` (hot_kernels.reference, the published eager code path, called
directly: no validation or dispatch), ``torch.compile(reference)``, for TRA ``sdpa`` (the same
projections around ``F.scaled_dot_product_attention``, what a user would write instead), then the
hot_kernels backends ``cpu``, ``cuda``, ``triton`` called through the public ops with the backend
named (validation and dispatch included, as a user pays them; a call naming ``cpu`` takes the same
common-case path as a user's call that names none, see hot_kernels/functional.py).

Checks: selections are compared tie-aware (:func:`selection_violations`: equal to the reference's,
or valid up to rounding by a float64 interval analysis, so a pick may differ only at a genuine
near-tie); TPC's gathered frames exactly (up to the dtype's rounding of the positional add); TRA
outputs and gradients by relative error against a float64 evaluation of the reference, within
max(the dtype's floor, 4 x the reference's own error in that dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import _dispatch
from . import functional as hk
from . import reference as R

__all__ = [
    "OPS", "EXTRA_OPS", "OP_ALIASES", "BASELINES", "HOT_BACKENDS", "PUBLISHED", "Case", "CaseInputs", "Candidate",
    "CheckFailed", "default_cases", "target_cases", "sweep_cases", "candidates", "make_inputs", "check_output",
    "selection_violations", "flop_model", "byte_model", "TARGETS",
]

# OPS: what a run times by default (HoT's two operations); EXTRA_OPS run when asked for (--ops).
OPS = ("dpc_knn", "token_pruning_cluster", "token_recovering_attention")
EXTRA_OPS = ("token_recovering_interpolation", "merge_tokens")
OP_ALIASES = {
    "dpc_knn": "dpc_knn", "dpc": "dpc_knn",
    "token_pruning_cluster": "token_pruning_cluster", "tpc": "token_pruning_cluster",
    "token_recovering_attention": "token_recovering_attention", "tra": "token_recovering_attention",
    "token_recovering_interpolation": "token_recovering_interpolation", "interp": "token_recovering_interpolation",
    "merge_tokens": "merge_tokens", "merge": "merge_tokens",
}
SHORT = {"dpc_knn": "dpc_knn", "token_pruning_cluster": "TPC", "token_recovering_attention": "TRA",
         "token_recovering_interpolation": "interp", "merge_tokens": "merge"}
# Ops with a "forward+backward" mode (the others are selections, forward only).
DIFFERENTIABLE = ("token_recovering_attention", "token_recovering_interpolation", "merge_tokens")
COMPILED = "torch.compile(reference)"
BASELINES = ("reference", COMPILED, "sdpa")  # sdpa: TRA only
HOT_BACKENDS = ("cpu", "cuda", "triton")
BACKEND_ALIASES = {"reference": "reference", "ref": "reference", "compile": COMPILED, "torch.compile": COMPILED,
                   COMPILED: COMPILED, "sdpa": "sdpa", "cpu": "cpu", "cuda": "cuda", "triton": "triton"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "half": "float16"}
SWEEP_PARAMS = ("N", "B", "C")
JOINTS = 17  # Human3.6M joints: HoT's TRA runs one sequence per joint, S = 17 B

# Triton on CPU tensors runs only in Triton's interpreter: a correctness tool, orders of
# magnitude slower than any kernel, so timing it would say nothing.
TRITON_ON_CPU = ("the triton backend runs on CPU tensors only in Triton's interpreter "
                 "(TRITON_INTERPRET=1), a correctness tool far too slow to time; it is timed on CUDA")


@dataclass(frozen=True)
class Published:
    """One row of DESIGN.md's shape table: N frames, f kept, DPC width C, TRA heads (None: the
    model has no TRA), forced center frame (None: none), J axis pooled by TPC (False: the width
    already holds the joints, as in MHFormer's 3 x 512 hypotheses)."""
    name: str
    N: int
    f: int
    C: int
    heads: int | None
    center: int | None
    joints: bool = True


PUBLISHED = (
    Published("HoT-MixSTE", 243, 81, 512, 8, None),
    Published("TPC-MixSTE", 243, 61, 512, None, 121),
    Published("HoT-MotionBERT", 243, 81, 256, 8, None),
    Published("HoT-MotionAGFormer", 243, 81, 128, 4, None),
    Published("TPC-MHFormer", 351, 117, 1536, None, 175, joints=False),
)
_BY_NAME = {p.name: p for p in PUBLISHED}


@dataclass(frozen=True)
class Case:
    """One timed configuration. ``params``: the op's shape parameters as sorted (name, value)
    pairs (see the module docstring), read through :attr:`p`."""
    op: str
    model: str
    dtype: str
    params: tuple
    mode: str = "forward"

    @property
    def p(self) -> dict:
        return dict(self.params)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def shape_str(self) -> str:
        p = self.p
        keys = {"dpc_knn": ("B", "N", "C", "f", "k", "center"),
                "token_pruning_cluster": ("B", "N", "J", "C", "f", "k", "center"),
                "token_recovering_attention": ("B", "S", "L", "M", "C", "heads"),
                "token_recovering_interpolation": ("B", "N", "J", "C", "f"),
                "merge_tokens": ("B", "N", "C", "f")}[self.op]
        return " ".join(f"{k}={p[k]}" for k in keys if p.get(k) is not None)

    def title(self) -> str:
        mode = f" {self.mode}" if self.op in DIFFERENTIABLE else ""
        return f"{SHORT[self.op]}{mode} {self.model} {self.shape_str()} {self.dtype}"


def _case(op, model, dtype, mode="forward", **params) -> Case:
    return Case(op, model, dtype, tuple(sorted(params.items())), mode)


def _dpc(pub: Published, B: int, dtype: str, N: int | None = None, C: int | None = None, f: int | None = None):
    N = N or pub.N
    f = f or (pub.f if N == pub.N else max(1, round(N * pub.f / pub.N)))
    center = None if pub.center is None else N // 2
    return _case("dpc_knn", pub.name, dtype, B=B, N=N, C=C or pub.C, f=f, k=2, center=center)


def _tpc(pub: Published, B: int, dtype: str, N: int | None = None, C: int | None = None):
    N = N or pub.N
    f = pub.f if N == pub.N else max(1, round(N * pub.f / pub.N))
    center = None if pub.center is None else N // 2
    return _case("token_pruning_cluster", pub.name, dtype, B=B, N=N, J=JOINTS, C=C or pub.C, f=f, k=2,
                 center=center)


def _tra(pub: Published, B: int, dtype: str, mode: str, N: int | None = None, C: int | None = None):
    N = N or pub.N
    M = pub.f if N == pub.N else max(1, round(N * pub.f / pub.N))
    return _case("token_recovering_attention", pub.name, dtype, mode, B=B, S=JOINTS * B, L=N, M=M, C=C or pub.C,
                 heads=pub.heads)


def _interp(pub: Published, B: int, dtype: str, mode: str, N: int | None = None, C: int | None = None):
    N = N or pub.N
    f = pub.f if N == pub.N else max(1, round(N * pub.f / pub.N))
    return _case("token_recovering_interpolation", pub.name, dtype, mode, B=B, N=N, J=JOINTS, C=C or pub.C, f=f)


def _merge(pub: Published, B: int, dtype: str, mode: str, N: int | None = None, C: int | None = None):
    N = N or pub.N
    f = pub.f if N == pub.N else max(1, round(N * pub.f / pub.N))
    return _case("merge_tokens", pub.name, dtype, mode, B=B, N=N, C=C or pub.C, f=f)


_DENSE = {"token_recovering_interpolation": _interp, "merge_tokens": _merge}
MODES = ("forward", "forward+backward")


def _default_dtypes(op: str, device_type: str) -> tuple[str, ...]:
    if device_type != "cuda":
        return ("float32",)
    # On a GPU the selection targets are fp32 and bf16; TRA's target is bf16 (tensor cores).
    return ("bfloat16",) if op == "token_recovering_attention" else ("float32", "bfloat16")


def default_cases(device_type: str, ops=OPS, dtypes=None, quick: bool = False) -> list[Case]:
    """The built-in default: DESIGN.md's published shapes at B = 1 and 64 (HoT's batch; TRA then
    has S = 17 * 64 = 1088 sequences), plus on a GPU the long clips (N = 16384 at B = 4, N = 65536
    at B = 1). On the CPU TRA runs at B = 1 and 4 (S = 17 and 68): the published B = 64 takes
    seconds per call on a laptop-class CPU, minutes per case. ``quick``: HoT-MixSTE only (on a CPU:
    dpc_knn at B = 1 and 64, TPC and TRA at B = 1; on a GPU: dpc_knn at B = 1 and 64, TPC and TRA at
    B = 64)."""
    gpu = device_type == "cuda"
    pubs = PUBLISHED[:1] if quick else PUBLISHED
    batches = (1, 64)
    # quick on a CPU: TPC at B = 1 only (its B = 64 clip is 0.5 GB and 0.2 s per reference call)
    tpc_batches = ((64,) if gpu else (1,)) if quick else (1, 64)
    tra_batches = ((64,) if gpu else (1,)) if quick else ((1, 64) if gpu else (1, 4))
    cases = []
    for op in ops:
        for dtype in dtypes or _default_dtypes(op, device_type):
            for pub in pubs:
                if op == "dpc_knn":
                    cases += [_dpc(pub, B, dtype) for B in batches]
                elif op == "token_pruning_cluster" and pub.joints:
                    cases += [_tpc(pub, B, dtype) for B in tpc_batches]
                elif op == "token_recovering_attention" and pub.heads:
                    cases += [_tra(pub, B, dtype, mode) for mode in ("forward", "forward+backward")
                              for B in tra_batches]
                elif op == "token_recovering_interpolation" and pub.joints and pub.center is None:
                    cases += [_interp(pub, B, dtype, mode) for mode in MODES for B in tpc_batches]
                elif op == "merge_tokens":
                    cases += [_merge(pub, B, dtype, mode) for mode in MODES for B in batches]
            if op == "dpc_knn" and gpu and not quick:
                mix = _BY_NAME["HoT-MixSTE"]
                cases += [_dpc(mix, 4, dtype, N=16384, f=4096), _dpc(mix, 1, dtype, N=65536, f=16384)]
    return cases


def target_cases(device_type: str, ops=OPS, dtypes=None) -> list[Case]:
    """The default cases that DESIGN.md's targets for this device type measure (TARGETS)."""
    return [c for c in default_cases(device_type, ops, dtypes)
            if any(target_matches(t, c, device_type) for t in TARGETS)]


def sweep_cases(device_type: str, sweeps: dict[str, list[int]], ops=OPS, dtypes=None,
                model: str = "HoT-MixSTE") -> list[Case]:
    """Scaling curves: ``model``'s shapes with the swept parameters (N, B, C) set to every
    combination of the given values; unswept ones stay at the model's (B = 1). N scales f (and
    TRA's M) by the model's ratio f / N = 1/3; TRA's L = N."""
    pub = _BY_NAME[model]
    ops = [op for op in ops if op not in unsupported_ops(model)]
    grid = [{}]
    for name in SWEEP_PARAMS:
        if name in sweeps:
            grid = [dict(g, **{name: v}) for g in grid for v in sweeps[name]]
    cases = []
    for op in ops:
        for dtype in dtypes or _default_dtypes(op, device_type):
            for g in grid:
                B, N, C = g.get("B", 1), g.get("N"), g.get("C")
                if op == "dpc_knn":
                    cases.append(_dpc(pub, B, dtype, N=N, C=C))
                elif op == "token_pruning_cluster":
                    cases.append(_tpc(pub, B, dtype, N=N, C=C))
                elif op in _DENSE:
                    cases += [_DENSE[op](pub, B, dtype, mode, N=N, C=C) for mode in MODES]
                else:
                    cases += [_tra(pub, B, dtype, mode, N=N, C=C) for mode in ("forward", "forward+backward")]
    return cases


def unsupported_ops(model: str) -> dict[str, str]:
    """{op: why} for the ops a published model's shapes do not define (no TRA, no joint axis)."""
    pub = _BY_NAME[model]
    out = {}
    if pub.heads is None:
        out["token_recovering_attention"] = f"{model} has no token recovering attention"
    if not pub.joints:
        out["token_pruning_cluster"] = f"{model}'s tokens have no joint axis (its width holds the joints)"
    return out


# ------------------------------------------------------------------------------------------------
# FLOP and byte models: every time can be read against a floor.
# ------------------------------------------------------------------------------------------------


def flop_model(case: Case) -> int:
    """Useful floating-point operations. dpc_knn / TPC: the distance Gram product, 2 B N^2 C (one
    pass; a kernel that recomputes distances in a second pass does twice this). TRA forward: the
    shared query projected once (2 L C^2), K and V (4 S M C^2), attention (4 S L M C), output
    projection (2 S L C^2); forward+backward: 3x the forward."""
    p = case.p
    if case.op in ("dpc_knn", "token_pruning_cluster"):
        return 2 * p["B"] * p["N"] ** 2 * p["C"]
    if case.op == "token_recovering_interpolation":  # (1 - w) a + w c per output value; backward the same
        fwd = 3 * p["B"] * p["N"] * p["J"] * p["C"]
        return fwd if case.mode == "forward" else 2 * fwd
    if case.op == "merge_tokens":  # w x summed per token, one scale per cluster; backward ~2x
        fwd = 2 * p["B"] * p["N"] * p["C"] + p["B"] * p["f"] * p["C"]
        return fwd if case.mode == "forward" else 3 * fwd
    S, L, M, C = p["S"], p["L"], p["M"], p["C"]
    fwd = 2 * L * C * C + 4 * S * M * C * C + 4 * S * L * M * C + 2 * S * L * C * C
    return fwd if case.mode == "forward" else 3 * fwd


def byte_model(case: Case) -> int:
    """Compulsory memory traffic: inputs read once, outputs written once (no intermediates)."""
    p, e = case.p, case.torch_dtype.itemsize
    if case.op == "dpc_knn":
        return p["B"] * p["N"] * p["C"] * e + 8 * p["B"] * p["f"]
    if case.op == "token_pruning_cluster":
        return (p["B"] * p["N"] * p["J"] * p["C"] + p["f"] * p["C"] + p["B"] * p["f"] * p["J"] * p["C"]) * e
    if case.op == "token_recovering_interpolation":  # kept frames in, full clip out (backward: reversed)
        fwd = (p["B"] * p["f"] * p["J"] * p["C"] + p["B"] * p["N"] * p["J"] * p["C"]) * e + 8 * p["B"] * p["f"]
        return fwd if case.mode == "forward" else 2 * fwd
    if case.op == "merge_tokens":  # x, weight, assignment in, merged out (backward: grad in, grad_x out, x again)
        fwd = (p["B"] * p["N"] * (p["C"] + 1) + p["B"] * p["f"] * p["C"]) * e + 8 * p["B"] * p["N"]
        return fwd if case.mode == "forward" else 3 * fwd
    S, L, M, C = p["S"], p["L"], p["M"], p["C"]
    fwd = (L * C + S * M * C + 4 * C * C + C + S * L * C) * e
    return fwd if case.mode == "forward" else 3 * fwd


# ------------------------------------------------------------------------------------------------
# Inputs.
# ------------------------------------------------------------------------------------------------


@dataclass
class CaseInputs:
    """The inputs of one case: ``copies`` (the timed calls rotate through them, so no call finds
    its inputs in a cache the previous one warmed), and what the checks need."""
    args: tuple
    copies: list = field(default_factory=list)
    grad_out: torch.Tensor | None = None
    oracle: dict = field(default_factory=dict)  # float64 results, filled lazily

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.args if isinstance(t, torch.Tensor))


def _smooth(shape, seed: int, device, dtype) -> torch.Tensor:
    """A smooth clip: a random walk over frames (dim 1), as pose features are; unit scale."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    return (x.cumsum(1) / math.sqrt(shape[1])).to(dtype)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> CaseInputs:
    """The case's argument tuple on ``device`` (the first copy; see :func:`add_copies`)."""
    p, dt = case.p, case.torch_dtype
    if case.op == "dpc_knn":
        return CaseInputs((_smooth((p["B"], p["N"], p["C"]), seed, device, dt),))
    if case.op == "token_pruning_cluster":
        x = _smooth((p["B"], p["N"], p["J"] * p["C"]), seed, device, dt).view(p["B"], p["N"], p["J"], p["C"])
        g = torch.Generator(device=device).manual_seed(seed + 1)
        pos = (0.1 * torch.randn(1, p["f"], p["C"], generator=g, device=device)).to(dt)
        return CaseInputs((x, pos))
    if case.op in _DENSE:
        return _dense_inputs(case, device, seed)
    S, L, M, C = p["S"], p["L"], p["M"], p["C"]
    g = torch.Generator(device=device).manual_seed(seed)

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device) * s).to(dt).requires_grad_()

    w = lambda: t(C, C, s=C ** -0.5)  # noqa: E731  (nn.Linear-like scale)
    # The published Cross_Attention: linear_q/k/v without bias, proj with bias; x_token (1, L, C).
    query, x = t(1, L, C, s=0.5), t(S, M, C)
    args = (query, x, w(), None, w(), None, w(), None, w(), t(C, s=0.1))
    grad_out = None
    if case.mode != "forward":
        grad_out = torch.randn(S, L, C, generator=g, device=device).to(dt)
    return CaseInputs(args, grad_out=grad_out)


def _dense_inputs(case: Case, device: torch.device, seed: int) -> CaseInputs:
    """interp: (x_kept (B, f, J, C), index (B, f): dpc_knn's pick of a smooth clip); merge: (x (B, N, C),
    index, assignment from dpc_knn on x, weight (B, N) in [0.1, 1.1))."""
    p, dt = case.p, case.torch_dtype
    g = torch.Generator(device=device).manual_seed(seed + 1)
    train = case.mode != "forward"
    if case.op == "token_recovering_interpolation":
        clip = _smooth((p["B"], p["N"], p["C"]), seed, device, torch.float32)
        index = R.dpc_knn(clip, p["f"], 2)
        x = _smooth((p["B"], p["f"], p["J"] * p["C"]), seed + 2, device, dt).view(p["B"], p["f"], p["J"], p["C"])
        args = (x.requires_grad_(train), index)
        out_shape = (p["B"], p["N"], p["J"], p["C"])
    else:
        x = _smooth((p["B"], p["N"], p["C"]), seed, device, dt)
        index, assignment = R.dpc_knn(x.float(), p["f"], 2, return_assignment=True)
        weight = (torch.rand(p["B"], p["N"], generator=g, device=device) + 0.1).to(dt)
        args = (x.requires_grad_(train), index, assignment, weight.requires_grad_(train))
        out_shape = (p["B"], p["f"], p["C"])
    grad_out = torch.randn(out_shape, generator=g, device=device).to(dt) if train else None
    return CaseInputs(args, grad_out=grad_out)


def add_copies(inputs: CaseInputs, n: int) -> None:
    """Fill ``inputs.copies`` with n argument tuples: the original and n - 1 clones (the same
    values in other memory, so every check made on the first holds for all)."""
    def clone(a):
        if not isinstance(a, torch.Tensor):
            return a
        c = a.detach().clone()
        return c.requires_grad_() if a.requires_grad else c

    inputs.copies = [inputs.args] + [tuple(clone(a) for a in inputs.args) for _ in range(n - 1)]


# ------------------------------------------------------------------------------------------------
# Candidates.
# ------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A baseline or backend of one case: ``fn(args)`` runs the op once and returns its outputs
    (TRA forward+backward: (out, grads)); ``skip`` says why it cannot run here (fn is None)."""
    label: str
    kind: str  # "baseline" or "hot_kernels"
    fn: Callable | None = None
    skip: str | None = None


def sdpa_tra(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads: int, residual: bool = True):
    """Cross-attention with the published projections around PyTorch's fused
    ``scaled_dot_product_attention`` (the shared query projected once): what a user would write."""
    S, M, C = x.shape
    L, H, d = query.shape[1], num_heads, C // num_heads
    q = F.linear(query, wq, bq).expand(S, L, C).view(S, L, H, d).transpose(1, 2)
    k = F.linear(x, wk, bk).view(S, M, H, d).transpose(1, 2)
    v = F.linear(x, wv, bv).view(S, M, H, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(S, L, C)
    out = F.linear(o, wo, bo)
    return query.expand(S, L, C) + out if residual else out


def _op_function(case: Case, backend: str | None) -> Callable:
    """fn(*args) of the op: the reference function itself (backend None) or the public op."""
    p = case.p
    if case.op == "dpc_knn":
        if backend is None:
            return lambda x: R.dpc_knn(x, p["f"], p["k"], center=p["center"])
        return lambda x: hk.dpc_knn(x, p["f"], p["k"], center=p["center"], backend=backend)
    if case.op == "token_pruning_cluster":
        if backend is None:
            return lambda x, pos: R.token_pruning_cluster(x, p["f"], p["k"], p["center"], pos)
        return lambda x, pos: hk.token_pruning_cluster(x, p["f"], p["k"], p["center"], pos, backend=backend)
    if case.op == "token_recovering_interpolation":
        if backend is None:
            return lambda x, index: R.token_recovering_interpolation(x, index, p["N"])
        return lambda x, index: hk.token_recovering_interpolation(x, index, p["N"], backend=backend)
    if case.op == "merge_tokens":
        if backend is None:
            return lambda x, index, assignment, w: R.merge_tokens(x, index, assignment, w)
        return lambda x, index, assignment, w: hk.merge_tokens(x, index, assignment, w, backend=backend)
    heads = p["heads"]
    if backend is None:
        return lambda *a: R.token_recovering_attention(*a, num_heads=heads)
    if backend == "sdpa":
        return lambda *a: sdpa_tra(*a, heads)
    return lambda *a: hk.token_recovering_attention(*a, num_heads=heads, backend=backend)


def _runner(case: Case, fn: Callable, grad_out_of: Callable | None) -> Callable:
    """args -> outputs, in the case's mode."""
    if case.mode == "forward":
        def run(args):
            with torch.no_grad():
                return fn(*args)
        return run

    def run_fb(args):
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        out = fn(*args)
        grads = torch.autograd.grad(out, leaves, grad_out_of())
        return out.detach(), grads
    return run_fb


def _compiled(fn: Callable) -> Callable:
    """torch.compile of the reference, fresh for each case. dynamo's caches are reset first: its
    recompile limit (8 shapes per function) would otherwise silently run later cases eagerly."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _refusal(backend: str, case: Case, device: torch.device) -> str | None:
    dt = case.torch_dtype
    if case.op == "dpc_knn":
        why = _dispatch.refusal(backend, "dpc_knn", device, dt, case.p["k"])
    elif case.op == "token_pruning_cluster":
        why = (_dispatch.refusal(backend, "dpc_knn", device, dt, case.p["k"])
               or _dispatch.refusal(backend, "gather_frames", device, dt))
    else:
        why = _dispatch.refusal(backend, case.op, device, dt)
    if backend == "triton" and device.type == "cpu" and (why is None or "TRITON_INTERPRET" in why):
        why = TRITON_ON_CPU
    return why


def candidates(case: Case, device: torch.device, inputs: CaseInputs, backends=None,
               skip_reference: str | None = None) -> list[Candidate]:
    """The case's baselines, then the hot_kernels backends, each runnable or with its reason.
    ``backends``: the labels to include (None: all); ``reference`` is always included (the yardstick
    of every ratio and the oracle of every check). ``skip_reference``: why the reference (and its
    compiled form) cannot run this case, e.g. too big for the device."""
    want = set(backends) | {"reference"} if backends else None
    grad = lambda: inputs.grad_out  # noqa: E731
    out = []
    for label in BASELINES + HOT_BACKENDS:
        if want is not None and label not in want:
            continue
        if label == "sdpa" and case.op != "token_recovering_attention":
            continue
        kind = "baseline" if label in BASELINES else "hot_kernels"
        if label in ("reference", COMPILED) and skip_reference:
            out.append(Candidate(label, kind, skip=skip_reference))
            continue
        if label in HOT_BACKENDS:
            why = _refusal(label, case, device)
            if why is not None:
                out.append(Candidate(label, kind, skip=why))
                continue
        if label == COMPILED:
            base = _op_function(case, None)
            compiled = []

            def fn(*a, base=base, compiled=compiled):
                if not compiled:  # compiled at the first call, i.e. when this candidate's turn comes
                    compiled.append(_compiled(base))
                return compiled[0](*a)
        else:
            fn = _op_function(case, None if label == "reference" else label)
        out.append(Candidate(label, kind, _runner(case, fn, grad)))
    return out


def reference_too_big(case: Case, device: torch.device) -> str | None:
    """Why the reference cannot run this case on ``device`` (None if it fits): the published path
    holds about five B x N x N float32 temporaries (its distance matrix and the masks and copies
    of it), i.e. 20 B N^2 bytes; refused above 80 % of the memory free on the device."""
    if case.op not in ("dpc_knn", "token_pruning_cluster"):
        return None
    p = case.p
    need = 20 * p["B"] * p["N"] ** 2
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"free on {torch.cuda.get_device_name(device)}"
    else:
        free = _available_ram()
        where = "of RAM available"
        if free is None:
            return None
    if need > 0.8 * free:
        return (f"too big: the published path needs ~{need / 2**30:.0f} GiB of B x N x N temporaries "
                f"(5 float32 matrices of {p['B']} x {p['N']} x {p['N']}), {free / 2**30:.0f} GiB {where}")
    return None


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------
# Checks.
# ------------------------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """An output that does not match the reference: the case's record says why, and it is not timed."""


# Relative (Frobenius) error floors of TRA outputs / gradients vs float64, per input dtype. A
# candidate passes within max(floor, REF_ERROR_FACTOR x the reference's own error in that dtype):
# low-precision kernels are judged against what PyTorch's same-dtype computation makes.
TRA_TOLERANCE = {
    "float32": {"forward": 2e-5, "backward": 1e-4},
    "bfloat16": {"forward": 2e-2, "backward": 5e-2},
    "float16": {"forward": 5e-3, "backward": 2e-2},
}
REF_ERROR_FACTOR = 4.0
# TPC's gathered frames: a gather is exact; the positional add may round differently by one unit.
TPC_TOLERANCE = {"float32": dict(rtol=1e-6, atol=1e-6), "bfloat16": dict(rtol=1e-2, atol=1e-2),
                 "float16": dict(rtol=1e-3, atol=1e-3)}
# The selection check's rounding model (relative, absolute) for inputs computed in float32
# (every input dtype here): about 20x the largest Gram-form float32 error (see
# selection_violations). A backend using tf32 products for float32 would need ~2e-3; the GPU
# backends use tf32x3 / ieee products (float32 accuracy).
SELECTION_RTOL, SELECTION_ATOL = 1e-5, 1e-9


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    g, w = got.detach().double(), want.detach().double().to(got.device)
    return float((g - w).norm() / w.norm().clamp_min(1e-300))


def check_output(case: Case, label: str, inputs: CaseInputs, out, ref_out) -> str:
    """Verdict (a short string) on ``out`` of candidate ``label``; raises CheckFailed. ``ref_out``:
    the reference's output for the same inputs (None when the reference did not run)."""
    if case.op == "dpc_knn":
        return _check_index(case, inputs.args[0], out, ref_out)
    if case.op == "token_pruning_cluster":
        x, pos = inputs.args
        kept, index = out
        pooled = x.detach().float().mean(2)
        verdict = _check_index(case, pooled, index, None if ref_out is None else ref_out[1])
        want = x.detach().gather(1, index[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3]))
        want = want + pos.detach()[:, :, None, :]
        if kept.shape != want.shape or kept.dtype != want.dtype:
            raise CheckFailed(f"x_kept is {tuple(kept.shape)} {kept.dtype}, expected {tuple(want.shape)} {want.dtype}")
        if not torch.allclose(kept.float(), want.float(), **TPC_TOLERANCE[case.dtype]):
            err = (kept.float() - want.float()).abs().max().item()
            raise CheckFailed(f"x_kept differs from x gathered at the kept frames + pos_embed by up to {err:.3g}")
        return verdict
    if case.op in _DENSE:
        return _check_dense(case, label, inputs, out)
    return _check_tra(case, label, inputs, out)


def _check_index(case: Case, x: torch.Tensor, index: torch.Tensor, ref_index) -> str:
    p = case.p
    if index.dtype != torch.int64 or tuple(index.shape) != (p["B"], p["f"]):
        raise CheckFailed(f"index is {tuple(index.shape)} {index.dtype}, expected ({p['B']}, {p['f']}) int64")
    if ref_index is not None and torch.equal(index, ref_index):
        return "same as reference"
    msgs = selection_violations(x, index, p["f"], p["k"], p["center"])
    if msgs:
        raise CheckFailed("selection differs from the reference beyond rounding: " + "; ".join(msgs))
    if ref_index is None:
        return "valid selection (tie-aware float64 check)"
    rows = int((index != ref_index).any(-1).sum())
    return f"near-ties only ({rows} of {p['B']} rows differ; tie-aware check)"


def _tra_oracle(case: Case, inputs: CaseInputs, budget_bytes: int | None = None) -> dict:
    """Float64 output (and gradients) of the reference on float64 copies of the inputs.

    Computed in chunks of sequences and of query rows, so that its S x heads x L x M float64
    attention never exceeds ``budget_bytes`` (1 GiB on a CPU, 8 GiB on a GPU): rows of the output
    depend only on their own query row and sequence, and every gradient is a sum over the chunks
    (the query's and x's land in their slices)."""
    if inputs.oracle:
        return inputs.oracle
    p = case.p
    query, x, wq, bq, wk, bk, wv, bv, wo, bo = (a.detach().double() if isinstance(a, torch.Tensor) else a
                                                for a in inputs.args)
    S, M, C = x.shape
    L, H = query.shape[1], p["heads"]
    if budget_bytes is None:
        budget_bytes = 8 << 30 if x.device.type == "cuda" else 1 << 30
    per_row = 4 * 8 * H * M  # attention row of one sequence: scores, softmax, their gradients
    rows = max(1, budget_bytes // per_row)
    s_chunk = max(1, min(S, rows // L))
    l_chunk = L if s_chunk > 1 or rows >= L else max(1, rows)
    train = case.mode != "forward"
    weights = [w for w in (wq, wk, wv, wo, bo)]
    for w in weights:
        w.requires_grad_(train)
    out = torch.empty(S, L, C, dtype=torch.float64, device=x.device)
    grads = None
    if train:
        d_query = torch.zeros_like(query)
        d_x = torch.zeros_like(x)
        d_w = [torch.zeros_like(w) for w in weights]
        g_all = inputs.grad_out.double()
    for s0 in range(0, S, s_chunk):
        s1 = min(S, s0 + s_chunk)
        xs = x[s0:s1].clone().requires_grad_(train)
        for l0 in range(0, L, l_chunk):
            l1 = min(L, l0 + l_chunk)
            q = query[:, l0:l1].clone().requires_grad_(train)
            with torch.set_grad_enabled(train):
                o = R.token_recovering_attention(q, xs, wq, bq, wk, bk, wv, bv, wo, bo, num_heads=H)
            out[s0:s1, l0:l1] = o.detach()
            if train:
                gs = torch.autograd.grad(o, [q, xs] + weights, g_all[s0:s1, l0:l1])
                d_query[:, l0:l1] += gs[0]
                d_x[s0:s1] += gs[1]
                for acc, g in zip(d_w, gs[2:]):
                    acc += g
    if train:  # in the order of the leaves: query, x, wq, wk, wv, wo, bo
        grads = (d_query, d_x, *d_w)
    inputs.oracle["out"] = out
    if grads is not None:
        inputs.oracle["grads"] = grads
    return inputs.oracle


def _check_dense(case: Case, label: str, inputs: CaseInputs, out) -> str:
    """interp / merge: output (and gradients) against the reference on float64 copies of the inputs,
    by relative error, within TRA's floors (or 4x the reference's own error in the dtype)."""
    if not inputs.oracle:
        args64 = tuple(a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                       and a.is_floating_point() else a for a in inputs.args)
        fn = _op_function(case, None)
        if case.mode == "forward":
            inputs.oracle["out"] = fn(*args64).detach()
        else:
            o = fn(*args64)
            leaves = [a for a in args64 if isinstance(a, torch.Tensor) and a.requires_grad]
            inputs.oracle["out"] = o.detach()
            inputs.oracle["grads"] = torch.autograd.grad(o, leaves, inputs.grad_out.double())
    tol = TRA_TOLERANCE[case.dtype]
    pairs = [("output", "forward", out if case.mode == "forward" else out[0], inputs.oracle["out"])]
    if case.mode != "forward":
        pairs += [(f"grad {i}", "backward", g, w) for i, (g, w) in enumerate(zip(out[1], inputs.oracle["grads"]))]
    errs = {}
    for name, _, got, want in pairs:
        if got.shape != want.shape:
            raise CheckFailed(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        errs[name] = _rel_err(got, want)
    if label == "reference":
        inputs.oracle["ref_errs"] = errs
    ref_errs = inputs.oracle.get("ref_errs", {})
    for name, kind, _, _ in pairs:
        limit = max(tol[kind], REF_ERROR_FACTOR * ref_errs.get(name, 0.0))
        if not errs[name] <= limit:
            raise CheckFailed(f"{name}: relative error {errs[name]:.2e} vs float64 > {limit:.1e}")
    return f"rel. err {max(errs.values()):.1e} vs float64"


def _check_tra(case: Case, label: str, inputs: CaseInputs, out) -> str:
    oracle = _tra_oracle(case, inputs)
    tol = TRA_TOLERANCE[case.dtype]
    pairs = [("output", "forward", out if case.mode == "forward" else out[0], oracle["out"])]
    if case.mode != "forward":
        names = ("d query", "d x", "d wq", "d wk", "d wv", "d wo", "d bo")
        pairs += [(n, "backward", g, w) for n, g, w in zip(names, out[1], oracle["grads"])]
    errs = {}
    for name, kind, got, want in pairs:
        if got.shape != want.shape:
            raise CheckFailed(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        errs[name] = _rel_err(got, want)
    if label == "reference":  # the yardstick of the other candidates' tolerances
        inputs.oracle["ref_errs"] = errs
    ref_errs = inputs.oracle.get("ref_errs", {})
    worst = 0.0
    for name, kind, _, _ in pairs:
        limit = max(tol[kind], REF_ERROR_FACTOR * ref_errs.get(name, 0.0))
        if not errs[name] <= limit:  # NaN fails too
            raise CheckFailed(f"{name}: relative error {errs[name]:.2e} vs float64 > {limit:.1e} "
                              f"(the reference's own: {ref_errs.get(name, float('nan')):.1e})")
        worst = max(worst, errs[name])
    return f"rel. err {worst:.1e} vs float64"


def selection_violations(x: torch.Tensor, index: torch.Tensor, f: int, k: int = 2, center: int | None = None,
                         rtol: float = SELECTION_RTOL, atol: float = SELECTION_ATOL, max_messages: int = 3,
                         block_bytes: int | None = None) -> list[str]:
    """Why ``index`` (B, f), ascending, is not a valid dpc_knn selection of x (B, N, C) up to
    rounding; [] when it is. Computed in float64 on x's device, in row blocks (no N x N matrix is
    held, so it runs at N = 65536).

    The rounding model is the one of the test suite's checker (tests/selection.py), vectorised:
    a backend's squared distance D^2[i, j] may be off by eps = rtol (|x_i|^2 + |x_j|^2) / C + atol
    (a Gram-form evaluation), giving intervals [Dlo, Dhi]; log-densities by tau_i. Token j is
    *definitely* higher than i when lr_j - lr_i > tau_i + tau_j, *possibly* when >= -(tau_i +
    tau_j); an exact density tie is robust (follows the index rule in every backend) when k = 1,
    or k = 2 and i, j are each other's nearest neighbour with a margin (the two densities are then
    computed from one bit-symmetric distance). delta_i's interval: [min over possibly-higher j of
    Dlo, min over definitely-higher j of Dhi] (the top token: the largest distance); score
    intervals from those. The selection is valid iff no unkept token's lowest possible score
    exceeds a kept token's highest (tokens whose density underflows to 0 have score exactly 0 and
    tie by index). A necessary condition, not a sufficient one; but a pick that is wrong by more
    than rounding always fails it."""
    B, N, C = x.shape
    if block_bytes is None:  # float64 row blocks of the distance matrices, ~12 temporaries of each;
        # on a CPU blocks that stay in cache are several times faster than big ones
        block_bytes = 1 << (31 if x.device.type == "cuda" else 24)
    msgs: list[str] = []
    idx = index.to(x.device, torch.long)
    if tuple(idx.shape) != (B, f):
        return [f"index has shape {tuple(idx.shape)}, expected {(B, f)}"]
    if B == 0 or f == 0:
        return []
    if int(idx.min()) < 0 or int(idx.max()) >= N:
        return [f"index values outside [0, {N})"]
    srt = idx.sort(-1).values
    if f > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
        return ["an index row repeats a token"]
    if not torch.equal(srt, idx):
        return ["index rows are not ascending"]
    if center is not None and not bool((idx == center).any(-1).all()):
        return [f"the forced center {center} is not kept"]
    # Samples in groups small enough that ~12 float64 (group, rows, N) temporaries fit block_bytes.
    per_sample = 8 * 12 * N * N
    group = max(1, min(B, block_bytes // max(per_sample, 1)))
    ar = torch.arange(N, device=x.device)
    for b0 in range(0, B, group):
        X = x[b0:b0 + group].detach().double()
        finite = torch.isfinite(X).flatten(1).all(1)  # non-finite samples: index validity only
        slo, shi = _score_intervals(X, k, rtol, atol, block_bytes)
        kept = torch.zeros(X.shape[:2], dtype=torch.bool, device=x.device)
        kept.scatter_(1, idx[b0:b0 + group], True)
        unkept = ~kept
        if center is not None:
            kept[:, center] = unkept[:, center] = False  # the center is forced, not ranked
        lo_u = slo.masked_fill(~unkept, -math.inf).max(1)
        hi_k = shi.masked_fill(~kept, math.inf).min(1)
        bad = finite & (lo_u.values > hi_k.values)
        zero = (slo == 0) & (shi == 0)  # exactly-zero scores tie, and ties go to the lower index
        zu = torch.where(zero & unkept, ar, N).min(1).values
        zk = torch.where(zero & kept, ar, -1).max(1).values
        bad_zero = finite & (zu < zk)
        for j in (bad | bad_zero).nonzero().flatten().tolist():
            b = b0 + j
            if bool(bad[j]):
                u, t = int(lo_u.indices[j]), int(hi_k.indices[j])
                msgs.append(f"sample {b}: token {u} (score >= {float(lo_u.values[j]):.6g}) should have been kept "
                            f"instead of token {t} (score <= {float(hi_k.values[j]):.6g}): not a near-tie")
            else:
                msgs.append(f"sample {b}: tokens {int(zu[j])} and {int(zk[j])} both score exactly 0; "
                            f"the lower index must be kept")
            if len(msgs) >= max_messages:
                return msgs
    return msgs[:max_messages]


def _score_intervals(X: torch.Tensor, k: int, rtol: float, atol: float, block_bytes: int):
    """(score_lo, score_hi) (b, N) of samples X (b, N, C) float64 under the rounding model of
    :func:`selection_violations`, for a backend computing in float32. Rows in blocks: no (b, N, N)
    tensor when that would exceed block_bytes."""
    b, N, C = X.shape
    dev = X.device
    sq = (X * X).sum(2) / C  # (b, N)
    Xs = X / math.sqrt(C)
    k_eff = min(k, N)
    rows = max(1, min(N, block_bytes // (8 * 12 * b * max(N, 1))))
    ar = torch.arange(N, device=dev)
    inf = math.inf

    def block(r0, r1):
        """D^2, Dlo, Dhi (b, r1 - r0, N) of rows r0:r1, and the diagonal mask (r1 - r0, N)."""
        d2 = (sq[:, r0:r1, None] + sq[:, None, :] - 2.0 * (Xs[:, r0:r1] @ Xs.transpose(1, 2))).clamp_min(0.0)
        eps = rtol * (sq[:, r0:r1, None] + sq[:, None, :]) + atol
        diag = ar[r0:r1, None] == ar[None, :]
        d2 = d2.masked_fill(diag, 0.0)
        eps = eps.masked_fill(diag, 0.0)
        lo = (d2 - eps).clamp_min(0.0).sqrt() * (1.0 - rtol)
        hi = (d2 + eps).sqrt() * (1.0 + rtol)
        return d2, lo, hi, diag

    lr = torch.empty(b, N, dtype=torch.float64, device=dev)
    nn = torch.zeros(b, N, dtype=torch.long, device=dev)
    margin = torch.zeros(b, N, dtype=torch.bool, device=dev)
    largest_lo = torch.zeros(b, dtype=torch.float64, device=dev)
    largest_hi = torch.zeros(b, dtype=torch.float64, device=dev)
    for r0 in range(0, N, rows):  # pass 1: log-densities, nearest neighbours, largest distance
        r1 = min(N, r0 + rows)
        d2, lo, hi, diag = block(r0, r1)
        lr[:, r0:r1] = -d2.topk(k_eff, dim=2, largest=False).values.mean(2)
        largest_lo = torch.maximum(largest_lo, lo.flatten(1).max(1).values)
        largest_hi = torch.maximum(largest_hi, hi.flatten(1).max(1).values)
        if k_eff == 2:
            j = d2.masked_fill(diag, inf).argmin(2)  # the first minimum: the lower index
            nn[:, r0:r1] = j
            rest = lo.masked_fill(diag, inf).scatter(2, j[..., None], inf).min(2).values
            margin[:, r0:r1] = rest > hi.gather(2, j[..., None])[..., 0]
    tau = rtol * (sq + sq.max(1, keepdim=True).values) + atol + rtol * lr.abs()
    partner = torch.full((b, N), -1, dtype=torch.long, device=dev)
    if k_eff == 2:
        mutual = (nn.gather(1, nn) == ar) & margin & margin.gather(1, nn)
        partner = torch.where(mutual, nn, partner)
    dlo = torch.empty(b, N, dtype=torch.float64, device=dev)
    dhi = torch.empty(b, N, dtype=torch.float64, device=dev)
    for r0 in range(0, N, rows):  # pass 2: delta intervals
        r1 = min(N, r0 + rows)
        _, lo, hi, diag = block(r0, r1)
        lower = (ar[None, :] < ar[r0:r1, None]).expand(b, -1, -1)  # [i, j]: j < i
        if k_eff == 1:  # every log-density is exactly 0: the index rule decides everything
            definite = possible = lower
        else:
            diff = lr[:, None, :] - lr[:, r0:r1, None]  # [i, j] = lr_j - lr_i
            band = tau[:, r0:r1, None] + tau[:, None, :]
            robust = partner[:, r0:r1, None] == ar[None, None, :]
            definite = torch.where(robust, lower, diff > band)
            possible = torch.where(robust, lower, diff >= -band)
        definite, possible = definite & ~diag, possible & ~diag
        has_def, has_pos = definite.any(2), possible.any(2)
        hi_def = hi.masked_fill(~definite, inf).min(2).values
        hi_pos = hi.masked_fill(~possible, -inf).max(2).values.clamp_min(0.0)
        dhi[:, r0:r1] = torch.where(has_def, hi_def, torch.maximum(hi_pos, largest_hi[:, None]))
        lo_pos = lo.masked_fill(~possible, inf).min(2).values
        lo_top = torch.where(has_def, lo_pos, torch.minimum(lo_pos, largest_lo[:, None]))
        dlo[:, r0:r1] = torch.where(has_pos, lo_top, largest_lo[:, None].expand(-1, r1 - r0))
    tiny = torch.finfo(torch.float32).tiny
    sub = 1.4e-45  # float32's smallest subnormal
    A = 2.0 * tiny * (1.0 + dhi)
    slo = (dlo * torch.exp(lr - tau) * (1.0 - rtol) - A).clamp_min(0.0)
    shi = dhi * torch.exp(lr + tau) * (1.0 + rtol) + A
    under = lr + tau < math.log(sub) - 1.0  # rho underflows to exactly 0 in float32: score 0
    return slo.masked_fill(under, 0.0), shi.masked_fill(under, 0.0)


# ------------------------------------------------------------------------------------------------
# DESIGN.md's targets, as data: (device type, case filter, hot_kernels vs what, at least).
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    device_type: str
    op: str
    where: tuple  # (name, value) pairs the case must have
    dtype: str
    versus: str  # "reference", "torch.compile(reference)" or "best baseline"
    at_least: float
    mode: str = "forward"

    def describe(self) -> str:
        where = " ".join(f"{k}={v}" for k, v in self.where)
        mode = f" {self.mode}" if self.op == "token_recovering_attention" else ""
        return (f"{self.device_type} {SHORT[self.op]}{mode} {where} {self.dtype}: "
                f">= {self.at_least:g}x vs {self.versus}")


_MIX = (("C", 512), ("N", 243), ("f", 81))
TARGETS = (
    Target("cpu", "dpc_knn", (("B", 64),) + _MIX, "float32", "reference", 4.0),
    Target("cuda", "dpc_knn", (("B", 1),) + _MIX, "float32", "reference", 10.0),
    Target("cuda", "dpc_knn", (("B", 64),) + _MIX, "float32", "reference", 5.0),
    Target("cuda", "dpc_knn", (("B", 64),) + _MIX, "bfloat16", "reference", 15.0),
    Target("cuda", "dpc_knn", (("B", 64),) + _MIX, "float32", COMPILED, 2.0),
    Target("cuda", "dpc_knn", (("B", 4), ("N", 16384)), "float32", "reference", 2.0),
    Target("cuda", "dpc_knn", (("B", 4), ("N", 16384)), "bfloat16", "reference", 10.0),
    Target("cuda", "token_recovering_attention", (("S", 1088), ("C", 512), ("L", 243), ("M", 81)), "bfloat16",
           "best baseline", 1.5, "forward"),
    Target("cuda", "token_recovering_attention", (("S", 1088), ("C", 512), ("L", 243), ("M", 81)), "bfloat16",
           "best baseline", 1.3, "forward+backward"),
)


def target_matches(t: Target, case: Case, device_type: str) -> bool:
    p = case.p
    return (t.device_type == device_type and t.op == case.op and t.dtype == case.dtype and t.mode == case.mode
            and all(p.get(k) == v for k, v in t.where) and p.get("center") is None)


# ------------------------------------------------------------------------------------------------
# Tuning: the triton TRA kernels' module-level knobs (hot_kernels/triton/tra.py, read at each
# call), timed as extra candidates "triton[variant]" of the TRA cases (``--triton-knobs``).
# ------------------------------------------------------------------------------------------------

TRITON_TRA_VARIANTS = {
    "output projection by torch": dict(OUT_PROJ="torch"),
    "output GEMM 4 warps": dict(OUT_WARPS=4),
    "output GEMM 64x128": dict(OUT_BLOCK_R=64, OUT_WARPS=4, OUT_STAGES=4),
    "fused output, 2 groups": dict(FWD_FUSE_MAX_C=1 << 20, FWD_FUSE_BLOCK_C=256),
    "forward 8 warps": dict(FWD_WARPS=8),
    "forward 3 stages": dict(FWD_STAGES=3),
    "backward 16-row blocks": dict(BWD_BLOCK_L=16),
    "backward 1 stage": dict(BWD_STAGES=1),
    "backward 32-key chunks": dict(BWD_MAX_KEYS=32, BWD_CHUNK_KEYS=32),
    "dQ 8 warps": dict(DQ_WARPS=8),
    "dQ 2048 programs": dict(DQ_TARGET_PROGRAMS=2048),
    "dQ 512 programs": dict(DQ_TARGET_PROGRAMS=512),
}


def triton_knob_candidates(case: Case, device: torch.device, inputs: CaseInputs) -> list[Candidate]:
    """One candidate per TRITON_TRA_VARIANTS entry (checked like any other); skipped with the
    reason where the triton backend cannot run the case."""
    if case.op != "token_recovering_attention":
        return []
    why = _refusal("triton", case, device)
    out = []
    for name, knobs in TRITON_TRA_VARIANTS.items():
        label = f"triton[{name}]"
        if why is not None:
            out.append(Candidate(label, "tuning", skip=why))
            continue
        from .triton import tra

        base = _runner(case, _op_function(case, "triton"), lambda: inputs.grad_out)

        def run(args, base=base, knobs=knobs, tra=tra):
            saved = {k: getattr(tra, k) for k in knobs}
            try:
                for k, v in knobs.items():
                    setattr(tra, k, v)
                return base(args)
            finally:
                for k, v in saved.items():
                    setattr(tra, k, v)
        out.append(Candidate(label, "tuning", run))
    return out
