"""The one timing harness (used by benchmarks/ scripts and, later, ``hot-kernels bench``).

Timing: warm-up calls, then many repeats; reports median, min and max in milliseconds. On CUDA
each repeat is timed with CUDA events around the call (after a synchronize); on CPU with
time.perf_counter. Speed is only ever reported as ratios measured side by side in one run.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


def time_fn(fn, *, warmup: int = 3, repeat: int = 20, device: torch.device | str = "cpu") -> Timing:
    """Median/min/max wall time of ``fn()`` in ms after ``warmup`` untimed calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), repeat)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict:
    """Device name, versions, commit and date: stored with every benchmark record."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .version import __version__

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "hot_kernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Record:
    op: str
    backend: str
    shape: dict
    dtype: str
    timing: Timing
    ratio_vs_reference: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def write_results(out_dir: str, name: str, env: dict, records: list[Record], suffix: str = "") -> str:
    """Record a run: ``out_dir/name.json`` (environment + one dict per record) and
    ``out_dir/command{suffix}.txt`` (the command line that made it). Returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as fh:
        json.dump({"environment": env, "records": [r.as_dict() for r in records]}, fh, indent=1)
    with open(os.path.join(out_dir, f"command{suffix}.txt"), "w") as fh:
        fh.write("python " + " ".join(sys.argv) + "\n")
    print(f"wrote {path}")
    return path
