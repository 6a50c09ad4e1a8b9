"""``generate()`` with KV-cache reuse for transformers models.

The model is never patched. lmkv hands transformers an ordinary ``DynamicCache`` pre-filled with the stored
KV of the longest stored prefix; ``model.generate`` then prefills only the remaining tokens (it derives
``cache_position`` from the cache length) and decodes as usual. The last prompt token is always left uncached
so that its logits, which choose the first new token, are computed by the model.

One request is one pass: the prompt is hashed once (``engine.plan``), and that plan serves the lookup, the
retrieve and the store; with ``store_generated`` the longer sequence gets a plan of its own.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmkv.adapters.hf.blend import blended_cache
from lmkv.adapters.hf.cache import adopt_cache, build_cache, cache_buffer, cache_to_kv
from lmkv.adapters.hf.compat import cache_kwargs, output_cache
from lmkv.adapters.hf.support import refuse_unsupported
from lmkv.storage.buffers import BufferPool

if TYPE_CHECKING:
    from lmkv.engine import KVEngine


@dataclass
class GenerateStats:
    """What one ``generate`` call did."""

    prompt_tokens: int = 0
    hit_tokens: int = 0
    computed_prompt_tokens: int = 0
    stored_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    retrieve_s: float = 0.0
    store_s: float = 0.0
    tiers: dict[str, int] = field(default_factory=dict)
    blend: dict[str, Any] | None = None


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [R, T + new]: R = max(num_beams, num_return_sequences) rows, as model.generate
    stats: GenerateStats
    output: Any = None  # transformers' own output object (scores, logits, ... when asked for)

    def new_tokens(self) -> torch.Tensor:
        return self.sequences[0, self.stats.prompt_tokens :]


def _clock_processor(stamp: list[float]) -> Any:
    from transformers import LogitsProcessor

    class _FirstTokenClock(LogitsProcessor):
        """Records the time the first next-token scores exist: the end of prefill (TTFT)."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if not stamp:
                stamp.append(time.perf_counter())
            return scores

    return _FirstTokenClock()


def _as_single_row(input_ids: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an int tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"input_ids has batch {input_ids.shape[0]}: lmkv.hf.generate reuses cache for one sequence per call "
            "(call it once per row; padded batches would need per-row cache positions)"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty")
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise ValueError("attention_mask has padding: lmkv.hf.generate supports unpadded single sequences only")
    return input_ids.long()


# Idle cache buffers kept for the next request (at most 1 GiB): a fresh buffer is page-fault bound, about a third
# of the copy rate into mapped memory here; set ``CACHE_BUFFERS.max_cached = 0`` to keep none.
CACHE_BUFFERS = BufferPool(1 << 30)


def _prefix_cache(model: Any, plan: Any, engine: KVEngine, stats: GenerateStats) -> tuple[Any, int, Any]:
    """``(DynamicCache of the longest stored prefix or None, its length, buffer lease or None)``, keeping >= 1
    prompt token to compute. On CPU the stored KV is copied once, straight into the tensors the model reads, which
    live in a reused buffer; release the lease when generation is done.

    The stored extent may end at the prompt's end (its partial last chunk, stored by an earlier call): that chunk
    is read whole and its last token dropped, so a repeated prompt of any length reuses all but one token."""
    extent = engine.lookup(plan)
    keep = stats.prompt_tokens - 1  # the model computes the last prompt token: its logits pick the first new one
    if min(extent, keep) <= 0:
        return None, 0, None
    t0 = time.perf_counter()
    g = engine.geometry
    if model.device.type != "cpu" or model.dtype != g.dtype or g.mla:
        kv, n = engine.retrieve(plan, end=extent)
        stats.retrieve_s = time.perf_counter() - t0
        n = min(n, keep)
        if n <= 0:
            return None, 0, None
        return build_cache(kv[:, :, :n].to(device=model.device, dtype=model.dtype), model.config), n, None
    lease = CACHE_BUFFERS.take(g.bytes_per_token * extent)
    buffer, view = cache_buffer(g.num_layers, g.num_kv_heads, extent, g.head_dim, g.dtype, lease.data)
    _, n = engine.retrieve(plan, end=extent, out=view)
    stats.retrieve_s = time.perf_counter() - t0
    n = min(n, keep)
    if n <= 0:
        lease.release()
        return None, 0, None
    return adopt_cache(buffer[..., :n, :], model.config), n, lease


def _run(model: Any, input_ids: torch.Tensor, cache: Any, generate_kwargs: dict[str, Any]) -> tuple[Any, float]:
    """``model.generate`` from ``cache``: ``(output with its cache, time of the first token's scores)``."""
    from transformers import LogitsProcessorList

    stamp: list[float] = []
    kwargs = dict(generate_kwargs)
    processors = list(kwargs.pop("logits_processor", None) or [])
    processors.append(_clock_processor(stamp))
    # no do_sample default of lmkv's own: the model's generation_config decides, as in model.generate
    kwargs.update(cache_kwargs(cache))  # ``cache=`` or ``past_key_values=``, as the installed transformers names it
    kwargs.update(return_dict_in_generate=True, use_cache=True)
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                         logits_processor=LogitsProcessorList(processors), **kwargs)
    return out, (stamp[0] if stamp else time.perf_counter())


def _setting(model: Any, kwargs: dict[str, Any], name: str, default: Any) -> Any:
    """A generation setting as generate sees it: the call's keyword, else its generation_config, else the model's."""
    gc = kwargs.get("generation_config") or model.generation_config
    return kwargs.get(name, getattr(gc, name, default))


