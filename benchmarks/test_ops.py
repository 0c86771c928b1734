"""pytest-benchmark suite of the ops: every case of ``hot-kernels bench`` x every candidate.

One test per (case, candidate); ids read like ``dpc_knn-HoT-MixSTE-B64-N243-C512-f81-k2-float32-cpu``.
Timing goes through pytest-benchmark (``benchmark.pedantic``, one call per round) with the rounds
and warm-up of hot_kernels.benchmark's policy for the device; each round gets the next copy of
the inputs, and on CUDA the L2 is flushed and the device synchronised outside the timed call.
``extra_info`` holds the case's parameters, the check's verdict and the FLOP / byte models.
"""
from __future__ import annotations

import itertools
import time

import pytest
import torch

from hot_kernels import bench_cases as BC
from hot_kernels import benchmark as H
from hot_kernels.cli import _comma_list, _sweep_arg


def _cases(config) -> list[BC.Case]:
    device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = config.getoption("--bench-dtype")
    dtypes = _comma_list("dtype", BC.DTYPE_ALIASES, "float32, bfloat16, float16")(dtypes) if dtypes else None
    sweeps = config.getoption("--bench-sweep")
    if sweeps:
        return BC.sweep_cases(device.type, dict(_sweep_arg(s) for s in sweeps), BC.OPS, dtypes)
    return BC.default_cases(device.type, BC.OPS, dtypes, config.getoption("--bench-quick"))


def _case_id(case: BC.Case) -> str:
    p = case.p
    keys = [k for k in ("B", "S", "N", "L", "M", "J", "C", "f", "k", "heads", "center") if p.get(k) is not None]
    mode = [case.mode.replace("+", "_")] if case.op == "token_recovering_attention" else []
    return "-".join([case.op, case.model] + mode + [f"{k}{p[k]}" for k in keys] + [case.dtype])


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        params = [pytest.param(c, b, id=f"{_case_id(c)}-{b.replace('torch.compile(reference)', 'compile')}")
                  for c in _cases(metafunc.config)
                  for b in BC.BASELINES + BC.HOT_BACKENDS
                  if not (b == "sdpa" and c.op != "token_recovering_attention")]
        metafunc.parametrize(("case", "backend"), params)


def test_op(benchmark, case, backend, bench_device):
    cand, inputs, verdict = H.prepare_candidate(case, bench_device, backend)  # raises if the check fails
    if cand.fn is None:
        pytest.skip(cand.skip)
    policy = H.policy_for(bench_device.type)
    copies = itertools.cycle(inputs.copies)
    cuda = bench_device.type == "cuda"

    def setup():
        if cuda:
            H._flush_buffer(bench_device).zero_()
            torch.cuda.synchronize(bench_device)
        return (next(copies),), {}

    def call(args):
        out = cand.fn(args)
        if cuda:
            torch.cuda.synchronize(bench_device)
        return out

    t0 = time.perf_counter()
    call(inputs.args)
    per_call = time.perf_counter() - t0
    rounds = int(min(policy.max_repeat, max(policy.min_repeat, policy.budget_s / max(per_call, 1e-7))))
    benchmark.extra_info.update(op=case.op, model=case.model, mode=case.mode, dtype=case.dtype,
                                device=str(bench_device), check=verdict, flop=BC.flop_model(case),
                                bytes=BC.byte_model(case), **{f"param_{k}": v for k, v in case.p.items()})
    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=policy.warmup, iterations=1)
