"""The one benchmark harness: behind ``hot-kernels bench``, the pytest-benchmark suites and the
whole-model benchmark in ``benchmarks/``. The cases themselves are in :mod:`hot_kernels.bench_cases`.

Per case and candidate (a baseline or a hot_kernels backend): one first call (torch.compile and
Triton autotuning happen here; its time is recorded apart), its output checked against the
reference (a candidate whose output is wrong is not timed: the record says why), peak memory of
one call, then the timing:

* warm-up calls, then repeats until a time budget is spent (at least ``min_repeat``, at most
  ``max_repeat``): median, min, max and quartiles in milliseconds. The candidates of a case are
  timed round-robin (one call of each per round), so that load from elsewhere on a shared machine
  hits them alike;
* the calls rotate through copies of the inputs (together beyond the last-level cache where memory
  allows) so that no call finds its inputs in a cache the previous call warmed;
* CUDA: each call between two CUDA events, after a write of twice the L2 cache size (the L2 starts
  cold) and a synchronize (the GPU idles at the start event, so launch latency is counted);
  CPU: ``time.perf_counter`` around each call.

Host memory: :func:`keep_freed_host_memory` (glibc keeps freed blocks for reuse) is set by every
front-end before it times anything, so that no call's time depends on whether its temporaries
page-fault in fresh memory.

Peak memory: CUDA ``torch.cuda.max_memory_allocated`` over one call, minus what was allocated
before it; CPU: the peak of the torch CPU allocator's allocations over one call (the profiler's
memory events; memory a C++ kernel takes outside the allocator, e.g. std::vector scratch, is not
seen). Inputs are not counted, outputs are.

Speed is only ever reported as ratios measured side by side in one run: ``ratio_vs_reference``
= reference median / candidate median (> 1: faster), ``ratio_vs_best_baseline`` the same against
the fastest baseline of the case (reference, torch.compile(reference), and for TRA sdpa).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import bench_cases as BC

__all__ = ["Timing", "TimingPolicy", "time_fn", "time_interleaved", "keep_freed_host_memory", "peak_bytes", "environment", "Record", "run_cases", "run_case",
           "prepare_candidate", "load_records",
           "format_case", "format_summary", "evaluate_targets", "write_results", "plot", "Progress",
           "policy_for", "n_copies"]


# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    warmup: int


@dataclass
class TimingPolicy:
    """Repeats are adaptive: after ``warmup`` calls, as many timed calls as fit in ``budget_s``
    (at least ``min_repeat``, at most ``max_repeat``); ``repeat`` fixes the count instead."""
    budget_s: float = 0.5
    min_repeat: int = 5
    max_repeat: int = 200
    warmup: int = 2
    repeat: int | None = None

    def describe(self) -> str:
        if self.repeat:
            return (f"{self.warmup} warm-up calls, then {self.repeat} timed calls per candidate, "
                    "the candidates of a case round-robin")
        return (f"{self.warmup} warm-up calls, then timed calls for ~{self.budget_s:g} s per candidate "
                f"(at least {self.min_repeat}, at most {self.max_repeat}), the candidates of a case round-robin")


def policy_for(device_type: str, quick: bool = False, budget_s: float | None = None,
               repeat: int | None = None) -> TimingPolicy:
    """The default policy: on a GPU calls are short and the noise low (0.2 s, 10..1000 calls); on
    the CPU 0.6 s, 7..200 calls (quick: 0.15 s, 3..200), since a reference call can take 100 ms there
    and a shared machine's other jobs stretch some calls (7 rounds keep the median off them)."""
    if device_type == "cuda":
        pol = TimingPolicy(budget_s=0.1 if quick else 0.2, min_repeat=10, max_repeat=1000, warmup=3)
    else:
        pol = TimingPolicy(budget_s=0.15 if quick else 0.6, min_repeat=3 if quick else 7, max_repeat=200,
                           warmup=1 if quick else 2)
    if budget_s is not None:
        pol.budget_s = budget_s
    pol.repeat = repeat
    return pol


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FLUSH: dict = {}


