#!/usr/bin/env python
"""Compile every Triton kernel of hot_kernels ahead of time for sm_90 / sm_80, without a GPU.

How. The real launch wrappers (hot_kernels/triton/tpc.py, tra.py) are called with CPU tensors
at the DESIGN shapes, under ``hot_kernels.triton._target.override`` (the wrappers then choose
their configuration for that GPU: capability and SM count) and with every ``@triton.jit`` kernel
of tpc_kernels.py / tra_kernels.py replaced by a recorder, so what is compiled is exactly what
the wrappers would launch: constexprs, num_warps, num_stages, argument specialisation. Each
distinct launch is bound with Triton's own binder (the path of JITFunction.run) for a GPUTarget
and compiled with ``triton.compile`` (ptxas ships in the triton wheel). Registers and spills
come from the ptxas log, shared memory from the compiled metadata.

Nothing breaks silently when the wrappers change: a wrapper that raises, a kernel of the kernel
modules that no launch reached, a compile error, or shared memory above the arch's opt-in limit
makes the exit status 1 (and tests/test_triton_aot.py fail).

Sets: ``ci`` (default HoT configurations, mostly bfloat16: every kernel at least once per arch;
36 compilations, ~45 s on 2 cores) and ``full`` (k up to 32, float32/float16/bfloat16, pooled
(once and in every load) and plain, masks, centers, both selection orders, assignment, large N,
TRA head dims 32/64/128 including the fused C <= 128 path, batch sizes that reach every sweep
row tile; ~1050 compilations, ~25 min per arch on one core).

Usage, from the repo root (the repo need not be installed):
    python scripts/triton_aot_compile.py [--set ci|full] [--arch 90,80] [--jobs 2]
        [--json out.json] [--md out.md] [--filter SUBSTR] [--list]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import re
import sys
import time

# Compile, never interpret; no poisoning (nothing runs); compiled artefacts out of ~/.triton.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.pop("HOT_KERNELS_POISON", None)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "hk_triton_aot_cache"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from hot_kernels.triton import _target  # noqa: E402
from hot_kernels.triton import tpc, tra  # noqa: E402
from hot_kernels.triton import tpc_kernels, tra_kernels  # noqa: E402

KERNEL_MODULES = (tpc_kernels, tra_kernels)
# arch -> (capability, SM count of the GPU the configs are for, opt-in shared memory per block,
# shared memory per SM). sm_90: H100/H200 (227 KB per block); sm_80: A100 (163 KB per block).
ARCHS = {
    90: ((9, 0), 132, 232448, 233472),
    80: ((8, 0), 108, 166912, 167936),
}
MAX_GRID_YZ = 65535
# Inputs live on the meta device: shapes, strides and dtypes without memory (nothing runs).
DEV = torch.device("meta")
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# ---- recording the wrappers' launches ----------------------------------------------------------


class Launch:
    def __init__(self, fn, grid, args, kwargs, label, hot):
        self.fn, self.grid, self.args, self.kwargs, self.label, self.hot = fn, grid, args, kwargs, label, hot


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` records instead of running."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            self.sink.record(self.fn, tuple(int(v) for v in g), args, kwargs)
        return launch


class Recording:
    """Patches the kernel modules' kernels with recorders; ``call`` runs a wrapper under a label."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.errors: list[str] = []
        self.kernels = {}
        self._label, self._hot = "", False
        self._standins = {}

    def _standin(self, t):
        # Triton specialises a pointer on dtype and 16-byte alignment only: a tiny tensor will do.
        key = (t.dtype, t.device.type == "meta" or t.data_ptr() % 16 == 0)
        if key not in self._standins:
            base = torch.empty(64, dtype=t.dtype)
            self._standins[key] = base if key[1] else base[1:]
        return self._standins[key]

    def record(self, fn, grid, args, kwargs):
        args = tuple(self._standin(a) if isinstance(a, torch.Tensor) else a for a in args)
        self.launches.append(Launch(fn, grid, args, dict(kwargs), self._label, self._hot))

    @contextlib.contextmanager
    def patched(self):
        saved = []
        for mod in KERNEL_MODULES:
            for name, obj in vars(mod).items():
                if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                    self.kernels[name] = obj
                    saved.append((mod, name, obj))
        for mod, name, obj in saved:
            setattr(mod, name, _Recorder(obj, self))
        try:
            yield self
        finally:
            for mod, name, obj in saved:
                setattr(mod, name, obj)

    def call(self, label, fn, *args, hot=False):
        self._label, self._hot = label, hot
        n0 = len(self.launches)
        try:
            fn(*args)
        except Exception as e:  # the wrapper itself failed on these inputs: a failure of the check
            self.errors.append(f"{label}: {type(e).__name__}: {e}")
        if len(self.launches) == n0 and not any(e.startswith(label + ":") for e in self.errors):
            self.errors.append(f"{label}: the wrapper launched no kernel")
        self._label, self._hot = "", False


