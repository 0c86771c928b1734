"""The CUDA token recovering attention, run on the CPU under the emulator of tests/cuda_emulation/.

csrc/cuda/token_recovering_attention.cu (host glue and kernels, unchanged) is compiled once per
session as plain C++ with -DTRA_EMULATE against tests/cuda_emulation/tra_emu.h: each CUDA thread is
a std::thread, scheduled cooperatively at barriers, shuffles and mma.sync (emulated with the PTX
fragment layouts). What that does and does not prove: tests/cuda_emulation/README.md.

Checked here, per dtype (float32: CUDA-core FMA tiles; float16/bfloat16: tensor-core tiles):
  * forward (out, lse) and backward (all ten gradients) against hot_kernels.reference in float64
    on the same rounded inputs, with tests/test_backends.py's tolerances;
  * every value is written: uninitialised ATen allocations are NaN-filled (deterministic mode) and
    shared memory is NaN-poisoned by the emulator;
  * outputs bitwise equal under two schedules (lowest thread/block first vs highest first, plus a
    random one): a missing barrier or a race between threads changes the result;
  * the tile choice by the device's shared-memory limit: float32 at head dims 96 and 128 on a
    device allowing 99 KB per block (sm_86/89/120) takes the compact tiles, and below what any
    kernel tiling needs, the ATen attention; both against the float64 reference.
Skips, saying why, only when the host toolchain cannot build a torch C++ extension at all.
"""
import ast
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.utils.cpp_extension as ce

from hot_kernels import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_DIR = os.path.join(ROOT, "tests", "cuda_emulation")
CSRC = os.path.join(ROOT, "csrc")
OURS = ("token_recovering_attention.cu", "tra_kernels.cuh", "hot_kernels.h", "tra_emu.h", "tra_ext.cpp")

# tests/test_backends.py's TOL (checked equal below), per input dtype: forward, backward.
TOL = {
    torch.float32: dict(fwd=dict(rtol=2e-5, atol=2e-6), bwd=dict(rtol=1e-4, atol=1e-5)),
    torch.bfloat16: dict(fwd=dict(rtol=2e-2, atol=2e-2), bwd=dict(rtol=5e-2, atol=5e-2)),
    torch.float16: dict(fwd=dict(rtol=5e-3, atol=5e-3), bwd=dict(rtol=2e-2, atol=2e-2)),
}
# bfloat16 has an 8-bit mantissa, and on some cases the reference backend itself, run in bfloat16
# on the same inputs, is past TOL (weight gradients summed over S*L rows: e.g. (4, 27, 9, 64, 1, ...)
# gives 1.14 x TOL on d_wo for the reference, 1.16 x TOL on d_wq for the kernels). So a bfloat16
# value passes if its error in units of TOL (max |err| / (atol + rtol |want|); 1 = the edge) is
# <= max(1, BF16_SLACK x the reference-in-bfloat16's error on the same tensor): within TOL, or no
# worse than the oracle in that dtype up to a factor for a different, equally valid rounding order
# (the kernels round P before P V and the mma sums in fp32, where the reference rounds each op's
# output). float32 and float16 get no such allowance.
BF16_SLACK = 1.5

