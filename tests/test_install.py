"""Installing hot_kernels never downloads torch, and hot_kernels._C always matches the torch that runs.

Default run (~50 s on a busy 2-core machine, ~33 s of CPU; no C++ compile):
* setup.py and the first-use build take sources and flags from one place (hot_kernels/_build.py);
* a _C stamped for another torch is recognised before it is loaded and rebuilt for this torch on
  first use (the compiler stubbed: it hands back this session's _C), with the cache key, flags,
  sources and stamp checked; the rebuilt _C then serves a second process from the cache; with
  HOT_KERNELS_JIT=0 the cpu backend is refused with the reason instead;
* no C++ compiler: a clear error;
* a fresh venv holding only torch (from the local wheel; pip reaches local package sources only),
  ``pip install <checkout>`` with build isolation: no torch downloaded or built against, the
  pure-Python package with csrc/ inside; the cpu backend runs there from a _C for its torch
  (seeded into its build cache, since compiling costs minutes).

``python -m pytest -m install tests/test_install.py`` (minutes): the same fresh venv, but the cpu
backend compiles _C for real on first use, then a second process reuses the cached build.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from hot_kernels import _build, _ext
from selection import assert_same_or_near_tie

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_C = _ext.C is not None
FOREIGN_TORCH = "1.0.0+elsewhere"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOT_KERNELS_", "PYTHONPATH"))}
    env.update(extra)
    return env


def _check_dpc(saved):
    """The cpu backend's selection (saved by a child process) against the reference, tie-aware."""
    d = torch.load(saved)
    import hot_kernels as hk

    ref = hk.dpc_knn(d["x"], d["f"], k=d["k"], backend="reference")
    assert_same_or_near_tie(d["index"], ref, d["x"], f=d["f"], k=d["k"])


# A child process: dpc_knn on the backend the default dispatch picks for a CPU tensor (cpu, once _C
# is there), saved for _check_dpc, and what hot_kernels._ext found, printed as JSON.
CHILD_RUN = r"""
import json, sys, torch
import hot_kernels as hk
from hot_kernels import _dispatch, _ext
x = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(1))
f, k = 12, 3
index = hk.dpc_knn(x, f, k=k)
torch.save(dict(x=x, index=index, f=f, k=k), sys.argv[1])
if len(sys.argv) > 2 and sys.argv[2] == "info":  # then `hot-kernels info`, as its entry point runs it
    from hot_kernels.cli import main
    main(["info"])
print(json.dumps(dict(backend=_dispatch.resolve("dpc_knn", x), origin=_ext.ORIGIN, path=_ext.PATH,
                      installed_problem=_ext.INSTALLED_PROBLEM, package=hk.__file__, torch=torch.__version__)))
"""


