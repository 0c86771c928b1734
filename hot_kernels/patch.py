"""Swap hot_kernels into an existing HoT-style repo with a few lines.

Two ways, both undoable and both scoped to what you name (nothing process-wide, no shared class
is touched):

``patch_module(pymod)`` rebinds the names the published HoT model files use, inside one imported
Python module (a repo's model file), to the drop-ins of :mod:`hot_kernels.compat`:

    ==========================  ==========================================
    name in the model file      replaced by
    ==========================  ==========================================
    ``cluster_dpc_knn``         :func:`hot_kernels.compat.cluster_dpc_knn`
    ``cluster_dpc_knn_center``  :func:`hot_kernels.compat.cluster_dpc_knn_center`
    ``Cross_Attention``         :class:`hot_kernels.compat.CrossAttention`
    ==========================  ==========================================

Functions are looked up at call time, so the TPC functions are swapped for models built before
or after the patch; ``Cross_Attention`` is only used by models built *after* it (for a model that
already exists, use ``patch_model``).

``patch_model(model)`` swaps every cross-attention submodule of a built model in place: any module
with ``linear_q/linear_k/linear_v/proj`` square ``nn.Linear`` layers of one width, an integer
``num_heads`` dividing it and a ``forward(x_1, x_2, x_3)``, whatever its class is called. The swap
rebinds ``forward`` on that instance only: parameters, buffers, state_dict keys, device, dtype,
train/eval mode and hooks all stay as they are, so it works before or after a checkpoint is loaded
and an optimizer built earlier keeps working. ``unpatch_model(model)`` reverts.

The patched cross-attention runs the fused op when keys and values come from the same tensor
(``cross_attention(x_token, x, x)``, every TRA) and dropout is inactive; otherwise it runs the
module's own forward unchanged (e.g. MHFormer's cross-hypothesis attention, or dropout p > 0 while
training).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import types
import warnings

from torch import nn

from . import compat

__all__ = ["PATCHABLE_NAMES", "ModulePatch", "patch_module", "unpatch_module", "patch_model", "unpatch_model",
           "is_cross_attention"]

PATCHABLE_NAMES = {
    "cluster_dpc_knn": compat.cluster_dpc_knn,
    "cluster_dpc_knn_center": compat.cluster_dpc_knn_center,
    "Cross_Attention": compat.CrossAttention,
}

_ORIGINALS = "__hot_kernels_originals__"  # on a patched Python module: {name: original object}
_PATCHED = "_hot_kernels_patched"  # on a patched nn.Module instance: True


# ---- patch_module -------------------------------------------------------------------------------


class ModulePatch(dict):
    """What :func:`patch_module` replaced: ``{name: original}`` (empty when everything was already
    patched). As a context manager it restores those originals on exit; :meth:`undo` does it
    explicitly. A name the user has rebound since the patch is left alone."""

    def __init__(self, module: types.ModuleType, replaced: dict):
        super().__init__(replaced)
        self.module = module

    def undo(self) -> None:
        originals = getattr(self.module, _ORIGINALS, {})
        for name, original in self.items():
            if getattr(self.module, name, None) is PATCHABLE_NAMES[name]:
                setattr(self.module, name, original)
            originals.pop(name, None)
        if not originals and hasattr(self.module, _ORIGINALS):
            delattr(self.module, _ORIGINALS)
        self.clear()

    def __enter__(self) -> "ModulePatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"ModulePatch({self.module.__name__}: {sorted(self)})"


def patch_module(module: types.ModuleType | str) -> ModulePatch:
    """Rebind ``cluster_dpc_knn``, ``cluster_dpc_knn_center`` and ``Cross_Attention`` inside
    ``module`` (an imported Python module, or its dotted name) to the hot_kernels drop-ins.

    Returns a :class:`ModulePatch` ``{name: original}`` of what was replaced; use it as a context
    manager (or call ``.undo()`` / :func:`unpatch_module`) to restore. Patching twice is harmless
    (the second call replaces nothing). Raises ``ValueError`` if the module defines none of these
    names, and ``TypeError`` if ``module`` is not a module."""
    if isinstance(module, str):
        module = importlib.import_module(module)
    if not isinstance(module, types.ModuleType):
        raise TypeError(f"patch_module: module must be an imported Python module (or its dotted name), "
                        f"got {type(module).__name__}; to swap the submodules of a built model use patch_model(model)")
    present = [name for name in PATCHABLE_NAMES if name in vars(module)]
    if not present:
        raise ValueError(f"patch_module: {module.__name__} defines none of {', '.join(PATCHABLE_NAMES)} "
                         "(the names the published HoT model files use), so there is nothing to patch; "
                         "for a built model use patch_model(model), for a new one hot_kernels.nn")
    originals = vars(module).setdefault(_ORIGINALS, {})
    replaced = {}
    for name in present:
        current = getattr(module, name)
        if current is PATCHABLE_NAMES[name]:
            continue  # already patched
        originals[name] = replaced[name] = current
        setattr(module, name, PATCHABLE_NAMES[name])
    return ModulePatch(module, replaced)


def unpatch_module(module: types.ModuleType | str) -> dict:
    """Restore every name :func:`patch_module` replaced in ``module``; returns ``{name: original}``
    (empty if it was not patched)."""
    if isinstance(module, str):
        module = importlib.import_module(module)
    patch = ModulePatch(module, dict(getattr(module, _ORIGINALS, {})))
    restored = dict(patch)
    patch.undo()
    return restored


# ---- patch_model --------------------------------------------------------------------------------


def is_cross_attention(mod: nn.Module) -> bool:
    """Is ``mod`` shaped like the published TRA cross-attention? ``linear_q/linear_k/linear_v/proj``
    are ``nn.Linear(C, C)`` of one width C, ``num_heads`` is an int dividing C, and ``forward``
    takes (x_1, x_2, x_3). Detection is by structure, not by class name."""
    linears = [getattr(mod, name, None) for name in ("linear_q", "linear_k", "linear_v", "proj")]
    if not all(isinstance(lin, nn.Linear) for lin in linears):
        return False
    C = linears[0].in_features
    if any(lin.in_features != C or lin.out_features != C for lin in linears):
        return False
    heads = getattr(mod, "num_heads", None)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or C % heads:
        return False
    try:
        params = list(inspect.signature(type(mod).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _patched_forward(self, x_1, x_2, x_3, *args, **kwargs):
    """forward of a patched cross-attention: the fused op for ``(query, x, x)`` without active
    dropout, the module's own forward otherwise."""
    if x_2 is x_3 and not args and not kwargs:
        if not compat.dropout_active(self):
            return compat.fused_cross_attention(self, x_1, x_2, residual=False)
        if not getattr(self, "_hot_kernels_warned", False):
            self._hot_kernels_warned = True
            warnings.warn(f"hot_kernels.patch: {type(self).__name__} has dropout > 0 and is training: it runs its "
                          "own (unfused) forward; the fused kernels implement p = 0", stacklevel=3)
    return type(self).forward(self, x_1, x_2, x_3, *args, **kwargs)


