"""``hot-kernels bench``: a tiny run through the CLI (JSON schema, table, PNG), argument errors,
and the pieces the run relies on (the tie-aware selection check, skip reasons, no matplotlib).

Tiny shapes (a sweep at N = 16, 24 and C = 32) and a 10 ms time budget keep this to seconds;
torch.compile is left out (its compile takes longer than the rest together).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import hot_kernels
from hot_kernels import bench_cases as BC
from hot_kernels import benchmark as H
from hot_kernels import cli
from hot_kernels import reference as R

RECORD_FIELDS = {
    "op", "model", "mode", "params", "dtype", "device", "device_name", "backend", "kind", "status", "reason",
    "checked", "check", "median_ms", "min_ms", "max_ms", "repeats", "peak_bytes", "ratio_vs_reference",
    "ratio_vs_best_baseline", "flop", "bytes", "versions", "git_commit", "date",
}
TINY = ["bench", "--ops", "dpc,tpc,tra", "--sweep", "N=16,24", "--sweep", "C=32", "--device", "cpu",
        "--backends", "reference,sdpa,cpu,cuda,triton", "--budget", "0.01"]


@pytest.fixture(autouse=True, scope="module")
def _leave_malloc_alone():
    """hot-kernels bench tunes glibc's malloc for its process; not for the test session's."""
    saved = H.keep_freed_host_memory
    H.keep_freed_host_memory = lambda: None
    yield
    H.keep_freed_host_memory = saved


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, _leave_malloc_alone):
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(TINY + ["--out", str(out)])
    return rc, buf.getvalue(), out


def test_tiny_run_writes_checked_records(tiny_run):
    rc, text, out = tiny_run
    assert rc == 0, text
    doc = json.loads((out / "bench.json").read_text())
    assert doc["command"] and doc["environment"]["torch"] == torch.__version__
    recs = doc["records"]
    # 2 N values x (dpc_knn, TPC, TRA forward, TRA forward+backward) cases.
    assert len({(r["op"], r["mode"], json.dumps(r["params"], sort_keys=True)) for r in recs}) == 8
    for r in recs:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["checked"] is True and r["check"], r
            assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] >= 1
            assert r["ratio_vs_reference"] > 0 and r["versions"]["torch"] == torch.__version__
        else:
            assert r["checked"] is False and r["reason"], r
    by = {(r["op"], r["mode"], r["backend"]) for r in recs if r["status"] == "ok"}
    assert ("dpc_knn", "forward", "reference") in by
    assert ("token_recovering_attention", "forward+backward", "sdpa") in by
    if "cpu" in _runs_here():
        assert ("dpc_knn", "forward", "cpu") in by
    triton = [r for r in recs if r["backend"] == "triton"]
    assert triton and all(r["status"] == "skipped" and "triton" in r["reason"] for r in triton)
    assert "sdpa" not in {r["backend"] for r in recs if r["op"] != "token_recovering_attention"}
    assert (out / "command.txt").read_text().startswith("hot-kernels bench --ops dpc,tpc,tra")
    assert doc["command"].startswith("hot-kernels bench")


def test_environment_records_the_cpu_path_and_the_variables_that_change_a_run(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    env = H.environment("cpu")
    assert env["env"].get("ATEN_CPU_CAPABILITY") == "avx2"
    assert "MKL_ENABLE_INSTRUCTIONS" not in env["env"]
    assert env["cpu_isa"] == hot_kernels.cpu_isa()


def _runs_here():
    return [b for b, why in hot_kernels.available_backends("cpu").items() if why is None]


def test_tiny_run_prints_the_table(tiny_run):
    _, text, _ = tiny_run
    assert "x ref" in text and "x best base" in text  # the two ratio columns
    assert "dpc_knn HoT-MixSTE B=1 N=16 C=32" in text
    assert "Summary (fastest hot_kernels backend per case)" in text
    assert "skipped: " in text  # triton on CPU says why it is not timed
    assert "wrote " in text


def test_tiny_run_png(tiny_run):
    _, text, out = tiny_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "bench.png NOT written" in text and "pip install matplotlib" in text
        pytest.skip("matplotlib is not installed: the run says bench.png was not written, and how to get it")
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_no_matplotlib_is_reported_not_fatal(tmp_path, monkeypatch):
    doc, recs = H.load_records(str(_any_json(tmp_path)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    why = H.plot(recs, str(tmp_path / "x.png"))
    assert why and "pip install matplotlib" in why and not (tmp_path / "x.png").exists()


def _any_json(tmp_path):
    rc = cli.main(["bench", "--ops", "dpc", "--sweep", "N=12", "--sweep", "C=8", "--device", "cpu",
                   "--backends", "reference", "--repeat", "1", "--out", str(tmp_path / "one")])
    assert rc == 0
    return tmp_path / "one" / "bench.json"


def test_host_allocator_as_is_leaves_malloc_alone_and_says_so(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(H, "keep_freed_host_memory", lambda: calls.append(1) or "kept")
    for choice, tuned, said in (("as-is", [], "as is (--host-allocator as-is)"), ("kept", [1], "kept")):
        rc = cli.main(["bench", "--ops", "dpc", "--sweep", "N=12", "--sweep", "C=8", "--device", "cpu",
                       "--backends", "reference", "--repeat", "1", "--host-allocator", choice,
                       "--out", str(tmp_path / choice)])
        assert rc == 0 and calls == tuned
        doc, _ = H.load_records(str(tmp_path / choice / "bench.json"))
        assert json.dumps(doc).count(said) >= 1, choice
        calls.clear()


@pytest.mark.parametrize("argv, message", [
    (["--ops", "dpc,nope"], "unknown op 'nope'"),
    (["--sweep", "X=1,2"], "NAME one of N, B, C"),
    (["--sweep", "N=12,abc"], "positive integers"),
    (["--sweep", "N"], "NAME=V1,V2"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--backends", "cudnn"], "unknown backend"),
    (["--device", "tpu"], "expected cpu or cuda"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench"] + argv + ["--list"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_list_shows_the_published_default(capsys):
    assert cli.main(["bench", "--device", "cpu", "--list"]) == 0
    text = capsys.readouterr().out
    assert "dpc_knn HoT-MixSTE B=64 N=243 C=512 f=81 k=2 float32" in text
    assert "dpc_knn TPC-MHFormer B=1 N=351 C=1536 f=117 k=2 center=175 float32" in text
    assert "TRA forward+backward HoT-MotionAGFormer" in text


def test_targets_adds_the_design_targets_cases_and_list_needs_no_gpu(capsys):
    # The GPU case list is shown on any machine (what scripts/gpu_check.sh will time there).
    assert cli.main(["bench", "--device", "cuda", "--quick", "--targets", "--list"]) == 0
    text = capsys.readouterr().out
    assert "dpc_knn HoT-MixSTE B=4 N=16384 C=512 f=4096 k=2 float32" in text  # a target, not in --quick
    assert "TRA forward+backward HoT-MixSTE B=64 S=1088" in text and "10 cases" in text
    assert cli.main(["bench", "--device", "cpu", "--quick", "--list"]) == 0
    quick = capsys.readouterr().out
    assert cli.main(["bench", "--device", "cpu", "--quick", "--targets", "--list"]) == 0
    assert capsys.readouterr().out == quick  # the CPU target (dpc_knn B=64) is already a quick case


def test_an_interrupted_run_writes_the_cases_done(tmp_path, monkeypatch, capsys):
    real = H.run_cases

    def one_case_then_interrupt(cases, *args, on_case=None, **kw):
        real(cases[:1], *args, on_case=on_case, **kw)
        raise KeyboardInterrupt  # as a time limit's SIGINT would

    monkeypatch.setattr(H, "run_cases", one_case_then_interrupt)
    rc = cli.main(["bench", "--ops", "dpc", "--sweep", "N=12,16", "--sweep", "C=8", "--device", "cpu",
                   "--backends", "reference", "--repeat", "1", "--out", str(tmp_path)])
    assert rc == 130
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert {r["params"]["N"] for r in doc["records"]} == {12}
    assert any("interrupted after 1 of 2 cases" in n for n in doc["notes"])


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "hot_kernels", "bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--sweep" in out.stdout and "--quick" in out.stdout


def test_selection_check_accepts_the_reference_and_rejects_a_wrong_pick():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=g).cumsum(1) / 40 ** 0.5
    x[:, 5] = x[:, 4]  # an exact tie
    idx = R.dpc_knn(x, 12, 2)
    assert BC.selection_violations(x, idx, 12, 2) == []
    assert BC.selection_violations(x, idx, 12, 2, block_bytes=4096) == []  # row-blocked path
    # Replace sample 0's lowest-scoring pick by its highest-scoring unpicked token.
    log_rho = R.knn_density(x, 2, log=True)
    score = R.dpc_delta(x, log_rho)[0] * log_rho.exp()
    kept = idx[0].tolist()
    worst = min(kept, key=lambda t: score[0, t])
    best = max((t for t in range(40) if t not in kept), key=lambda t: score[0, t])
    bad = idx.clone()
    bad[0] = torch.tensor(sorted(set(kept) - {worst} | {best}))
    msgs = BC.selection_violations(x, bad, 12, 2)
    assert msgs and "sample 0" in msgs[0] and "not a near-tie" in msgs[0]
    assert BC.selection_violations(x, idx.flip(-1), 12, 2) == ["index rows are not ascending"]
    # center forcing: the center must be kept
    idx_c = R.dpc_knn(x, 12, 2, center=20)
    assert BC.selection_violations(x, idx_c, 12, 2, center=20) == []
    assert "center" in BC.selection_violations(x, idx, 12, 2, center=20)[0]


def test_a_wrong_output_is_failed_not_timed(monkeypatch):
    case = BC.sweep_cases("cpu", {"N": [20], "C": [8]}, ["dpc_knn"])[0]
    good = BC._op_function

    def broken(case, backend):  # the "cpu" candidate keeps the first f frames
        if backend == "cpu":
            return lambda x: torch.arange(case.p["f"]).expand(x.shape[0], -1).contiguous()
        return good(case, backend)

    monkeypatch.setattr(BC, "_op_function", broken)
    recs = H.run_case(case, torch.device("cpu"), H.environment("cpu"), H.TimingPolicy(repeat=1),
                      backends=["reference", "cpu"])
    cpu = next(r for r in recs if r.backend == "cpu")
    if cpu.status == "skipped":
        pytest.skip(cpu.reason)
    assert cpu.status == "failed" and cpu.median_ms is None and "output check failed" in cpu.reason


def test_reference_too_big_is_a_reason():
    case = BC._dpc(BC.PUBLISHED[0], 1, "float32", N=10 ** 6, f=1000)
    why = BC.reference_too_big(case, torch.device("cpu"))
    assert why is None or ("too big" in why and "GiB" in why)
    recs = [H._new_record(case, c, H.environment("cpu"))
            for c in BC.candidates(case, torch.device("cpu"), BC.CaseInputs(()), ["reference"],
                                   skip_reference="too big: test")]
    assert recs[0].status == "skipped" and recs[0].reason == "too big: test"


def test_progress_bar_on_a_pipe(capsys):
    import io

    stream = io.StringIO()
    p = H.Progress(3, enabled=True, stream=stream)
    for i in range(3):
        p.update(i, f"case {i}")
    p.close()
    assert stream.getvalue().count("\n") == 3 and "[2/3" in stream.getvalue()


def test_replot_redraws_from_the_json(tiny_run, capsys):
    _, _, out = tiny_run
    (out / "bench.png").unlink(missing_ok=True)
    rc = cli.main(["bench", "--replot", str(out)])
    text = capsys.readouterr().out
    assert "Summary (fastest hot_kernels backend per case)" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 1 and "pip install matplotlib" in text
        return
    assert rc == 0 and (out / "bench.png").exists()


def test_tra_bound_script_times_the_gemms_of_the_flop_model_and_prints_consistent_bounds(capsys):
    """benchmarks/bench_tra_bound.py: its GEMMs are exactly the bench's TRA FLOP model less the
    attention core (forward; forward+backward: those of the backward too), and each printed row
    has the cpu/SDPA ratio and the two bounds in order (a free core allows more than one at the
    GEMMs' rate)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tra_bound.py"
    spec = importlib.util.spec_from_file_location("bench_tra_bound", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    S, L, M, C = 3, 11, 5, 8
    case = BC.Case("token_recovering_attention", "HoT-MotionAGFormer", "float32",
                   tuple(sorted(dict(B=1, C=C, L=L, M=M, S=S, heads=2).items())), "forward")
    _, fwd = mod.gemm_calls(S, L, M, C, backward=False)
    assert fwd == BC.flop_model(case) - 4 * S * L * M * C
    _, fb = mod.gemm_calls(S, L, M, C, backward=True)
    assert fb == 3 * fwd  # the backward: two products per forward GEMM, each of its size
    mod.main(["--model", "HoT-MotionAGFormer", "--batch", "1", "--rounds", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("HoT-MotionAGFormer")]
    assert len(rows) == 2
    for row in rows:
        sdpa, cpu, ratio, gemm, _, _, free, at_rate = (float(v) for v in row[3:11])  # after "model B=1 mode"
        assert abs(ratio - sdpa / cpu) < 0.01 and 0 < gemm < sdpa
        assert free > at_rate > 0


def test_fresh_process_script_times_each_candidate_in_its_own_process(capsys):
    """benchmarks/bench_fresh_process.py: one line per process with every candidate's median and
    page faults per call; a forward+backward of an op without one is an argparse error."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fresh_process.py"
    spec = importlib.util.spec_from_file_location("bench_fresh_process", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--op", "dpc", "--mode", "forward+backward"])
    assert "TRA only" in capsys.readouterr().err
    assert mod.main(["--model", "HoT-MotionAGFormer", "--processes", "1", "--calls", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("process 1:")]
    assert len(rows) == 1
    parts = rows[0].split(": ", 1)[1].split(" | ")
    assert [p.split()[0] for p in parts] == ["sdpa", "cpu"]  # cpu: timed, or "cpu skipped: why"
    for p in parts:
        if "skipped" in p:
            continue
        _, ms, _, faults, _ = p.split()
        assert float(ms) > 0 and float(faults) >= 0


def test_bench_model_records_its_host_allocator_choice(tmp_path, monkeypatch):
    """benchmarks/bench_model.py --host-allocator: kept (the default) tunes glibc as the bench does,
    as-is leaves it alone, and model.json says which (the models themselves are not run here)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"
    spec = importlib.util.spec_from_file_location("bench_model_alloc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    monkeypatch.setattr(H, "keep_freed_host_memory", lambda: calls.append(1) or "kept")
    monkeypatch.setattr(mod, "run", lambda *a, **k: ([], H.environment("cpu")))
    for choice, tuned, said in ((None, [1], "kept"), ("as-is", [], "as is (--host-allocator as-is)"),
                                ("kept", [1], "kept")):
        out = tmp_path / str(choice)
        argv = ["--device", "cpu", "--out", str(out)] + (["--host-allocator", choice] if choice else [])
        assert mod.main(argv) == 0
        assert calls == tuned, choice
        doc, _ = H.load_records(str(out / "model.json"))
        assert doc["settings"]["host allocator"] == said, choice
        calls.clear()