def test_setup_py_and_the_first_use_build_share_sources_and_flags():
    code = ("import json, runpy, setuptools, sys\n"
            "seen = {}\n"
            "setuptools.setup = lambda **kw: seen.update(kw)\n"
            "sys.argv = ['setup.py', '--version']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n"
            "ext = seen['ext_modules'][0]\n"
            "print(json.dumps(dict(sources=ext.sources, args=ext.extra_compile_args, link=ext.extra_link_args,\n"
            "                      cmdclass=sorted(seen['cmdclass']))))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = _ext.build_config()
    assert [os.path.join(ROOT, s) for s in got["sources"]] == _build.sources(os.path.join(ROOT, "csrc"),
                                                                              cfg["with_cuda"])
    cxx = got["args"]["cxx"] if isinstance(got["args"], dict) else got["args"]
    assert cxx == cfg["cxx_flags"] and "-ffp-contract=off" in cxx and "-fopenmp" in cxx
    assert got["link"] == cfg["link_flags"]
    assert got["cmdclass"] == ["build_ext", "build_py"]  # build_py ships csrc/ as hot_kernels/_csrc
    header = open(os.path.join(ROOT, "build", "hot_kernels_gen", _build.HEADER)).read()
    stamp = json.loads(re.search(r'HOT_KERNELS_BUILD_STAMP:(.*)"\n', header).group(1).replace('\\"', '"'))
    assert stamp["torch"] == torch.__version__ and stamp["built_by"] == "setup.py"
    assert stamp["sources"] == cfg["sources"]


def test_default_cuda_archs_carry_ptx_of_the_newest(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    archs = _build.cuda_archs().split(";")
    assert archs[-1].endswith("+PTX") and archs == sorted(archs, key=lambda a: float(a.split("+")[0]))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.cuda_archs() == "9.0"


@pytest.mark.skipif(not HAVE_C, reason=f"no hot_kernels._C for this torch in this session: {_ext.ERROR}")
def test_loaded_c_records_the_torch_it_was_built_for():
    stamp = _build.read_stamp(_ext.PATH)
    assert stamp is not None and stamp["torch"] == torch.__version__
    assert json.loads(_ext.C.build_stamp[len(_build.STAMP_MARKER):]) == stamp  # the module says the same
    assert _ext.stamp_problem(_ext.PATH) is None


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in _ext.compiler_problem()
    with pytest.raises(RuntimeError, match=r"cannot compile hot_kernels._C for torch .*no C\+\+ compiler"):
        _ext.build(force=True)


# The mismatch path in a copy of the package whose installed _C is stamped for another torch (and is
# not even a shared library: it must never be loaded). The "compiler" records how it was called and
# hands back this session's _C, which was built for this torch from these sources.
CHILD_STUB = r"""
import json, os, shutil, sys, time, warnings
import torch, torch.utils.cpp_extension as ce
real, calls_out, mode = sys.argv[2], sys.argv[3], sys.argv[4]
calls = []

def fake_load(name, sources, extra_cflags, extra_cuda_cflags, extra_ldflags, extra_include_paths,
              build_directory, with_cuda, verbose):
    if mode == "no-compile":
        raise AssertionError("compiled although a build for this torch is cached")
    calls.append(dict(name=name, sources=sources, cflags=extra_cflags, ldflags=extra_ldflags,
                      include=extra_include_paths, build_directory=build_directory, with_cuda=with_cuda,
                      header=open(os.path.join(build_directory, "hot_kernels_build_info.h")).read()))
    open(os.path.join(build_directory, "one.o"), "w").close()
    time.sleep(0.6)  # long enough for a progress line
    so = os.path.join(build_directory, name + ".so")
    shutil.copyfile(real, so)
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

ce.load = fake_load
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import hot_kernels as hk
    from hot_kernels import _ext
_ext._PROGRESS_EVERY = 0.1
x = torch.randn(2, 16, 8)
refused = None
if mode == "jit-off-then-on":
    try:
        hk.dpc_knn(x, 4, backend="cpu")
    except hk.BackendUnavailableError as e:
        refused = str(e)
    os.environ["HOT_KERNELS_JIT"] = "1"
"""
CHILD_STUB_END = r"""
json.dump(dict(calls=calls, refused=refused, import_warnings=[str(m.message) for m in w]), open(calls_out, "w"))
"""


@pytest.mark.skipif(not HAVE_C, reason=f"no hot_kernels._C for this torch in this session: {_ext.ERROR}")
def test_c_built_for_another_torch_is_rebuilt_for_this_one_not_fallen_back(tmp_path):
    pkg, cache = tmp_path / "pkg", tmp_path / "cache"
    shutil.copytree(os.path.join(ROOT, "hot_kernels"), pkg / "hot_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    shutil.copytree(os.path.join(ROOT, "csrc"), pkg / "csrc", ignore=shutil.ignore_patterns("*build_info.h"))
    import sysconfig

    foreign = pkg / "hot_kernels" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    foreign.write_bytes(b"not a shared library\0" + _build.STAMP_MARKER
                        + json.dumps(dict(torch=FOREIGN_TORCH)).encode() + b"\0")
    script = tmp_path / "child.py"
    script.write_text(CHILD_STUB + CHILD_RUN.replace("sys.argv[1]", "sys.argv[5]") + CHILD_STUB_END)

    def child(mode, jit):
        calls = tmp_path / f"calls-{mode}.json"
        saved = tmp_path / f"out-{mode}.pt"
        proc = subprocess.run([sys.executable, str(script), "-", _ext.PATH, str(calls), mode, str(saved)],
                              cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                              env=_env(PYTHONPATH=str(pkg), HOT_KERNELS_CACHE=str(cache), HOT_KERNELS_JIT=jit))
        assert proc.returncode == 0, proc.stderr[-4000:]
        _check_dpc(saved)
        return json.loads(calls.read_text()), json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    stub, run, stderr = child("jit-off-then-on", "0")
    # Found before loading: the foreign file was never imported (it would fail as not an ELF file).
    assert f"was built for torch {FOREIGN_TORCH}, but this is torch {torch.__version__}" in run["installed_problem"]
    # HOT_KERNELS_JIT=0: the cpu backend refused, saying why and what to do; a warning at import.
    assert "backend 'cpu'" in stub["refused"] and FOREIGN_TORCH in stub["refused"]
    assert "HOT_KERNELS_JIT=0" in stub["refused"] and "hot-kernels build" in stub["refused"]
    assert any("only the 'reference' and 'triton' backends" in m for m in stub["import_warnings"])
    # First use with the build allowed: compiled once for this torch, then the cpu backend ran.
    assert len(stub["calls"]) == 1
    call, cfg = stub["calls"][0], _ext.build_config()
    assert run["backend"] == "cpu" and run["origin"] == "built", run
    assert run["package"].startswith(str(pkg))
    key_dir = call["build_directory"]
    assert os.path.dirname(key_dir) == str(cache)
    assert os.path.basename(key_dir).startswith(f"torch{torch.__version__}-{sys.implementation.cache_tag}-")
    assert call["sources"] == _build.sources(str(pkg / "csrc"), cfg["with_cuda"]) and call["name"] == "_C"
    assert call["cflags"] == cfg["cxx_flags"] and call["ldflags"] == cfg["link_flags"]
    assert str(pkg / "csrc") in call["include"] and key_dir in call["include"]
    assert f'\\"torch\\": \\"{torch.__version__}\\"' in call["header"] and '\\"built_by\\": \\"jit\\"' in call["header"]
    assert f"hot_kernels: compiling hot_kernels._C for torch {torch.__version__}" in stderr
    assert re.search(r"hot_kernels: \.\.\. 1/\d+ sources compiled", stderr), stderr[-2000:]
    # The stub's copy carries the stamp of this torch: a second process loads it from the cache.
    stub2, run2, stderr2 = child("no-compile", "1")
    assert run2["origin"] == "cache" and run2["backend"] == "cpu" and run2["path"] == os.path.join(key_dir, "_C.so")
    assert stub2["calls"] == [] and "compiling" not in stderr2


# ------------------------------------------------------------------------------------------------
# A fresh venv: only torch in it, pip reaching local package sources only.
# ------------------------------------------------------------------------------------------------


def _pip_config():
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    links, indexes = [], []
    for line in out.splitlines():
        m = re.match(r"[^.]*\.(find-links|index-url|extra-index-url)='(.*)'$", line.strip())
        if m:
            (links if m.group(1) == "find-links" else indexes).extend(m.group(2).split())
    return links, indexes


def _local_sources():
    """pip options naming only this machine's package sources (a find-links folder holding a wheel of
    this very torch, file:// indexes for its dependencies), or why there are none."""
    links, indexes = _pip_config()
    links = [d for d in dict.fromkeys(links) if os.path.isdir(d)]
    indexes = [u for u in dict.fromkeys(indexes) if u.startswith("file://")]
    version = torch.__version__
    wheels = [w for d in links for w in glob.glob(os.path.join(d, f"torch-{version}-*.whl"))]
    if not wheels:
        return None, f"no local wheel of torch {version} among pip's find-links {links}: the test would download torch"
    if not indexes:
        return None, "no local (file://) package index for torch's dependencies"
    opts = ["--index-url", indexes[0]]
    for u in indexes[1:]:
        opts += ["--extra-index-url", u]
    for d in links:
        opts += ["--find-links", d]
    return opts, wheels[0]


LOCAL, TORCH_WHEEL = _local_sources()


def _pip_env(**extra):
    # No pip configuration files or PIP_* variables: the only sources are the options passed.
    env = {k: v for k, v in _env().items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


@pytest.fixture
def fresh_venv(tmp_path):
    """(python, bin dir, the pip log of `pip install <checkout>`): a venv holding torch from the local
    wheel, then this checkout installed with build isolation on."""
    if LOCAL is None:
        pytest.skip(TORCH_WHEEL)
    venv = tmp_path / "venv"
    # No pip inside (ensurepip costs seconds): this pip installs into it (pip --python).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "--no-compile"]
    log1, log2 = tmp_path / "pip-torch.log", tmp_path / "pip-install.log"
    proc = subprocess.run([*pip, "--log", str(log1), *LOCAL, f"torch=={torch.__version__}"], env=_pip_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Processing {TORCH_WHEEL}" in log1.read_text() or os.path.basename(TORCH_WHEEL) in log1.read_text()
    # The checkout, as a user types it: no flags (build isolation on). Copied first, so that the
    # build's own files (build/, *.egg-info) land in the copy, not in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".hypothesis", ".pytest_cache", "bench-out*",
        ".venv*", "_csrc", "gpu-check-out"))
    proc = subprocess.run([*pip, "--log", str(log2), *LOCAL, str(src)], env=_pip_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return py, str(venv / "bin"), log2.read_text()


def _check_isolated_install(py, log, cache):
    """Checks the pip log and what got installed; returns the venv's build folder for its torch."""
    # Nothing of torch fetched for the build or for the install; the venv's torch is the local wheel's.
    assert not re.search(r"(Collecting|Downloading|Processing)\s+(\S*/)?torch([-=<>~!\s]|$)", log, re.I | re.M), \
        [line for line in log.splitlines() if "torch" in line.lower()][:20]
    assert re.search(r"Requirement already satisfied: torch", log)
    assert "Installing build dependencies" in log and "torch is not importable in this build environment" in log
    info = subprocess.run([py, "-c", "import torch, hot_kernels, hot_kernels._build as b, os, importlib.util; "
                                     "from hot_kernels import _ext; "
                                     "print(torch.__version__); print(os.path.dirname(hot_kernels.__file__)); "
                                     "print(importlib.util.find_spec('hot_kernels._C')); print(b.source_dir()); "
                                     "print(_ext.build_dir())"],
                          cwd="/", env=_env(HOT_KERNELS_JIT="0", HOT_KERNELS_CACHE=str(cache)), capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-3000:]
    version, pkg, spec, src, key_dir = info.stdout.split("\n")[:5]
    assert version == torch.__version__ and "site-packages" in pkg
    assert spec == "None"  # pure-Python: no _C compiled against a downloaded torch
    assert src == os.path.join(pkg, "_csrc") and os.path.isfile(os.path.join(src, "hot_kernels.cpp"))
    assert key_dir.startswith(str(cache / f"torch{torch.__version__}-"))
    return key_dir


def _run_cpu(py, tmp_path, name, info=False, **env):
    saved = tmp_path / f"{name}.pt"
    proc = subprocess.run([py, "-c", CHILD_RUN, str(saved)] + (["info"] if info else []), cwd=str(tmp_path),
                          env=_env(**env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_dpc(saved)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout, proc.stderr


@pytest.mark.skipif(not HAVE_C, reason=f"no hot_kernels._C for this torch in this session: {_ext.ERROR}")
def test_fresh_venv_isolated_install_downloads_no_torch_and_runs_the_cpu_backend(fresh_venv, tmp_path):
    py, bindir, log = fresh_venv
    cache = tmp_path / "cache"
    key_dir = _check_isolated_install(py, log, cache)
    # What a first-use build would leave there (compiling costs minutes: the marked test does it).
    os.makedirs(key_dir)
    shutil.copyfile(_ext.PATH, os.path.join(key_dir, "_C.so"))
    run, out, _ = _run_cpu(py, tmp_path, "venv", info=True, HOT_KERNELS_CACHE=str(cache), HOT_KERNELS_JIT="0")
    assert run["backend"] == "cpu" and run["origin"] == "cache" and run["torch"] == torch.__version__, run
    # hot-kernels info: which _C (path), for which torch, and why the installed one is not used.
    assert os.path.join(key_dir, "_C.so") in out and f"torch {torch.__version__}" in out
    assert "this install has no compiled hot_kernels._C" in out
    assert os.access(os.path.join(bindir, "hot-kernels"), os.X_OK)  # the entry point


@pytest.mark.install
def test_fresh_venv_isolated_install_compiles_c_on_first_use(fresh_venv, tmp_path):
    py, bindir, log = fresh_venv
    cache = tmp_path / "cache"
    key_dir = _check_isolated_install(py, log, cache)
    info = subprocess.run([os.path.join(bindir, "hot-kernels"), "info"], cwd="/", capture_output=True, text=True,
                          env=_env(HOT_KERNELS_CACHE=str(cache)), timeout=300)
    assert "compile it for this torch on first use" in info.stdout, info.stdout
    run, _, stderr = _run_cpu(py, tmp_path, "first", HOT_KERNELS_CACHE=str(cache), MAX_JOBS="2")
    assert run["backend"] == "cpu" and run["origin"] == "built" and run["path"] == os.path.join(key_dir, "_C.so")
    assert f"hot_kernels: compiling hot_kernels._C for torch {torch.__version__}" in stderr
    assert re.search(r"hot_kernels: \.\.\. \d+/\d+ sources compiled", stderr) and "compiled in" in stderr
    assert _build.read_stamp(run["path"])["built_by"] == "jit"
    run2, _, stderr2 = _run_cpu(py, tmp_path, "second", HOT_KERNELS_CACHE=str(cache), HOT_KERNELS_JIT="0")
    assert run2["origin"] == "cache" and run2["path"] == run["path"] and "compiling" not in stderr2
    print(stderr, file=sys.stderr)
