"""lmkv: a research-grade KV-cache layer for LLM inference.

Start with ``lmkv.ops`` (paged gather/scatter, hashing, CacheGen codec, CacheBlend kernels, each with a
reference and optimized backends), ``lmkv.config.load()`` and ``lmkv.engine.KVEngine``.
"""

from __future__ import annotations

import importlib.util as _util
from pathlib import Path as _Path

# Run from a source checkout without installing (scripts/gpu_check.sh on a machine where nothing can be installed):
# reference/ and optimized/ sit beside lmkv/ there, while an install (editable or not) maps them into the package.
if _util.find_spec("lmkv.reference") is None and (_Path(__file__).resolve().parents[1] / "reference").is_dir():
    __path__.append(str(_Path(__file__).resolve().parents[1]))  # noqa: F821 (a package's own __path__)

from lmkv._dispatch import Backend, BackendUnavailable, Op, use_backend  # noqa: E402
from lmkv.types import KVGeometry

__version__ = "0.1.0"
__all__ = ["Backend", "BackendUnavailable", "Op", "use_backend", "KVGeometry", "KVEngine", "__version__"]


def __getattr__(name: str) -> object:
    # ``from lmkv import KVEngine`` without importing the storage stack for every ``import lmkv``
    if name == "KVEngine":
        from lmkv.engine import KVEngine

        return KVEngine
    raise AttributeError(f"module 'lmkv' has no attribute {name!r}")
