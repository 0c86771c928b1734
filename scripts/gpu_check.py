"""The first GPU run, prepared (issue 14): scripts/gpu_check.sh runs this. See that file for usage.

Stages, in priority order, each under its own time limit inside one overall budget (default 470 s,
so the whole fits 8 minutes), later stages keeping a minimum share of it:

  build      pip install --no-build-isolation --no-deps -e . with the CUDA kernels for this GPU's
             arch only (sm_90 on an H200), MAX_JOBS=16, HOT_KERNELS_REQUIRE_CUDA=1: fails at once if
             CUDA would not be compiled in (no nvcc, a CPU torch, nvcc and torch CUDA majors differ),
             then checks that hot_kernels._C has its cuda ops. Every later stage needs it.
  smoke      scripts/gpu_smoke.py: every op once per GPU backend and dtype against the reference;
             the distance engine alone against float64 (default engine and HOT_KERNELS_CUDA_GRAM=fma).
  tests      pytest tests/ -m "not large" -k "cuda-cuda or triton-cuda" (the CUDA targets of
             tests/targets.py in test_backends, test_robustness, test_fuzz).
  gpu_tests  pytest tests/ -m gpu (tests/test_gpu.py and the models' CUDA tests).
  sanitize   tests/gpu/sanitize.sh with FOCUSED=1: compute-sanitizer memcheck, racecheck and
             synccheck over scripts/gpu_smoke.py --focused.
  bench      hot-kernels bench --quick --targets (HoT-MixSTE shapes plus DESIGN.md's target cases);
             cut off at its limit it still writes the cases done.

Results: one folder of at most 8 files (the device tool returns no more): summary.json (rewritten
after every stage: per stage passed/failed/skipped with the reason, limit and wall time; device,
versions, total wall time; the smoke checks), build.log, smoke.log, tests.log, sanitize.log,
bench.log, bench.json, bench.png.

--dry-run (any machine, seconds to a minute): the GPU stages are reported "skipped: no CUDA" (or
"skipped: dry run" on a GPU machine) and their plumbing is exercised instead: the build is not
redone where hot_kernels._C exists (and the HOT_KERNELS_REQUIRE_CUDA=1 refusal is checked where
torch has no CUDA); the smoke module runs on the cpu backend; the test selections are collected;
the sanitizer commands are printed; a one-repeat CPU bench writes bench.json/png; the GPU bench's
case list is printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MAX_FILES, MAX_DEPTH = 8, 2  # what the device tool returns from $OUT
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
TEST_K = "cuda-cuda or triton-cuda"


class Stage:
    def __init__(self, name, limit, reserve, log, what):
        self.name, self.limit, self.reserve, self.log, self.what = name, limit, reserve, log, what


# limit: the most this stage may take; reserve: the least kept for it while earlier stages run.
STAGES = [
    Stage("build", 240, 0, "build.log", "build hot_kernels._C with CUDA for this GPU's arch"),
    Stage("smoke", 100, 30, "smoke.log", "every op x GPU backend x dtype vs the reference; distance engine vs float64"),
    Stage("tests", 130, 45, "tests.log", f'pytest tests/ -m "not large" -k "{TEST_K}"'),
    Stage("gpu_tests", 70, 30, "tests.log", "pytest tests/ -m gpu"),
    Stage("sanitize", 100, 45, "sanitize.log", "compute-sanitizer memcheck/racecheck/synccheck, focused subset"),
    Stage("bench", 160, 60, "bench.log", "hot-kernels bench --quick --targets"),
]


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(cmd, log_path, limit, env=None, header=None):
    """Run cmd (a list) with stdout+stderr appended to log_path, in its own process group. At the
    limit: SIGINT (pytest and hot-kernels bench then write what they have), SIGTERM 15 s later,
    SIGKILL 5 s after that. Returns (exit status or 'timeout', seconds)."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n==== {header or ''} [{now_iso()}, limit {limit:.0f} s]\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            rc = "timeout"
            for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        dt = time.time() - t0
        log.write(f"==== exit {rc} after {dt:.1f} s\n")
    return rc, dt