def _l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(2 * _l2_bytes(device) // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def n_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of a case's inputs the timed calls rotate through: enough to exceed twice
    the L2 (CUDA; the L2 is flushed between calls too) or 64 MiB (CPU, beyond the per-core caches),
    at most 16, within 1 GiB (CPU) / 4 GiB (CUDA)."""
    nbytes = max(1, nbytes)
    if device.type == "cuda":
        target, cap = 2 * _l2_bytes(device), 4 * 2**30
    else:
        target, cap = 64 * 2**20, 2**30
    return int(max(1, min(16, math.ceil(target / nbytes), cap // nbytes)))


def time_fn(fn, inputs: list | None = None, *, device: torch.device | str = "cpu",
            policy: TimingPolicy | None = None, warmup: int | None = None, repeat: int | None = None) -> Timing:
    """Time ``fn(inputs[i])`` rotating over ``inputs`` (or ``fn()`` when inputs is None)."""
    device = torch.device(device)
    policy = policy or TimingPolicy()
    if warmup is not None or repeat is not None:
        policy = TimingPolicy(policy.budget_s, policy.min_repeat, policy.max_repeat,
                              policy.warmup if warmup is None else warmup, repeat or policy.repeat)
    call = (lambda i: fn()) if inputs is None else (lambda i: fn(inputs[i % len(inputs)]))
    t0 = time.perf_counter()
    for i in range(max(1, policy.warmup)):
        call(i)
    _sync(device)
    per_call = (time.perf_counter() - t0) / max(1, policy.warmup)
    if policy.repeat:
        reps = policy.repeat
    else:
        reps = int(min(policy.max_repeat, max(policy.min_repeat, policy.budget_s / max(per_call, 1e-7))))
    times = []
    if device.type == "cuda":
        flush = _flush_buffer(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            flush.zero_()
            torch.cuda.synchronize(device)
            start.record()
            call(i)
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for i in range(reps):
            t = time.perf_counter()
            call(i)
            times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), min(times), max(times), q[0], q[2], reps, max(1, policy.warmup))


def time_interleaved(fns: dict, inputs: list, *, device: torch.device | str = "cpu",
                     policy: TimingPolicy | None = None) -> dict:
    """{label: Timing} of several candidates timed round-robin: each round calls every candidate
    once (the next input copy), so a burst of load from elsewhere on a shared machine hits all of
    them alike and their ratios stay fair. Rounds: ``policy.budget_s`` per candidate in total (at
    least ``min_repeat``, at most ``max_repeat``), after ``policy.warmup`` calls of each."""
    device = torch.device(device)
    policy = policy or TimingPolicy()
    round_s = 0.0
    for fn in fns.values():
        t0 = time.perf_counter()
        for i in range(max(1, policy.warmup)):
            fn(inputs[i % len(inputs)])
        _sync(device)
        round_s += (time.perf_counter() - t0) / max(1, policy.warmup)
    if policy.repeat:
        reps = policy.repeat
    else:
        reps = int(min(policy.max_repeat, max(policy.min_repeat, policy.budget_s * len(fns) / max(round_s, 1e-7))))
    times: dict = {label: [] for label in fns}
    cuda = device.type == "cuda"
    flush = _flush_buffer(device) if cuda else None
    for i in range(reps):
        x = inputs[i % len(inputs)]
        for label, fn in fns.items():
            if cuda:
                flush.zero_()
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                end.synchronize()
                times[label].append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn(x)
                times[label].append((time.perf_counter() - t) * 1e3)
    out = {}
    for label, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[label] = Timing(statistics.median(ts), min(ts), max(ts), q[0], q[2], reps, max(1, policy.warmup))
    return out


def keep_freed_host_memory() -> str | None:
    """Make glibc keep freed memory for reuse (no mmap per large block, no trimming) for the rest
    of the process; returns what was set, or None where this is not glibc.

    Why: by default a large block (over a threshold that glibc moves at run time) is mmap-ed and
    returned to the OS when freed, so whether a call's big temporaries page-fault in fresh memory
    depends on what ran before it. The reference's B x N x N temporaries then make its time
    bimodal (measured at B=64, N=243: 60 ms or 80-180 ms in one run). Kept memory makes every
    call reuse it: steadier times, and if anything faster for the allocation-heavy baselines."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    if mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1:
        return "glibc malloc keeps freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
    return None


HOST_ALLOCATOR_CHOICES = ("kept", "as-is")
HOST_ALLOCATOR_HELP = ("kept (default): glibc keeps freed memory, so no call's time depends on whether its "
                       "temporaries page-fault in fresh memory; as-is: leave glibc as a user's process has it")


def host_allocator(choice: str) -> str | None:
    """Apply a --host-allocator choice (HOST_ALLOCATOR_CHOICES) for the rest of the process; returns
    what to record in the run's settings (None: kept asked for, but this is not glibc)."""
    return keep_freed_host_memory() if choice == "kept" else "as is (--host-allocator as-is)"


# ------------------------------------------------------------------------------------------------
# Peak memory.
# ------------------------------------------------------------------------------------------------

PEAK_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated over one call, minus the memory allocated before it",
    "cpu": ("peak of the torch CPU allocator over one call (profiler memory events); memory a C++ "
            "kernel takes outside the allocator (std::vector scratch) is not seen"),
}


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native code prints a line to fd 2 at every start and stop; hide them."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn, device: torch.device | str = "cpu") -> int | None:
    """Peak bytes allocated during ``fn()`` beyond what was allocated before it (see PEAK_METHOD)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # a torch without this profiler interface
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.autograd.DeviceType.CPU:
            current += e.nbytes()
            peak = max(peak, current)
    return peak


# ------------------------------------------------------------------------------------------------
# Environment and records.
# ------------------------------------------------------------------------------------------------


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=here)
        commit = out.stdout.strip()
        if not commit:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return commit + ("+dirty" if dirty else "")
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


# Environment variables that change what a run measures (the cpu backend's instruction-set path,
# the eager fast path, ATen's and MKL's kernels, thread counts, the default backend), recorded
# with it when set.
RECORDED_ENV = ("HOT_KERNELS_CPU_ISA", "HOT_KERNELS_BACKEND", "HOT_KERNELS_EAGER", "ATEN_CPU_CAPABILITY",
                "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRITON_INTERPRET")


def environment(device: torch.device | str = "cpu") -> dict:
    """Device name, versions, commit, date, the cpu backend's instruction-set path and the
    environment variables of RECORDED_ENV that are set: stored with every run and every record."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import _dispatch, _ext
    from .version import __version__

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "hot_kernels": __version__,
        "hot_kernels_C": None if _ext.C is None else ("cpu+cuda" if _ext.C.with_cuda else "cpu"),
        "cpu_isa": _dispatch.cpu_isa(),
        "env": {k: os.environ[k] for k in RECORDED_ENV if os.environ.get(k)},
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Record:
    """One case x candidate. status: "ok" (checked, then timed), "skipped" (cannot run here:
    ``reason``) or "failed" (raised, or its output did not match the reference: ``reason``)."""
    op: str
    model: str
    mode: str
    params: dict
    dtype: str
    device: str
    device_name: str
    backend: str
    kind: str
    status: str
    reason: str | None = None
    checked: bool = False
    check: str | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    repeats: int | None = None
    warmup: int | None = None
    first_call_ms: float | None = None
    peak_bytes: int | None = None
    ratio_vs_reference: float | None = None
    ratio_vs_best_baseline: float | None = None
    best_baseline: str | None = None
    flop: int | None = None
    bytes: int | None = None
    tflops: float | None = None
    gbytes_per_s: float | None = None
    versions: dict = field(default_factory=dict)
    git_commit: str | None = None
    date: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def case_key(self) -> tuple:
        return (self.op, self.mode, self.model, self.dtype, tuple(sorted(self.params.items())))


