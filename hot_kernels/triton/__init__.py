"""The ``triton`` backend: Triton kernels, one file per op family (kernel, launch wrapper).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
``OPS`` names the ops this backend implements (their backward ops are implied); the TPC and TRA
kernels add themselves here, and so do token_recovering_interpolation and merge_tokens
(interp_merge.py). Without the triton package the module still imports, with ``IMPORT_ERROR``
saying why and ``OPS`` empty.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401

    IMPORT_ERROR: str | None = None
except ImportError as e:
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

OPS: frozenset[str] = frozenset()

if IMPORT_ERROR is None:
    from . import _interp_compat

    _interp_compat.apply()  # Triton 3.6's interpreter under numpy >= 2.4 (see _interp_compat.py)
    from .tpc import (  # noqa: F401
        dpc_delta,
        dpc_knn,
        gather_frames,
        gather_frames_backward,
        knn_density,
        pairwise_distance,
        pairwise_distance_backward,
        topf_select,
    )

    OPS = OPS | frozenset({"pairwise_distance", "knn_density", "dpc_delta", "topf_select", "dpc_knn",
                           "gather_frames"})
    from .tra import token_recovering_attention, token_recovering_attention_backward  # noqa: F401

    OPS = OPS | frozenset({"token_recovering_attention"})
    from .interp_merge import (  # noqa: F401
        merge_tokens,
        merge_tokens_backward,
        token_recovering_interpolation,
        token_recovering_interpolation_backward,
    )

    OPS = OPS | frozenset({"token_recovering_interpolation", "merge_tokens"})
