"""Triton 3.6's interpreter with numpy >= 2.4: loop bounds taken from runtime scalars.

Under ``TRITON_INTERPRET=1`` Triton 3.6 holds every runtime scalar (a kernel argument, a
reduction's result, a scalar load, even ``tl.reshape(x, ())``) as a 1-element 1-D numpy array,
and its ``tl.tensor.__index__`` (what ``range(0, C, BC)`` calls) is ``int(array)``: numpy 2.4
refuses that for a 1-D array ("only 0-dimensional arrays can be converted to Python scalars").
No kernel-level expression yields a 0-d array there, and rewriting the loops as ``while`` loops
would cost the compiled kernels their software pipelining, so the kernels keep their ``for``
loops and this module gives the interpreter the ``__index__`` that Triton >= 3.7 has (the
element of a single-element array). It only acts when both conditions hold (the interpreter's
``__index__`` lacks that fix and this numpy refuses the conversion); compiled kernels are
untouched.
"""
from __future__ import annotations

import inspect

import numpy as np


def _needs_patch(interp) -> bool:
    try:
        int(np.ones(1))
        return False  # numpy < 2.4: the 1-element conversion still works
    except TypeError:
        pass
    fn = getattr(interp, "_patch_lang_tensor", None)
    if fn is None:
        return False
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return "int(self.handle.data)" in src


def apply() -> bool:
    """Patch the interpreter if needed; True when it was patched (idempotent)."""
    try:
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    if getattr(interp, "_hot_kernels_index_fix", False):
        return True
    if not _needs_patch(interp):
        return False
    original = interp._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    interp._patch_lang_tensor = patch_lang_tensor
    interp._hot_kernels_index_fix = True
    return True
