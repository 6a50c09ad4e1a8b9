"""HuggingFace transformers adapter: everything transformers-specific lives here.

- :mod:`~lmkv.adapters.hf.cache`: lmkv chunks ``[L, 2, T, H, D]`` <-> ``DynamicCache`` (``build_cache``,
  ``cache_to_kv``);
- :mod:`~lmkv.adapters.hf.generate`: ``generate()`` with prefix reuse;
- :mod:`~lmkv.adapters.hf.compat`: the cache argument of the installed transformers (``cache=`` from 5.24,
  ``past_key_values=`` before);
- :mod:`~lmkv.adapters.hf.blend`: CacheBlend's per-layer steps of HF LLaMA-family models, ``blend_prefill`` and
  ``generate(blend=True)``;
- :mod:`~lmkv.adapters.hf.support`: the one check of which models and setups are served
  (:class:`lmkv.errors.Unsupported` otherwise).

The public entry point is :mod:`lmkv.hf`, which re-exports these names.
"""

from lmkv.adapters.hf.blend import (
    SUPPORTED_MODEL_TYPES,
    BlendStats,
    HFSteps,
    Segment,
    blend_prefill,
    blended_cache,
    cache_for_generate,
    kv_deviation_by_layer,
    prefill_kv,
    rope_spec,
    segments_from_chunks,
)
from lmkv.adapters.hf.cache import build_cache, cache_to_kv
from lmkv.adapters.hf.generate import GenerateOutput, GenerateStats, generate
from lmkv.adapters.hf.support import refuse_unsupported

__all__ = [
    "build_cache", "cache_to_kv", "generate", "GenerateOutput", "GenerateStats", "refuse_unsupported",
    "Segment", "BlendStats", "HFSteps", "blend_prefill", "blended_cache", "cache_for_generate",
    "kv_deviation_by_layer", "prefill_kv", "rope_spec", "segments_from_chunks", "SUPPORTED_MODEL_TYPES",
]