def _cold_reason(model: Any, kwargs: dict[str, Any]) -> str | None:
    """Why this call cannot start from a reused cache (it then runs cold, as model.generate), or None."""
    if any(k in kwargs for k in ("cache", "past_key_values")):
        return "the call passes its own cache"
    impl = _setting(model, kwargs, "cache_implementation", None)
    if impl not in (None, "dynamic"):
        return f"cache_implementation={impl!r} (lmkv reuses KV through a DynamicCache)"
    return None


def _rows(model: Any, kwargs: dict[str, Any]) -> int:
    """The rows generate expands the prompt to: ``max(num_beams, num_return_sequences)`` (transformers' rule)."""
    beams = _setting(model, kwargs, "num_beams", 1) or 1
    returned = _setting(model, kwargs, "num_return_sequences", 1) or 1
    return max(int(beams), int(returned), 1)


def _store(out: Any, plan: Any, engine: KVEngine, store_generated: bool, stats: GenerateStats) -> None:
    """Store the prompt's KV (and with ``store_generated`` the answer's) under the plan of those tokens."""
    t0 = time.perf_counter()
    full = out.sequences[0].tolist()
    # The cache holds KV for every token fed to the model: the prompt and all but the last generated token.
    usable = len(full) - 1 if store_generated else stats.prompt_tokens
    kv_cache = output_cache(out)
    usable = min(usable, kv_cache.get_seq_length())
    if usable != stats.prompt_tokens:
        plan = engine.plan(full[:usable])  # a different sequence: its own plan
    stats.stored_tokens = engine.store(plan, cache_to_kv(kv_cache, 0, usable))
    stats.store_s = time.perf_counter() - t0


def generate(
    model: Any,
    input_ids: Any,
    *,
    engine: KVEngine,
    attention_mask: torch.Tensor | None = None,
    reuse: bool = True,
    store: bool = True,
    store_generated: bool = False,
    blend: bool = False,
    tokenizer: Any = None,
    blend_separator: Any = None,
    **generate_kwargs: Any,
) -> GenerateOutput:
    """``model.generate`` with the longest stored prefix of the prompt reused from ``engine``.

    Args:
        model: a transformers causal LM with full attention (others raise :class:`lmkv.errors.Unsupported`).
        input_ids: ``[1, T]`` (or ``[T]``) prompt ids.
        engine: the :class:`lmkv.engine.KVEngine` that stores and serves KV for this model.
        reuse: look up and reuse stored KV (False: a plain cold generate, timed the same way).
        store: store the prompt's KV (new chunks only) after generating.
        store_generated: also store the answer's KV, so a next chat turn that repeats it hits.
        blend: reuse non-prefix chunks with CacheBlend (see :mod:`lmkv.adapters.hf.blend`); the prompt's chunks
            are separated by ``blend_separator`` (token ids) or ``config.blend.separator`` tokenized with
            ``tokenizer``. Blended KV is approximate, so it is not stored under prefix keys.
        **generate_kwargs: passed to ``model.generate`` with their meaning kept (``max_new_tokens``, sampling
            defaults from the model's generation config, ``num_beams``, ``num_return_sequences``,
            ``output_scores``, streamers, stopping criteria ...). A call that passes its own cache, or a cache
            implementation other than the dynamic one, runs cold with a warning naming why.
    Returns:
        :class:`GenerateOutput`: ``sequences [R, T + new]`` (R rows as ``model.generate``), :class:`GenerateStats`,
        and ``output``, transformers' own output object.
    """
    refuse_unsupported(model, blend=blend and reuse)
    input_ids = _as_single_row(input_ids, attention_mask)
    engine.check_model(model)
    cold = _cold_reason(model, generate_kwargs)
    if cold is not None and (reuse or store):
        warnings.warn(f"lmkv.hf.generate runs this call without reuse: {cold}", stacklevel=2)
        reuse = store = False
    rows = _rows(model, generate_kwargs)
    store_generated = store_generated and rows == 1  # beams reorder the cache rows: only the prompt is row 0's
    stats = GenerateStats(prompt_tokens=input_ids.shape[1])
    t0 = time.perf_counter()
    prefix = not blend and (reuse or store)
    plan = engine.plan(input_ids[0].tolist()) if prefix else None  # hashed once: lookup, retrieve and store
    cache, hit = None, 0
    if reuse and blend:
        cache, hit, stats.blend = blended_cache(model, input_ids, engine=engine, tokenizer=tokenizer,
                                                separator=blend_separator)
    lease = None
    try:
        if reuse and not blend:
            cache, hit, lease = _prefix_cache(model, plan, engine, stats)
        stats.hit_tokens = hit
        stats.computed_prompt_tokens = stats.prompt_tokens - hit
        if blend:
            stats.tiers = dict(stats.blend["tiers"]) if stats.blend else {}
        else:
            stats.tiers = engine.last_tiers() if hit else {}
        if cache is not None and rows > 1:
            cache.batch_repeat_interleave(rows)  # generate expands the prompt rows, not a cache it was given
        out, first_token = _run(model, input_ids, cache, generate_kwargs)
        del cache  # its layers hold the reused buffer only until the first forward step replaced them
        stats.ttft_s = first_token - t0
        stats.new_tokens = out.sequences.shape[1] - stats.prompt_tokens
        if store and not blend:
            _store(out, plan, engine, store_generated, stats)
    finally:
        if lease is not None:
            lease.release()
    stats.total_s = time.perf_counter() - t0
    return GenerateOutput(sequences=out.sequences, stats=stats, output=out)


__all__ = ["generate", "GenerateOutput", "GenerateStats"]
