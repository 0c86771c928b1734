"""``hot-kernels`` command line (also ``python -m hot_kernels``).

  hot-kernels info     versions, which hot_kernels._C is loaded and for which torch, the backends
                       and why any is missing, compiler flags and CUDA archs of the extension
  hot-kernels build    compile hot_kernels._C for the running torch now (else: on first use)
  hot-kernels check    correctness self-check: every op on every backend that runs here,
                       against the reference backend, on fresh random inputs
  hot-kernels bench    microbenchmarks: the published HoT shapes (or a sweep), every backend
                       that runs here against the baselines, each output checked first;
                       writes DIR/bench.json, DIR/bench.png, DIR/command.txt
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from . import _build, _dispatch, _ext
from .version import __version__


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def _devices() -> list[torch.device]:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs.append(torch.device("cuda"))
    return devs


def info() -> int:
    rows = [
        ("hot_kernels", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", _triton_version()),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("CPU threads", str(torch.get_num_threads())),
    ]
    C = _ext.C
    if C is None:
        rows.append(("hot_kernels._C", f"not available: {_ext.ERROR}"))
    else:
        stamp = _build.read_stamp(_ext.PATH) or {}
        origin = {"installed": "installed with the package", "cache": "built earlier for this torch (cache)",
                  "built": "built now"}[_ext.ORIGIN]
        rows += [
            ("hot_kernels._C", _ext.PATH),
            ("  built for", f"torch {stamp.get('torch', '?')}, {stamp.get('python', '?')}, by "
                            f"{stamp.get('built_by', '?')} ({origin})"),
        ]
        if _ext.INSTALLED_PROBLEM and _ext.ORIGIN != "installed":
            rows.append(("  installed _C", f"not used: {_ext.INSTALLED_PROBLEM}"))
        rows += [
            ("  built with", "cpu" + (", cuda" if C.with_cuda else "") + (", OpenMP" if C.with_openmp else "")),
            ("  C++ flags", C.cxx_flags or "-"),
            ("  nvcc flags", C.nvcc_flags or "-"),
            ("  CUDA archs", C.cuda_archs or "- (no CUDA in this build)"),
            ("  cpu ops", ", ".join(sorted(_ext.ops_for_device("cpu"))) or "-"),
            ("  cuda ops", ", ".join(sorted(_ext.ops_for_device("cuda"))) or "-"),
        ]
    rows.append(("build cache", f"{_ext.cache_root()} (${_ext.CACHE_ENV}); first-use build "
                                f"{'on' if _ext.jit_enabled() else f'off ({_ext.JIT_ENV}=0)'}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print()
    print("backends (op dpc_knn, float32):")
    for dev in _devices():
        for name, why in _dispatch.available_backends(dev).items():
            state = "runs" if why is None else f"no: {why}"
            print(f"  {dev.type:<5} {name:<10} {state}")
    return 0


def build(force: bool = False) -> int:
    """Compile hot_kernels._C for the running torch now (what the cpu backend would do on first use)."""
    if _ext.C is not None and not force:
        print(f"hot_kernels._C for torch {torch.__version__} is already there ({_ext.ORIGIN}): {_ext.PATH}\n"
              "nothing to do (--force compiles it again, into the cache)")
        return 0
    try:
        _ext.build(force=force)
    except Exception as e:  # noqa: BLE001 - the reason, not a traceback
        print(f"hot-kernels build: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"built {_ext.PATH} for torch {torch.__version__}")
    return 0


def check(devices: list[str] | None = None, seed: int = 0) -> int:
    from . import selfcheck

    counts = {"ok": 0, "skip": 0, "FAIL": 0}
    for dev in [torch.device(d) for d in devices] if devices else _devices():
        # The backends that can run on this kind of device (reference is the yardstick).
        for backend in ("cpu", "triton") if dev.type == "cpu" else ("cuda", "triton"):
            for op, outcome in selfcheck.run(backend, dev, seed):
                mark = "ok" if outcome is None else ("skip" if outcome.startswith("skip") else "FAIL")
                counts[mark] += 1
                detail = "" if outcome is None else f"  {outcome}"
                print(f"{mark:<4} {dev.type:<5} {backend:<7} {op}{detail}")
    print(f"\n{counts['ok']} passed, {counts['FAIL']} failed, {counts['skip']} skipped "
          "(each against the reference backend)")
    return 1 if counts["FAIL"] else 0


# ------------------------------------------------------------------------------------------------
# hot-kernels bench
# ------------------------------------------------------------------------------------------------


def _comma_list(kind: str, aliases: dict, allowed: str):
    def parse(text: str) -> list[str]:
        out = []
        for item in (t.strip() for t in text.split(",")):
            if item not in aliases:
                raise argparse.ArgumentTypeError(f"unknown {kind} {item!r}; expected a comma list of {allowed}")
            if aliases[item] not in out:
                out.append(aliases[item])
        return out
    return parse


def _sweep_arg(text: str) -> tuple[str, list[int]]:
    from . import bench_cases as BC

    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or name not in BC.SWEEP_PARAMS:
        raise argparse.ArgumentTypeError(
            f"expected NAME=V1,V2,... with NAME one of {', '.join(BC.SWEEP_PARAMS)} "
            f"(e.g. N=243,1024,4096,16384), got {text!r}")
    try:
        vals = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{name}: the values must be positive integers, e.g. "
                                         f"{name}=243,1024; got {values!r}")
    return name, vals


def _device_arg(text: str) -> str:
    if text.split(":")[0] not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda (cuda:N), got {text!r}")
    return text


def _add_bench_parser(sub) -> argparse.ArgumentParser:
    from . import bench_cases as BC
    from . import benchmark as H

    p = sub.add_parser(
        "bench", help="microbenchmarks against the baselines (writes bench.json and bench.png)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time dpc_knn, token_pruning_cluster and token recovering attention (forward and "
                    "forward+backward) at the published HoT shapes on every backend that runs here, against "
                    "the baselines: reference (the published eager path), torch.compile(reference), and for "
                    "TRA an SDPA version. Every output is checked against the reference before it is timed.",
        epilog="examples:\n"
               "  hot-kernels bench                               the published shapes, best device\n"
               "  hot-kernels bench --quick                       HoT-MixSTE only (under a minute on a CPU)\n"
               "  hot-kernels bench --ops dpc --sweep N=243,1024,4096 --out bench-out/sweep-N\n"
               "  hot-kernels bench --ops tra --dtype bf16 --backends triton,cuda\n"
               "  hot-kernels bench --list                        show the cases, run nothing")
    p.add_argument("--ops", type=_comma_list("op", BC.OP_ALIASES, "dpc_knn (dpc), token_pruning_cluster (tpc), "
                                             "token_recovering_attention (tra), token_recovering_interpolation "
                                             "(interp), merge_tokens (merge)"),
                   help="comma list (default: the first three): dpc_knn|dpc, token_pruning_cluster|tpc, "
                        "token_recovering_attention|tra, token_recovering_interpolation|interp, merge_tokens|merge")
    p.add_argument("--device", type=_device_arg, help="cpu or cuda (default: cuda when present, else cpu)")
    p.add_argument("--dtype", type=_comma_list("dtype", BC.DTYPE_ALIASES, "float32, bfloat16, float16"),
                   help="comma list of float32|fp32, bfloat16|bf16, float16|fp16 (default: float32 on cpu; "
                        "float32,bfloat16 for the selections and bfloat16 for TRA on cuda)")
    p.add_argument("--backends", type=_comma_list("backend", BC.BACKEND_ALIASES,
                                                  "reference, torch.compile, sdpa, cpu, cuda, triton"),
                   help="comma list of the candidates to run (default: all): reference, torch.compile "
                        "(compile), sdpa, cpu, cuda, triton; reference always runs (ratios and checks need it)")
    p.add_argument("--quick", action="store_true",
                   help="HoT-MixSTE shapes only and a shorter time budget (under a minute on a 2-core CPU)")
    p.add_argument("--targets", action="store_true",
                   help="also the cases that DESIGN.md's targets for the device measure (with --quick: the long "
                        "clips N = 16384 on a GPU)")
    p.add_argument("--sweep", type=_sweep_arg, action="append", metavar="NAME=V1,V2,...",
                   help="scaling curve over N (frames; f and TRA's M scale with it), B or C, at --model's "
                        "other shapes (B = 1 unless swept); repeat to sweep several (their product)")
    p.add_argument("--model", default="HoT-MixSTE", choices=[m.name for m in BC.PUBLISHED],
                   help="the published shapes a sweep starts from (default HoT-MixSTE)")
    p.add_argument("--out", default="bench-out", metavar="DIR",
                   help="folder for bench.json, bench.png and command.txt (default: ./bench-out)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="timed seconds per candidate and case (default 0.6 on cpu, 0.15 with --quick; 0.2 on cuda)")
    p.add_argument("--repeat", type=int, help="a fixed number of timed calls instead of a time budget")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host-allocator", choices=H.HOST_ALLOCATOR_CHOICES, default="kept", help=H.HOST_ALLOCATOR_HELP)
    p.add_argument("--triton-knobs", action="store_true",
                   help="also time the triton TRA kernels' tuning variants (hot_kernels/triton/tra.py knobs)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--replot", metavar="DIR",
                   help="only redraw DIR/bench.png from DIR/bench.json (e.g. from a run on a machine without "
                        "matplotlib) and print its table")
    return p


def _replot(directory: str) -> int:
    from . import benchmark as H

    doc, records = H.load_records(os.path.join(directory, "bench.json"))
    env = doc["environment"]
    for recs in H._by_case(records).values():
        print(H.format_case(recs) + "\n")
    print("Summary (fastest hot_kernels backend per case):")
    print(H.format_summary(records))
    png = os.path.join(directory, "bench.png")
    why = H.plot(records, png, title=f"hot-kernels bench on {env['device']} ({env['device_type']}), torch "
                                     f"{env['torch']}, {env['date'][:10]}", sweep=bool(doc["settings"].get("sweep")))
    print(f"\nwrote {png}" if why is None else f"\nbench.png NOT written: {why}")
    return 0 if why is None else 1


def bench(args, parser: argparse.ArgumentParser) -> int:
    from . import bench_cases as BC
    from . import benchmark as H

    if args.replot:
        return _replot(args.replot)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available() and not args.list:
        parser.error("--device cuda: this torch sees no CUDA device "
                     f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none: a CPU build'})")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    ops = args.ops or list(BC.OPS)
    sweeps = dict(args.sweep or [])
    if sweeps:
        for op, why in BC.unsupported_ops(args.model).items():
            if op in ops:
                print(f"note: no {op} cases: {why}")
        heads = next(p.heads for p in BC.PUBLISHED if p.name == args.model)
        if heads and "token_recovering_attention" in ops and any(c % heads for c in sweeps.get("C", [])):
            parser.error(f"--sweep C: TRA needs C divisible by {args.model}'s {heads} heads, got {sweeps['C']}")
        cases = BC.sweep_cases(device.type, sweeps, ops, args.dtype, args.model)
    else:
        cases = BC.default_cases(device.type, ops, args.dtype, args.quick)
    if args.targets:
        cases += [c for c in BC.target_cases(device.type, ops, args.dtype) if c not in cases]
    if args.list:
        for c in cases:
            print(c.title())
        print(f"{len(cases)} cases")
        return 0
    policy = H.policy_for(device.type, args.quick, args.budget, args.repeat)
    allocator = H.host_allocator(args.host_allocator)
    env = H.environment(device)
    clock = "CUDA events, L2 flushed before each call" if device.type == "cuda" else "time.perf_counter per call"
    print(f"hot-kernels bench: {len(cases)} cases on {env['device']} ({device.type}, {env['cpu_threads']} CPU threads); "
          f"hot_kernels {env['hot_kernels']} @ {env['git_commit']}, torch {env['torch']}, triton {env['triton']}, "
          f"{env['date']}")
    print(f"timing: {policy.describe()}; {clock}; inputs rotated over copies. Every output is checked against "
          "the reference before it is timed (selections tie-aware, TRA against float64). Ratios: reference "
          "time / candidate time (> 1: faster).\n")
    progress = H.Progress(len(cases), enabled=True if sys.stderr.isatty() else (bool(sweeps) and len(cases) > 8))
    t0 = time.perf_counter()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    records = []

    def on_case(recs):
        records.extend(recs)
        print(H.format_case(recs) + "\n", flush=True)

    notes, interrupted = [], False
    try:
        H.run_cases(cases, device, backends=args.backends, policy=policy, seed=args.seed,
                    triton_knobs=args.triton_knobs, progress=progress, on_case=on_case)
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: keep and write the cases done so far
        interrupted, done = True, len(H._by_case(records))
        notes.append(f"interrupted after {done} of {len(cases)} cases: the rest were not run")
        print(f"\ninterrupted after {done} of {len(cases)} cases", file=sys.stderr)
        if not records:
            return 130
    wall = time.perf_counter() - t0
    print("Summary (fastest hot_kernels backend per case):")
    print(H.format_summary(records))
    targets = H.evaluate_targets(records, device.type)
    if targets:
        print("\nDESIGN.md targets measured in this run:")
        for t in targets:
            state = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
            ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x ({t['backend']})"
            print(f"  {t['target']:<70} {ratio:<22} {state}")
    if device.type == "cpu" and not sweeps and "token_recovering_attention" in ops:
        notes.append("CPU: TRA runs at B = 1 and 4 (S = 17, 68), not the published B = 64 (S = 1088): "
                     "seconds per call on a CPU.")
    settings = {"timing": policy.describe(), "clock": clock, "peak memory": H.PEAK_METHOD[device.type],
                "cases": len(cases), "seed": args.seed, "sweep": sweeps or None,
                "host allocator": allocator or "as is (not glibc)"}
    if hasattr(os, "getloadavg"):  # on a shared machine, other jobs make CPU times noisy: say how busy it was
        settings["load average"] = (f"{load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
                                    f"(1-minute, {os.cpu_count()} CPUs)")
    path = H.write_results(args.out, records, env, command=args.command, settings=settings, targets=targets,
                           notes=notes, wall_s=wall)
    png = os.path.join(args.out, "bench.png")
    why = H.plot(records, png, title=f"hot-kernels bench on {env['device']} ({device.type}), torch {env['torch']}, "
                                     f"{env['date'][:10]}", sweep=bool(sweeps))
    failed = [r for r in records if r.status == "failed"]
    skipped = sum(r.status == "skipped" for r in records)
    print(f"\n{len(records)} records: {sum(r.status == 'ok' for r in records)} checked and timed, {skipped} skipped "
          f"(reasons above), {len(failed)} failed; {wall:.0f} s")
    print(f"wrote {path}")
    print(f"wrote {os.path.join(args.out, 'command.txt')}")
    print(f"wrote {png}" if why is None else f"bench.png NOT written: {why}")
    for r in failed:
        print(f"FAILED {r.backend} on {r.op} {r.params}: {r.reason}", file=sys.stderr)
    # A baseline that fails (torch.compile without a compiler, say) is reported, not fatal; a
    # hot_kernels backend that fails its check or raises is. An interrupted run exits 130.
    if any(r.kind != "baseline" for r in failed):
        return 1
    return 130 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hot-kernels", description="hot_kernels: HoT token pruning and recovering kernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, which hot_kernels._C is loaded (for which torch), backends, build flags")
    p_build = sub.add_parser("build", help="compile hot_kernels._C for the running torch now (else: on first use)")
    p_build.add_argument("--force", action="store_true", help="compile even if a _C for this torch exists")
    p_check = sub.add_parser("check", help="check every backend that runs here against the reference")
    p_check.add_argument("--device", action="append", help="cpu or cuda (default: every device present)")
    p_check.add_argument("--seed", type=int, default=0)
    p_bench = _add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return info()
    if args.cmd == "build":
        return build(args.force)
    if args.cmd == "bench":
        from .benchmark import command_line

        # The command recorded with the results: as typed, or as called (cli.main([...]) from Python).
        args.command = command_line() if argv is None else command_line(["hot-kernels"] + list(argv))
        return bench(args, p_bench)
    return check(args.device, args.seed)


if __name__ == "__main__":
    sys.exit(main())
