"""The environment switches that every op call reads (HOT_KERNELS_DEBUG, HOT_KERNELS_BACKEND), read cheaply.

``os.environ.get`` goes through the Mapping layers and encodes the key and decodes the value on
every call: about 1 us when warm, but 10-15 us right after a large op has evicted the interpreter
from the caches, as it is between a model's layers (a B = 1 TRA call read three switches). On
POSIX CPython, ``os.environ`` keeps its encoded copy in ``os.environ._data``, which every
assignment through ``os.environ`` (``monkeypatch.setenv`` included) updates; one dict lookup there
with the key encoded once gives the same answer. Elsewhere this falls back to ``os.environ.get``.
"""
from __future__ import annotations

import os

_DATA = getattr(os.environ, "_data", None)
_FAST = os.name == "posix" and isinstance(_DATA, dict) and all(isinstance(k, bytes) for k in _DATA)
_KEYS: dict[str, bytes] = {}


def get(name: str) -> str | None:
    """``os.environ.get(name)``."""
    key = _KEYS.get(name)
    if key is None:
        if not _FAST:
            return os.environ.get(name)
        key = _KEYS[name] = os.fsencode(name)
    value = _DATA.get(key)
    return None if value is None else os.fsdecode(value)


def flag(name: str) -> bool:
    """Whether switch ``name`` is set to something other than "" or "0"."""
    key = _KEYS.get(name)
    if key is None:
        return get(name) not in (None, "", "0")
    return _DATA.get(key) not in (None, b"", b"0")
