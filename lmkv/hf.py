"""``lmkv.hf``: the HuggingFace transformers adapter (see :mod:`lmkv.adapters.hf`)."""

from lmkv.adapters.hf import GenerateOutput, GenerateStats, build_cache, cache_to_kv, generate, refuse_unsupported

__all__ = ["build_cache", "cache_to_kv", "generate", "GenerateOutput", "GenerateStats", "refuse_unsupported"]
