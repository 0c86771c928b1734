"""The Triton backend's launch wrappers: interpreter compatibility, grid limits (large batches),
the device guard, the selection + assignment split. Small shapes under the interpreter (CPU), a
few checks only a GPU (or two) can make are marked ``gpu``."""
import types

import numpy as np
import pytest
import torch

import hot_kernels as hk

triton = pytest.importorskip("triton")
if hk.available_backends("cpu")["triton"] is not None and not torch.cuda.is_available():
    pytest.skip("the triton backend does not run here", allow_module_level=True)

from hot_kernels.triton import _interp_compat  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ---- Triton 3.6's interpreter under numpy >= 2.4 (issue 15 item 7) ----------------------------------


def _fake_interp(tmp_path, name: str, index_src: str):
    """A module with an interpreter-like _patch_lang_tensor whose __index__ is index_src."""
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(f"def _patch_lang_tensor(tensor, scope):\n    f = lambda self: {index_src}\n")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interp_compat_patches_only_the_old_index(tmp_path):
    numpy_refuses = True
    try:
        int(np.ones(1))
        numpy_refuses = False
    except TypeError:
        pass
    # Triton 3.6's __index__ needs the fix exactly when numpy refuses; Triton >= 3.7's never does.
    assert _interp_compat._needs_patch(_fake_interp(tmp_path, "old", "int(self.handle.data)")) == numpy_refuses
    assert not _interp_compat._needs_patch(_fake_interp(tmp_path, "new", "int(self.handle.data.squeeze())"))
    assert not _interp_compat._needs_patch(types.SimpleNamespace())


def test_runtime_loop_bounds_run():
    """range() over runtime scalars (kernel arguments, as every TPC/TRA kernel has) under this
    Triton and numpy: the kernel sums x[0:n] in chunks of 4 and must match torch."""
    import triton.language as tl

    @triton.jit
    def chunk_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0))

    x = torch.randn(11, device=DEV)
    out = torch.full((1,), float("nan"), device=DEV)
    chunk_sum[(1,)](x, out, 11, BLOCK=4)
    torch.testing.assert_close(out[0], x.sum())
