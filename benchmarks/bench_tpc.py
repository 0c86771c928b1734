"""TPC (dpc_knn, token_pruning_cluster) on every backend against the published eager path.

    python benchmarks/bench_tpc.py                       # the DESIGN.md target shapes, best device
    python benchmarks/bench_tpc.py --device cpu --quick  # what runs on the CPU machine
    python benchmarks/bench_tpc.py --out benchmarks/results/h100-DATE

Baselines: ``reference`` (the published eager path: one Gram cdist, then B x N x N tensor ops)
and ``torch.compile`` of it; then every hot_kernels backend that runs on the device (cuda and
triton on a GPU; cpu on the CPU). Every timed output is checked against the reference before it
is timed (tie-aware, tests/selection.py), and each case records its peak memory, so the long-clip
cases show that no N x N tensor is allocated (the reference needs several; at N = 65536 it cannot
run at all, and is recorded as failed).

Targets (DESIGN.md, H100): N = 243: B = 1 >= 10x vs reference; B = 64 >= 5x (fp32) and >= 15x
(bf16); >= 2x vs torch.compile(reference). N = 16384, B = 4: >= 2x (fp32) / >= 10x (bf16), O(N C)
memory. N = 65536 runs.

The last table printed is the measured fastest backend per op and device: it is what
hot_kernels/_dispatch.py's CUDA_PREFERENCE is set from.
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_MAX_N = 4096  # above this the float64 tie-aware check would need N x N float64 on the host


def dpc_cases(device: str, quick: bool):
    """(B, N, C, f): HoT-MixSTE's TPC (243 -> 81, C = 512) at B = 1 and 64, then long clips."""
    if device == "cpu":
        return [(1, 243, 512, 81), (64, 243, 512, 81)] + ([] if quick else [(2, 4096, 256, 1024)])
    cases = [(1, 243, 512, 81), (64, 243, 512, 81), (4, 16384, 512, 4096)]
    return cases[:2] if quick else cases + [(1, 65536, 512, 16384)]


def smooth_clip(B, N, C, dtype, device, seed=0):
    """A smooth clip (random walk over frames), as pose features are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g).cumsum(1) / N ** 0.5
    return x.to(device=device, dtype=dtype)


def peak_bytes(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def check_index(name, got, want, x, f):
    """got must be a valid selection: equal to the reference's, or differing only at near-ties."""
    assert got.shape == want.shape and got.dtype == torch.int64, f"{name}: shape/dtype {got.shape} {got.dtype}"
    if torch.equal(got, want):
        return "same as reference"
    if x.shape[1] <= CHECK_MAX_N:
        check_selection(x.float().cpu(), got.cpu(), f, k=2)
        return "differs at near-ties (checked)"
    rows_ok = all(len(set(r)) == f and min(r) >= 0 and max(r) < x.shape[1] for r in got.cpu().tolist())
    assert rows_ok, f"{name}: invalid index rows"
    agree = (got.cpu()[:, :, None] == want.cpu()[:, None, :]).any(-1).float().mean().item()
    assert agree > 0.98, f"{name}: only {agree:.1%} of the picks agree with the reference"
    return f"{agree:.2%} of picks agree (too large for the float64 check)"


def candidates(op, device, dtype, backends, compile_reference: bool):
    """{label: backend name or None for the compiled reference}."""
    out = {"reference": "reference"}
    if compile_reference:
        out["torch.compile(reference)"] = None
    for b in backends:
        if b != "reference" and hk.available_backends(device, op, dtype)[b] is None:
            out[b] = b
    return out


