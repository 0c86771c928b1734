"""How far TRA's cpu backend can get past the SDPA baseline on this CPU: a bound set by the GEMMs.

The cpu backend and the SDPA baseline (hot_kernels.bench_cases.sdpa_tra) run the same projection
GEMMs: the shared query's, K|V's and the output's, and in the backward their input and weight
gradients. Both leave those to the BLAS (MKL in torch's CPU wheels), which runs them near the
machine's peak. Only the attention core (softmax(Q K^T) V: 4 S L M C FLOP forward, and at least
8 S L M C more backward: dP, dV, dQ and dK with P kept) and the glue around it differ. So the cpu
backend's time is at least

    T_gemm                          (the GEMMs alone, timed here as bare torch.mm calls), and
    T_gemm + core FLOP / R_gemm     if the core ran at the GEMMs' own FLOP rate R_gemm (it also
                                    has the softmax, so this bound is optimistic);

and its ratio to SDPA at most T_sdpa / those. The last column is the FLOP rate the core would need
for the cpu backend to reach --target x SDPA (given the GEMMs' time): above R_gemm means that
target needs the core faster than a large GEMM on this machine.

    python benchmarks/bench_tra_bound.py                      # published TRA shapes, B = 1 and 4
    python benchmarks/bench_tra_bound.py --batch 1 --rounds 31
    HOT_KERNELS_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/bench_tra_bound.py                  # the AVX2 path, on an AVX-512 machine

Timing: the three candidates round-robin (order rotated per round), a small torch op before every
call, two warm-up rounds, the median of --rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hot_kernels as hk
from hot_kernels import bench_cases as BC
from hot_kernels.benchmark import environment


def gemm_calls(S: int, L: int, M: int, C: int, backward: bool):
    """(fn, FLOP): fn runs the projection GEMMs of one TRA call (forward, or forward and backward) as
    bare torch.mm calls into preallocated outputs."""
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    query, x, wq, wkv, wo = r(L, C), r(S * M, C), r(C, C), r(2 * C, C), r(C, C)
    o, grad, dkv, dq = r(S * L, C), r(S * L, C), r(S * M, 2 * C), r(L, C)
    out = {name: torch.empty(shape) for name, shape in (
        ("q", (L, C)), ("kv", (S * M, 2 * C)), ("y", (S * L, C)), ("do", (S * L, C)), ("dwo", (C, C)),
        ("dx", (S * M, C)), ("dwkv", (2 * C, C)), ("dqin", (L, C)), ("dwq", (C, C)))}
    calls = [(query, wq.t(), "q"), (x, wkv.t(), "kv"), (o, wo.t(), "y")]
    if backward:
        calls += [(grad, wo, "do"), (grad.t(), o, "dwo"), (dkv, wkv, "dx"), (dkv.t(), x, "dwkv"),
                  (dq, wq, "dqin"), (dq.t(), query, "dwq")]
    flop = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b, _ in calls)

    def run():
        for a, b, name in calls:
            torch.mm(a, b, out=out[name])

    return run, flop


def candidates(pub, B: int, backward: bool):
    """{label: fn} for SDPA and the cpu backend, run exactly as ``hot-kernels bench`` runs them on its
    inputs (bench_cases.candidates), and for the GEMMs alone; and the GEMMs' FLOP."""
    cpu = torch.device("cpu")
    case = BC._tra(pub, B, "float32", "forward+backward" if backward else "forward")
    inputs = BC.make_inputs(case, cpu)
    runs = {c.label: c for c in BC.candidates(case, cpu, inputs, backends=["sdpa", "cpu"])}
    if runs["cpu"].fn is None:
        raise SystemExit(f"the cpu backend cannot run here: {runs['cpu'].skip}")
    p = case.p
    gemms, flop = gemm_calls(p["S"], p["L"], p["M"], p["C"], backward)
    return {label: (lambda fn=runs[label].fn: fn(inputs.args)) for label in ("sdpa", "cpu")} | {"gemm": gemms}, flop


def medians(fns: dict, rounds: int) -> dict:
    """Median seconds per label: round-robin, the order rotated every round, a small op before each
    call (as between a model's layers), two warm-up rounds."""
    between = (torch.ones(64, 64), torch.ones(64, 64))
    labels = list(fns)
    times = {label: [] for label in labels}
    for r in range(rounds + 2):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            torch.mm(*between)
            t0 = time.perf_counter()
            fns[label]()
            dt = time.perf_counter() - t0
            if r >= 2:
                times[label].append(dt)
    return {label: statistics.median(v) for label, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="B (S = 17 B sequences); repeat for several "
                        "(default: 1 and 4, the bench's CPU batches)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per case")
    parser.add_argument("--target", type=float, default=1.2, help="ratio to SDPA for the last column")
    parser.add_argument("--model", choices=[p.name for p in BC.PUBLISHED if p.heads],
                        help="one published model's shapes (default: every model with a TRA)")
    args = parser.parse_args(argv)
    batches = args.batch or [1, 4]
    env = environment(torch.device("cpu"))
    print(f"{env['date']}  {env['device']}  git {env['git_commit']}  env {env['env']}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu path {hk.cpu_isa()}, "
          f"ATen capability {torch.backends.cpu.get_cpu_capability()}, {args.rounds} rounds")
    print(f"{'case':<44} {'sdpa ms':>8} {'cpu ms':>8} {'cpu x':>6} {'GEMMs ms':>9} {'GFLOP/s':>8} "
          f"{'core GFLOP':>10} {'max x, free core':>16} {'max x, core at GEMM rate':>24} "
          f"{f'core GFLOP/s for {args.target}x':>22}")
    for pub in BC.PUBLISHED:
        if not pub.heads or (args.model and pub.name != args.model):
            continue
        for B in batches:
            S, L, M, C = BC.JOINTS * B, pub.N, pub.f, pub.C
            for backward in (False, True):
                fns, flop = candidates(pub, B, backward)
                t = medians(fns, args.rounds)
                core = (12 if backward else 4) * S * L * M * C
                rate = flop / t["gemm"]
                at_rate = t["gemm"] + core / rate
                room = t["sdpa"] / args.target - t["gemm"]
                need = f"{core / room / 1e9:.0f}" if room > 0 else "none: GEMMs alone too slow"
                case = f"{pub.name} B={B} {'forward+backward' if backward else 'forward'}"
                print(f"{case:<44} {t['sdpa'] * 1e3:8.2f} {t['cpu'] * 1e3:8.2f} {t['sdpa'] / t['cpu']:6.2f} "
                      f"{t['gemm'] * 1e3:9.2f} {rate / 1e9:8.0f} {core / 1e9:10.2f} {t['sdpa'] / t['gemm']:16.2f} "
                      f"{t['sdpa'] / at_rate:24.2f} {need:>22}", flush=True)


if __name__ == "__main__":
    main()
