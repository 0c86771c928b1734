"""GPU-only properties of the cuda and triton backends: CUDA-graph capture, long clips without
any N x N tensor, outputs over 2^31 elements, torch.compile on CUDA tensors.

Correctness against the reference on CUDA tensors is in test_backends.py (its targets include
cuda-cuda and triton-cuda when a GPU is present). Everything here skips without CUDA.
"""
import pytest
import torch

import hot_kernels as hk
from hot_kernels import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_BACKENDS = ("cuda", "triton")


def require(backend, op="dpc_knn", dtype=torch.float32):
    why = hk.available_backends("cuda", op, dtype)[backend]
    if why is not None:
        pytest.skip(f"{backend}: {why}")


def smooth_clip(B, N, C, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(B, N, C, generator=g, device="cuda").cumsum(1) / N ** 0.5).to(dtype)


def valid_rows(index, N, f):
    index = index.cpu()
    assert index.shape[1] == f and index.dtype == torch.int64
    assert ((index >= 0) & (index < N)).all()
    assert all(len(set(row)) == f for row in index.tolist())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dpc_knn_and_token_pruning_cluster_replay_in_a_cuda_graph(backend):
    require(backend)
    require(backend, "gather_frames")
    x = smooth_clip(8, 243, 64)
    clip = smooth_clip(8, 243, 17 * 32).view(8, 243, 17, 32)
    pos = torch.randn(1, 81, 32, device="cuda")

    def step():
        index, asg = hk.dpc_knn(x, 81, 2, center=121, return_assignment=True, backend=backend)
        kept, idx2 = hk.token_pruning_cluster(clip, 81, pos_embed=pos, backend=backend)
        return index, asg, kept, idx2

    eager = step()  # also warms up (compiles) the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(smooth_clip(8, 243, 64, seed=1))  # new input in place: the replay must see it
    clip.copy_(smooth_clip(8, 243, 17 * 32, seed=1).view(8, 243, 17, 32))
    graph.replay()
    torch.cuda.synchronize()
    again = step()
    for got, want in zip(captured, again):
        assert torch.equal(got, want)
    assert not torch.equal(captured[0], eager[0])  # the replay ran on the new input


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_clip_allocates_no_n_by_n_tensor(backend, dtype):
    require(backend, dtype=dtype)
    N, C, f = 65536, 256, 16384  # an N x N float32 matrix alone would be 16 GiB
    x = smooth_clip(1, N, C, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    index, asg = hk.dpc_knn(x, f, 2, return_assignment=True, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 64 * N * C + 2**26, f"{extra / 2**20:.0f} MiB for N = {N}: O(N C) expected"
    valid_rows(index, N, f)
    assert ((asg >= 0) & (asg < f)).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_pairwise_distance_output_over_2_pow_31_elements(backend):
    require(backend, "pairwise_distance")
    N = 46400  # N^2 = 2.15e9 > 2^31 elements (8.6 GB of float32)
    x = torch.randn(1, N, 4, device="cuda")
    D = hk.pairwise_distance(x, backend=backend)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device="cuda")
    want = R.pairwise_distance(x[:, rows].double(), x.double())  # exact rows, the last ones past 2^31
    torch.testing.assert_close(D[0, rows].double(), want[0], rtol=1e-5, atol=1e-5)
    del D


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_on_cuda_tensors(backend):
    require(backend)
    require(backend, "gather_frames")
    torch._dynamo.reset()
    x = smooth_clip(4, 81, 32)
    clip = smooth_clip(4, 81, 3 * 16).view(4, 81, 3, 16).requires_grad_()

    def fn(x, clip):
        index = hk.dpc_knn(x, 27, 2, backend=backend)
        kept, idx2 = hk.token_pruning_cluster(clip, 27, backend=backend)
        return index, kept.square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(x, clip), fn(x, clip)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    (g,) = torch.autograd.grad(compiled(x, clip)[1], clip)
    assert torch.isfinite(g).all()



@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tra_output_over_2_pow_31_elements(backend):
    """S = 17408 sequences (B = 1024 clips x 17 joints) of L = 243 recovered tokens, C = 512: the
    output alone has S * L * C = 2.17e9 > 2^31 elements. A few sequences, the last ones past 2^31,
    are checked against the float64 reference, forward and backward (a grad_out that is zero
    except on those sequences: their x gradients and the weight gradients are theirs alone)."""
    require(backend, "token_recovering_attention")
    S, L, M, C, H = 17408, 243, 81, 512, 8
    assert S * L * C > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)

    def t(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * s

    w = C ** -0.5
    query = t(1, L, C).requires_grad_()
    x = t(S, M, C).requires_grad_()
    ws = [t(C, C, s=w), t(C, s=0.1), t(C, C, s=w), t(C, s=0.1), t(C, C, s=w), t(C, s=0.1), t(C, C, s=w), t(C, s=0.1)]
    ws = [v.requires_grad_() for v in ws]
    out = hk.token_recovering_attention(query, x, *ws, num_heads=H, backend=backend)
    assert out.shape == (S, L, C)
    rows = torch.tensor([0, 1, S // 2, S - 2, S - 1], device="cuda")
    assert int(rows[-2]) * L * C > 2**31
    g_rows = t(len(rows), L, C)
    grad_out = torch.zeros_like(out)
    grad_out[rows] = g_rows
    grads = torch.autograd.grad(out, [query, x, *ws], grad_out)
    out_rows = out[rows].detach()
    del grad_out, out

    ref_leaves = [v.detach().double().requires_grad_() for v in (query, x[rows], *ws)]
    want = R.token_recovering_attention(ref_leaves[0], ref_leaves[1], *ref_leaves[2:], num_heads=H)
    torch.testing.assert_close(out_rows.double(), want, rtol=1e-4, atol=1e-4)
    want_grads = torch.autograd.grad(want, ref_leaves, g_rows.double())
    assert int((grads[1].abs().sum((1, 2)) != 0).sum()) <= len(rows)  # no other sequence got a gradient
    for i, (got, exp) in enumerate(zip(grads, want_grads)):
        if i == 1:
            got = got[rows]
        torch.testing.assert_close(got.double(), exp, rtol=2e-3, atol=2e-3, msg=lambda m: f"gradient {i}: {m}")
