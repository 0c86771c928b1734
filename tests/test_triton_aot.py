"""Every Triton kernel compiles for sm_90 and sm_80, here, without a GPU (issue 14 item 2).

scripts/triton_aot_compile.py calls the real launch wrappers with CPU tensors for those GPUs
(hot_kernels/triton/_target.py), records the launches and compiles each distinct one with
Triton's ahead-of-time compiler and the ptxas the triton wheel ships. It fails on a compile
error, shared memory above the arch's per-block limit, a wrapper that raises, or a kernel no
launch reached. Run in a subprocess: the test session interprets Triton (TRITON_INTERPRET=1),
and the wrappers pick different paths there.

Default: the ``ci`` set (default HoT configurations, every kernel at least once per arch; ~40 s
on 2 cores). ``HOT_KERNELS_AOT_FULL=1`` runs the ``full`` set instead (k up to 32, every dtype,
pooled and plain, masks, TRA head dims 32/64/128; ~1 h on 2 cores), the sweep recorded in
benchmarks/results/triton-aot/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "triton_aot_compile.py"
FULL = os.environ.get("HOT_KERNELS_AOT_FULL", "0") not in ("", "0")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HOT_KERNELS_POISON")}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")  # compile for real, not from an old cache
    cmd = [sys.executable, str(SCRIPT), "--set", "full" if FULL else "ci", "--arch", "90,80", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200 if FULL else 900)
    assert out.exists(), f"no report from {' '.join(cmd)} (exit {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    rep = json.loads(out.read_text())
    rep["returncode"], rep["stdout"] = p.returncode, p.stdout
    return rep


def test_no_compile_error_wrapper_error_or_shared_memory_overflow(report):
    assert report["errors"] == [], "\n".join(report["errors"][:30])
    assert report["returncode"] == 0, report["stdout"][-4000:]
    failed = [r for r in report["results"] if not r["ok"]]
    assert not failed, failed[:3]


def test_every_kernel_compiled_for_both_archs(report):
    import hot_kernels.triton.tpc_kernels as tk
    import hot_kernels.triton.tra_kernels as rk

    kernels = {name for mod in (tk, rk) for name in vars(mod) if name.endswith("_kernel")}
    assert len(kernels) >= 10
    for arch in ("sm_90", "sm_80"):
        done = {r["kernel"] for r in report["results"] if r["arch"] == arch and r["ok"]}
        assert kernels <= done, f"{arch}: not compiled: {sorted(kernels - done)}"


def test_resources_recorded(report):
    # every record carries the ptxas counts and Triton's shared memory, within the arch's limits
    limits = {"sm_90": 232448, "sm_80": 166912}
    for r in report["results"]:
        assert r["regs"] is not None and 16 <= r["regs"] <= 255, r
        assert r["spill_st"] is not None and r["spill_ld"] is not None, r
        assert 0 <= r["shared"] <= limits[r["arch"]], r
        assert r["ctas_per_sm"] >= 1, r


def test_no_spills_on_the_default_hot_paths_on_sm90(report):
    # issue 15 item 3: the default HoT configurations (DESIGN shapes, k = 2, no mask) on an H100/H200
    hot = [r for r in report["results"] if r["arch"] == "sm_90" and r["hot"]]
    assert hot, "no default HoT configuration in the report"
    spills = [(r["kernel"], r["spill_st"], r["spill_ld"], r["examples"][0]) for r in hot
              if r["spill_st"] or r["spill_ld"]]
    assert not spills, spills