def bench_dpc_knn(device, dtypes, backends, quick, repeat):
    records = []
    compiled = torch.compile(R.dpc_knn, dynamic=False)
    for B, N, C, f in dpc_cases(device.type, quick):
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            x = smooth_clip(B, N, C, dtype, device)
            small = N <= 1024
            want = None
            base = None
            for label, name in candidates("dpc_knn", device, dtype, backends, small).items():
                fn = (lambda: compiled(x, f, 2)) if name is None else (lambda n=name: hk.dpc_knn(x, f, 2, backend=n))
                shape = dict(B=B, N=N, C=C, f=f, k=2)
                try:
                    got = fn()
                    if want is None:
                        want, verdict = got, "is the reference"
                    else:
                        verdict = check_index(label, got, want, x, f)
                    peak = peak_bytes(fn, device)
                    t = time_fn(fn, warmup=3, repeat=repeat if small else max(3, repeat // 4), device=device)
                except torch.OutOfMemoryError as e:  # the reference at N = 65536 needs > 80 GB
                    print(f"dpc_knn {dtype_name:<8} B={B:<3} N={N:<6} {label:<26} failed: out of memory")
                    records.append(Record("dpc_knn", label, shape, dtype_name, None,
                                          extra=dict(failed=f"OutOfMemoryError: {str(e)[:200]}")))
                    torch.cuda.empty_cache()
                    continue
                base = base or (t.median_ms if label == "reference" else None)
                ratio = base / t.median_ms if base else None
                records.append(Record("dpc_knn", label, shape, dtype_name, t, ratio,
                                      extra=dict(peak_bytes=peak, check=verdict)))
                print(f"dpc_knn {dtype_name:<8} B={B:<3} N={N:<6} C={C:<5} f={f:<6} {label:<26} "
                      f"{t.median_ms:10.4f} ms (min {t.min_ms:.4f}) "
                      + (f"x{ratio:6.2f} vs ref " if ratio else "             ")
                      + (f"peak {peak / 2**20:9.1f} MiB  " if peak is not None else "") + verdict)
    return records


def bench_token_pruning_cluster(device, dtypes, backends, repeat):
    records = []
    B, F, J, C, f = (64, 243, 17, 512, 81)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        x = smooth_clip(B, F, J * C, dtype, device).view(B, F, J, C)
        pos = torch.randn(1, f, C, device=device, dtype=dtype)
        want = None
        base = None
        for label, name in candidates("dpc_knn", device, dtype, backends, False).items():
            def fn(n=name):
                return hk.token_pruning_cluster(x, f, 2, pos_embed=pos, backend=n)

            kept, index = fn()
            if want is None:
                want, verdict = index, "is the reference"
            else:
                verdict = check_index(label, index, want, x.float().mean(2), f)
            t = time_fn(fn, warmup=3, repeat=repeat, device=device)
            base = base or t.median_ms
            records.append(Record("token_pruning_cluster", label, dict(B=B, F=F, J=J, C=C, f=f, k=2), dtype_name, t,
                                  base / t.median_ms, extra=dict(peak_bytes=peak_bytes(fn, device), check=verdict)))
            print(f"token_pruning_cluster {dtype_name:<8} B={B} F={F} J={J} C={C} {label:<10} {t.median_ms:10.4f} ms "
                  f"x{base / t.median_ms:6.2f} vs ref  {verdict}")
    return records


def fastest_per_op(records):
    """{(op, dtype): backend} of the hot_kernels backends (not the baselines), by median time
    summed over the shapes where every backend ran."""
    totals: dict = {}
    for r in records:
        if r.timing is None or r.backend in ("reference", "torch.compile(reference)"):
            continue
        key = (r.op, r.dtype)
        totals.setdefault(key, {}).setdefault(r.backend, 0.0)
        totals[key][r.backend] += r.timing.median_ms
    return {key: min(by_backend, key=by_backend.get) for key, by_backend in totals.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="comma list of float32,bfloat16,float16 "
                                                 "(default: float32,bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--backends", default="cuda,triton,cpu", help="hot_kernels backends to time besides the baselines")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="only the N = 243 shapes")
    p.add_argument("--out", help="folder for bench.json and command.txt")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtypes = (args.dtype or ("float32,bfloat16" if device.type == "cuda" else "float32")).split(",")
    backends = args.backends.split(",")
    if device.type == "cpu" and "triton" in backends:
        backends.remove("triton")  # the interpreter is a correctness tool, not something to time
    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}, {env['date']}")
    records = bench_dpc_knn(device, dtypes, backends, args.quick, args.repeat)
    records += bench_token_pruning_cluster(device, dtypes, backends, max(5, args.repeat // 2))
    print("\nfastest hot_kernels backend per op and dtype (sets CUDA_PREFERENCE in hot_kernels/_dispatch.py):")
    for (op, dtype), backend in sorted(fastest_per_op(records).items()):
        print(f"  {op:<24} {dtype:<9} {backend}")
    if args.out:
        write_results(args.out, "bench_tpc", env, records, "_tpc")


if __name__ == "__main__":
    main()
