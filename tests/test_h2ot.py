"""Hierarchical pruning (H2OT): hot_kernels.compose_indices, and the example model
python/hourglass_h2ot.py trained one step on every backend that runs here against the same model on
the pure PyTorch path (outputs, kept frames, gradients). Tiny shapes: ~15 s on 2 cores."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import hot_kernels as hk
from targets import runnable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from hourglass_h2ot import HourglassH2OT  # noqa: E402


def ascending(B, n, f, g):
    return torch.stack([torch.randperm(n, generator=g)[:f].sort().values for _ in range(B)])


# ---- compose_indices -----------------------------------------------------------------------------


def test_compose_indices_matches_a_loop_and_stays_ascending():
    g = torch.Generator().manual_seed(0)
    B, sizes = 3, (40, 23, 11, 4)
    stages = [ascending(B, n, f, g) for n, f in zip(sizes, sizes[1:])]
    got = hk.compose_indices(*stages)
    assert got.shape == (B, sizes[-1]) and got.dtype == torch.int64
    for b in range(B):
        for t in range(sizes[-1]):
            pos = t
            for idx in reversed(stages):
                pos = int(idx[b, pos])
            assert int(got[b, t]) == pos
    assert (got.diff(dim=-1) > 0).all()
    assert torch.equal(hk.compose_indices(stages), got)  # a list works too
    assert torch.equal(hk.compose_indices(stages[0]), stages[0])


def test_composed_index_gathers_what_the_stacked_stages_kept():
    """Pruning stage by stage (no positional embeddings) == gathering the input at the composed index."""
    x = torch.randn(2, 30, 3, 8, generator=torch.Generator().manual_seed(1))
    h, locals_ = x, []
    for f in (17, 9, 4):
        h, idx = hk.token_pruning_cluster(h, f, backend="reference")
        locals_.append(idx)
    index = hk.compose_indices(*locals_)
    assert torch.equal(h, x.gather(1, index[:, :, None, None].expand(-1, -1, 3, 8)))


@pytest.mark.parametrize("args,message", [
    ((), "needs at least one index tensor"),
    ((torch.zeros(2, 3),), r"index_1 must be an integer \(int64\) tensor"),
    ((torch.zeros(2, dtype=torch.long),), r"index_1 must be a \(B, f_1\) int64 tensor"),
    ((torch.tensor([[0, 4, 6]]), torch.tensor([[0, 3]])), r"index_2 values must be positions in \[0, 2\]"),
    ((torch.tensor([[0, 4, 6]]), torch.tensor([[0, 1], [1, 2]])), r"index_2 must have shape \(B, f_2\) = \(1, 2\), got \(2, 2\)"),
    ((torch.tensor([[0, 4, 6]]), [0, 1]), r"index_2 must be a \(B, f_2\) int64 tensor"),
])
def test_compose_indices_bad_input(args, message):
    with pytest.raises(hk.HotKernelsInputError, match=message):
        hk.compose_indices(*args)


# ---- the example model ---------------------------------------------------------------------------

TINY = dict(frames=12, joints=3, dim=16, heads=2, depth=3, keep=(8, 5, 3), prune_at=(0, 1, 2))
BACKENDS = [b for b, d in runnable(backends_on_cpu=("cpu", "triton")) if d == "cpu"]


def build(backend, recover, seed=0):
    torch.manual_seed(seed)
    hot = HourglassH2OT(**TINY, recover=recover, backend=backend)
    with torch.no_grad():  # the zero-initialised embeddings and queries, random so that they matter
        for name, p in hot.named_parameters():
            if not p.any():
                p.normal_(std=0.1)
    pure = HourglassH2OT(**TINY, recover=recover, use_hot_kernels=False)
    pure.load_state_dict(hot.state_dict())
    return hot, pure


def train_step(model, poses, target):
    model.zero_grad(set_to_none=True)
    out, index = model(poses, return_index=True)
    F.mse_loss(out, target).backward()
    return out.detach(), index, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("recover", ["tra", "interp"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_h2ot_trains_a_step_like_pure_pytorch(backend, recover):
    hot, pure = build(backend, recover)
    g = torch.Generator().manual_seed(1)
    poses, target = torch.randn(2, 12, 3, 2, generator=g), torch.randn(2, 12, 3, 3, generator=g)
    out, index, grads = train_step(hot, poses, target)
    want, want_index, want_grads = train_step(pure, poses, target)
    assert out.shape == (2, 12, 3, 3) and index.shape == (2, 3)
    assert (index.diff(dim=-1) > 0).all() and ((index >= 0) & (index < 12)).all()
    assert torch.equal(index, want_index)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    stage_params = [n for n in want_grads if n.startswith("tpc_stages.")]
    assert len(stage_params) == 3  # one positional embedding per stage, each trained
    for n, w in want_grads.items():
        assert w is not None and grads[n] is not None and w.norm() > 0, f"{n}: no gradient"
        err = float((grads[n] - w).norm() / w.norm())
        assert err <= 1e-4, f"{n}: relative gradient error {err:.2e}"


def test_h2ot_arguments_are_checked():
    with pytest.raises(ValueError, match="must increase within"):
        HourglassH2OT(**{**TINY, "prune_at": (1, 1, 2)})
    with pytest.raises(ValueError, match="must not increase"):
        HourglassH2OT(**{**TINY, "keep": (5, 8, 3)})
    with pytest.raises(ValueError, match="recover must be"):
        HourglassH2OT(**TINY, recover="copy")


def test_bench_model_h2ot_case_checks_and_runs_each_timed_step():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_model as BM

    assert "h2ot" in BM.MODELS and BM.MODELS["h2ot"][1] == "HourglassH2OT"
    hot, pure = build(None, "tra")  # BM.build's small model, smaller still (tiny shapes for CI)
    models, in_dim = {True: hot, False: pure}, 2
    m = models[True]
    poses = torch.randn(1, m.frames, m.joints, in_dim, generator=torch.Generator().manual_seed(2))
    verdict, captured = BM.check_paths(models, poses)
    assert "kept frames" in verdict and len(captured["tpc"]) == len(m.keep)
    fns = BM.step_fns(m, poses, torch.randn(1, m.frames, m.joints, 3), captured)
    for what, fn in fns.items():
        assert fn() is not None, what
