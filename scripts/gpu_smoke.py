"""GPU smoke check: every op once per GPU backend and dtype against the reference, and the CUDA
distance engine alone against float64. Stage (a) of scripts/gpu_check.sh; with --focused, the
small set of calls that stage (c) runs under compute-sanitizer.

    python scripts/gpu_smoke.py --json smoke.json     # cuda + triton, float32/float16/bfloat16
    python scripts/gpu_smoke.py --focused             # float32 + bfloat16, no engine comparison
    python scripts/gpu_smoke.py --device cpu          # the same code on the cpu backend (a dry run)

Checks (small shapes, fresh random inputs drawn in float64 and rounded to the dtype; every
uninitialised allocation NaN-poisoned, so an unwritten output element fails):
  * pairwise_distance (x alone, and x with y) with its backward; knn_density with a token mask
    (density and log); dpc_delta with a mask; topf_select sorted and unsorted with an exclude
    tensor; dpc_knn with a mask, a forced center and the assignment (tie-aware, tests/selection.py);
    token_pruning_cluster on a 4-D clip with pos_embed and its backward; token recovering attention
    forward + backward at head dims 32, 64 and 128 (shared query). Values by relative error
    ||got - want|| / ||want|| against the reference evaluated in float64 on the same rounded inputs.
  * the distance engine: pairwise_distance at odd N and C on plain and offset data (x + 10), in
    each dtype, against float64, within the Gram-form error model of tests/test_backends.py (inputs
    shifted by token 0); then again in a child process with HOT_KERNELS_CUDA_GRAM=fma (the variable
    is read once per process), and the two engines' largest difference.
Writes a JSON report (--json) and prints one line per check; exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tie-aware selection checker

import hot_kernels as hk  # noqa: E402
from hot_kernels import reference as R  # noqa: E402
from selection import check_assignment, check_selection  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest relative error ||got - want|| / ||want|| against float64 (forward; backward twice this).
REL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
GRAM_RTOL = 1e-5  # tests/test_backends.py's error model of a Gram-form distance
ENGINE_OFFSETS = (0.0, 10.0)
ENGINE_SHAPE = (2, 203, 67)  # odd N and C


class Failed(Exception):
    pass


def rel_err(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise Failed(f"shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise Failed(f"{int((~torch.isfinite(got)).sum())} non-finite values (unwritten output?)")
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def expect_close(name, got, want, dtype, backward=False) -> float:
    err = rel_err(got, want)
    limit = REL[dtype] * (2 if backward else 1)
    if not err <= limit:
        raise Failed(f"{name}: relative error {err:.3g} > {limit:g}")
    return err


def draw(*shape, seed, dtype, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def leaf(t, dev):
    """A fresh leaf copy of t on dev that requires grad (never t itself)."""
    return t.detach().clone().to(dev).requires_grad_()


def clip(B, N, C, seed, dtype):
    x = draw(B, N, C, seed=seed, dtype=torch.float64)
    x[:, 1] = x[:, 0]  # an exact duplicate, as edge-padded clips make
    return x.to(dtype)


def mask_for(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, generator=g) > 0.25
    m[:, :3] = True
    return m


# ---- the op checks: each returns a detail string (errors) or raises Failed ------------------------------


def check_pairwise(dev, be, dt):
    x, y = clip(2, 37, 24, 1, dt), draw(2, 19, 24, seed=2, dtype=dt)
    errs = []
    for yy in (None, y):
        xg = leaf(x, dev)
        yg = None if yy is None else leaf(yy, dev)
        D = hk.pairwise_distance(xg, yg, backend=be)
        w = draw(*D.shape, seed=3, dtype=torch.float64)
        (D.float() * w.to(dev, torch.float32)).sum().backward()
        x64 = leaf(x.double(), "cpu")
        y64 = None if yy is None else leaf(yy.double(), "cpu")
        D64 = R.pairwise_distance(x64, y64)
        (D64 * w).sum().backward()
        errs.append(expect_close("distance", D, D64, dt))
        errs.append(expect_close("d_x", xg.grad, x64.grad, dt, backward=True))
        if yy is not None:
            errs.append(expect_close("d_y", yg.grad, y64.grad, dt, backward=True))
    return f"max rel err {max(errs):.2e}"


def check_density(dev, be, dt):
    x, m = clip(3, 41, 24, 4, dt), mask_for(3, 41, 5)
    errs = []
    for log in (False, True):
        got = hk.knn_density(x.to(dev), 3, m.to(dev), log=log, backend=be)
        want = R.knn_density(x.double(), 3, m, log=log)
        if log:  # masked tokens: -inf in both
            finite = m
            got, want = got.cpu()[finite], want[finite]
        errs.append(expect_close("log density" if log else "density", got, want, dt))
    return f"max rel err {max(errs):.2e}"


def check_delta(dev, be, dt):
    x, m = clip(3, 41, 24, 6, dt), mask_for(3, 41, 7)
    log_rho = R.knn_density(x.double(), 2, m, log=True)
    delta, parent = hk.dpc_delta(x.to(dev), log_rho.to(dev, torch.float32), m.to(dev), backend=be)
    want, _ = R.dpc_delta(x.double(), log_rho, m)
    rows = m  # a masked token's delta is not compared
    err = expect_close("delta", delta.cpu()[rows], want[rows], dt)
    # The parent is a token at distance delta (which one may differ at exact distance ties).
    D = R.pairwise_distance(x.double())
    par = parent.cpu()
    if not ((par >= 0) & (par < x.shape[1])).all():
        raise Failed(f"parent out of range: {par.tolist()}")
    at_parent = D.gather(2, par[:, :, None])[:, :, 0]
    rows = m & (par != torch.arange(x.shape[1]))  # the densest token is its own parent
    expect_close("D[i, parent_i] vs delta", at_parent[rows], want[rows], dt)
    return f"rel err {err:.2e}"


def check_topf(dev, be, dt):
    score = draw(3, 57, seed=8, dtype=torch.float32)  # distinct values: one exact answer
    exclude = torch.tensor([4, 0, 56])
    for sorted_ in (True, False):
        got = hk.topf_select(score.to(dev), 9, sorted=sorted_, exclude=exclude.to(dev), backend=be).cpu()
        want = R.topf_select(score, 9, sorted=sorted_, exclude=exclude)
        if not torch.equal(got, want):
            raise Failed(f"sorted={sorted_}: got {got.tolist()}, reference {want.tolist()}")
    return "exact (sorted and unsorted, exclude tensor)"


def check_dpc_knn(dev, be, dt):
    x, m = clip(3, 61, 32, 9, dt), mask_for(3, 61, 10)
    index = hk.dpc_knn(x.to(dev), 16, 2, m.to(dev), backend=be)
    check_selection(x, index.cpu(), 16, k=2, token_mask=m)
    index, asg = hk.dpc_knn(x.to(dev), 16, 3, None, 30, return_assignment=True, backend=be)
    check_selection(x, index.cpu(), 16, k=3, center=30)
    check_assignment(x, index.cpu(), asg.cpu())
    unsorted = hk.dpc_knn(x.to(dev), 16, 3, None, 30, sorted=False, backend=be).cpu()
    if not torch.equal(unsorted.sort(-1).values, index.cpu()):
        raise Failed("sorted=False keeps other tokens than sorted=True")
    return "valid up to rounding (mask; center + assignment; sorted=False)"


def check_tpc(dev, be, dt):
    x4 = draw(2, 37, 5, 8, seed=11, dtype=dt)
    pos = draw(1, 12, 8, seed=12, dtype=dt)
    xg = leaf(x4, dev)
    kept, index = hk.token_pruning_cluster(xg, 12, 2, center=18, pos_embed=pos.to(dev), backend=be)
    idx = index.cpu()
    check_selection(x4.float().mean(2), idx, 12, k=2, center=18)
    want = torch.stack([x4[b, idx[b]] for b in range(2)]).double() + pos.double()[:, :, None, :]
    err = expect_close("x_kept", kept, want, dt)
    w = draw(*kept.shape, seed=13, dtype=torch.float64)
    (kept.float() * w.to(dev, torch.float32)).sum().backward()
    want_grad = torch.zeros(x4.shape, dtype=torch.float64)
    for b in range(2):
        want_grad[b].index_add_(0, idx[b], w[b])
    expect_close("d_x", xg.grad, want_grad, dt, backward=True)
    return f"x_kept rel err {err:.2e}"


def check_tra(dev, be, dt, head_dim):
    H, S, L, M = 2, 3, 9, 7
    C = H * head_dim
    s = C ** -0.5
    t = [draw(1, L, C, seed=20, dtype=dt), draw(S, M, C, seed=21, dtype=dt)]
    t += [draw(C, C, seed=22 + i, dtype=dt, scale=s) for i in range(4)] + [draw(C, seed=30, dtype=dt, scale=0.1)]
    leaves = [leaf(a, dev) for a in t]
    q, x, wq, wk, wv, wo, bo = leaves
    out = hk.token_recovering_attention(q, x, wq, None, wk, None, wv, None, wo, bo, H, backend=be)
    g = draw(S, L, C, seed=31, dtype=torch.float64)
    (out.float() * g.to(dev, torch.float32)).sum().backward()
    ref = [leaf(a.double(), "cpu") for a in t]
    q, x, wq, wk, wv, wo, bo = ref
    want = R.token_recovering_attention(q, x, wq, None, wk, None, wv, None, wo, bo, H)
    (want * g).sum().backward()
    errs = [expect_close("out", out, want, dt)]
    for name, a, r in zip(("query", "x", "wq", "wk", "wv", "wo", "bo"), leaves, ref):
        errs.append(expect_close(f"d_{name}", a.grad, r.grad, dt, backward=True))
    return f"max rel err {max(errs):.2e}"


OP_CHECKS = [
    ("pairwise_distance", check_pairwise),
    ("knn_density", check_density),
    ("dpc_delta", check_delta),
    ("topf_select", check_topf),
    ("dpc_knn", check_dpc_knn),
    ("token_pruning_cluster", check_tpc),
] + [(f"token_recovering_attention d={d}", (lambda d: lambda dev, be, dt: check_tra(dev, be, dt, d))(d))
     for d in (32, 64, 128)]


# ---- the distance engine ----------------------------------------------------------------------------------


def engine_error(D, x):
    """(max |D - D64|, worst ratio to the Gram-form bound): D64 the float64 distance of the same
    rounded x; the bound that of tests/test_backends.py with the inputs shifted by token 0."""
    x64 = x.double()
    want = R.pairwise_distance(x64)
    a = x64 - x64[:, :1]
    sq = a.square().sum(-1)
    bound = GRAM_RTOL * (sq[:, :, None] + sq[:, None, :]) / x.shape[-1]
    allowed = torch.sqrt(want.square() + bound) - want + 2 * torch.finfo(D.dtype).eps * want + 1e-300
    err = (D.double().cpu() - want).abs()
    if not torch.isfinite(err).all():
        raise Failed("non-finite distances (unwritten output?)")
    return err.max().item(), (err / allowed).max().item()


def engine_checks(dev, backends, dtypes, label):
    """One check per (backend, dtype, offset); 'distances' holds D per key for the engine comparison."""
    results, distances = [], {}
    for be in backends:
        for name, dt in dtypes.items():
            why = refusal(dev, be, "pairwise_distance", dt)
            if why is not None:
                results.append(dict(check=f"distance engine ({label})", backend=be, dtype=name, status="skipped",
                                    detail=why))
                continue
            for off in ENGINE_OFFSETS:
                def run(be=be, dt=dt, off=off, name=name):
                    x = draw(*ENGINE_SHAPE, seed=40, dtype=dt, offset=off)
                    D = hk.pairwise_distance(x.to(dev), backend=be).cpu()
                    distances[f"{be}/{name}/{off:g}"] = D
                    err, excess = engine_error(D, x)
                    if not excess <= 1:
                        raise Failed(f"max abs error {err:.3g} is {excess:.3g}x the Gram-form bound")
                    return f"max abs err {err:.2e} ({excess:.2f}x the bound)"
                results.append(record(f"distance engine ({label}) N,C={ENGINE_SHAPE[1]},{ENGINE_SHAPE[2]} "
                                      f"offset {off:g}", be, name, run))
    return results, distances


# ---- running ----------------------------------------------------------------------------------------------


def record(check, backend, dtype, fn):
    t0 = time.perf_counter()
    try:
        status, detail = "passed", fn()
    except Failed as e:
        status, detail = "failed", str(e)
    except AssertionError as e:  # tests/selection.py's checkers
        status, detail = "failed", str(e)[:2000]
    except Exception as e:  # noqa: BLE001 - a smoke check reports and goes on
        status, detail = "failed", f"raised {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
    rec = dict(check=check, backend=backend, dtype=dtype, status=status, detail=detail,
               seconds=round(time.perf_counter() - t0, 3))
    print(f"{status.upper():7s} {backend:7s} {dtype:9s} {check}: {detail}", flush=True)
    return rec


def refusal(dev, be, op, dt):
    op = "token_recovering_attention" if op.startswith("token_recovering_attention") else op
    op = "dpc_knn" if op == "token_pruning_cluster" else op
    return hk.available_backends(dev, op, dt)[be]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--backends", help="comma list (default: cuda,triton on cuda; cpu on cpu)")
    p.add_argument("--json", help="write the report here (rewritten after every check)")
    p.add_argument("--focused", action="store_true", help="the sanitizer subset: float32 + bfloat16, no engine run")
    p.add_argument("--engine-only", action="store_true", help="only the distance engine checks")
    a = p.parse_args(argv)
    t0 = time.time()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(status="skipped", reason="no CUDA", checks=[]), f, indent=1)
        return 0
    dev = torch.device(a.device)
    backends = a.backends.split(",") if a.backends else (["cuda", "triton"] if a.device == "cuda" else ["cpu"])
    dtypes = dict(DTYPES) if a.device == "cuda" else {"float32": torch.float32}
    if a.focused:
        dtypes.pop("float16", None)
    # Poison: every uninitialised allocation is NaN (integers: their largest value) while this runs.
    import torch.utils.deterministic as det
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    os.environ.setdefault("HOT_KERNELS_POISON", "1")
    gram = os.environ.get("HOT_KERNELS_CUDA_GRAM", "default") or "default"
    report = dict(status="running", device=device_name(dev), gram_engine=gram, checks=[])

    def save(*recs):
        report["checks"] += recs
        for k in ("passed", "failed", "skipped"):
            report[k] = sum(c["status"] == k for c in report["checks"])
        report["wall_s"] = round(time.time() - t0, 1)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)

    distances = {}
    for be in backends:  # backend by backend, so that a run cut short has whole backends
        if not a.engine_only:
            for name, dt in dtypes.items():
                for op, fn in OP_CHECKS:
                    why = refusal(dev, be, op, dt)
                    if why is not None:
                        print(f"SKIPPED {be:7s} {name:9s} {op}: {why}")
                        save(dict(check=op, backend=be, dtype=name, status="skipped", detail=why))
                    else:
                        save(record(op, be, name, lambda fn=fn, be=be, dt=dt: fn(dev, be, dt)))
        if not a.focused:
            eng, dist = engine_checks(dev, [be], dtypes, f"HOT_KERNELS_CUDA_GRAM={gram}")
            save(*eng)
            distances.update(dist)
            if not a.engine_only and gram == "default" and be in ("cuda", "cpu"):  # the variable is the cuda backend's
                save(*fma_engine(dev, a, be, dist))
    if a.device == "cuda":
        torch.cuda.synchronize()
    report["status"] = "failed" if report.get("failed") else "passed"
    if a.engine_only and a.json:  # the child of fma_engine: hand the distances back too
        torch.save(distances, a.json + ".pt")
    save()
    print(f"smoke: {report['passed']} passed, {report['failed']} failed, {report['skipped']} skipped "
          f"in {report['wall_s']} s")
    return 1 if report["failed"] else 0


def fma_engine(dev, a, backend, default_distances):
    """The engine checks of `backend` again in a child process with HOT_KERNELS_CUDA_GRAM=fma, and
    the largest difference between the two engines' distances (the same inputs)."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gpu_smoke_fma_{os.getpid()}.json")
    env = dict(os.environ, HOT_KERNELS_CUDA_GRAM="fma")
    cmd = [sys.executable, os.path.abspath(__file__), "--device", a.device, "--backends", backend, "--engine-only",
           "--json", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write("".join(f"  (fma child) {ln}\n" for ln in proc.stdout.splitlines()))
    try:
        child = json.load(open(out))["checks"]
        fma = torch.load(out + ".pt")
    except (OSError, ValueError) as e:
        return [dict(check="distance engine (HOT_KERNELS_CUDA_GRAM=fma)", backend="-", dtype="-", status="failed",
                     detail=f"child process failed (exit {proc.returncode}): {e}; {proc.stderr[-1500:]}")]
    finally:
        for path in (out, out + ".pt"):
            if os.path.exists(path):
                os.remove(path)
    diffs = []
    for key, D in default_distances.items():
        if key in fma:
            d = (D.double() - fma[key].double()).abs().max().item()
            diffs.append(f"{key}: {d:.2e}" if math.isfinite(d) else f"{key}: non-finite")
    print("default vs fma engine, max |D difference|: " + "; ".join(diffs))
    return child + [dict(check="default vs fma engine: max |D difference|", backend="-", dtype="-", status="passed",
                         detail="; ".join(diffs))]


def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main())
