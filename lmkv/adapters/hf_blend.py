"""``lmkv.hf.generate(..., blend=True)``: CacheBlend reuse of non-prefix chunks in a transformers prompt.

The prompt is cut on a separator token sequence (``blend.separator`` of the config, tokenized, or explicit ids).
Every span followed by a separator is a reusable chunk: its KV, computed on its own at positions 0.., is stored
under a position-free segment key (``lmkv.ops.hashing.segment_keys``) with a fingerprint of its own tokens, and
found again whatever its place in a later prompt. The span after the last separator is the query suffix and is
always computed. A chunk never seen before is prefilled on its own and stored. Then
:func:`lmkv.blending.blend_prefill` re-rotates the cached keys to their new positions and recomputes the
``blend.ratio`` most deviating tokens, and ``generate`` continues from the blended cache.

Blended KV is an approximation, so it is never stored under exact prefix keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lmkv.ops import hashing

if TYPE_CHECKING:
    from lmkv.engine import KVEngine


def separator_ids(engine: KVEngine, tokenizer: Any = None, separator: Sequence[int] | None = None) -> list[int]:
    """The separator as token ids: ``separator`` if given, else ``blend.separator`` tokenized by ``tokenizer``."""
    if separator is not None:
        ids = [int(t) for t in separator]
    elif tokenizer is not None:
        ids = list(tokenizer.encode(engine.config.blend.separator, add_special_tokens=False))
    else:
        raise ValueError("blend=True needs the separator: pass blend_separator=<token ids> or tokenizer=<tokenizer>")
    if not ids:
        raise ValueError("blend separator is empty")
    return ids


def chunk_spans(tokens: list[int], sep: list[int], engine: KVEngine) -> list[tuple[int, int, str]]:
    """Spans ``(start, end, key)`` that a separator follows: the reusable chunks (the suffix is not one)."""
    m = len(sep)
    return [(s, e, key) for s, e, key in engine.db.segments(tokens, sep) if tokens[e : e + m] == sep]


def blended_cache(model: Any, input_ids: torch.Tensor, *, engine: KVEngine, tokenizer: Any = None,
                  separator: Sequence[int] | None = None, ratio: float | None = None) -> tuple[Any, int, dict]:
    """``(cache for generate, cached tokens, stats)`` for a prompt of separated chunks.

    Args:
        input_ids: ``[1, N]``.
        ratio: recompute ratio (default ``engine.config.blend.ratio``).
    """
    from lmkv.blending import Segment, blend_prefill, cache_for_generate, prefill_kv

    cfg = engine.config.blend
    tokens = input_ids[0].tolist()
    sep = separator_ids(engine, tokenizer, separator)
    spans = chunk_spans(tokens, sep, engine)
    segments: list[Segment] = []
    reused = stored = 0
    for start, end, key in spans:
        fp = hashing.token_fingerprint(tokens[start:end], salt=engine.keyspace.salt)
        kv, _tier = engine.storage.get_with_tier(key, fingerprint=fp)
        if kv is None or tuple(kv.shape) != engine.geometry.chunk_shape(end - start):
            kv = prefill_kv(model, tokens[start:end])[0].to(engine.geometry.dtype)  # on its own, from 0
            engine.storage.put(key, kv, fingerprint=fp)
            stored += end - start
        else:
            reused += end - start
        segments.append(Segment(start, end, kv.to(model.dtype), 0))
    cache, _logits, bstats = blend_prefill(
        model, input_ids, segments,
        ratio=cfg.ratio if ratio is None else ratio, check_layers=cfg.check_layers, deviation=cfg.deviation,
    )
    stats = {
        "chunks": len(spans), "reused_tokens": reused, "prefilled_chunk_tokens": stored,
        "recompute_fraction": bstats.recompute_fraction, "num_fresh": bstats.num_fresh,
    }
    return cache_for_generate(cache), reused, stats
