"""``lmkv.hf``: the HuggingFace transformers entry point (implemented in :mod:`lmkv.adapters.hf`).

``generate``, ``build_cache``, ``cache_to_kv``, ``blend_prefill`` ... : every name of ``lmkv.adapters.hf.__all__``.
"""

from lmkv.adapters.hf import *  # noqa: F403  (a thin re-export: the names are listed once, in lmkv.adapters.hf)
from lmkv.adapters.hf import __all__ as __all__