def patch_model(model: nn.Module) -> int:
    """Swap every cross-attention submodule of ``model`` (``model`` itself included) to the fused
    hot_kernels path, in place; returns how many this call swapped (already patched ones and
    hot_kernels' own modules are not counted). Weights, device, dtype, train/eval mode and
    state_dict keys are unchanged; only the instances' ``forward`` is rebound."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model must be a torch.nn.Module, got {type(model).__name__}; "
                        "to patch a model file use patch_module(module)")
    swapped = 0
    for mod in model.modules():
        if isinstance(mod, compat.CrossAttention) or getattr(mod, _PATCHED, False) or not is_cross_attention(mod):
            continue
        # functools.partial, not a bound method: it pickles (torch.save(model)) and deep-copies.
        mod.forward = functools.partial(_patched_forward, mod)
        setattr(mod, _PATCHED, True)
        swapped += 1
    return swapped


def unpatch_model(model: nn.Module) -> int:
    """Revert :func:`patch_model` on every submodule of ``model``; returns how many it reverted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_model: model must be a torch.nn.Module, got {type(model).__name__}")
    reverted = 0
    for mod in model.modules():
        if getattr(mod, _PATCHED, False):
            vars(mod).pop("forward", None)
            vars(mod).pop("_hot_kernels_warned", None)
            delattr(mod, _PATCHED)
            reverted += 1
    return reverted
