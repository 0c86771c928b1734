"""pytest-benchmark suite of the whole models (benchmarks/bench_model.py): forward and train step
of HourglassMixSTE, HourglassMotionBERT and HourglassH2OT (published sizes) with and without hot_kernels.

Batch sizes: ``--bench-model-batch`` (default 1 on cpu; 1,64 on cuda). The two paths are checked
against each other first (kept frames equal or near-ties only; outputs equal where they agree).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model as BM  # noqa: E402


def pytest_generate_tests(metafunc):
    if "model_case" in metafunc.fixturenames:
        cfg = metafunc.config
        device = cfg.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        batches = cfg.getoption("--bench-model-batch") or ("1,64" if device.startswith("cuda") else "1")
        params = [pytest.param((m, int(b), path, what), id=f"{m}-B{b}-{path}-{what}")
                  for m in BM.MODELS for b in batches.split(",")
                  for path in ("hot_kernels", "reference") for what in ("forward", "train_step")]
        metafunc.parametrize("model_case", params)


_BUILT: dict = {}


def _models(name, device):
    if name not in _BUILT:
        _BUILT.clear()  # one model pair in memory at a time
        _BUILT[name] = BM.build(name, small=False, device=device)
    return _BUILT[name]


def test_model(benchmark, model_case, bench_device):
    name, B, path, what = model_case
    models, in_dim, _ = _models(name, bench_device)
    model = models[path == "hot_kernels"]
    g = torch.Generator(device=bench_device).manual_seed(0)
    poses = torch.randn(B, model.frames, model.joints, in_dim, generator=g, device=bench_device)
    target = torch.randn(B, model.frames, model.joints, 3, generator=g, device=bench_device)
    verdict, _ = BM.check_paths(models, poses)  # raises if the paths disagree beyond near-ties
    cuda = bench_device.type == "cuda"

    def forward():
        with torch.no_grad():
            out = model(poses)
        if cuda:
            torch.cuda.synchronize()
        return out

    def train_step():
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(poses), target).backward()
        if cuda:
            torch.cuda.synchronize()

    benchmark.extra_info.update(model=type(model).__name__, B=B, path=path, check=verdict)
    fn = forward if what == "forward" else train_step
    benchmark.pedantic(fn, rounds=20 if cuda else 3, warmup_rounds=2 if cuda else 1, iterations=1)
