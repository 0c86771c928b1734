"""hot_kernels: fused kernels for the Hourglass Tokenizer (HoT) of video pose transformers.

Token pruning by density-peaks clustering (``dpc_knn``, ``token_pruning_cluster`` and their parts
``pairwise_distance``, ``knn_density``, ``dpc_delta``, ``topf_select``) and token recovering
attention (``token_recovering_attention``), plus interpolation recovery
(``token_recovering_interpolation``), cluster token merging (``merge_tokens``) and
``compose_indices`` (hierarchical pruning), on the ``reference`` (PyTorch), ``cpu`` (C++), ``cuda``
and ``triton`` backends. See README.md and DESIGN.md for the exact semantics.
"""
from . import _ops  # noqa: F401  (registers the torch.library ops)
from . import compat, nn, patch, reference
from ._dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    cpu_cache_info,
    cpu_isa,
    empty_cpu_cache,
    set_cpu_cache_limit,
    supported_cpu_isas,
    use_backend,
    use_cpu_isa,
)
from ._validate import HotKernelsInputError
from .functional import (
    compose_indices,
    dpc_delta,
    dpc_knn,
    knn_density,
    merge_tokens,
    pairwise_distance,
    token_pruning_cluster,
    token_recovering_attention,
    token_recovering_interpolation,
    topf_select,
)
from .version import __version__

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "HotKernelsInputError",
    "__version__",
    "available_backends",
    "compat",
    "compose_indices",
    "cpu_cache_info",
    "cpu_isa",
    "empty_cpu_cache",
    "nn",
    "patch",
    "dpc_delta",
    "dpc_knn",
    "knn_density",
    "pairwise_distance",
    "reference",
    "token_pruning_cluster",
    "token_recovering_attention",
    "token_recovering_interpolation",
    "merge_tokens",
    "topf_select",
    "set_cpu_cache_limit",
    "supported_cpu_isas",
    "use_backend",
    "use_cpu_isa",
]