CASES = [
    # S, L, M, C, heads, shared query, biases present (of q k v o), residual
    (2, 9, 4, 64, 2, True, "qkvo", True),     # head dim 32, shared query
    (3, 7, 5, 16, 2, False, "", False),       # head dim 8, per-sequence query, no bias
    (1, 70, 81, 64, 1, False, "ko", True),    # head dim 64, S = 1, 2 query tiles, 2 key tiles
    (2, 70, 81, 64, 2, True, "v", False),     # head dim 32, shared query, 2 x 2 tiles
    (4, 27, 9, 64, 1, False, "o", True),      # head dim 64 (bf16 at the tolerance's edge, see above)
    (2, 5, 11, 30, 2, True, "qkvo", True),    # head dim 15: no 16-byte vector accesses
    (2, 33, 40, 96, 1, True, "qkvo", False),  # head dim 96: padded to 128 (32-row tiles in backward)
    (2, 6, 5, 256, 1, False, "", True),       # head dim 256: the ATen fallback of the same glue
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A shared query over S > 256 sequences: the dQ kernel sums 2 sequences per block (129 groups), the
# only way to reach that loop (fewer sequences give one group each). ~900 blocks, 12-40 s: float32
# only (the loop is the same code for every dtype) and marked slow.
GROUPED = (257, 3, 2, 8, 1, True, "qkvo", True)
ACCURACY = [pytest.param(c, d, id=f"{c}-{str(d)[6:]}") for c in CASES for d in DTYPES]
ACCURACY.append(pytest.param(GROUPED, torch.float32, id=f"{GROUPED}-float32", marks=pytest.mark.slow))
GRAD_NAMES = ["query", "x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo"]


# ---- build ------------------------------------------------------------------------------------


def _toolchain_problem():
    """Why this machine cannot build a torch C++ extension at all, or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no host C++ compiler ({cxx!r} is not on PATH)"
    if not ce.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension.load needs it)"
    if not any(os.path.exists(os.path.join(p, "torch", "library.h")) for p in ce.include_paths()):
        return "this torch ships no C++ headers (torch/library.h)"
    probe = ("template <typename F> void f(F g) { g.template operator()<int>(); }\n"
             "int main() { f([]<typename T>() {}); }\n")
    proc = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"], input=probe, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        return f"{cxx} cannot compile C++20 (template lambdas): {proc.stderr.strip()[:300]}"
    return None


def _environmental(log, ours=OURS):
    """True when a failed build's log shows no compile error in our own sources."""
    if re.search(r"internal compiler error|Killed|No space left|Cannot allocate memory|out of memory", log):
        return True
    return not any(re.search(re.escape(name) + r":\d+:\d+: (fatal )?error", log) for name in ours)


def build_emulation(tmp_path_factory, name, source, define, ours):
    """torch.ops.<name>, built from tests/cuda_emulation/<source> with -D<define> in a scratch
    directory (skips when the toolchain cannot build it; fails on a compile error in `ours`)."""
    why = _toolchain_problem()
    if why is not None:
        pytest.skip(f"CUDA emulation not built: {why}")
    build = tmp_path_factory.mktemp(name + "_build")
    # -O1: the fastest build + run here (the run is dominated by thread hand-offs, not arithmetic).
    flags = ["-std=c++20", "-O1", f"-D{define}", "-DHOT_KERNELS_WITH_CUDA", "-Wno-unknown-pragmas",
             "-fvisibility=hidden"]
    ldflags = []
    if os.environ.get("TRA_EMU_ASAN") == "1":  # see tests/cuda_emulation/README.md
        flags += ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    try:
        ce.load(name=name, sources=[os.path.join(EMU_DIR, source)],
                extra_cflags=flags, extra_ldflags=ldflags, extra_include_paths=[CSRC, EMU_DIR],
                build_directory=str(build), verbose=False, is_python_module=False)
        return getattr(torch.ops, name)
    except (RuntimeError, OSError) as e:
        log = str(e)
    if _environmental(log, ours):
        pytest.skip(f"CUDA emulation not built (toolchain problem, not our sources): {log[-1500:]}")
    errors = [line for line in log.splitlines() if re.search(r":\d+:\d+: (fatal )?error", line)]
    pytest.fail(f"the CUDA sources do not compile under {define}:\n" + "\n".join(errors[:30])
                + f"\n---- end of the build log ----\n{log[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """torch.ops.hot_kernels_tra_emu, built once per session in a scratch directory."""
    return build_emulation(tmp_path_factory, "hot_kernels_tra_emu", "tra_ext.cpp", "TRA_EMULATE", OURS)


@pytest.fixture
def poison_empty():
    """at::empty / torch.empty fill with NaN while a test runs: an output element that a kernel
    never writes shows as NaN instead of whatever the allocator returned."""
    import torch.utils.deterministic as det

    old_alg, old_warn, old_fill = (torch.are_deterministic_algorithms_enabled(),
                                   torch.is_deterministic_algorithms_warn_only_enabled(),
                                   det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)  # for the fill only: warn, never raise
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_alg, warn_only=old_warn)


# ---- inputs, runs, reference --------------------------------------------------------------------


def tra_args(case, dtype, seed=0):
    """The ten inputs (query, x, wq, bq, wk, bk, wv, bv, wo, bo), drawn in float64 and rounded to
    dtype, plus grad_out; absent biases are None."""
    S, L, M, C, _, shared, biases, _ = case
    g = torch.Generator().manual_seed(seed)

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    w = C ** -0.5
    args = [t(1 if shared else S, L, C), t(S, M, C)]
    for name in "qkvo":
        args += [t(C, C, s=w), t(C, s=0.1) if name in biases else None]
    return args, t(S, L, C)


_RUNS = {}


def emulated(emu, case, dtype, policy=0, seed=1, smem_optin=None):
    """(out, lse, grads) of the emulated CUDA op; memoised per (case, dtype, policy, seed, smem_optin).
    smem_optin: the emulated device's opt-in shared memory per block in bytes (None: 227 KB, an
    H100/H200's). The emulator's stats (launches, blocks, switches, largest shared memory of a
    launch) of the run go with it into _STATS."""
    key = (case, dtype, policy, seed, smem_optin)
    if key not in _RUNS:
        _, _, _, C, H, _, _, residual = case
        args, grad_out = tra_args(case, dtype)
        scale = (C // H) ** -0.5
        emu.set_policy(policy, seed)
        emu.reset_stats()
        old = emu.set_smem_optin(smem_optin) if smem_optin is not None else None
        try:
            out, lse = emu.forward(*args, H, scale, residual)
            grads = emu.backward(grad_out, *args, lse, H, scale, residual)
        finally:
            if old is not None:
                emu.set_smem_optin(old)
        _RUNS[key] = (out, lse, list(grads))
        _STATS[key] = dict(zip(("launches", "blocks", "switches", "max_smem"), emu.stats()))
    return _RUNS[key]


_STATS = {}


def reference(case, dtype, compute_dtype):
    """out, lse and the gradients of the present inputs from hot_kernels.reference, computed in
    compute_dtype on the inputs rounded to dtype."""
    _, _, _, C, H, _, _, residual = case
    args, grad_out = tra_args(case, dtype)
    leaves = [a.to(compute_dtype).requires_grad_() if a is not None else None for a in args]
    out = R.token_recovering_attention(*leaves, num_heads=H, residual=residual)
    present = [a for a in leaves if a is not None]
    grads = torch.autograd.grad(out, present, grad_out.to(compute_dtype))
    with torch.no_grad():  # lse (S, H, L) of the scaled logits
        q, x, wq, bq, wk, bk = leaves[:6]
        S, M, _ = x.shape
        L = q.shape[1]
        d = C // H
        Q = torch.nn.functional.linear(q.expand(S, L, C), wq, bq).view(S, L, H, d).transpose(1, 2)
        K = torch.nn.functional.linear(x, wk, bk).view(S, M, H, d).transpose(1, 2)
        lse = torch.logsumexp(Q @ K.transpose(-1, -2) * d ** -0.5, -1)
    return out.detach(), lse, list(grads)


def err_in_tol(got, want, tol):
    """max |got - want| / (atol + rtol |want|): <= 1 is within tolerance; inf if not finite."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs() / (tol["atol"] + tol["rtol"] * want.abs())).max().item()


def same_bits(a, b):
    """Bitwise equality (NaN payloads included, which torch.equal would call unequal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


# ---- tests --------------------------------------------------------------------------------------


def test_tolerances_are_those_of_test_backends():
    tree = ast.parse(open(os.path.join(ROOT, "tests", "test_backends.py")).read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "TOL")
    theirs = eval(compile(ast.Expression(node.value), "test_backends.py", "eval"), {"torch": torch})
    assert {k: v for k, v in theirs.items() if k in TOL} == TOL


@pytest.mark.parametrize("case,dtype", ACCURACY)
def test_emulated_cuda_matches_the_reference(emu, poison_empty, case, dtype):
    assert_matches_reference(case, dtype, *emulated(emu, case, dtype))


def assert_matches_reference(case, dtype, out, lse, grads):
    """out, lse and the ten gradients of a run against the float64 reference, within TOL."""
    S, L, _, C, H = case[:5]
    args, _ = tra_args(case, dtype)
    want_out, want_lse, want_grads = reference(case, dtype, torch.float64)

    # Shapes, dtypes, and the empty tensors standing for the gradients of absent biases.
    assert out.shape == (S, L, C) and out.dtype == dtype
    assert lse.shape == (S, H, L) and lse.dtype == torch.float32
    assert len(grads) == 10
    got = {}
    for name, a, g in zip(GRAD_NAMES, args, grads):
        if a is None:
            assert g.numel() == 0, f"d_{name}: the input is absent, the gradient must be empty"
        else:
            assert g.shape == a.shape and g.dtype == dtype, f"d_{name}: {g.shape} {g.dtype}"
            got["d_" + name] = g
    got = {"out": out, "lse": lse, **got}
    want = dict(zip(got, [want_out, want_lse, *want_grads]))

    tol = TOL[dtype]
    errors = {k: err_in_tol(got[k], want[k], tol["fwd" if k in ("out", "lse") else "bwd"]) for k in got}
    allowed = {k: 1.0 for k in got}
    if dtype == torch.bfloat16:
        ref_out, _, ref_grads = reference(case, dtype, torch.bfloat16)
        for k, r in zip([k for k in got if k != "lse"], [ref_out, *ref_grads]):
            ref_err = err_in_tol(r, want[k], tol["fwd" if k == "out" else "bwd"])
            allowed[k] = max(1.0, BF16_SLACK * ref_err)
    bad = {k: (f"{errors[k]:.3g} (allowed {allowed[k]:.3g})" if errors[k] < float("inf") else "NaN/inf")
           for k in got if not errors[k] <= allowed[k]}
    assert not bad, f"error in units of the tolerance: {bad}"


RACE_CASES = [  # case, dtype, policy compared with policy 0
    ((2, 70, 81, 64, 2, True, "v", False), torch.float32, 1),
    ((2, 70, 81, 64, 2, True, "v", False), torch.bfloat16, 1),
    ((1, 70, 81, 64, 1, False, "ko", True), torch.float16, 2),
    ((2, 33, 40, 96, 1, True, "qkvo", False), torch.float32, 1),
]


@pytest.mark.parametrize("case,dtype,policy", RACE_CASES, ids=[f"{c}-{str(d)[6:]}-{p}" for c, d, p in RACE_CASES])
def test_emulated_cuda_is_schedule_independent(emu, poison_empty, case, dtype, policy):
    """Bitwise the same outputs when threads (and blocks) run lowest-id-first and highest-id-first
    (policy 1) or in a random order (policy 2): a missing barrier or a race between threads shows."""
    base = emulated(emu, case, dtype, policy=0)
    other = emulated(emu, case, dtype, policy=policy, seed=7)
    names = ["out", "lse", *("d_" + n for n in GRAD_NAMES)]
    differ = [n for n, a, b in zip(names, [base[0], base[1], *base[2]], [other[0], other[1], *other[2]])
              if not same_bits(a, b)]
    assert not differ, f"schedule-dependent results (policy 0 vs {policy}): {differ}"


# ---- the tile choice by the device's shared memory per block -------------------------------------

SMEM_99KB = 99 * 1024  # opt-in limit of sm_86 / sm_89 / sm_120 GPUs (RTX 30xx/40xx, L4, L40S)
COMPACT_CASES = [  # float32 at padded head dim 128: the default tiles need 108-116 KB per block
    (2, 33, 40, 96, 1, True, "qkvo", False),   # head dim 96, shared query
    (2, 70, 81, 128, 1, False, "ko", True),    # head dim 128, per-sequence query, 2 query x 3-6 key tiles
]


@pytest.mark.parametrize("case", COMPACT_CASES, ids=str)
def test_emulated_cuda_float32_head_dim_over_64_fits_99_kb_of_shared_memory(emu, poison_empty, case):
    """On a device allowing 99 KB per block, float32 TRA at head dims 96 and 128 takes the compact
    tiles (every launch <= 99 KB; the launch itself refuses more), matches the float64 reference,
    and is schedule-independent; with the default limit the same call needs more than 99 KB."""
    dtype = torch.float32
    emulated(emu, case, dtype)
    default = _STATS[(case, dtype, 0, 1, None)]
    assert default["max_smem"] > SMEM_99KB, f"the default tiles fit 99 KB here: the test proves nothing ({default})"
    run = emulated(emu, case, dtype, smem_optin=SMEM_99KB)
    small = _STATS[(case, dtype, 0, 1, SMEM_99KB)]
    assert small["launches"] >= 4 and 48 * 1024 < small["max_smem"] <= SMEM_99KB, small  # the kernels ran
    assert_matches_reference(case, dtype, *run)
    other = emulated(emu, case, dtype, policy=1, seed=7, smem_optin=SMEM_99KB)
    flat = lambda r: [r[0], r[1], *r[2]]  # noqa: E731
    assert all(same_bits(a, b) for a, b in zip(flat(run), flat(other))), "schedule-dependent compact tiles"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_cuda_takes_the_aten_attention_when_no_tiles_fit(emu, poison_empty, dtype):
    """A device limit below every kernel tiling of the head dim (48 KB at head dim 128): no attention
    kernel is launched, the ATen attention of the same glue runs, and the results still match."""
    case = COMPACT_CASES[0]
    run = emulated(emu, case, dtype, smem_optin=48 * 1024)
    assert _STATS[(case, dtype, 0, 1, 48 * 1024)]["launches"] == 0
    assert_matches_reference(case, dtype, *run)


# ---- the emulator's own detectors, on small kernels with planted bugs (tests/cuda_emulation/tra_ext.cpp)


def test_emulator_flags_a_missing_barrier(emu):
    want = torch.arange(1, 129, dtype=torch.float32) % 128
    for policy in (0, 1, 2):
        emu.set_policy(policy, 3)
        assert torch.equal(emu.selftest(0), want)
    emu.set_policy(0, 1)
    low_first = emu.selftest(1)
    emu.set_policy(1, 1)
    high_first = emu.selftest(1)
    assert not same_bits(low_first, high_first)
    assert low_first.isnan().any()  # read the 0xFF poison of a slot not written yet


def test_emulator_raises_on_deadlock_and_divergent_collectives(emu):
    emu.set_policy(0, 1)
    with pytest.raises(RuntimeError, match="deadlock in block 0"):
        emu.selftest(2)
    for policy in (0, 1):
        emu.set_policy(policy, 1)
        with pytest.raises(RuntimeError, match="divergent warp collectives"):
            emu.selftest(3)
    assert torch.equal(emu.selftest(0), torch.arange(1, 129, dtype=torch.float32) % 128)  # still usable
