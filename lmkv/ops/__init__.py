"""The public, backend-dispatched interface: one :class:`lmkv._dispatch.Op` per kernel-backed function.

Component modules are imported lazily on attribute access (``lmkv.ops.paged``), so importing lmkv stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

COMPONENTS = ("paged", "hashing", "codec", "blend", "quant")


def __getattr__(name: str) -> Any:
    if name in COMPONENTS:
        return importlib.import_module(f"lmkv.ops.{name}")
    raise AttributeError(f"module 'lmkv.ops' has no attribute {name!r}")


def load_all() -> list[str]:
    """Import every component that exists; returns their names."""
    loaded = []
    for name in COMPONENTS:
        try:
            importlib.import_module(f"lmkv.ops.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lmkv.ops.{name}":
                raise
            continue
        loaded.append(name)
    return loaded