# ---- the shapes ------------------------------------------------------------------------------------
# DESIGN.md "The shapes that occur": (N, f, C, center) of the published models; k = 2 in all of
# them, k up to 32 supported (TCFormer-style clustering: k = 5). hot=True marks the default HoT
# configurations (the paths the spill check of issue 15 covers).
TPC_SHAPES = [(243, 81, 512, None), (243, 61, 512, 121), (351, 117, 1536, 175)]
# C = 256 and 128 (HoT-MotionBERT, -MotionAGFormer) compile as C = 512: C is a run-time argument
# (a multiple of 16 in all of them) and the channel chunks are the same.
# (C, H): D = 64, 32, 32 (the HoT models), 128; the fused path (C <= 128) at D = 32, 64, 128
TRA_SHAPES = [(512, 8), (256, 8), (128, 4), (512, 4), (256, 2), (128, 2), (128, 1)]
TRA_L, TRA_M, TRA_S = 243, 81, 2
J = 17


@contextlib.contextmanager
def _knob(mod, name, value):
    """A wrapper knob set for the block; a knob that no longer exists fails loudly."""
    if not hasattr(mod, name):
        raise AttributeError(f"{mod.__name__}.{name} does not exist: update scripts/triton_aot_compile.py")
    old = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, old)


def _tpc(rec: Recording, full: bool, sms: int):
    dtypes = list(DT) if full else ["bf16"]
    for dn in dtypes:
        dt = DT[dn]
        shapes = TPC_SHAPES if full else [TPC_SHAPES[0]]
        for N, f, C, center in shapes:
            hot_shape = (N, f) == (243, 81) and center is None
            # B = 1, 64, 128 reach the sweep row tiles 16 / 32 / 64 at N = 243 on 132 SMs (16 / 64 / 64
            # on 108 SMs); the C of the DESIGN shapes (multiples of 16) change no compilation.
            Bs = ((1, 64, 128) if hot_shape and C == 512 else (1, 128)) if full else (64,)
            for B in Bs:
                x = torch.empty(B, N, C, dtype=dt, device=DEV)
                xp = torch.empty(B, N, J, C, dtype=dt, device=DEV)
                mask = torch.ones(B, N, dtype=torch.bool, device=DEV)
                mask[:, -5:] = False
                if full:
                    # every k at one shape; elsewhere k = 1, 2 and the widest slot count (KP = 32)
                    ks = range(1, 33) if (dn == "fp16" and C == 512 and B == 64 and center is None) \
                        else (1, 2, 5, 32)
                else:
                    ks = (2,)
                # pooled input: the default (pooled once at these shapes), and pooled in every load
                for pooled, mode in ((False, "auto"), (True, "auto")) + (((True, "never"),) if full else ()):
                    xx = xp if pooled else x
                    # with a mask: k = 2 and 32; pooled in every load: k = 2 and 32
                    cases = [(None, k) for k in ks] + ([(mask, 2), (mask, 32)] if full else [])
                    if mode == "never":
                        cases = [(None, 2), (None, 32), (mask, 2)]
                    for m, k in cases:
                        with _knob(tpc, "POOL_ONCE", mode):
                            tag = f"{dn} B={B} N={N} C={C} {'pooled J=17 ' + mode if pooled else 'plain'} k={k} " \
                                  f"mask={m is not None}"
                            hot = hot_shape and k == 2 and m is None and B == 64
                            if not pooled and full and k in (2, 32):
                                rec.call("knn_density " + tag, tpc.knn_density, xx, k, m, True)
                            for srt in ((True, False) if full else (True,)):
                                for ra in ((False, True) if full or not pooled else (False,)):
                                    rec.call(f"dpc_knn {tag} center={center} sorted={srt} asg={ra}", tpc.dpc_knn,
                                             xx, f, k, m, center, center is not None, srt, ra,
                                             hot=hot and pooled and mode == "auto" and srt and not ra)
                        if not pooled and full:
                            dens = torch.empty(B, N, dtype=torch.float32, device=DEV)
                            rec.call(f"dpc_delta {dn} B={B} N={N} C={C} mask={m is not None}", tpc.dpc_delta,
                                     x, dens, m)
                # pairwise distance and its backward (x only and x, y)
                y = torch.empty(B, f, C, dtype=dt, device=DEV)
                tag = f"{dn} B={B} N={N} C={C}"
                rec.call(f"pdist self {tag}", tpc.pairwise_distance, x, None)
                dxx, dxy = torch.empty(B, N, N, dtype=dt, device=DEV), torch.empty(B, N, f, dtype=dt, device=DEV)
                rec.call(f"pdist_bwd self {tag}", tpc.pairwise_distance_backward, dxx, x, None, dxx)
                if full:
                    rec.call(f"pdist xy {tag}", tpc.pairwise_distance, x, y)
                    rec.call(f"pdist_bwd xy {tag}", tpc.pairwise_distance_backward, dxy, x, y, dxy)
                # gather_frames (+ backward) on (B, N, J, C)
                idx = torch.empty(B, f, dtype=torch.long, device=DEV)
                for pos in ((None, torch.empty(1, f, C, dtype=dt, device=DEV), torch.empty(B, f, C, dtype=dt, device=DEV)) if full
                            else (torch.empty(1, f, C, dtype=dt, device=DEV),)):
                    pname = None if pos is None else pos.shape[0]
                    rec.call(f"gather {tag} J={J} pos={pname}", tpc.gather_frames, xp, idx, pos,
                             hot=hot_shape and B == 64)
                gr = torch.empty(B, f, J, C, dtype=dt, device=DEV)
                for pb in ((0, 1, B) if full else (1,)):
                    rec.call(f"gather_bwd {tag} J={J} pos_batch={pb}", tpc.gather_frames_backward, gr, idx, N, pb,
                             hot=hot_shape and B == 64)
        # topf_select on scores of this dtype (ci: the selection kernel comes with dpc_knn)
        for B in ((1, 64) if full else ()):
            sc = torch.empty(B, 243, dtype=dt, device=DEV)
            ex = torch.zeros(B, dtype=torch.long, device=DEV)
            for srt in ((True, False) if full else (True,)):
                for e in ((None, ex) if full else (None,)):
                    rec.call(f"topf {dn} B={B} N=243 f=81 sorted={srt} excl={e is not None}", tpc.topf_select,
                             sc, 81, srt, e)
    if full:  # large N: the selection's big-sort and bisection paths
        for Nb in (2048, 4096, 65536):
            for dn in ("fp16", "fp32"):
                x = torch.empty(1, Nb, 256, dtype=DT[dn], device=DEV)
                for srt in (True, False):
                    for ra in (False, True):
                        rec.call(f"dpc_knn {dn} B=1 N={Nb} C=256 k=2 sorted={srt} asg={ra}", tpc.dpc_knn,
                                 x, Nb // 3, 2, None, None, False, srt, ra)


def _tra(rec: Recording, full: bool):
    L, M, S = TRA_L, TRA_M, TRA_S
    for dn, dt in DT.items():
        # ci: HoT-MixSTE (C = 512, 8 x 64) in bfloat16, forward and backward; the forward of
        # HoT-MotionAGFormer (C = 128, 4 x 32: the fused path) in bfloat16 and of HoT-MixSTE in float32
        shapes = TRA_SHAPES if full else {"bf16": [(512, 8), (128, 4)], "fp32": [(512, 8)]}.get(dn, [])
        for C, H in shapes:
            D = C // H
            w = [torch.empty(C, C, dtype=dt, device=DEV) for _ in range(4)]
            bias = [torch.empty(C, dtype=dt, device=DEV) for _ in range(4)]
            x = torch.empty(S, M, C, dtype=dt, device=DEV)
            hot = (C, H) in ((512, 8), (256, 8), (128, 4))
            for Sq in ((1, S) if full else (1,)):
                q = torch.empty(Sq, L, C, dtype=dt, device=DEV)
                for has_b, res in (((True, True), (False, False), (True, False)) if full and Sq == 1 else
                                   ((True, True), (False, False)) if full else ((True, True),)):
                    bb = bias if has_b else [None] * 4
                    tag = f"{dn} C={C} H={H} D={D} Sq={Sq} bias={has_b} res={res}"
                    args = (q, x, w[0], bb[0], w[1], bb[1], w[2], bb[2], w[3], bb[3], H, D ** -0.5, res)
                    h = hot and Sq == 1 and has_b and res
                    rec.call("tra_fwd " + tag, tra.token_recovering_attention, *args, hot=h)
                    if not full and (dn, C) != ("bf16", 512):  # ci: the forward only
                        continue
                    lse = torch.empty(S, H, L, device=DEV)
                    go = torch.empty(S, L, C, dtype=dt, device=DEV)
                    rec.call("tra_bwd " + tag, tra.token_recovering_attention_backward, go, *args[:10], lse,
                             H, D ** -0.5, res, hot=h)
    if full:  # more keys than one backward program holds: the chunked path
        for dn, dt in DT.items():
            C, H, M2 = 256, 4, 300
            w = [torch.empty(C, C, dtype=dt, device=DEV) for _ in range(4)]
            x = torch.empty(S, M2, C, dtype=dt, device=DEV)
            q = torch.empty(S, L, C, dtype=dt, device=DEV)
            args = (q, x, w[0], None, w[1], None, w[2], None, w[3], None, H, 0.125, False)
            rec.call(f"tra_bwd {dn} C={C} H={H} M={M2} Sq={S}", tra.token_recovering_attention_backward,
                     torch.empty(S, L, C, dtype=dt, device=DEV), *args[:10], torch.empty(S, H, L, device=DEV), H, 0.125, False)


def record(arch: int, full: bool) -> Recording:
    cap, sms = ARCHS[arch][0], ARCHS[arch][1]
    rec = Recording()
    with rec.patched(), _target.override(cap, sms), torch.no_grad():
        _tpc(rec, full, sms)
        _tra(rec, full)
    return rec


# ---- compiling -------------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


_BINDERS = {}


def _bind(fn, args, kwargs, target):
    key = (id(fn), target.arch)
    if key not in _BINDERS:  # building a binder costs ~10 ms: once per kernel and arch
        backend = make_backend(target)
        _BINDERS[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _BINDERS[key]
    kw = dict(kwargs)
    bound, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
    return options, signature, constexprs, attrs


def _config(fn, constexprs):
    """The launch's constexpr values by name (Triton keys them by argument position)."""
    out = {}
    for k, v in constexprs.items():
        if len(k) == 1 and fn.arg_names[k[0]] and fn.params[k[0]].is_constexpr:
            out[fn.arg_names[k[0]]] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def distinct_launches(rec: Recording, arch: int, flt: str | None):
    target = GPUTarget("cuda", arch, 32)
    out = {}
    for ln in rec.launches:
        if flt and not any(f in ln.fn.__name__ for f in flt.split(",")):
            continue
        options, signature, constexprs, attrs = _bind(ln.fn, ln.args, ln.kwargs, target)
        key = (ln.fn.__name__, tuple(sorted(signature.items())), tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
               tuple(sorted((str(k), str(v)) for k, v in attrs.items())), options.num_warps, options.num_stages)
        d = out.get(key)
        if d is None:
            d = out[key] = dict(fn=ln.fn, args=ln.args, kwargs=ln.kwargs, labels=[], grids=set(), hot=False,
                                config=_config(ln.fn, constexprs), warps=options.num_warps,
                                stages=options.num_stages)
        if len(d["labels"]) < 3:
            d["labels"].append(ln.label)
        d["grids"].add(ln.grid)
        d["hot"] = d["hot"] or ln.hot
    return list(out.values())


def _ctas_per_sm(arch, regs, warps, smem):
    if regs is None:
        return None
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # registers are allocated per warp in 256s
    by_smem = ARCHS[arch][3] // (smem + 1024) if smem else 32  # 1 KB reserved per CTA
    return min(65536 // (per_warp * warps), 64 // warps, by_smem, 32)


def compile_one(fn, args, kwargs, arch):
    """triton.compile one launch for sm_<arch> -> dict(ok, regs, spill_st, spill_ld, stack, shared, ...)."""
    from triton import knobs
    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = _bind(fn, args, kwargs, target)
    src = ASTSource(fn, signature, constexprs, attrs)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # the ptxas log is only printed by a real compile
    buf = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            k = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:
        return dict(ok=False, error=f"{type(e).__name__}: {e}"[:3000], seconds=round(time.time() - t0, 2))
    finally:
        knobs.nvidia.dump_ptxas_log = False
    log = buf.getvalue()
    regs, spill = _REGS.findall(log), _SPILL.findall(log)
    r = dict(ok=True, regs=int(regs[-1]) if regs else None,
             stack=int(spill[-1][0]) if spill else None, spill_st=int(spill[-1][1]) if spill else None,
             spill_ld=int(spill[-1][2]) if spill else None, shared=int(k.metadata.shared),
             seconds=round(time.time() - t0, 2))
    return r


def _worker(job):
    fn_name, args, kwargs, arch = job
    fn = next(getattr(m, fn_name) for m in KERNEL_MODULES if hasattr(m, fn_name))
    if not isinstance(fn, JITFunction):  # a forked worker sees the originals (patching is undone)
        fn = fn.fn
    return compile_one(fn, args, kwargs, arch)


def _flags(arch, r):
    if not r["ok"]:
        return ["COMPILE-FAIL"]
    f = []
    if r["shared"] > ARCHS[arch][2]:
        f.append("SMEM>MAX")
    if (r["spill_st"] or 0) or (r["spill_ld"] or 0):
        f.append("SPILL")
    elif r["stack"]:
        f.append("STACK")
    if r["regs"] is not None and r["regs"] >= 255:
        f.append("REG-CAP")
    return f


def run(set_name: str, archs, jobs: int, flt: str | None, list_only: bool = False, log=print):
    """Record and compile. -> dict(meta, results, errors): errors are what fails the check."""
    full = set_name == "full"
    t_start = time.time()
    results, errors, todo = [], [], []
    for arch in archs:
        rec = record(arch, full)
        errors += [f"sm_{arch} wrapper: {e}" for e in rec.errors]
        if not flt:
            launched = {ln.fn.__name__ for ln in rec.launches}
            for name in sorted(set(rec.kernels) - launched):
                errors.append(f"sm_{arch}: kernel {name} was never launched by the wrappers at these shapes")
        for d in distinct_launches(rec, arch, flt):
            for gr in d["grids"]:
                if len(gr) > 1 and max(gr[1:]) > MAX_GRID_YZ:
                    errors.append(f"sm_{arch} {d['fn'].__name__}: grid {gr} over 65535 on axis 1/2 ({d['labels'][0]})")
            todo.append((arch, d))
    log(f"triton {triton.__version__}, torch {torch.__version__}: set {set_name}, {len(todo)} distinct compilations "
        f"({', '.join(f'sm_{a}: {sum(t[0] == a for t in todo)}' for a in archs)}), recorded in "
        f"{time.time() - t_start:.1f} s")
    if list_only:
        for arch, d in todo:
            log(f"sm_{arch} {d['fn'].__name__} w{d['warps']} s{d['stages']} {d['config']} | {d['labels'][0]}")
        return dict(meta={}, results=[], errors=errors)
    t0 = time.time()
    jobs_in = [(d["fn"].__name__, d["args"], d["kwargs"], arch) for arch, d in todo]
    if jobs > 1:
        import multiprocessing as mp
        outs = []
        with mp.get_context("fork").Pool(jobs) as pool:
            for i, r in enumerate(pool.imap(_worker, jobs_in, chunksize=1)):
                outs.append(r)
                if (i + 1) % 25 == 0:
                    log(f"  {i + 1}/{len(jobs_in)} compiled, {time.time() - t0:.0f} s")
    else:
        outs = []
        for i, j in enumerate(jobs_in):
            outs.append(_worker(j))
            if (i + 1) % 25 == 0:
                log(f"  {i + 1}/{len(jobs_in)} compiled, {time.time() - t0:.0f} s")
    for (arch, d), r in zip(todo, outs):
        r = dict(kernel=d["fn"].__name__, arch=f"sm_{arch}", num_warps=d["warps"], num_stages=d["stages"],
                 config=d["config"], hot=d["hot"], **r)
        r["flags"] = _flags(arch, r)
        r["ctas_per_sm"] = _ctas_per_sm(arch, r.get("regs"), r["num_warps"], r.get("shared")) if r["ok"] else None
        r["examples"] = d["labels"]
        r["grids"] = [list(g) for g in sorted(d["grids"])[:3]]
        if not r["ok"]:
            errors.append(f"{r['arch']} {r['kernel']} {r['config']}: {r['error'][:500]}")
        elif "SMEM>MAX" in r["flags"]:
            errors.append(f"{r['arch']} {r['kernel']} {r['config']}: {r['shared']} B of shared memory > "
                          f"{ARCHS[arch][2]} ({d['labels'][0]})")
        results.append(r)
    meta = dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                set=set_name, archs=[f"sm_{a}" for a in archs], compilations=len(results),
                compile_seconds=round(time.time() - t0, 1), total_seconds=round(time.time() - t_start, 1), jobs=jobs,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=" ".join([sys.executable, os.path.relpath(__file__)] + sys.argv[1:]) if __name__ == "__main__"
                else None)
    return dict(meta=meta, results=results, errors=errors)


def _cfg_str(cfg):
    skip = {"PREC"}
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.items() if k not in skip) + \
        (f" PREC={cfg['PREC']}" if "PREC" in cfg else "")


def markdown(report) -> str:
    m = report["meta"]
    res = sorted(report["results"], key=lambda r: (r["arch"], r["kernel"], not r["hot"], -(r.get("spill_st") or 0)))
    lines = [f"# Triton AOT compile: {m.get('set')} set, triton {m.get('triton')}", "",
             f"- date: {m.get('date')}; torch {m.get('torch')}, python {m.get('python')}",
             f"- command: `{m.get('command')}`",
             f"- {m.get('compilations')} distinct compilations in {m.get('compile_seconds')} s "
             f"({m.get('jobs')} jobs); failures: {sum(not r['ok'] for r in res)}; "
             f"with spills: {sum('SPILL' in r['flags'] for r in res)}; "
             f"default HoT paths with spills: {sum('SPILL' in r['flags'] and r['hot'] for r in res)}",
             "- registers / spill stores / spill loads from ptxas; shared = Triton's dynamic shared memory "
             "(bytes); CTAs/SM: occupancy bound by registers, warps and shared memory; hot: a default HoT "
             "configuration (DESIGN shapes, k = 2, no mask).", ""]
    if report["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in report["errors"]] + [""]
    for arch in m.get("archs", []):
        rs = [r for r in res if r["arch"] == arch]
        lines += [f"## {arch}", "", "| kernel | hot | warps | stages | regs | spill st/ld | stack | shared | "
                  "CTAs/SM | flags | config | example |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            lines.append(f"| {r['kernel']} | {'yes' if r['hot'] else ''} | {r['num_warps']} | {r['num_stages']} | "
                         f"{r.get('regs')} | {r.get('spill_st')}/{r.get('spill_ld')} | {r.get('stack')} | "
                         f"{r.get('shared')} | {r.get('ctas_per_sm')} | {' '.join(r['flags'])} | "
                         f"{_cfg_str(r['config'])} | {r['examples'][0]} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=("ci", "full"), default="ci")
    ap.add_argument("--arch", default="90,80", help="comma list of 90, 80")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--json", default=None, help="write the report (meta, results, errors) here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--filter", default=None, help="only kernels whose name contains one of these (comma list)")
    ap.add_argument("--list", action="store_true", help="list the distinct launches, compile nothing")
    a = ap.parse_args(argv)
    archs = [int(v) for v in a.arch.split(",")]
    for v in archs:
        if v not in ARCHS:
            ap.error(f"--arch: expected a comma list of {sorted(ARCHS)}, got {a.arch!r}")
    report = run(a.set, archs, a.jobs, a.filter, a.list)
    if a.list:
        for e in report["errors"]:
            print("ERROR:", e)
        return 1 if report["errors"] else 0
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    if a.md:
        with open(a.md, "w") as fh:
            fh.write(markdown(report))
    m = report["meta"]
    res = report["results"]
    print(f"{len(res)} compiled in {m['compile_seconds']} s ({m['total_seconds']} s in all); "
          f"failures {sum(not r['ok'] for r in res)}, spills {sum('SPILL' in r['flags'] for r in res)} "
          f"(default HoT paths: {sum('SPILL' in r['flags'] and r['hot'] for r in res)})")
    for r in res:
        if r["flags"]:
            print(f"  {r['arch']} {r['kernel']} w{r['num_warps']} s{r['num_stages']} {' '.join(r['flags'])} "
                  f"regs={r.get('regs')} spill={r.get('spill_st')}/{r.get('spill_ld')} shared={r.get('shared')} "
                  f"{'HOT ' if r['hot'] else ''}| {r['examples'][0]}")
    for e in report["errors"]:
        print("ERROR:", e)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
