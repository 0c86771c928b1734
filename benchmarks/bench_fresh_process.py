"""Times each candidate of one bench case the way a user's script calls it: in a fresh process, the
same call back to back, with glibc's malloc as the process has it (``hot-kernels bench`` keeps
freed memory; see hot_kernels.benchmark.keep_freed_host_memory). Prints the median per call and
the minor page faults per call, one line per process.

Why: glibc hands large freed blocks back to the system, or keeps them, depending on what the
process freed before. Where it hands them back, every 4 KB page of a fresh temporary costs a page
fault when first written, and a call's time can double from one process to the next with the same
code. Several processes show both states.

    python benchmarks/bench_fresh_process.py                                   # TRA forward, HoT-MotionBERT, B = 1
    python benchmarks/bench_fresh_process.py --op tra --mode forward+backward --model HoT-MotionAGFormer
    python benchmarks/bench_fresh_process.py --op dpc --batch 64 --backends reference,cpu --processes 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, resource, statistics, sys, time, torch
from hot_kernels import bench_cases as BC
op, model, mode, B, label, calls = sys.argv[1:7]
case = [c for c in BC.sweep_cases("cpu", {"B": [int(B)]}, ops=(op,), dtypes=("float32",), model=model)
        if c.model == model and c.mode == mode][0]
inputs = BC.make_inputs(case, torch.device("cpu"))
cand = {c.label: c for c in BC.candidates(case, torch.device("cpu"), inputs, backends=[label])}[label]
if cand.fn is None:
    print(json.dumps({"skip": cand.skip}))
    sys.exit(0)
for _ in range(3):
    cand.fn(inputs.args)
times = []
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(calls)):
    t = time.perf_counter()
    cand.fn(inputs.args)
    times.append(time.perf_counter() - t)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / int(calls)
print(json.dumps({"ms": statistics.median(times) * 1e3, "faults": faults}))
"""

OPS = {"dpc": "dpc_knn", "tpc": "token_pruning_cluster", "tra": "token_recovering_attention"}


def run_one(op: str, model: str, mode: str, batch: int, label: str, calls: int) -> dict:
    """One fresh process: the candidate's median ms and page faults per call (or why it was skipped)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, op, model, mode, str(batch), label, str(calls)],
                         capture_output=True, text=True, env=dict(os.environ), timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{label}: the child process failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=sorted(OPS), default="tra")
    parser.add_argument("--mode", choices=("forward", "forward+backward"), default="forward",
                        help="forward+backward: TRA only")
    parser.add_argument("--model", default="HoT-MotionBERT")
    parser.add_argument("--batch", type=int, default=1, help="B (TRA: S = 17 B sequences)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated candidate labels (default: TRA sdpa,cpu; else the two "
                             "baselines and cpu)")
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per candidate")
    parser.add_argument("--calls", type=int, default=60, help="timed calls per process")
    args = parser.parse_args(argv)
    op = OPS[args.op]
    if args.mode != "forward" and op != "token_recovering_attention":
        parser.error("--mode forward+backward: TRA only")
    default = "sdpa,cpu" if op == "token_recovering_attention" else "reference,torch.compile(reference),cpu"
    labels = (args.backends or default).split(",")
    print(f"{op} {args.model} {args.mode} B={args.batch}: {args.processes} fresh processes per candidate, "
          f"{args.calls} calls back to back each; median ms per call and minor page faults per call")
    for p in range(args.processes):  # candidates alternate, so a drifting machine hits them alike
        row = []
        for label in labels:
            r = run_one(op, args.model, args.mode, args.batch, label, args.calls)
            row.append(f"{label} skipped: {r['skip']}" if "skip" in r else
                       f"{label} {r['ms']:8.3f} ms {r['faults']:7.0f} faults")
        print(f"process {p + 1}: " + " | ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
