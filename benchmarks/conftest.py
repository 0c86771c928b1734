"""pytest-benchmark suites over the cases of ``hot-kernels bench`` (hot_kernels/bench_cases.py).

    pytest benchmarks/ --benchmark-only                              # the default cases, best device
    pytest benchmarks/ --benchmark-only --bench-quick                # HoT-MixSTE shapes only
    pytest benchmarks/ --benchmark-only --benchmark-autosave         # store a run in .benchmarks/
    pytest benchmarks/ --benchmark-only --benchmark-compare          # ... and compare with the last one
    pytest benchmarks/ --benchmark-only --bench-sweep N=243,1024 -k dpc_knn

CI does not run these (the test suite's testpaths is tests/). Cases, inputs, checks and the time
budget are those of ``hot-kernels bench``: every timed output is checked against the reference
first (a wrong output fails the test), a candidate that cannot run here is skipped with its
reason.
"""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    g = parser.getgroup("hot_kernels bench")
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    g.addoption("--bench-quick", action="store_true", help="HoT-MixSTE shapes only (hot-kernels bench --quick)")
    g.addoption("--bench-dtype", default=None, help="comma list of float32, bfloat16, float16")
    g.addoption("--bench-sweep", action="append", default=None, metavar="NAME=V1,V2",
                help="sweep N, B or C instead of the default cases (as hot-kernels bench --sweep)")
    g.addoption("--bench-model-batch", default=None,
                help="comma list of batch sizes of the whole-model benchmark (default: 1,2 on cpu, 1,64 on cuda)")


def pytest_configure(config):
    from hot_kernels.benchmark import keep_freed_host_memory

    keep_freed_host_memory()  # as hot-kernels bench does: no call's time depends on fresh-page faults


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    return torch.device(request.config.getoption("--bench-device")
                        or ("cuda" if torch.cuda.is_available() else "cpu"))
