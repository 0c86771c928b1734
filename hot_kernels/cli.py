"""``hot-kernels`` command line (also ``python -m hot_kernels``).

  hot-kernels info     versions, the backends this build has and which run on this machine,
                       compiler flags and CUDA archs of the extension
  hot-kernels check    correctness self-check: every op on every backend that runs here,
                       against the reference backend, on fresh random inputs
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import _dispatch, _ext
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
        rows += [
            ("hot_kernels._C", C.__file__),
            ("  built with", "cpu" + (", cuda" if C.with_cuda else "") + (", OpenMP" if C.with_openmp else "")),
            ("  C++ flags", C.cxx_flags or "-"),
            ("  nvcc flags", C.nvcc_flags or "-"),
            ("  CUDA archs", C.cuda_archs or "- (no CUDA in this build)"),
            ("  cpu ops", ", ".join(sorted(_ext.ops_for_device("cpu"))) or "-"),
            ("  cuda ops", ", ".join(sorted(_ext.ops_for_device("cuda"))) or "-"),
        ]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hot-kernels", description="hot_kernels: HoT token pruning and recovering kernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, backends, build flags")
    p_check = sub.add_parser("check", help="check every backend that runs here against the reference")
    p_check.add_argument("--device", action="append", help="cpu or cuda (default: every device present)")
    p_check.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return info()
    return check(args.device, args.seed)


if __name__ == "__main__":
    sys.exit(main())
