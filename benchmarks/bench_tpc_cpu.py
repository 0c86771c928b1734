"""CPU dpc_knn and TRA against the reference (the published eager path) and torch.compile of it.

    python benchmarks/bench_tpc_cpu.py [--threads 2] [--out benchmarks/results/cpu-DATE]

DESIGN.md target: CPU dpc_knn at B=64, N=243, C=512, fp32, 2 threads >= 4x faster than
``reference``. Every timed output is checked against the reference before it is timed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import hot_kernels as hk
from hot_kernels import reference as R
from hot_kernels.benchmark import Record, environment, time_fn, write_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from selection import check_selection  # noqa: E402  (tie-aware: a differing pick only at a near-tie)


def tpc_cases(quick: bool):
    # (B, N, C, f): HoT-MixSTE's TPC (N=243 frames -> 81, C=512), B=1 and B=64; MHFormer's N=351.
    cases = [(1, 243, 512, 81), (64, 243, 512, 81)]
    if not quick:
        cases += [(16, 351, 1536, 117), (4, 2048, 256, 512)]
    return cases


def bench_dpc_knn(quick: bool, repeat: int):
    records = []
    compiled_ref = torch.compile(R.dpc_knn, dynamic=False)
    for B, N, C, f in tpc_cases(quick):
        g = torch.Generator().manual_seed(0)
        # A smooth clip (cumulative random walk over frames), as pose features are.
        x = torch.randn(B, N, C, generator=g).cumsum(1) / N ** 0.5
        want = R.dpc_knn(x, f, 2)
        candidates = {
            "reference": lambda: R.dpc_knn(x, f, 2),
            "torch.compile(reference)": lambda: compiled_ref(x, f, 2),
            "cpu": lambda: hk.dpc_knn(x, f, 2, backend="cpu"),
        }
        base = None
        for name, fn in candidates.items():
            got = fn()
            if not torch.equal(got, want):
                check_selection(x, got, f, k=2)
            t = time_fn(fn, warmup=3, repeat=repeat)
            base = base or t.median_ms
            rec = Record("dpc_knn", name, dict(B=B, N=N, C=C, f=f, k=2), "float32", t, base / t.median_ms)
            records.append(rec)
            print(f"dpc_knn  B={B:<3} N={N:<5} C={C:<5} f={f:<4} {name:<26} {t.median_ms:9.3f} ms "
                  f"(min {t.min_ms:.3f}, max {t.max_ms:.3f})  x{rec.ratio_vs_reference:5.2f} vs reference")
    return records


def bench_tra(quick: bool, repeat: int):
    records = []
    S, L, M, C, H = (68, 243, 81, 512, 8) if quick else (1088, 243, 81, 512, 8)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, L, C, generator=g, requires_grad=True)
    xs = torch.randn(S, M, C, generator=g, requires_grad=True)
    ws = [(torch.randn(C, C, generator=g) / C ** 0.5).requires_grad_() for _ in range(4)]
    bo = torch.zeros(C, requires_grad=True)
    args = (query, xs, ws[0], None, ws[1], None, ws[2], None, ws[3], bo, H)
    want = R.token_recovering_attention(*args)
    for mode in ("forward", "forward+backward"):
        base = None
        for name in ("reference", "cpu"):
            def run(name=name, mode=mode):
                if mode == "forward":
                    with torch.no_grad():
                        return hk.token_recovering_attention(*args, backend=name)
                out = hk.token_recovering_attention(*args, backend=name)
                out.sum().backward()
                return out

            torch.testing.assert_close(run().detach(), want.detach(), rtol=1e-4, atol=1e-4)
            t = time_fn(run, warmup=2, repeat=max(3, repeat // 4))
            base = base or t.median_ms
            rec = Record("token_recovering_attention", name, dict(S=S, L=L, M=M, C=C, heads=H, mode=mode),
                         "float32", t, base / t.median_ms)
            records.append(rec)
            print(f"TRA {mode:<16} S={S} L={L} M={M} C={C} {name:<10} {t.median_ms:9.2f} ms "
                  f"x{rec.ratio_vs_reference:5.2f} vs reference")
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="the two HoT dpc_knn shapes and a small TRA")
    p.add_argument("--out", help="folder for bench.json and command.txt")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"{env['device']}, {args.threads} threads, torch {env['torch']}, commit {env['git_commit']}")
    records = bench_dpc_knn(args.quick, args.repeat) + bench_tra(args.quick, args.repeat)
    if args.out:
        write_results(args.out, "bench", env, records, "")


if __name__ == "__main__":
    main()
