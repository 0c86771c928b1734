"""Test-session set-up shared by every test file.

Without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET
must be set before triton compiles (decorates) any kernel, so it is set here, before the tests
import hot_kernels. With a GPU the Triton kernels run compiled on CUDA tensors instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Outputs of the Triton wrappers start as NaN / -2^62 (hot_kernels/triton/_alloc.py): an element a
# kernel leaves unwritten shows in the comparisons instead of passing by luck.
os.environ.setdefault("HOT_KERNELS_POISON", "1")

# Triton decides at decoration time whether a kernel is interpreted: import the kernels now, under
# the setting above, not first inside a test that changes the environment.
import hot_kernels.triton  # noqa: E402,F401
