"""hot_kernels.nn modules and the python/ example model: every backend that runs here gives the
reference path's outputs, kept indices and gradients."""
import os
import sys

import pytest
import torch
from torch import nn

import hot_kernels as hk
from hot_kernels.nn import TokenPruningCluster, TokenRecoveringAttention

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from hourglass_mixste import HourglassMixSTE  # noqa: E402

BACKENDS = [b for b in ("cpu", "triton") if hk.available_backends("cpu")[b] is None]


class PublishedCrossAttention(nn.Module):
    """The published HoT cross-attention's parameter layout and math, written out here as the
    state_dict source and an independent check (linear_q/k/v without bias, proj with bias)."""

    def __init__(self, dim, num_heads=8):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.linear_q = nn.Linear(dim, dim, bias=False)
        self.linear_k = nn.Linear(dim, dim, bias=False)
        self.linear_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_1, x_2, x_3):
        B, N, C = x_1.shape
        M = x_2.shape[1]
        H = self.num_heads
        q = self.linear_q(x_1).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        k = self.linear_k(x_2).reshape(B, M, H, C // H).permute(0, 2, 1, 3)
        v = self.linear_v(x_3).reshape(B, M, H, C // H).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def precision(backend):
    """float64 where the backend computes in it (cpu, reference), else float32; with tolerances
    (forward, gradients) for that dtype."""
    if hk.available_backends("cpu", "token_recovering_attention", torch.float64)[backend] is None:
        return torch.float64, dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-9, atol=1e-11)
    return torch.float32, dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_tra_module_loads_published_weights_and_matches(backend):
    torch.manual_seed(0)
    dtype, fwd_tol, bwd_tol = precision(backend)
    S, L, M, C, H = 6, 27, 9, 32, 4
    published = PublishedCrossAttention(C, H).to(dtype)
    x_token = torch.randn(1, L, C, dtype=dtype)
    tra = TokenRecoveringAttention(C, H, length=L).to(dtype)
    missing, unexpected = tra.load_state_dict({**published.state_dict(), "x_token": x_token}, strict=True)
    assert not missing and not unexpected
    x = torch.randn(S, M, C, dtype=dtype, requires_grad=True)
    with hk.use_backend(backend):
        out = tra(x)
    q = x_token.expand(S, L, C)
    want = q + published(q, x, x)
    torch.testing.assert_close(out, want, **fwd_tol)
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    xt = x_token.clone().requires_grad_()
    q2 = xt.expand(S, L, C)
    (q2 + published(q2, x2, x2)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **bwd_tol)
    torch.testing.assert_close(tra.x_token.grad, xt.grad, **bwd_tol)
    for name, p in tra.named_parameters():
        if name != "x_token":
            torch.testing.assert_close(p.grad, dict(published.named_parameters())[name].grad, **bwd_tol)


def test_tra_module_dropout_warns_and_runs_reference_path():
    tra = TokenRecoveringAttention(16, 2, length=5, attn_drop=0.1).train()
    with pytest.warns(UserWarning, match="dropout > 0 runs the reference path"):
        assert tra(torch.randn(3, 4, 16)).shape == (3, 5, 16)
    tra.eval()
    assert tra(torch.randn(3, 4, 16)).shape == (3, 5, 16)


def test_tra_module_rejects_heads_not_dividing_dim():
    with pytest.raises(ValueError, match="num_heads = 3 must divide dim = 16"):
        TokenRecoveringAttention(16, 3)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_tpc_module(backend):
    x = torch.randn(2, 27, 17, 8, requires_grad=True)
    tpc = TokenPruningCluster(9, center=13, embed_dim=8)
    with hk.use_backend(backend):
        kept, index = tpc(x)
    assert kept.shape == (2, 9, 17, 8) and index.shape == (2, 9)
    assert (index == 13).any(-1).all() and (index.diff(dim=-1) > 0).all()
    want_kept, want_index = hk.reference.token_pruning_cluster(x, 9, 2, 13, tpc.pos_embed)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(kept, want_kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_example_model_matches_reference_path(backend):
    torch.manual_seed(1)
    dtype, _, _ = precision(backend)
    model = HourglassMixSTE(frames=27, keep=9, dim=32, heads=4, depth=4, prune_after=1).to(dtype)
    for name, p in model.named_parameters():  # non-trivial x_token / pos embeddings (zero-initialised)
        if name in ("joint_pos", "frame_pos", "tpc.pos_embed", "tra.x_token"):
            nn.init.normal_(p, std=0.05)
    poses = torch.randn(2, 27, 17, 2, dtype=dtype)
    results = {}
    for name in ("reference", backend):
        model.zero_grad()
        with hk.use_backend(name):
            out, index = model(poses, return_index=True)
            out.square().mean().backward()
        results[name] = (out.detach(), index, {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_out, ref_index, ref_grads), (out, index, grads) = results["reference"], results[backend]
    assert torch.equal(index, ref_index)
    atol = 1e-8 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=atol)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("query_kind", ["expanded", "shared", "per-sequence"])
def test_compat_cross_attention_is_the_published_module(backend, query_kind):
    torch.manual_seed(2)
    dtype, fwd_tol, bwd_tol = precision(backend)
    S, L, M, C, H = 5, 27, 9, 32, 4
    published = PublishedCrossAttention(C, H).to(dtype)
    ours = hk.compat.CrossAttention(C, num_heads=H, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                                    length=L).to(dtype)
    missing, unexpected = ours.load_state_dict(published.state_dict(), strict=True)
    assert not missing and not unexpected
    x_token = torch.randn(1 if query_kind != "per-sequence" else S, L, C, dtype=dtype, requires_grad=True)
    x = torch.randn(S, M, C, dtype=dtype, requires_grad=True)

    def query(t):  # what the published models pass: x_token.expand / einops.repeat (stride 0)
        return t.expand(S, L, C) if query_kind == "expanded" else t

    with hk.use_backend(backend):
        out = ours(query(x_token), x, x)  # one tensor for keys and values: the fused op
    want = published(x_token.expand(S, L, C), x, x)
    torch.testing.assert_close(out, want, **fwd_tol)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x_token, x, *ours.parameters()], g)
    want_grads = torch.autograd.grad(want, [x_token, x, *published.parameters()], g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **bwd_tol)
    y = torch.randn(S, M, C, dtype=dtype)  # keys and values from different tensors: the plain path
    torch.testing.assert_close(ours(query(x_token), x, y), published(x_token.expand(S, L, C), x, y), **fwd_tol)


def test_compat_cross_attention_dropout_warns_in_training_only():
    attn = hk.compat.CrossAttention(16, num_heads=2, attn_drop=0.1, proj_drop=0.1).train()
    q, x = torch.randn(1, 5, 16), torch.randn(3, 4, 16)
    with pytest.warns(UserWarning, match="dropout > 0 runs the reference path"):
        assert attn(q, x, x).shape == (3, 5, 16)
    attn.eval()
    torch.testing.assert_close(attn(q, x, x), attn._unfused(q, x, x.clone()))
    with pytest.raises(ValueError, match="num_heads = 3 must divide dim = 16"):
        hk.compat.CrossAttention(16, num_heads=3)
