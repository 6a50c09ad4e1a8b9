"""lmkv: a research-grade KV-cache layer for LLM inference.

Start with ``lmkv.ops`` (paged gather/scatter, hashing, CacheGen codec, CacheBlend kernels, each with a
reference and optimized backends), ``lmkv.config.load()`` and ``lmkv.engine.KVEngine``.
"""

from __future__ import annotations

from lmkv._dispatch import Backend, BackendUnavailable, Op, use_backend
from lmkv.types import KVGeometry

__version__ = "0.1.0"
__all__ = ["Backend", "BackendUnavailable", "Op", "use_backend", "KVGeometry", "KVEngine", "__version__"]


def __getattr__(name: str) -> object:
    # ``from lmkv import KVEngine`` without importing the storage stack for every ``import lmkv``
    if name == "KVEngine":
        from lmkv.engine import KVEngine

        return KVEngine
    raise AttributeError(f"module 'lmkv' has no attribute {name!r}")
