"""The compat drop-ins advance the global RNG exactly as the published TPC functions do.

The published ``cluster_dpc_knn`` (HoT, after TCFormer) adds ``torch.rand(density.shape,
device=density.device, dtype=density.dtype) * 1e-6`` to the densities on every call. It is
written out below (our own transcription of the published computation, for this test only) and
compared with the drop-ins: RNG state after one call, and the dropout masks of a training step of
a model that calls it, patched and unpatched, from one seed.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from hot_kernels import compat
from hot_kernels.patch import patch_module


def published_cluster_dpc_knn(x, cluster_num, k, token_mask=None):
    """The published computation (tie noise included), for the RNG comparison."""
    with torch.no_grad():
        B, N, C = x.shape
        dist_matrix = torch.cdist(x, x) / (C ** 0.5)
        if token_mask is not None:
            token_mask = token_mask > 0
            dist_matrix = dist_matrix * token_mask[:, None, :] + (dist_matrix.max() + 1) * (~token_mask[:, None, :])
        dist_nearest, _ = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
        density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
        density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
        if token_mask is not None:
            density = density * token_mask
        mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
        dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
        dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
        score = dist * density
        _, index_down = torch.topk(score, k=cluster_num, dim=-1)
        idx_cluster = dist_matrix.gather(1, index_down[:, :, None].expand(B, cluster_num, N)).argmin(dim=1)
        idx_cluster.scatter_(1, index_down, torch.arange(cluster_num, device=x.device).expand(B, cluster_num))
    return index_down, idx_cluster


def published_cluster_dpc_knn_center(x, cluster_num, k, center, token_mask=None):
    """The center-forcing variant draws the same noise (its pick excludes ``center``)."""
    with torch.no_grad():
        B, N, C = x.shape
        dist_matrix = torch.cdist(x, x) / (C ** 0.5)
        dist_nearest, _ = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
        density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
        density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
        mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
        dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
        dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
        score = dist * density
        score[:, center] = -float("inf")
        _, index_down = torch.topk(score, k=cluster_num, dim=-1)
        idx_cluster = dist_matrix.gather(1, index_down[:, :, None].expand(B, cluster_num, N)).argmin(dim=1)
        idx_cluster.scatter_(1, index_down, torch.arange(cluster_num, device=x.device).expand(B, cluster_num))
    return index_down, idx_cluster


def _state(device):
    return torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state(torch.device(device))


def _seed(device, seed):
    torch.manual_seed(seed)  # seeds every device's default generator


def _rng_after(fn, device, seed=7):
    _seed(device, seed)
    fn()
    state = _state(device)
    follow = torch.rand(5, device=device)  # and the next draw agrees too
    return state, follow


def _check_same_stream(published, drop_in, device):
    want_state, want_next = _rng_after(published, device)
    got_state, got_next = _rng_after(drop_in, device)
    assert torch.equal(got_state, want_state), "RNG state after the drop-in differs from the published function's"
    assert torch.equal(got_next, want_next)


CASES = [  # (B, N, C, dtype, autocast)
    (2, 13, 8, torch.float32, False),
    (3, 7, 5, torch.float64, False),
    (2, 9, 6, torch.float32, True),  # cdist runs (and the noise is drawn) in float32 under autocast
    (0, 6, 4, torch.float32, False),  # nothing drawn
]


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run_case(device, B, N, C, dtype, autocast, center):
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(B * 100 + N), dtype=dtype).to(device)
    if autocast:
        x = x.to(torch.bfloat16)
    f = 3

    def ctx():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)

    def published():
        with ctx():
            if center is None:
                published_cluster_dpc_knn(x, f, 2)
            else:
                published_cluster_dpc_knn_center(x, f, 2, center)

    def drop_in():
        with ctx():
            if center is None:
                compat.cluster_dpc_knn(x, f, 2)
            else:
                compat.cluster_dpc_knn_center(x, f, 2, center)

    _check_same_stream(published, drop_in, device)


@pytest.mark.parametrize("center", [None, 1], ids=["tpc", "center"])
@pytest.mark.parametrize("B,N,C,dtype,autocast", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_drop_in_advances_the_cpu_rng_like_the_published_function(B, N, C, dtype, autocast, center):
    _run_case("cpu", B, N, C, dtype, autocast, center)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("center", [None, 1], ids=["tpc", "center"])
@pytest.mark.parametrize("B,N,C,dtype,autocast", CASES + [(2, 11, 8, torch.float16, False)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_drop_in_advances_the_cuda_rng_like_the_published_function(B, N, C, dtype, autocast, center):
    _run_case("cuda", B, N, C, dtype, autocast, center)


def test_token_mask_and_non_bool_mask_draw_the_same():
    x = torch.randn(2, 10, 4)
    mask = (torch.arange(10) < 7).float().expand(2, 10)
    _check_same_stream(lambda: published_cluster_dpc_knn(x, 3, 2, mask),
                       lambda: compat.cluster_dpc_knn(x, 3, 2, mask), "cpu")


def test_opt_out_by_keyword_and_by_module_flag():
    x = torch.randn(2, 9, 4)
    _seed("cpu", 3)
    before = _state("cpu")
    compat.cluster_dpc_knn(x, 3, 2, advance_rng=False)
    compat.cluster_dpc_knn_center(x, 3, 2, 4, advance_rng=False)
    assert torch.equal(_state("cpu"), before)
    old = compat.ADVANCE_RNG
    try:
        compat.ADVANCE_RNG = False
        compat.cluster_dpc_knn(x, 3, 2)
        assert torch.equal(_state("cpu"), before)
        compat.cluster_dpc_knn(x, 3, 2, advance_rng=True)  # the keyword wins over the flag
        assert not torch.equal(_state("cpu"), before)
    finally:
        compat.ADVANCE_RNG = old
    with pytest.raises(ValueError, match="advance_rng must be True or False"):
        compat.cluster_dpc_knn(x, 3, 2, advance_rng=1)


def test_the_noise_does_not_change_the_selection():
    x = torch.randn(2, 15, 6)
    with_noise = compat.cluster_dpc_knn(x, 5, 2)
    without = compat.cluster_dpc_knn(x, 5, 2, advance_rng=False)
    for a, b in zip(with_noise, without):
        assert torch.equal(a, b)


# ---- a training step, patched and unpatched: the same dropout masks ----------------------------


def _model_file():
    """A model file in the published conventions: a module-level cluster_dpc_knn called at run time."""
    mod = types.ModuleType("published_model_file")
    mod.cluster_dpc_knn = published_cluster_dpc_knn
    return mod


class TinyHourglass(nn.Module):
    """Dropout before and after TPC (the published models have DropPath/dropout in every block)."""

    def __init__(self, model_file, C=8, f=4):
        super().__init__()
        self.model_file, self.f = model_file, f
        self.inp = nn.Linear(3, C)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(0.3), nn.Dropout(0.3), nn.Dropout(0.3)
        self.mid = nn.Linear(C, C)
        self.out = nn.Linear(C, 3)

    def forward(self, x):  # (B, F, 3)
        h = self.drop1(self.inp(x))
        index, _ = self.model_file.cluster_dpc_knn(h, self.f, 2)
        index = index.sort(dim=-1).values
        h = self.drop2(self.mid(torch.gather(h, 1, index[..., None].expand(-1, -1, h.shape[-1]))))
        h = self.drop3(h)
        return self.out(h).mean()


def _step_masks(model, x, seed):
    masks = []
    hooks = [m.register_forward_hook(lambda _m, inp, out: masks.append((out != 0) | (inp[0] == 0)))
             for m in (model.drop1, model.drop2, model.drop3)]
    torch.manual_seed(seed)
    model.train()
    model(x).backward()
    for h in hooks:
        h.remove()
    return masks


def test_patched_training_step_draws_the_same_dropout_masks():
    model_file = _model_file()
    torch.manual_seed(0)
    model = TinyHourglass(model_file)
    x = torch.randn(2, 11, 3, generator=torch.Generator().manual_seed(1))
    want = _step_masks(model, x, seed=5)
    with patch_module(model_file):
        assert model_file.cluster_dpc_knn is compat.cluster_dpc_knn
        got = _step_masks(model, x, seed=5)
        old = compat.ADVANCE_RNG
        try:
            compat.ADVANCE_RNG = False
            opted_out = _step_masks(model, x, seed=5)
        finally:
            compat.ADVANCE_RNG = old
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # Without the draw the masks after TPC differ (the test can tell the two apart).
    assert torch.equal(opted_out[0], want[0])
    assert not all(torch.equal(o, w) for o, w in zip(opted_out[1:], want[1:]))
