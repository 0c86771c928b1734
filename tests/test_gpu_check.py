"""scripts/gpu_check.sh (the first GPU run, prepared) works before a GPU comes.

* ``--dry-run`` runs the script's plumbing here: every stage is reported, the GPU stages as skipped
  ("no CUDA") with their plumbing exercised and passing, and the results folder fits what the
  device tool returns (at most 8 files, 2 folders deep, plain names), with summary.json holding
  device, versions and wall times.
* Without a GPU, the real run fails at once at the build, saying why, and skips the rest.
* HOT_KERNELS_REQUIRE_CUDA=1 makes setup.py refuse, at once and saying why, a build that would have
  no CUDA: a CPU torch, or nvcc's CUDA major differing from torch's.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = ["build", "smoke", "tests", "gpu_tests", "sanitize", "bench"]
NO_CUDA = not torch.cuda.is_available()


def run_check(args, out, timeout):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", SCRIPT, *args, "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    return proc, summary


def test_dry_run_exercises_every_stage_and_fits_the_device_tool(tmp_path):
    out = tmp_path / "gpu-check"
    proc, s = run_check(["--dry-run"], out, timeout=900)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "DRY RUN" in proc.stdout and "dry run:" in proc.stdout  # says what a dry run does
    assert s["dry_run"] is True and s["status"] == "passed", log
    assert [st["name"] for st in s["stages"]] == STAGES
    for st in s["stages"]:
        assert st["status"] == "skipped", st
        assert st["detail"] == ("no CUDA" if NO_CUDA else "dry run"), st
        assert st["dry_run"]["status"] == "passed", st
        assert (out / st["log"]).is_file(), st
    by = {st["name"]: st for st in s["stages"]}
    assert "passed, 0 failed" in by["smoke"]["dry_run"]["detail"]  # the smoke module ran (cpu backend)
    assert "collected" in by["gpu_tests"]["dry_run"]["detail"]
    if NO_CUDA and torch.version.cuda is None:
        assert "HOT_KERNELS_REQUIRE_CUDA=1 refuses this machine" in by["build"]["dry_run"]["detail"]
    for key in ("python", "torch", "triton", "numpy", "nvcc", "compute_sanitizer", "git_commit"):
        assert key in s["versions"], key
    assert s["device"]["cuda_available"] is (not NO_CUDA)
    assert s["wall_s"] > 0 and all(st["wall_s"] >= 0 for st in s["stages"])
    # What the device tool returns: at most 8 files, 2 folders deep, names of letters, digits, . _ -
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 2 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    assert {p.name for p in files} == set(s["files"]) and s["file_problems"] == []
    assert json.loads((out / "bench.json").read_text())["records"]
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG" or "matplotlib" in (out / "bench.log").read_text()


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device is present: the real run would start")
def test_real_run_without_a_gpu_fails_at_once_at_the_build(tmp_path):
    out = tmp_path / "res"
    proc, s = run_check([], out, timeout=300)
    assert proc.returncode == 1
    assert s["status"] == "failed" and s["dry_run"] is False
    build, *rest = s["stages"]
    assert build["name"] == "build" and build["status"] == "failed" and "use --dry-run" in build["detail"]
    assert [st["status"] for st in rest] == ["skipped"] * len(rest)
    assert all("the build failed" in st["detail"] for st in rest)


def _setup_py(tmp_path, torch_cuda, nvcc_release):
    """setup.py --version under HOT_KERNELS_REQUIRE_CUDA=1 with torch.version.cuda set to torch_cuda
    (this torch made to look like a CUDA build of that version, or a CPU build for None) and a
    stand-in nvcc (CUDA_HOME) reporting nvcc_release."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.1'\n")
    nvcc.chmod(0o755)
    code = ("import runpy, sys, torch, torch.utils.cpp_extension as ce\n"
            f"torch.version.cuda = {torch_cuda!r}\n"
            f"ce.CUDA_HOME = {str(home)!r}\n"  # what cpp_extension finds for a CUDA torch
            "sys.argv = ['setup.py', '--version']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    env = dict(os.environ, HOT_KERNELS_REQUIRE_CUDA="1")
    env.pop("HOT_KERNELS_NO_CUDA", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_require_cuda_refuses_a_cpu_torch(tmp_path):
    proc = _setup_py(tmp_path, None, "13.0")
    assert proc.returncode != 0
    assert "HOT_KERNELS_REQUIRE_CUDA=1 but the CUDA kernels would not be built" in proc.stderr
    assert "is a CPU build" in proc.stderr


def test_require_cuda_refuses_an_nvcc_of_another_cuda_major(tmp_path):
    proc = _setup_py(tmp_path, "13.0", "12.8")
    assert proc.returncode != 0
    assert "is CUDA 12.8 but torch" in proc.stderr and "built with CUDA 13.0" in proc.stderr
    assert "CUDA major versions must match" in proc.stderr
