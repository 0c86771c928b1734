"""Triton TRA configurations by dtype and arch (issue 15 item 3: register spills).

The choices come from ptxas counts (scripts/triton_aot_compile.py, tests/test_triton_aot.py); here:
the rule picks what tra._configs documents, and the sm_8x configurations - never run on this
machine's default path - compute the right result under the interpreter (the wrappers are told
they launch on an A100 through hot_kernels.triton._target.override).
"""
import pytest
import torch

import hot_kernels as hk
import hot_kernels.triton as T
from hot_kernels import reference as R

if T.IMPORT_ERROR is not None:
    pytest.skip(f"triton: {T.IMPORT_ERROR}", allow_module_level=True)

from hot_kernels.triton import _target, tra  # noqa: E402


def test_float32_never_fuses_the_output_projection():
    for D, C in ((32, 128), (64, 128), (128, 128), (32, 64)):
        for arch in (None, 80, 90):
            assert not tra._configs(torch.float32, D, C, 243, 81, arch)["fuse"]
            assert tra._configs(torch.bfloat16, D, C, 243, 81, arch)["fuse"]


def test_sm8x_tiles_and_sm90_defaults():
    a80 = tra._configs(torch.float32, 64, 512, 243, 81, 80)
    a90 = tra._configs(torch.float32, 64, 512, 243, 81, 90)
    assert a80["fwd"]["BLOCK_L"] == 32 and a90["fwd"]["BLOCK_L"] == tra.FWD_BLOCK_L
    assert a80["out"]["BLOCK_R"] == 64 and a90["out"]["BLOCK_R"] == tra.OUT_BLOCK_R
    assert a80["dq"]["BLOCK_L"] == 32 and a90["dq"]["BLOCK_L"] == tra.DQ_BLOCK_L
    assert a80["bwd"]["num_warps"] == 8 and a90["bwd"]["num_warps"] == 4
    b80 = tra._configs(torch.bfloat16, 64, 512, 243, 81, 80)
    b90 = tra._configs(torch.bfloat16, 64, 512, 243, 81, 90)
    assert b80["bwd"]["BLOCK_L"] == 16 and b90["bwd"]["BLOCK_L"] == tra.BWD_BLOCK_L
    # off CUDA the wrappers take the sm_90 configuration
    assert tra._configs(torch.bfloat16, 64, 512, 243, 81, None) == b90
    assert tra._arch(torch.empty(1)) is None
    with _target.override((8, 0), 108):
        assert tra._arch(torch.empty(1)) == 80


@pytest.mark.parametrize("dtype,C,H", [(torch.float32, 64, 1), (torch.bfloat16, 64, 1)])
def test_sm8x_configs_compute_the_reference(dtype, C, H):
    S, L, M = 2, 37, 9  # 37 query rows: more than one 16- or 32-row tile
    g = torch.Generator().manual_seed(7)

    def t(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    args = [t(1, L, C), t(S, M, C), t(C, C, s=C ** -0.5), t(C, s=0.1), t(C, C, s=C ** -0.5), t(C, s=0.1),
            t(C, C, s=C ** -0.5), t(C, s=0.1), t(C, C, s=C ** -0.5), t(C, s=0.1)]
    grad_out = t(S, L, C)
    leaves = [a.clone().requires_grad_() for a in args]
    with _target.override((8, 0), 108):
        out = hk.token_recovering_attention(*leaves, num_heads=H, residual=True, backend="triton")
        grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [a.double().requires_grad_() for a in args]
    want = R.token_recovering_attention(*ref_leaves, num_heads=H, residual=True)
    want_grads = torch.autograd.grad(want, ref_leaves, grad_out.double())
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    for i, (gv, w) in enumerate(zip(grads, want_grads)):
        assert gv.dtype == dtype, i
        torch.testing.assert_close(gv.double(), w, **tol, msg=lambda m: f"grad {i}: {m}")
