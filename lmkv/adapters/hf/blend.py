"""CacheBlend on HF LLaMA-family models (LLaMA, Qwen2, Qwen3, Mistral; SmolLM2 is LLaMA), and
``generate(blend=True)``.

Given a prompt whose spans were prefilled earlier *each on its own* (``segments``), :func:`blend_prefill` builds
the prompt's KV cache without a full prefill: cached keys are re-rotated to their new positions, the layers
before the first check layer run for every token, each check layer keeps only the ``ratio`` most deviating
cached tokens (plus every uncached token and the last one), and later layers compute only those. The algorithm
is model-agnostic (:data:`lmkv.ops.blend.prefill`: reference and ``fast`` backends); this module supplies the
model's per-layer steps (:class:`HFSteps`, the model's own modules: nothing is monkeypatched) and turns the
result into a transformers cache.

``ratio=1.0`` recomputes everything (a full prefill); ``ratio=0.0`` is plain reuse. Continue generation from the
result with ``model.generate(input_ids, cache=cache_for_generate(cache))`` (generate recomputes the
last token, exactly as blending did) or step the model yourself with ``cache`` and ``logits``.

``lmkv.hf.generate(..., blend=True)`` (:func:`blended_cache`): the prompt is cut on a separator token sequence
(``blend.separator`` of the config, tokenized, or explicit ids). Every span followed by a separator is a reusable
chunk: its KV, computed on its own at positions 0.., is stored under a position-free segment key with a
fingerprint of its own tokens (``engine.segment_plan``), and found again whatever its place in a later prompt.
The span after the last separator is the query suffix and is always computed. Blended KV is an approximation,
so it is never stored under exact prefix keys.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lmkv.adapters.hf.cache import build_cache, cache_to_kv
from lmkv.adapters.hf.compat import output_cache
from lmkv.adapters.hf.support import SUPPORTED_MODEL_TYPES, decoder, refuse_unsupported, rope_spec
from lmkv.blend_steps import BlendStats, Segment
from lmkv.config import BlendConfig
from lmkv.errors import Unsupported
from lmkv.ops import blend as blend_ops

if TYPE_CHECKING:
    from lmkv.engine import KVEngine

_DEFAULTS = BlendConfig()


class HFSteps:
    """:class:`lmkv.blend_steps.BlendSteps` of an HF LLaMA-family ``*ForCausalLM`` (eval mode, batch 1).

    Each step calls the model's own modules on token-major tensors (``[n, E]``; ``[n, heads, D]``); RoPE is the
    model's own ``apply_rotary_pos_emb`` with the cos/sin of its ``rotary_emb``, so Q and K are what its forward
    computes.
    """

    def __init__(self, model: Any) -> None:
        inner = decoder(model)
        attn = inner.layers[0].self_attn
        self._inner, self._lm_head = inner, model.lm_head
        self._rotate = getattr(importlib.import_module(type(attn).__module__), "apply_rotary_pos_emb", None)
        if self._rotate is None:
            raise Unsupported(f"model: {type(attn).__module__} has no apply_rotary_pos_emb")
        param = next(model.parameters())
        self.num_layers = len(inner.layers)
        self.num_heads = int(model.config.num_attention_heads)
        self.num_kv_heads = int(model.config.num_key_value_heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self._qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        self.dtype, self.device = param.dtype, param.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` ids -> ``[n, E]``."""
        return self._inner.embed_tokens(ids)

    def qkv(self, layer: int, hidden: torch.Tensor,
            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[n, E]`` at ``positions [n]`` -> ``q [n, Hq, D]``, ``k, v [n, H, D]`` (q and k after RoPE)."""
        block = self._inner.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        n = x.shape[0]
        q, k, v = (proj(x).view(n, -1, self.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if self._qk_norm:  # Qwen3: RMSNorm over each head's q and k, before RoPE (as its forward does)
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self._inner.rotary_emb(x, positions[None])  # [1, n, D]
        q, k = self._rotate(q, k, cos[0], sin[0], unsqueeze_dim=1)  # cos/sin [n, 1, D] over heads
        return q, k, v

    def finish(self, layer: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``attn [n, Hq, D]`` -> o_proj + residual, then the MLP block + residual -> ``[n, E]``."""
        block = self._inner.layers[layer]
        hidden = hidden + block.self_attn.o_proj(attn.reshape(attn.shape[0], -1))
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[1, E]`` of the last token -> final norm, LM head -> ``[V]``."""
        return self._lm_head(self._inner.norm(hidden))[-1]


# -- prefill ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prefill_kv(model: Any, input_ids: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain full prefill: ``(kv [L, 2, T, H, D], last-position logits [V])`` (how a chunk is cached on its own)."""
    ids = blend_ops.as_token_ids(input_ids, next(model.parameters()).device)
    out = model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
    return cache_to_kv(output_cache(out)), out.logits[0, -1]


@torch.no_grad()
def blend_prefill(
    model: Any,
    input_ids: torch.Tensor | Sequence[int],
    segments: Sequence[Segment | tuple[int, int, torch.Tensor, int]],
    *,
    ratio: float = _DEFAULTS.ratio,
    check_layers: Sequence[int] | int = _DEFAULTS.check_layers,
    deviation: str = _DEFAULTS.deviation,
    backend: str | None = None,
    rerotate_backend: str | None = None,
    scores: torch.Tensor | None = None,
    policy: str = _DEFAULTS.policy,
) -> tuple[Any, torch.Tensor, BlendStats]:
    """Prefill ``input_ids`` reusing the cached KV of ``segments``, recomputing only a ``ratio`` of their tokens.

    Args:
        model: an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` / ``MistralForCausalLM``
            (batch 1, eval mode).
        input_ids: ``[N]`` or ``[1, N]`` token ids of the whole prompt.
        segments: cached spans, ``Segment`` or ``(start, end, kv [L, 2, end-start, H, D], old_start)``: the KV of
            ``input_ids[start:end]`` computed at positions ``old_start ...`` (0 for a chunk prefilled on its own),
            in any order, non-overlapping. Tokens outside every segment are computed fresh at every layer.
        ratio: fraction of the cached tokens recomputed after the check layer(s), in [0, 1].
        check_layers: increasing layer indices; several = gradual filtering (kept fraction ratio**(i/m)).
        deviation: ``"key"`` or ``"value"``: which tensor's deviation selects tokens.
        backend: backend of the ``blend.prefill`` op: ``"reference"`` (the spec) or ``"fast"`` (None = dispatch
            default, the fast path).
        rerotate_backend: backend of the ``blend.rerotate`` op the fast path moves keys with.
        scores: optional ``[N]`` per-token scores that replace the measured deviation at the check layers (higher
            = recompute first), for studies of other selection rules such as an oracle; the check layers still
            decide where the selection happens.
        policy: the token-selection rule, a name registered in :mod:`lmkv.blend_policies` (``"deviation"``:
            CacheBlend; ``"chunk_head"``, ``"attention"``, ``"random"``, ``"oracle"``, or your own).

    Returns:
        ``(cache, logits, stats)``: a ``DynamicCache`` holding all N tokens (``[1, H, N, D]`` per layer), the
        logits ``[V]`` of the last position, and :class:`BlendStats`.
    """
    refuse_unsupported(model, blend=True)
    kv, logits, stats = blend_ops.prefill(
        HFSteps(model), input_ids, segments, rope=rope_spec(model), ratio=ratio, check_layers=check_layers,
        deviation=deviation, scores=scores, backend=backend, rerotate_backend=rerotate_backend, policy=policy,
    )
    return build_cache(kv), logits, stats


def cache_for_generate(cache: Any) -> Any:
    """A copy of a blended cache without its last token, for ``model.generate(input_ids, cache=...)``:
    generate then recomputes the last prompt token over the blended cache, exactly as blend_prefill did."""
    kv = cache_to_kv(cache)
    return build_cache(kv[:, :, : kv.shape[2] - 1])


@torch.no_grad()
def kv_deviation_by_layer(
    model: Any, input_ids: torch.Tensor | Sequence[int], segments: Sequence[Any]
) -> dict[str, torch.Tensor]:
    """Per-layer, per-token deviation between a full prefill's K/V and the re-rotated cached K/V.

    Returns ``{"key": [L, N], "value": [L, N]}`` float32 (NaN for tokens no segment covers): what the check layer
    sees, for every layer at once (used to study which layers separate the tokens best).
    """
    full, _ = prefill_kv(model, input_ids)
    num_layers, _, n, heads, head_dim = full.shape
    segs = blend_ops.as_segments(segments, n, (num_layers, heads, head_dim))
    spec = rope_spec(model)
    out = {"key": torch.full((num_layers, n), math.nan), "value": torch.full((num_layers, n), math.nan)}
    for seg in segs:
        t = seg.end - seg.start
        old = torch.arange(seg.old_start, seg.old_start + t)
        new = torch.arange(seg.start, seg.end)
        keys = blend_ops.rerotate(seg.kv[:, 0].to(full.dtype), old, new, spec)
        for li in range(num_layers):
            out["key"][li, seg.start:seg.end] = blend_ops.token_deviation(full[li, 0, seg.start:seg.end], keys[li])
            out["value"][li, seg.start:seg.end] = blend_ops.token_deviation(
                full[li, 1, seg.start:seg.end], seg.kv[li, 1].to(full.dtype))
    return out


def segments_from_chunks(chunks: Sequence[tuple[Sequence[int], torch.Tensor | None]]) -> tuple[torch.Tensor, list]:
    """Concatenate ``(token_ids, kv or None)`` chunks into a prompt: ``(input_ids [N], segments)``.

    A chunk with ``kv`` (computed on its own, positions from 0) becomes a segment; ``None`` marks fresh tokens.
    """
    ids: list[int] = []
    segs: list[Segment] = []
    for tokens, kv in chunks:
        tokens = [int(t) for t in tokens]
        if kv is not None and tokens:
            segs.append(Segment(len(ids), len(ids) + len(tokens), kv, 0))
        ids.extend(tokens)
    return torch.tensor(ids, dtype=torch.long), segs


# -- generate(blend=True) -----------------------------------------------------------------------------------------
def separator_ids(engine: KVEngine, tokenizer: Any = None, separator: Sequence[int] | None = None) -> list[int]:
    """The separator as token ids: ``separator`` if given, else ``blend.separator`` tokenized by ``tokenizer``."""
    if separator is not None:
        ids = [int(t) for t in separator]
    elif tokenizer is not None:
        # Tokenized as it appears in a prompt: trailing whitespace joins the next word in BPE tokenizers (" # # "
        # alone ends in a lone " " token that never occurs before a word), so it is not part of the match.
        text = engine.config.blend.separator.rstrip() or engine.config.blend.separator
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        raise ValueError("blend=True needs the separator: pass blend_separator=<token ids> or tokenizer=<tokenizer>")
    if not ids:
        raise ValueError("blend separator is empty")
    return ids


def chunk_spans(tokens: list[int], sep: list[int], engine: KVEngine) -> list[Any]:
    """The reusable chunks: segments (``Chunk(start, end, key, fingerprint)``) that a separator follows."""
    m = len(sep)
    return [c for c in engine.segment_plan(tokens, sep) if tokens[c.end : c.end + m] == sep]


def _cached_segments(model: Any, tokens: list[int], chunks: list[Any], engine: KVEngine,
                     tiers: dict[str, int]) -> tuple[list[Segment], int, int]:
    """``(segments, reused tokens, prefilled tokens)``: every chunk's KV from storage (one batched read; the
    tokens each tier served go into ``tiers``), or prefilled on its own and stored; a chunk repeated within the
    prompt is prefilled once."""
    found = engine.retrieve_segments(chunks, tiers_out=tiers) if chunks else []
    fresh: dict[str, torch.Tensor] = {}
    segments: list[Segment] = []
    reused = prefilled = 0
    for chunk, kv in zip(chunks, found):
        if kv is None and chunk.key in fresh:
            kv = fresh[chunk.key]
        if kv is None:
            kv = fresh[chunk.key] = prefill_kv(model, tokens[chunk.start:chunk.end])[0].to(engine.geometry.dtype)
            engine.store_segment(chunk, kv)
            prefilled += chunk.end - chunk.start
        else:
            reused += chunk.end - chunk.start
        segments.append(Segment(chunk.start, chunk.end, kv, 0))  # prefilled on its own: positions from 0
    return segments, reused, prefilled


def blended_cache(model: Any, input_ids: torch.Tensor, *, engine: KVEngine, tokenizer: Any = None,
                  separator: Sequence[int] | None = None, ratio: float | None = None,
                  policy: str | None = None) -> tuple[Any, int, dict]:
    """``(cache for generate, cached tokens, stats)`` for a prompt of separated chunks.

    Args:
        input_ids: ``[1, N]``.
        ratio: recompute ratio (default ``engine.config.blend.ratio``).
        policy: token-selection policy name (default ``engine.config.blend.policy``; any registered name).
    """
    cfg = engine.config.blend
    tokens = input_ids[0].tolist()
    chunks = chunk_spans(tokens, separator_ids(engine, tokenizer, separator), engine)
    if not chunks:
        warnings.warn("lmkv.hf.generate(blend=True): the prompt holds no chunk followed by the separator "
                      f"{engine.config.blend.separator!r}, so nothing is reused (a full prefill)", stacklevel=3)
    tiers: dict[str, int] = {}
    segments, reused, prefilled = _cached_segments(model, tokens, chunks, engine, tiers)
    cache, _logits, bstats = blend_prefill(
        model, input_ids, segments,
        ratio=cfg.ratio if ratio is None else ratio, check_layers=cfg.check_layers, deviation=cfg.deviation,
        policy=cfg.policy if policy is None else policy,
    )
    stats = {
        "chunks": len(chunks), "reused_tokens": reused, "prefilled_chunk_tokens": prefilled,
        "recompute_fraction": bstats.recompute_fraction, "num_fresh": bstats.num_fresh, "tiers": tiers,
    }
    return cache_for_generate(cache), reused, stats


__all__ = [
    "Segment", "BlendStats", "HFSteps", "blend_prefill", "prefill_kv", "cache_for_generate", "kv_deviation_by_layer",
    "segments_from_chunks", "rope_spec", "blended_cache", "separator_ids", "chunk_spans", "SUPPORTED_MODEL_TYPES",
]