def capture(cmd, env=None, timeout=60):
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def pytest_outcome(path, start=0):
    """The last pytest summary line of a log after byte `start` ('3 passed, 1 failed in 2.0s'), or ''."""
    with open(path, errors="replace") as f:
        f.seek(start)
        lines = [ln.strip().strip("=").strip() for ln in f]
    hits = [ln for ln in lines if re.search(r"\d+ (passed|failed|skipped|deselected|error|selected)", ln)
            or "no tests ran" in ln]
    return hits[-1] if hits else ""


# ---- environment ---------------------------------------------------------------------------------


def environment():
    import torch
    env = dict(python=sys.version.split()[0], torch=torch.__version__, torch_cuda=torch.version.cuda)
    for mod in ("triton", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"not importable ({type(e).__name__})"
    from torch.utils import cpp_extension as ce
    nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else shutil.which("nvcc")
    rc, out = capture([nvcc, "--version"]) if nvcc else (None, "")
    m = re.search(r"release ([\d.]+)", out or "")
    env["nvcc"] = f"{m.group(1)} ({nvcc})" if m else "not found"
    san = shutil.which("compute-sanitizer") or (os.path.join(ce.CUDA_HOME, "bin", "compute-sanitizer")
                                                if ce.CUDA_HOME else None)
    rc, out = capture([san, "--version"]) if san and os.path.exists(san) else (None, "")
    m = re.search(r"Version ([\w.]+)", out or "")
    env["compute_sanitizer"] = m.group(1) if m else "not found"
    rc, out = capture(["git", "rev-parse", "--short", "HEAD"])
    env["git_commit"] = out if rc == 0 else "unknown (no git checkout)"
    rc, out = capture(["git", "status", "--porcelain"])
    env["git_dirty"] = bool(out) if rc == 0 else None
    dev = dict(cuda_available=torch.cuda.is_available())
    if dev["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        dev.update(name=p.name, capability=f"{p.major}.{p.minor}", count=torch.cuda.device_count(),
                   memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count)
        rc, out = capture(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = out.splitlines()[0] if rc == 0 and out else "unknown"
    else:
        dev["name"] = "no CUDA device"
    dev["cpu_count"] = os.cpu_count()
    return env, dev


# ---- the run -------------------------------------------------------------------------------------


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        for name in {s.log for s in STAGES} | {"summary.json", "bench.json", "bench.png"}:  # no stale results
            if os.path.isfile(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))
        self.tmp = tempfile.mkdtemp(prefix="gpu_check_")
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.results = []
        self.summary = dict(tool="scripts/gpu_check.sh", dry_run=self.dry, started=now_iso(), budget_s=args.budget,
                            status="running", results_dir=self.out, stages=self.results)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=PY, CUBLAS_WORKSPACE_CONFIG=":4096:8")
        self.env["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
        self.env.pop("TRITON_INTERPRET", None)

    def log(self, stage):
        return os.path.join(self.out, stage.log)

    def write_summary(self):
        self.summary["wall_s"] = round(time.time() - self.t0, 1)
        path = os.path.join(self.out, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.summary, f, indent=1)
        os.replace(path + ".tmp", path)

    def limit_for(self, i):
        later = sum(s.reserve for s in STAGES[i + 1:])
        return min(STAGES[i].limit, self.deadline - time.time() - later)

    def record(self, stage, status, detail, wall=0.0, limit=None, **extra):
        rec = dict(name=stage.name, what=stage.what, status=status, detail=detail, wall_s=round(wall, 1),
                   limit_s=None if limit is None else round(limit), log=stage.log, **extra)
        self.results.append(rec)
        self.write_summary()
        line = f"[{time.time() - self.t0:6.0f} s] {stage.name:9s} {status.upper():7s} {detail}"
        print(line.splitlines()[0][:200] if "\n" in line else line[:300], flush=True)
        return rec

    # -- stages --

    def main(self):
        try:
            self.summary["versions"], self.summary["device"] = environment()
        except Exception as e:  # noqa: BLE001 - say so and go on: the stages will say more
            self.summary["versions"], self.summary["device"] = {"error": repr(e)}, {"cuda_available": False}
        self.cuda = bool(self.summary["device"].get("cuda_available"))
        mode = "DRY RUN (plumbing only: no GPU stage runs)" if self.dry else "GPU run"
        print(f"gpu_check: {mode} on {self.summary['device'].get('name')}; results in {self.out}; "
              f"budget {self.args.budget:.0f} s", flush=True)
        if self.dry:
            print("dry run: the build is not redone where hot_kernels._C exists; smoke runs on the cpu backend; test "
                  "selections are collected, not run; sanitizer commands are printed; a one-repeat CPU bench "
                  "exercises bench.json/png; every GPU stage is reported skipped", flush=True)
        self.write_summary()
        stop = None
        for i, stage in enumerate(STAGES):
            if stop is not None:
                self.record(stage, "skipped", stop)
                continue
            limit = self.limit_for(i)
            if limit < max(10, stage.reserve / 2):
                self.record(stage, "skipped", f"out of time: {limit:.0f} s of the {self.args.budget:.0f} s budget "
                                              "left for it")
                continue
            rec = getattr(self, "stage_" + stage.name)(stage, limit)
            if stage.name == "build" and rec["status"] == "failed":
                stop = "the build failed (every stage needs hot_kernels._C with CUDA)"
        self.finish()
        failed = [r["name"] for r in self.results if r["status"] == "failed"
                  or (r.get("dry_run") or {}).get("status") == "failed"]
        return 1 if failed else 0

    def gpu_skip_reason(self):
        return "no CUDA" if not self.cuda else "dry run"

    def stage_build(self, stage, limit):
        log = self.log(stage)
        if self.dry:
            return self.dry_build(stage, limit, log)
        if not self.cuda:
            return self.record(stage, "failed", "no CUDA device visible to torch (torch.cuda.is_available() is "
                                                "False): this is the GPU run; on a CPU machine use --dry-run")
        import torch
        major, minor = torch.cuda.get_device_capability(0)
        arch = os.environ.get("GPU_CHECK_ARCH", f"{major}.{minor}")
        env = dict(self.env, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=os.environ.get("MAX_JOBS", "16"),
                   HOT_KERNELS_REQUIRE_EXT="1", HOT_KERNELS_REQUIRE_CUDA="1", PIP_NO_INPUT="1")
        cmd = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
               "--disable-pip-version-check", "-v", "-e", "."]
        rc, dt = run(cmd, log, limit, env, header=f"build (TORCH_CUDA_ARCH_LIST={arch}, MAX_JOBS={env['MAX_JOBS']})")
        if rc != 0:
            why = "timed out" if rc == "timeout" else f"exit {rc}"
            msg = re.findall(r"HOT_KERNELS_REQUIRE_CUDA=1 but .*", open(log, errors="replace").read())
            return self.record(stage, "failed", f"{why}: " + (msg[-1] if msg else tail(log, 8)), dt, limit)
        probe = ("import hot_kernels._ext as e, hot_kernels._C as c; ops = sorted(e.ops_for_device('cuda')); "
                 "assert ops, 'hot_kernels._C has no cuda ops: the build has no CUDA'; print('cuda ops:', ops)")
        rc2, dt2 = run([PY, "-c", probe], log, 60, self.env, header="the built extension has CUDA")
        run([PY, "-m", "hot_kernels", "info"], log, 60, self.env, header="hot-kernels info")
        if rc2 != 0:
            return self.record(stage, "failed", f"built, but hot_kernels._C has no CUDA ops: {tail(log, 5)}",
                               dt + dt2, limit)
        return self.record(stage, "passed", f"hot_kernels._C with CUDA for sm_{arch.replace('.', '')} "
                                            f"in {dt:.0f} s", dt + dt2, limit, arch=arch)

    def dry_build(self, stage, limit, log):
        t0 = time.time()
        notes = []
        if not self.cuda:  # the knob must refuse a CPU torch at once, saying why
            rc, out = capture([PY, "setup.py", "--version"], dict(self.env, HOT_KERNELS_REQUIRE_CUDA="1"), 120)
            with open(log, "a") as f:
                f.write(f"==== HOT_KERNELS_REQUIRE_CUDA=1 python setup.py --version (exit {rc})\n{out}\n")
            msg = re.findall(r"HOT_KERNELS_REQUIRE_CUDA=1 but .*", out)
            if rc == 0 or not msg:
                return self.record(stage, "skipped", self.gpu_skip_reason(), time.time() - t0, limit,
                                   dry_run=dict(status="failed", detail="HOT_KERNELS_REQUIRE_CUDA=1 did not refuse "
                                                f"a torch without CUDA (exit {rc})"))
            notes.append("HOT_KERNELS_REQUIRE_CUDA=1 refuses this machine at once: " + msg[-1].split(": ", 1)[-1])
        rc, out = capture([PY, "-c", "import hot_kernels._C"], self.env)
        if rc == 0:
            notes.append("hot_kernels._C exists: not rebuilt")
            status = "passed"
        else:
            env = dict(self.env, HOT_KERNELS_REQUIRE_EXT="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
            rc, dt = run([PY, "setup.py", "build_ext", "--inplace"], log, limit, env, header="dry run: CPU build")
            status = "passed" if rc == 0 else "failed"
            notes.append(f"hot_kernels._C built for the CPU ({'ok' if rc == 0 else f'exit {rc}'})")
        return self.record(stage, "skipped", self.gpu_skip_reason(), time.time() - t0, limit,
                           dry_run=dict(status=status, detail="; ".join(notes)))

    def stage_smoke(self, stage, limit):
        out = os.path.join(self.tmp, "smoke.json")
        cmd = [PY, "scripts/gpu_smoke.py", "--json", out]
        if self.dry:
            cmd += ["--device", "cpu"]
        rc, dt = run(cmd, self.log(stage), limit, self.env,
                     header="smoke" + (" (dry run: cpu backend)" if self.dry else ""))
        try:
            rep = json.load(open(out))
        except (OSError, ValueError):
            rep = {}
        if rc == "timeout":
            status, detail = "failed", (f"timed out after {limit:.0f} s; so far {rep.get('passed', 0)} passed, "
                                        f"{rep.get('failed', 0)} failed")
        elif rep:
            status = "passed" if rc == 0 else "failed"
            detail = f"{rep.get('passed', 0)} passed, {rep.get('failed', 0)} failed, {rep.get('skipped', 0)} skipped"
            bad = [f"{c['backend']} {c['dtype']} {c['check']}: {c['detail'][:200]}" for c in rep.get("checks", [])
                   if c["status"] == "failed"]
            if bad:
                detail += " -- " + " | ".join(bad[:6])
        else:
            status, detail = "failed", f"exit {rc}, no report: {tail(self.log(stage), 6)}"
        self.summary["smoke_checks"] = rep.get("checks", [])
        if self.dry:
            return self.record(stage, "skipped", self.gpu_skip_reason(), dt, limit,
                               dry_run=dict(status=status, detail="smoke module on the cpu backend: " + detail))
        return self.record(stage, status, detail, dt, limit)

    def pytest_stage(self, stage, limit, selection):
        cmd = [PY, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *selection, "tests/"]
        if self.dry:
            cmd.insert(4, "--collect-only")
        start = os.path.getsize(self.log(stage)) if os.path.exists(self.log(stage)) else 0
        rc, dt = run(cmd, self.log(stage), limit, self.env,
                     header=stage.name + (" (dry run: collect only)" if self.dry else ""))
        outcome = pytest_outcome(self.log(stage), start)
        if self.dry:
            ok = rc in (0, 5)  # 5: nothing selected (no CUDA targets here)
            return self.record(stage, "skipped", self.gpu_skip_reason(), dt, limit,
                               dry_run=dict(status="passed" if ok else "failed",
                                            detail=f"collected with {' '.join(selection)}: {outcome or f'exit {rc}'}"))
        if rc == "timeout":
            return self.record(stage, "failed", f"timed out after {limit:.0f} s; so far: {outcome}", dt, limit)
        if rc == 5:
            return self.record(stage, "failed", "no test selected (are the CUDA targets missing?)", dt, limit)
        return self.record(stage, "passed" if rc == 0 else "failed", outcome or f"exit {rc}", dt, limit)

    def stage_tests(self, stage, limit):
        return self.pytest_stage(stage, limit, ["-m", "not large", "-k", TEST_K])

    def stage_gpu_tests(self, stage, limit):
        return self.pytest_stage(stage, limit, ["-m", "gpu"])

    def stage_sanitize(self, stage, limit):
        tools = "memcheck racecheck synccheck"
        env = dict(self.env, FOCUSED="1", TOOLS=tools, TOOL_TIMEOUT=str(int(max(10, (limit - 5) / 3))))
        if self.dry:
            env["DRY_RUN"] = "1"
        rc, dt = run(["bash", "tests/gpu/sanitize.sh"], self.log(stage), limit, env,
                     header="sanitize" + (" (dry run: commands only)" if self.dry else ""))
        lines = [ln.strip("= \n") for ln in open(self.log(stage), errors="replace")
                 if re.match(r"== \w+: (passed|FAILED)", ln)]
        errors = re.findall(r"ERROR SUMMARY: \d+ errors?", open(self.log(stage), errors="replace").read())
        detail = "; ".join(lines) + (f" ({', '.join(errors)})" if errors else "")
        if self.dry:
            return self.record(stage, "skipped", self.gpu_skip_reason(), dt, limit,
                               dry_run=dict(status="passed" if rc == 0 else "failed",
                                            detail=f"printed the {len(tools.split())} sanitizer commands "
                                                   f"(exit {rc}); compute-sanitizer: "
                                                   f"{self.summary['versions'].get('compute_sanitizer')}"))
        if "Device not supported" in open(self.log(stage), errors="replace").read():  # seen on gVisor machines
            return self.record(stage, "skipped", "compute-sanitizer refuses this device ('Device not supported'; "
                                                 f"a gVisor runtime?): {detail}", dt, limit)
        if rc == "timeout":
            return self.record(stage, "failed", f"timed out after {limit:.0f} s; {detail}", dt, limit)
        return self.record(stage, "passed" if rc == 0 else "failed", detail or f"exit {rc}", dt, limit)

    def stage_bench(self, stage, limit):
        bench_dir = os.path.join(self.tmp, "bench")
        log = self.log(stage)
        if self.dry:
            rc0, _ = run([PY, "-m", "hot_kernels", "bench", "--device", "cuda", "--quick", "--targets", "--list"], log,
                         60, self.env, header="the GPU bench's cases (listed, not run)")
            cmd = [PY, "-m", "hot_kernels", "bench", "--device", "cpu", "--ops", "dpc", "--sweep", "N=32",
                   "--backends", "cpu", "--repeat", "1", "--out", bench_dir]
        else:
            rc0 = 0
            cmd = [PY, "-m", "hot_kernels", "bench", "--quick", "--targets", "--out", bench_dir]
        rc, dt = run(cmd, log, limit - 5, self.env,
                     header="bench" + (" (dry run: one-repeat CPU bench)" if self.dry else ""))
        copied = []
        for name in ("bench.json", "bench.png"):
            src = os.path.join(bench_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(self.out, name))
                copied.append(name)
        extra = {}
        if os.path.exists(os.path.join(bench_dir, "command.txt")):
            extra["command"] = open(os.path.join(bench_dir, "command.txt")).read().strip()
        try:
            doc = json.load(open(os.path.join(bench_dir, "bench.json")))
            extra["targets"] = doc.get("targets")
        except (OSError, ValueError):
            pass
        summary = [ln.strip() for ln in open(log, errors="replace") if re.match(r"\d+ records:", ln.strip())]
        detail = (summary[-1] if summary else f"exit {rc}") + f"; wrote {', '.join(copied) or 'nothing'}"
        if self.dry:
            ok = rc == 0 and rc0 == 0 and "bench.json" in copied
            return self.record(stage, "skipped", self.gpu_skip_reason(), dt, limit,
                               dry_run=dict(status="passed" if ok else "failed",
                                            detail=f"GPU cases listed (exit {rc0}); CPU bench: {detail}"))
        if rc == "timeout" or rc == 130:
            return self.record(stage, "failed", f"cut off at {limit:.0f} s (cases done so far written): {detail}",
                               dt, limit, **extra)
        return self.record(stage, "passed" if rc == 0 else "failed", detail, dt, limit, **extra)

    def finish(self):
        files = []
        problems = []
        for dirpath, dirnames, filenames in os.walk(self.out):
            rel = os.path.relpath(dirpath, self.out)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            for name in filenames:
                files.append(os.path.normpath(os.path.join(rel, name)))
                if depth > MAX_DEPTH - 1:
                    problems.append(f"{name}: too deep")
                if not NAME_OK.match(name):
                    problems.append(f"{name}: a name the device tool will not return")
        if len(files) + ("summary.json" not in files) > MAX_FILES:
            problems.append(f"{len(files)} files: the device tool returns at most {MAX_FILES}")
        self.summary["files"] = sorted(set(files) | {"summary.json"})
        self.summary["file_problems"] = problems
        failed = [r["name"] for r in self.results if r["status"] == "failed"
                  or (r.get("dry_run") or {}).get("status") == "failed"]
        self.summary["status"] = "failed" if failed else "passed"
        self.write_summary()
        shutil.rmtree(self.tmp, ignore_errors=True)
        print(f"\n{'stage':10s} {'status':8s} {'wall':>6s} {'limit':>6s}  detail")
        for r in self.results:
            d = r["detail"] if not r.get("dry_run") else f"{r['detail']}; plumbing {r['dry_run']['status']}: " \
                                                          f"{r['dry_run']['detail']}"
            lim = "-" if r["limit_s"] is None else str(r["limit_s"])
            print(f"{r['name']:10s} {r['status']:8s} {r['wall_s']:6.0f} {lim:>6s}  {d[:400]}")
        print(f"\ngpu_check {'(dry run) ' if self.dry else ''}{self.summary['status'].upper()} in "
              f"{self.summary['wall_s']:.0f} s; results: {self.out} ({', '.join(self.summary['files'])})")
        for p in problems:
            print(f"WARNING: {p}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description="The first GPU run, prepared: build, smoke, "
                                "GPU tests, compute-sanitizer, bench, in one time budget (see scripts/gpu_check.py).")
    p.add_argument("--dry-run", action="store_true", help="exercise the plumbing on any machine; no GPU stage runs")
    default_out = (os.path.join(os.environ["OUT"], "gpu-check") if os.environ.get("OUT")
                   else os.path.join(ROOT, "gpu-check-out"))
    p.add_argument("--out", default=default_out, help=f"results folder (default: $OUT/gpu-check if OUT is set, else "
                                                      f"./gpu-check-out; now {default_out})")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", 470)),
                   help="seconds for everything (default 470, or $GPU_CHECK_BUDGET)")
    return Check(p.parse_args(argv)).main()


if __name__ == "__main__":
    sys.exit(main())
