"""hot_kernels.patch: patch_module / patch_model on a model file written in the published HoT
conventions (python/hot_style_model.py), compared with the same model unpatched."""
from __future__ import annotations

import os
import sys
import types
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hot_kernels
from hot_kernels import compat
from hot_kernels.patch import is_cross_attention, patch_model, patch_module, unpatch_model, unpatch_module

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "python"))
import hot_style_model as hsm  # noqa: E402

FRAMES, TOKENS, CHANNEL = 27, 9, 32


class OpRecorder(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher (custom ops included)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return hsm.Model(frames=FRAMES, channel=CHANNEL, token_num=TOKENS, **kw)


def batch(seed=1, B=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, FRAMES, 17, 2, generator=g), torch.randn(B, FRAMES, 17, 3, generator=g)


def train_step(model, poses, target):
    model.zero_grad(set_to_none=True)
    out, index = model(poses)
    torch.nn.functional.mse_loss(out, target[:, :out.shape[1]]).backward()  # center-forced: f frames out
    return out.detach(), index, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_step(got, want):
    out, index, grads = got
    out0, index0, grads0 = want
    assert torch.equal(index, index0), f"kept frames differ:\n{index}\n{index0}"
    torch.testing.assert_close(out, out0, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads0.keys()
    # Per parameter, relative to its own norm, with a floor at 1e-6 of the largest gradient: the
    # key bias's gradient is analytically zero (softmax ignores a per-row constant), so its
    # computed value is rounding noise of ~1e-10 on both paths.
    floor = 1e-6 * max(float(g.norm()) for g in grads0.values())
    for name, g0 in grads0.items():
        err = float((grads[name] - g0).norm())
        assert err <= 1e-3 * float(g0.norm()) + floor, f"gradient of {name}: |diff| {err:.3e}, |grad| {g0.norm():.3e}"


# ---- patch_module -------------------------------------------------------------------------------


def test_patch_module_rebinds_restores_and_is_idempotent():
    originals = {name: getattr(hsm, name) for name in ("cluster_dpc_knn", "cluster_dpc_knn_center", "Cross_Attention")}
    with patch_module(hsm) as replaced:
        assert dict(replaced) == originals
        assert hsm.cluster_dpc_knn is compat.cluster_dpc_knn
        assert hsm.cluster_dpc_knn_center is compat.cluster_dpc_knn_center
        assert hsm.Cross_Attention is compat.CrossAttention
        again = patch_module(hsm)  # harmless: nothing left to replace
        assert dict(again) == {}
        assert hsm.cluster_dpc_knn is compat.cluster_dpc_knn
        again.undo()  # undoing the no-op patch leaves the first one in place
        assert hsm.Cross_Attention is compat.CrossAttention
    assert {name: getattr(hsm, name) for name in originals} == originals
    assert not hasattr(hsm, "__hot_kernels_originals__")


def test_patch_module_by_name_and_unpatch_module():
    replaced = patch_module("hot_style_model")
    try:
        assert set(replaced) == {"cluster_dpc_knn", "cluster_dpc_knn_center", "Cross_Attention"}
    finally:
        restored = unpatch_module(hsm)
    assert set(restored) == set(replaced)
    assert hsm.Cross_Attention is not compat.CrossAttention
    assert unpatch_module(hsm) == {}


def test_patch_module_refuses_a_module_without_the_names():
    empty = types.ModuleType("my_model_file")
    empty.Block = nn.Linear
    with pytest.raises(ValueError, match="my_model_file defines none of cluster_dpc_knn"):
        patch_module(empty)
    with pytest.raises(TypeError, match="patch_module: module must be an imported Python module"):
        patch_module(nn.Linear(2, 2))


@pytest.mark.parametrize("center_forced", [False, True], ids=["tpc+tra", "tpc-center"])
def test_patch_module_model_matches_unpatched(center_forced):
    poses, target = batch()
    plain = build(center_forced=center_forced)
    want = train_step(plain, poses, target)
    with patch_module(hsm):
        patched = build(seed=123, center_forced=center_forced)  # built after the patch
        if not center_forced:
            assert isinstance(patched.cross_attention, compat.CrossAttention)
        patched.load_state_dict(plain.state_dict())  # the published checkpoint loads strictly
        with OpRecorder() as rec:
            got = train_step(patched, poses, target)
    assert "hot_kernels::dpc_knn" in rec.names
    assert center_forced or "hot_kernels::token_recovering_attention" in rec.names
    assert_same_step(got, want)
    # a model built before the patch calls the module-level TPC function at call time too
    with patch_module(hsm), OpRecorder() as rec:
        assert_same_step(train_step(plain, poses, target), want)
    assert "hot_kernels::dpc_knn" in rec.names


# ---- patch_model --------------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_bias", [True, False], ids=["bias", "no-bias"])
def test_patch_model_matches_unpatched_and_reverts(qkv_bias):
    poses, target = batch()
    model = build(qkv_bias=qkv_bias)
    want = train_step(model, poses, target)
    keys = list(model.state_dict())
    attn = model.cross_attention
    assert patch_model(model) == 1
    assert patch_model(model) == 0  # already patched
    assert model.cross_attention is attn and list(model.state_dict()) == keys and model.training
    with OpRecorder() as rec:
        got = train_step(model, poses, target)
    assert "hot_kernels::token_recovering_attention" in rec.names
    assert_same_step(got, want)
    assert got[2]["x_token"].norm() > 0  # the shared query's gradient (summed over B*J sequences)
    assert unpatch_model(model) == 1
    assert "forward" not in vars(attn)
    with OpRecorder() as rec:
        out, _ = model(poses)
    assert "hot_kernels::token_recovering_attention" not in rec.names
    torch.testing.assert_close(out.detach(), want[0], rtol=0, atol=0)


def test_patch_model_is_per_instance():
    a, b = build(), build()
    assert patch_model(a) == 1
    assert "forward" in vars(a.cross_attention) and "forward" not in vars(b.cross_attention)
    assert type(b.cross_attention).forward is hsm.Cross_Attention.forward
    poses, _ = batch()
    with OpRecorder() as rec:
        b(poses)
    assert "hot_kernels::token_recovering_attention" not in rec.names


def test_patch_model_before_loading_weights_eval_mode():
    poses, _ = batch()
    trained = build(seed=5).eval()
    with torch.no_grad():
        want, index0 = trained(poses)
    fresh = build(seed=6).eval()
    patch_model(fresh)  # patched first, checkpoint loaded afterwards
    fresh.load_state_dict(trained.state_dict())
    assert not fresh.training and not fresh.cross_attention.training
    with torch.no_grad():
        out, index = fresh(poses)
    assert torch.equal(index, index0)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_patch_model_keeps_dtype_float64():
    poses, target = batch()
    model = build().double()
    want = train_step(model, poses.double(), target.double())
    patch_model(model)
    got = train_step(model, poses.double(), target.double())
    assert got[0].dtype == torch.float64 and model.cross_attention.linear_q.weight.dtype == torch.float64
    assert_same_step(got, want)


def test_patch_model_distinct_keys_and_values_run_the_modules_own_forward():
    torch.manual_seed(0)
    mix = hsm.HypothesisMixing(CHANNEL, 4)
    xs = [torch.randn(2, FRAMES, CHANNEL, requires_grad=True) for _ in range(3)]
    want = mix(*xs)
    assert patch_model(mix) == 3
    with OpRecorder() as rec:
        got = mix(*xs)
    assert "hot_kernels::token_recovering_attention" not in rec.names
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_patch_model_with_dropout_training_falls_back_with_a_warning():
    torch.manual_seed(0)
    attn = hsm.Cross_Attention(CHANNEL, 4, qkv_bias=True, proj_drop=0.5)
    q, x = torch.randn(1, 7, CHANNEL).expand(3, 7, CHANNEL), torch.randn(3, 5, CHANNEL)
    torch.manual_seed(1)
    want = attn(q, x, x)
    patch_model(attn)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="dropout > 0 and is training"):
        got = attn(q, x, x)
    assert torch.equal(got, want)  # its own forward, same dropout mask
    attn.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with OpRecorder() as rec:
            out = attn(q, x, x)
    assert "hot_kernels::token_recovering_attention" in rec.names
    with torch.no_grad():
        unpatch_model(attn)
        torch.testing.assert_close(out, attn(q, x, x), rtol=1e-4, atol=1e-5)


class RenamedTRA(nn.Module):
    """Same structure as the published cross-attention under another class name."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.linear_q, self.linear_k, self.linear_v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, query, keys, values):
        S, L, C = query.shape
        H = self.num_heads
        q = self.linear_q(query).reshape(S, L, H, C // H).transpose(1, 2)
        k = self.linear_k(keys).reshape(S, -1, H, C // H).transpose(1, 2)
        v = self.linear_v(values).reshape(S, -1, H, C // H).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(S, L, C))


def test_detection_is_structural():
    assert is_cross_attention(RenamedTRA(16, 4))
    assert is_cross_attention(hsm.Cross_Attention(16, 4))
    odd = RenamedTRA(16, 4)
    odd.num_heads = 3  # does not divide 16
    assert not is_cross_attention(odd)
    wide = RenamedTRA(16, 4)
    wide.proj = nn.Linear(16, 32)
    assert not is_cross_attention(wide)
    assert not is_cross_attention(nn.MultiheadAttention(16, 4))
    model = nn.Sequential(RenamedTRA(16, 4), compat.CrossAttention(16, 4), odd)
    assert patch_model(model) == 1
    torch.manual_seed(0)
    q, x = torch.randn(4, 6, 16), torch.randn(4, 3, 16)
    with OpRecorder() as rec:
        got = model[0](q, x, x)
    assert "hot_kernels::token_recovering_attention" in rec.names
    unpatch_model(model)
    torch.testing.assert_close(got, model[0](q, x, x), rtol=1e-4, atol=1e-5)


def test_patch_model_rejects_non_modules():
    with pytest.raises(TypeError, match="patch_model: model must be a torch.nn.Module"):
        patch_model(hsm)
    with pytest.raises(TypeError, match="unpatch_model: model must be a torch.nn.Module"):
        unpatch_model(object())


def test_patched_model_compiles_fullgraph():
    torch._dynamo.reset()
    poses, _ = batch()
    model = build().eval()
    patch_model(model)
    with torch.no_grad():
        want, index0 = model(poses)
        compiled = torch.compile(model, fullgraph=True)
        got, index = compiled(poses)
    assert torch.equal(index, index0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_patch_is_exported():
    assert hot_kernels.patch.patch_module is patch_module


def test_patched_model_pickles_and_deep_copies():
    import copy
    import io

    model = build().eval()
    patch_model(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(model)
    poses, _ = batch()
    with torch.no_grad():
        want, _ = model(poses)
        for other in (loaded, twin):
            assert other.cross_attention.forward.args[0] is other.cross_attention  # bound to its own copy
            with OpRecorder() as rec:
                got, _ = other(poses)
            assert "hot_kernels::token_recovering_attention" in rec.names
            assert torch.equal(got, want)
            assert unpatch_model(other) == 1