def _new_record(case: BC.Case, cand: BC.Candidate, env: dict) -> Record:
    versions = {k: env[k] for k in ("hot_kernels", "torch", "triton", "cuda", "python")}
    return Record(case.op, case.model, case.mode, case.p, case.dtype, env["device_type"], env["device"],
                  cand.label, cand.kind, "skipped", cand.skip, flop=BC.flop_model(case), bytes=BC.byte_model(case),
                  versions=versions, git_commit=env["git_commit"], date=env["date"])


def _short_error(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def run_case(case: BC.Case, device: torch.device, env: dict, policy: TimingPolicy, backends=None,
             seed: int = 0, triton_knobs: bool = False, on_candidate=None) -> list[Record]:
    """Run one case: every candidate checked, then timed. Returns its records (ratios filled)."""
    inputs = BC.make_inputs(case, device, seed)
    BC.add_copies(inputs, n_copies(inputs.nbytes(), device))
    cands = BC.candidates(case, device, inputs, backends, skip_reference=BC.reference_too_big(case, device))
    if triton_knobs:
        cands += BC.triton_knob_candidates(case, device, inputs)
    records, ref_out, ready = [], None, {}
    # First every candidate's first call (compile, autotune), check and peak memory, one at a time.
    for cand in cands:
        rec = _new_record(case, cand, env)
        records.append(rec)
        if on_candidate:
            on_candidate(cand.label)
        if cand.fn is None:
            continue
        try:
            _sync(device)
            t0 = time.perf_counter()
            out = cand.fn(inputs.args)
            _sync(device)
            rec.first_call_ms = (time.perf_counter() - t0) * 1e3
            verdict = BC.check_output(case, cand.label, inputs, out, ref_out)
            if cand.label == "reference":  # the oracle of the others, itself checked against float64
                ref_out, verdict = out, f"reference: {verdict}"
            rec.check, rec.checked = verdict, True
            del out
            rec.peak_bytes = peak_bytes(lambda: cand.fn(inputs.args), device)
            ready[cand.label] = (cand, rec)
        except BC.CheckFailed as e:
            rec.status, rec.reason = "failed", f"output check failed: {e}"
        except Exception as e:  # noqa: BLE001 - a benchmark reports a failing candidate and goes on
            _record_error(rec, e, device)
    # Then the timing, round-robin over the candidates that passed.
    if on_candidate and ready:
        on_candidate("timing " + ", ".join(ready))
    try:
        timings = time_interleaved({lbl: c.fn for lbl, (c, _) in ready.items()}, inputs.copies, device=device,
                                   policy=policy) if ready else {}
    except Exception:  # noqa: BLE001 - find the candidate that raises: time them one by one
        timings = {}
        for lbl, (c, rec) in ready.items():
            try:
                timings[lbl] = time_fn(c.fn, inputs.copies, device=device, policy=policy)
            except Exception as e:  # noqa: BLE001
                _record_error(rec, e, device)
    for lbl, (c, rec) in ready.items():
        t = timings.get(lbl)
        if t is None:
            continue
        rec.status, rec.reason = "ok", None
        rec.median_ms, rec.min_ms, rec.max_ms = t.median_ms, t.min_ms, t.max_ms
        rec.q1_ms, rec.q3_ms, rec.repeats, rec.warmup = t.q1_ms, t.q3_ms, t.repeats, t.warmup
        rec.tflops = rec.flop / (t.median_ms * 1e-3) / 1e12
        rec.gbytes_per_s = rec.bytes / (t.median_ms * 1e-3) / 1e9
    _fill_ratios(records)
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def prepare_candidate(case: BC.Case, device: torch.device | str, label: str, seed: int = 0):
    """(candidate, inputs, verdict) for timing one candidate elsewhere (the pytest-benchmark
    suites): the inputs with their copies, the candidate (``skip`` set if it cannot run here) and
    the verdict of its output's check against the reference (raises BC.CheckFailed)."""
    device = torch.device(device)
    inputs = BC.make_inputs(case, device, seed)
    BC.add_copies(inputs, n_copies(inputs.nbytes(), device))
    cands = {c.label: c for c in BC.candidates(case, device, inputs, None,
                                                skip_reference=BC.reference_too_big(case, device))}
    if label not in cands:
        raise ValueError(f"{label!r} is not a candidate of {case.title()}: {', '.join(cands)}")
    cand = cands[label]
    if cand.fn is None:
        return cand, inputs, None
    ref = cands["reference"]
    ref_out = None if ref.fn is None else ref.fn(inputs.args)
    if ref_out is not None:
        BC.check_output(case, "reference", inputs, ref_out, None)  # also the yardstick of TRA's tolerances
    verdict = BC.check_output(case, label, inputs, cand.fn(inputs.args), ref_out)
    return cand, inputs, verdict


def _record_error(rec: Record, e: BaseException, device: torch.device) -> None:
    if _is_oom(e):
        rec.status, rec.reason = "skipped", f"out of memory: {_short_error(e)}"
    else:
        rec.status, rec.reason = "failed", _short_error(e)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fill_ratios(records: list[Record]) -> None:
    ok = {r.backend: r.median_ms for r in records if r.status == "ok"}
    base = {b: t for b, t in ok.items() if b in BC.BASELINES}
    ref = ok.get("reference")
    best = min(base, key=base.get) if base else None
    for r in records:
        if r.status != "ok":
            continue
        r.ratio_vs_reference = ref / r.median_ms if ref else None
        if best:
            r.ratio_vs_best_baseline = base[best] / r.median_ms
            r.best_baseline = best


def run_cases(cases: list[BC.Case], device: torch.device | str, *, backends=None, policy: TimingPolicy | None = None,
              seed: int = 0, triton_knobs: bool = False, progress: "Progress | None" = None,
              on_case=None) -> list[Record]:
    """Run every case (see run_case); ``on_case(records)`` after each (the CLI prints it)."""
    device = torch.device(device)
    env = environment(device)
    policy = policy or policy_for(device.type)
    records = []
    for i, case in enumerate(cases):
        if progress:
            progress.update(i, case.title())
        recs = run_case(case, device, env, policy, backends, seed, triton_knobs,
                        on_candidate=(lambda lbl, i=i, case=case: progress.update(i, f"{case.title()} | {lbl}"))
                        if progress else None)
        records += recs
        if on_case:
            if progress:
                progress.clear()
            on_case(recs)
    if progress:
        progress.update(len(cases), "done")
        progress.close()
    return records


# ------------------------------------------------------------------------------------------------
# Terminal output.
# ------------------------------------------------------------------------------------------------


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fmt_mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def format_case(records: list[Record]) -> str:
    """A block of the terminal table: the case's title, then one row per candidate."""
    r0 = records[0]
    case = BC.Case(r0.op, r0.model, r0.dtype, tuple(sorted(r0.params.items())), r0.mode)
    lines = [f"{case.title()}   [model: {r0.flop / 1e9:.3g} GFLOP, {r0.bytes / 1e6:.3g} MB]"]
    w = max(26, max(len(r.backend) for r in records) + 2)
    head = (f"  {'backend':<{w}}{'median ms':>11}  {'[min .. max]':<22}{'x ref':>8}{'x best base':>13}"
            f"{'peak MiB':>10}{'TFLOP/s':>9}  check")
    lines.append(head)
    for r in records:
        if r.status != "ok":
            lines.append(f"  {r.backend:<{w}}{r.status}: {r.reason}")
            continue
        spread = f"[{_fmt_ms(r.min_ms)} .. {_fmt_ms(r.max_ms)}]"
        lines.append(f"  {r.backend:<{w}}{_fmt_ms(r.median_ms):>11}  {spread:<22}{_fmt_x(r.ratio_vs_reference):>8}"
                     f"{_fmt_x(r.ratio_vs_best_baseline):>13}{_fmt_mib(r.peak_bytes):>10}{r.tflops:>9.3f}  {r.check}")
    return "\n".join(lines)


def _by_case(records: list[Record]) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault(r.case_key, []).append(r)
    return groups


def format_summary(records: list[Record]) -> str:
    """One row per case: the reference, the best baseline and the fastest hot_kernels backend,
    with the two ratios (> 1: hot_kernels is faster)."""
    rows = []
    for recs in _by_case(records).values():
        r0 = recs[0]
        case = BC.Case(r0.op, r0.model, r0.dtype, tuple(sorted(r0.params.items())), r0.mode)
        ref = next((r for r in recs if r.backend == "reference"), None)
        base = [r for r in recs if r.kind == "baseline" and r.status == "ok"]
        hot = [r for r in recs if r.kind == "hot_kernels" and r.status == "ok"]
        bb = min(base, key=lambda r: r.median_ms) if base else None
        hb = min(hot, key=lambda r: r.median_ms) if hot else None
        rows.append((case.title(),
                     _fmt_ms(ref.median_ms) if ref and ref.status == "ok" else (ref.status if ref else "-"),
                     f"{bb.backend} {_fmt_ms(bb.median_ms)}" if bb else "-",
                     f"{hb.backend} {_fmt_ms(hb.median_ms)}" if hb else "none ran",
                     _fmt_x(hb.ratio_vs_reference) if hb else "-",
                     _fmt_x(hb.ratio_vs_best_baseline) if hb else "-"))
    head = ("case", "reference ms", "best baseline ms", "hot_kernels ms", "x ref", "x best base")
    widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
    fmt = lambda row: "  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def evaluate_targets(records: list[Record], device_type: str) -> list[dict]:
    """DESIGN.md's targets that this run measured: the fastest hot_kernels backend's ratio."""
    out = []
    for t in BC.TARGETS:
        for recs in _by_case(records).values():
            r0 = recs[0]
            case = BC.Case(r0.op, r0.model, r0.dtype, tuple(sorted(r0.params.items())), r0.mode)
            if not BC.target_matches(t, case, device_type):
                continue
            times = {r.backend: r.median_ms for r in recs if r.status == "ok"}
            base = {b: v for b, v in times.items() if b in BC.BASELINES}
            hot = {r.backend: r.median_ms for r in recs if r.kind == "hot_kernels" and r.status == "ok"}
            if t.versus == "best baseline":
                yard = min(base.values()) if base else None
            else:
                yard = times.get(t.versus)
            best = min(hot, key=hot.get) if hot else None
            ratio = yard / hot[best] if (yard and best) else None
            out.append({"target": t.describe(), "case": case.title(), "backend": best, "ratio": ratio,
                        "met": None if ratio is None else ratio >= t.at_least})
    return out


class Progress:
    """A one-line progress bar on stderr (no dependency): redrawn in place on a terminal; on a
    pipe (long runs only) a plain line per case."""

    def __init__(self, total: int, enabled: bool | None = None, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else enabled
        self.start = time.perf_counter()
        self.width = 0
        self.last_case = -1

    def _elapsed(self) -> str:
        s = int(time.perf_counter() - self.start)
        return f"{s // 60}:{s % 60:02d}"

    def update(self, i: int, label: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            n = 24
            done = int(n * i / max(1, self.total))
            line = f"[{'#' * done}{'.' * (n - done)}] {i}/{self.total} {self._elapsed()} {label}"
            cols = _terminal_columns()
            line = line[: cols - 1]
            self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
            self.width = len(line)
            self.stream.flush()
        elif i != self.last_case:
            self.last_case = i
            self.stream.write(f"[{i}/{self.total} {self._elapsed()}] {label}\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

    def close(self) -> None:
        self.clear()


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 120


# ------------------------------------------------------------------------------------------------
# Files: bench.json, command.txt, bench.png.
# ------------------------------------------------------------------------------------------------


def command_line(argv: list[str] | None = None) -> str:
    """The command as it was typed: ``hot-kernels ...`` or ``python -m hot_kernels ...``."""
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else ""
    if prog in ("hot-kernels", "__main__.py"):
        head = "hot-kernels" if prog == "hot-kernels" else "python -m hot_kernels"
        return " ".join([head] + [shlex.quote(a) for a in argv[1:]])
    return " ".join(["python"] + [shlex.quote(a) for a in argv])


def write_results(out_dir: str, records: list, env: dict, *, name: str = "bench", command: str | None = None,
                  settings: dict | None = None, targets: list | None = None, notes: list[str] | None = None,
                  wall_s: float | None = None) -> str:
    """Record a run: ``out_dir/{name}.json`` (environment, settings, targets, one dict per record)
    and ``out_dir/command.txt`` (the command, device, versions, date). Returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    command = command or command_line()
    path = os.path.join(out_dir, f"{name}.json")
    doc = {"command": command, "environment": env, "settings": settings or {}, "wall_s": wall_s,
           "targets": targets or [], "notes": notes or [],
           "records": [r.as_dict() if hasattr(r, "as_dict") else r for r in records]}
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    with open(os.path.join(out_dir, "command.txt"), "w") as fh:
        fh.write(command + "\n\n")
        fh.write(f"device      {env['device']} ({env['device_type']}, {env['cpu_threads']} CPU threads)\n")
        fh.write(f"versions    hot_kernels {env['hot_kernels']} (_C: {env.get('hot_kernels_C')}), torch {env['torch']}, "
                 f"triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}\n")
        if env.get("cpu_isa"):
            fh.write(f"cpu path    {env['cpu_isa']} (hot_kernels.cpu_isa())\n")
        if env.get("env"):
            fh.write("environment " + " ".join(f"{k}={v}" for k, v in env["env"].items()) + "\n")
        fh.write(f"git commit  {env['git_commit']}\n")
        fh.write(f"date        {env['date']}\n")
        if wall_s is not None:
            fh.write(f"wall time   {wall_s:.0f} s\n")
        for k, v in (settings or {}).items():
            fh.write(f"{k:<11} {v}\n")
    return path


_COLORS = {"reference": "#7f7f7f", BC.COMPILED: "#ff7f0e", "sdpa": "#9467bd", "cpu": "#1f77b4",
           "cuda": "#2ca02c", "triton": "#d62728"}


def load_records(path: str) -> tuple[dict, list[Record]]:
    """(the document, its records as Record objects) of a bench.json."""
    with open(path) as fh:
        doc = json.load(fh)
    return doc, [Record(**r) for r in doc["records"]]


def plot(records: list[Record], path: str, title: str = "", sweep: bool = False) -> str | None:
    """Write bench.png. ``sweep``: per op, dtype and mode, time vs the swept parameter on log-log
    axes, one line per backend, with the speed-up vs the reference under it; otherwise, per case,
    the median time and the speed-up vs the reference as bars, one per backend. Returns None, or
    why no PNG was written (matplotlib missing, nothing timed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return (f"matplotlib is not installed ({e}); `pip install matplotlib` "
                "(or `pip install hot_kernels[bench]`) and run again to get bench.png")
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        return "nothing was timed"
    series = _sweep_series(ok) if sweep else {}
    fig = _plot_sweep(plt, series) if series else _plot_bars(plt, records)
    if title:
        fig.text(0.5, 1.03, title, fontsize=10, ha="center", va="bottom")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def _sweep_series(ok: list[Record]) -> dict:
    """{(op, mode, dtype, fixed params): (x name, {backend: [(x, ms, ratio)]})} where a parameter
    varies; {} when no op has one with several values."""
    groups: dict = {}
    for r in ok:
        groups.setdefault((r.op, r.mode, r.dtype, r.model), []).append(r)
    out = {}
    for (op, mode, dtype, model), recs in groups.items():
        varying = [k for k in ("N", "B", "C") if len({r.params.get(k) for r in recs}) > 1]
        if not varying:
            continue
        xname = "N" if "N" in varying else varying[0]
        for r in recs:
            fixed = tuple((k, r.params[k]) for k in varying if k != xname)
            key = (op, mode, dtype, model, fixed)
            out.setdefault(key, (xname, {}))[1].setdefault(r.backend, []).append(
                (r.params[xname], r.median_ms, r.ratio_vs_reference))
    return out


def _order(label: str) -> tuple:
    known = BC.BASELINES + BC.HOT_BACKENDS
    return (known.index(label) if label in known else len(known), label)


def _plot_sweep(plt, series: dict):
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    n = len(series)
    fig, axes = plt.subplots(2, n, figsize=(max(6.5, 4.5 * n + 0.5), 7.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for col, ((op, mode, dtype, model, fixed), (xname, by_backend)) in enumerate(series.items()):
        top, bottom = axes[0][col], axes[1][col]
        for backend, pts in sorted(by_backend.items(), key=lambda kv: _order(kv[0])):
            pts.sort()
            xs = [p[0] for p in pts]
            color = _COLORS.get(backend)
            top.plot(xs, [p[1] for p in pts], "o-", label=backend, color=color, ms=4)
            rs = [(p[0], p[2]) for p in pts if p[2] is not None]
            if rs and backend != "reference":
                bottom.plot([p[0] for p in rs], [p[1] for p in rs], "o-", label=backend, color=color, ms=4)
        fx = " ".join(f"{k}={v}" for k, v in fixed)
        mode_s = f" {mode}" if op in BC.DIFFERENTIABLE else ""
        top.set_title(f"{BC.SHORT[op]}{mode_s} {model} {dtype} {fx}".strip(), fontsize=9)
        top.set_xscale("log")
        top.set_yscale("log")
        top.set_ylabel("median time (ms)")
        top.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=7)
        bottom.set_xscale("log")
        bottom.set_yscale("log")
        bottom.axhline(1.0, color="#7f7f7f", lw=1, ls="--")
        bottom.set_xlabel(xname)
        bottom.set_ylabel("speed-up vs reference (x)")
        bottom.grid(True, which="both", alpha=0.3)
        xs = sorted({p[0] for pts in by_backend.values() for p in pts})
        for ax in (top, bottom):  # ticks at the swept values, plain numbers on both axes
            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(fmt)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(fmt)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def _plot_bars(plt, records: list[Record]):
    """Per (op, mode): median-time bars and speed-up-vs-reference bars, one bar per candidate that
    ran, cases down the y axis; what did not run is listed under the figure with its reason."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator

    groups: dict = {}
    for r in records:
        groups.setdefault((r.op, r.mode), {}).setdefault(r.case_key, []).append(r)
    heights = [max(1.4, 0.22 * sum(1.5 + sum(x.status == "ok" for x in c) for c in cases.values()))
               for cases in groups.values()]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, sum(heights) + 1.0), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    seen: dict = {}
    for row, ((op, mode), cases) in enumerate(groups.items()):
        ax_t, ax_r = axes[row]
        ticks = []
        for y, recs in enumerate(cases.values()):
            r0 = recs[0]
            case = BC.Case(r0.op, r0.model, r0.dtype, tuple(sorted(r0.params.items())), r0.mode)
            ran = [r for r in recs if r.status == "ok"]
            h = 0.8 / max(1, len(ran))
            for j, r in enumerate(ran):
                yy = y - 0.4 + h * (j + 0.5)
                color = _COLORS.get(r.backend, "#17becf")
                seen.setdefault(r.backend, color)
                ax_t.barh(yy, r.median_ms, height=h * 0.95, color=color)
                ax_t.text(r.median_ms, yy, f" {_fmt_ms(r.median_ms)}", va="center", fontsize=6)
                if r.backend != "reference" and r.ratio_vs_reference:
                    # From 1 to the ratio: right of the line is faster than the reference, left slower.
                    x = r.ratio_vs_reference
                    ax_r.barh(yy, x - 1.0, left=1.0, height=h * 0.95, color=color)
                    ax_r.text(x, yy, f" {x:.2f}x " if x >= 1 else f" {x:.2f}x ", va="center", fontsize=6,
                              ha="left" if x >= 1 else "right")
            ticks.append((y, f"{case.model} {case.dtype}\n{case.shape_str()}"))
        for ax in (ax_t, ax_r):
            ax.set_yticks([p for p, _ in ticks])
            ax.set_yticklabels([t for _, t in ticks], fontsize=6.5)
            ax.set_ylim(len(ticks) - 0.5, -0.5)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(fmt)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(True, axis="x", which="both", alpha=0.3)
        times = [r.median_ms for c in cases.values() for r in c if r.status == "ok"]
        ratios = [r.ratio_vs_reference for c in cases.values() for r in c
                  if r.status == "ok" and r.ratio_vs_reference and r.backend != "reference"]
        if times:  # log bars start at the left edge: put it well below the shortest time
            ax_t.set_xlim(min(times) / 4, max(times) * 4)
        if ratios:
            ax_r.set_xlim(min(0.5, min(ratios) / 2.5), max(2.0, max(ratios) * 2.5))
        mode_s = f" {mode}" if op in BC.DIFFERENTIABLE else ""
        ax_t.set_title(f"{BC.SHORT[op]}{mode_s}: median time (ms)", fontsize=9)
        ax_r.set_title(f"{BC.SHORT[op]}{mode_s}: speed-up vs reference (x; > 1 is faster)", fontsize=9)
        ax_r.axvline(1.0, color="#7f7f7f", lw=1, ls="--")
    fig.legend(handles=[Patch(color=seen[b], label=b) for b in sorted(seen, key=_order)], loc="lower center",
               bbox_to_anchor=(0.5, 1.0), ncol=len(seen), fontsize=8, frameon=False)
    notes = sorted({f"{r.backend}: {r.status}, {r.reason}" for r in records if r.status != "ok"})
    if notes:
        import textwrap

        text = "\n".join(textwrap.fill(n, 180, subsequent_indent="    ") for n in notes)
        fig.text(0.01, 0.0, "did not run:\n" + text, fontsize=6.5, va="top", ha="left", color="#444444")
    fig.tight_layout()
    return fig
