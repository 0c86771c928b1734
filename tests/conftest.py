"""Test-session set-up shared by every test file.

Without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET
must be set before triton compiles (decorates) any kernel, so it is set here, before the tests
import hot_kernels. With a GPU the Triton kernels run compiled on CUDA tensors instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
