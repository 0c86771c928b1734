"""Token recovering attention on every backend against the baselines a user would otherwise run.

    python benchmarks/bench_tra.py                         # HoT's target: S=1088, L=243, M=81, C=512, 8 heads, bf16
    python benchmarks/bench_tra.py --device cpu --dtype float32 --S 68
    python benchmarks/bench_tra.py --sweep                 # also time the triton backend's tuning knobs
    python benchmarks/bench_tra.py --out benchmarks/results/h100-DATE

Baselines: ``reference`` (the published Cross_Attention: the shared query expanded to S copies,
then projected), an SDPA version (the same projections around
``torch.nn.functional.scaled_dot_product_attention``: what a user would write instead) and
``torch.compile(reference)``. Then every hot_kernels backend that runs on the device. Forward and
forward+backward (gradients of every input), each output checked against the reference in
float64 before it is timed. Reports ratios vs reference and vs the best baseline, and achieved
TFLOP/s (the shared query's projection counted once).

Target (DESIGN.md, H100, bf16): forward >= 1.5x and forward+backward >= 1.3x faster than the
best of the three baselines.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import hot_kernels as hk
from hot_kernels import reference as R
from hot_kernels.benchmark import Record, environment, time_fn, write_results

BASELINES = ("reference", "sdpa", "torch.compile(reference)")


def sdpa_tra(query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, residual=True):
    """Cross-attention with the published projections around PyTorch's fused SDPA."""
    S, M, C = x.shape
    L, H, d = query.shape[1], num_heads, C // num_heads
    q_in = query.expand(S, L, C)
    q = F.linear(query, wq, bq).expand(S, L, C).view(S, L, H, d).transpose(1, 2)  # projected once
    k = F.linear(x, wk, bk).view(S, M, H, d).transpose(1, 2)
    v = F.linear(x, wv, bv).view(S, M, H, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(S, L, C)
    out = F.linear(o, wo, bo)
    return q_in + out if residual else out


def make_inputs(S, L, M, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype).requires_grad_()

    w = lambda: t(C, C, s=C ** -0.5)  # noqa: E731
    return [t(1, L, C, s=0.5), t(S, M, C), w(), t(C, s=0.1), w(), t(C, s=0.1), w(), t(C, s=0.1), w(), t(C, s=0.1)]


def flops(S, L, M, C, mode):
    """Forward: Q projected once (2LC^2), K and V (4SMC^2), attention (4SLMC), output (2SLC^2)."""
    fwd = 2 * L * C * C + 4 * S * M * C * C + 4 * S * L * M * C + 2 * S * L * C * C
    return fwd if mode == "forward" else 3 * fwd


def implementations(device, dtype, heads, backends):
    ref = lambda *a: R.token_recovering_attention(*a, num_heads=heads)  # noqa: E731
    impls = {"reference": ref, "sdpa": lambda *a: sdpa_tra(*a, heads), "torch.compile(reference)": torch.compile(ref)}
    for b in backends:
        if b != "reference" and hk.available_backends(device, "token_recovering_attention", dtype)[b] is None:
            impls[b] = lambda *a, b=b: hk.token_recovering_attention(*a, num_heads=heads, backend=b)
    return impls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--S", type=int, default=None, help="sequences (B*J); default 1088 on cuda, 68 on cpu")
    p.add_argument("--L", type=int, default=243)
    p.add_argument("--M", type=int, default=81)
    p.add_argument("--C", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--backends", default="cuda,triton,cpu")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--sweep", action="store_true", help="time the triton backend's tuning knobs too")
    p.add_argument("--out", help="folder for bench_tra.json and command_tra.txt")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    S = a.S or (1088 if device.type == "cuda" else 68)
    backends = [b for b in a.backends.split(",") if not (device.type == "cpu" and b == "triton")]
    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}, {env['date']}")
    print(f"TRA S={S} L={a.L} M={a.M} C={a.C} heads={a.heads} {dtype}")
    args = make_inputs(S, a.L, a.M, a.C, dtype, device)
    grad_out = torch.randn(S, a.L, a.C, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    want = R.token_recovering_attention(*[t.detach().double() for t in args], num_heads=a.heads)
    impls = implementations(device, dtype, a.heads, backends)
    shape = dict(S=S, L=a.L, M=a.M, C=a.C, heads=a.heads)
    records = []
    for mode in ("forward", "forward+backward"):
        times = {}
        for name, fn in impls.items():
            if mode == "forward":
                def run(fn=fn):
                    with torch.no_grad():
                        return fn(*args)
            else:
                def run(fn=fn):
                    out = fn(*args)
                    return torch.autograd.grad(out, args, grad_out)
            with torch.no_grad():
                got = fn(*args).double()
            err = float((got - want).norm() / want.norm())
            assert err < (1e-4 if dtype == torch.float32 else 3e-2), f"{name}: relative error {err:.3g} vs float64"
            t = time_fn(run, warmup=3, repeat=a.repeat, device=device)
            times[name] = t.median_ms
            tflops = flops(S, a.L, a.M, a.C, mode) / (t.median_ms * 1e-3) / 1e12
            records.append(Record("token_recovering_attention", name, dict(shape, mode=mode), str(dtype).split(".")[1],
                                  t, None, extra=dict(tflops=tflops, rel_err_vs_float64=err)))
        best = min(times[b] for b in BASELINES)
        for r in records[-len(impls):]:
            r.ratio_vs_reference = times["reference"] / r.timing.median_ms
            r.extra["ratio_vs_best_baseline"] = best / r.timing.median_ms
            print(f"  {mode:<16} {r.backend:<26} {r.timing.median_ms:9.3f} ms  x{r.ratio_vs_reference:5.2f} vs ref  "
                  f"x{r.extra['ratio_vs_best_baseline']:5.2f} vs best baseline  {r.extra['tflops']:7.1f} TFLOP/s  "
                  f"err {r.extra['rel_err_vs_float64']:.1e}")
    if a.sweep and "triton" in impls:
        sweep_triton_knobs(impls["triton"], args, grad_out, device, a.repeat)
    if a.out:
        write_results(a.out, "bench_tra", env, records, "_tra")


def sweep_triton_knobs(fn, args, grad_out, device, repeat):
    """Time variants of hot_kernels/triton/tra.py's module-level tuning knobs (read at each call)."""
    from hot_kernels.triton import tra

    variants = {
        "default": {},
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
    saved = {k: getattr(tra, k) for v in variants.values() for k in v}
    try:
        for name, knobs in variants.items():
            for k, v in {**saved, **knobs}.items():
                setattr(tra, k, v)
            try:
                f = time_fn(lambda: fn(*args), warmup=3, repeat=repeat, device=device).median_ms
                fb = time_fn(lambda: torch.autograd.grad(fn(*args), args, grad_out), warmup=3, repeat=repeat,
                             device=device).median_ms
                print(f"  sweep {name:<28} forward {f:8.3f} ms  forward+backward {fb:8.3f} ms")
            except Exception as e:  # a variant that does not fit the device (shared memory, ...)
                print(f"  sweep {name:<28} failed: {type(e).__name__}: {str(e)[:160]}")
    finally:
        for k, v in saved.items():
            setattr(tra, k, v)


if __name__ == "__main__":
    main()
