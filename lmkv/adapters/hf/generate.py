"""``generate()`` with KV-cache reuse for transformers models.

The model is never patched. lmkv hands transformers an ordinary ``DynamicCache`` pre-filled with the stored
KV of the longest stored prefix; ``model.generate`` then prefills only the remaining tokens (it derives
``cache_position`` from the cache length) and decodes as usual. The last prompt token is always left uncached
so that its logits, which choose the first new token, are computed by the model.

A left-padded batch ``[B, T]`` shares one cache of ``past`` columns: row b holds zeros on its padding and its
stored KV after, so generate (positions from the attention mask, as always) continues every row exactly as a
cold batch would. Sliding-window layers get the layout transformers gives them (:mod:`lmkv.adapters.hf.cache`).

One request is one pass: each prompt row is hashed once (``engine.plan``), and that plan serves the lookup, the
retrieve and the store; with ``store_generated`` the longer sequence gets a plan of its own.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmkv.adapters.hf.blend import blended_cache
from lmkv.adapters.hf.cache import adopt_cache, cache_buffer, cache_to_kv, new_cache, row_view
from lmkv.adapters.hf.compat import cache_kwargs, output_cache
from lmkv.adapters.hf.support import has_sliding_layers, refuse_unsupported
from lmkv.storage.buffers import BufferPool

if TYPE_CHECKING:
    from lmkv.engine import KVEngine


@dataclass
class GenerateStats:
    """What one ``generate`` call did."""

    prompt_tokens: int = 0  # the prompt's width T (padding included, for a left-padded batch)
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
    row_hits: list[int] = field(default_factory=list)  # reused tokens per prompt row (hit_tokens is their sum)


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


@dataclass(frozen=True)
class _Prompt:
    """The prompt rows: ``ids [B, T]``, left padding ``pads[b]`` columns per row (from the attention mask)."""

    ids: torch.Tensor
    pads: tuple[int, ...]

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def tokens(self, row: int) -> list[int]:
        return self.ids[row, self.pads[row]:].tolist()

    def mask(self) -> torch.Tensor:
        """``[B, T]``: 0 on the padding, 1 on the tokens."""
        cols = torch.arange(self.width)
        return (cols.unsqueeze(0) >= torch.tensor(self.pads).unsqueeze(1)).to(self.ids.dtype)


def _as_prompt(input_ids: Any, attention_mask: Any) -> _Prompt:
    """Validate ``input_ids [B, T]`` (or ``[T]``) and its left-padding ``attention_mask [B, T]``."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an int tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return _Prompt(input_ids.long(), (0,) * input_ids.shape[0])
    mask = torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask has right padding (or holes): lmkv.hf.generate takes left-padded "
                         "batches, as generate wants them (tokenizer.padding_side = 'left')")
    counts = mask.long().sum(1)
    if bool((counts == 0).any()):
        raise ValueError("attention_mask masks a whole row: every row needs at least one token")
    return _Prompt(input_ids.long(), tuple(int(input_ids.shape[1] - c) for c in counts))


# Idle cache buffers kept for the next request (at most 1 GiB): a fresh buffer is page-fault bound, about a third
# of the copy rate into mapped memory here; set ``CACHE_BUFFERS.max_cached = 0`` to keep none.
CACHE_BUFFERS = BufferPool(1 << 30)


def _shared_past(prompt: _Prompt, extents: list[int]) -> int:
    """Columns of the shared cache: every row's stored prefix must reach them, and every row keeps >= 1 token to
    compute (its last token's logits pick its first new token). Rows start after their padding, so a row with no
    hit limits the cache to its padding: the batch then computes no more than it would cold."""
    ends = [pad + min(extent, prompt.width - pad - 1) for pad, extent in zip(prompt.pads, extents)]
    past = min(ends)  # each end is >= its row's padding >= 0
    return past if any(past > pad for pad in prompt.pads) else 0


def _prefix_cache(model: Any, prompt: _Prompt, plans: list[Any], engine: KVEngine,
                  stats: GenerateStats) -> tuple[Any, Any]:
    """``(DynamicCache [B, H, past, D] of the rows' stored prefixes or None, buffer lease or None)``.

    Row b's cache holds zeros on its padding (masked, but finite) and its stored KV after; ``stats.row_hits``
    gets each row's reused tokens. On CPU the stored KV is copied once, straight into the tensors the model reads,
    which live in a reused buffer; release the lease when generation is done. A stored extent may end at the
    prompt's end (its partial last chunk, stored by an earlier call): that chunk is read whole and only what the
    cache needs is used, so a repeated prompt of any length reuses all but one token."""
    extents = [engine.lookup(plan) for plan in plans]
    past = _shared_past(prompt, extents)
    if past == 0:
        return None, None
    t0 = time.perf_counter()
    g, cs = engine.geometry, engine.chunk_size
    need = [max(past - pad, 0) for pad in prompt.pads]
    # a row reads whole chunks: up to the chunk that covers what the cache needs of it
    ends = [min(extent, -(-n // cs) * cs) for n, extent in zip(need, extents)]
    width = max(pad + end for pad, end in zip(prompt.pads, ends))
    direct = model.device.type == "cpu" and model.dtype == g.dtype  # else copied to the model's device and dtype
    lease = CACHE_BUFFERS.take(g.bytes_per_token * width * len(need)) if direct else None
    buffer, _ = cache_buffer(g.num_layers, g.num_kv_heads, width, g.head_dim, g.dtype,
                             lease.data if lease is not None else None, batch=len(need))
    tiers: dict[str, int] = {}
    for row, (plan, pad, n, end) in enumerate(zip(plans, prompt.pads, need, ends)):
        buffer[:, :, row, :, :pad].zero_()
        if n:
            served: dict[str, int] = {}
            _, got = engine.retrieve(plan, end=end, out=row_view(buffer, row, pad), tiers_out=served)
            for tier, count in served.items():
                tiers[tier] = tiers.get(tier, 0) + count
            past = min(past, pad + got)  # a chunk gone since the lookup: the cache stops before it
    stats.retrieve_s = time.perf_counter() - t0
    stats.tiers = tiers
    stats.row_hits = [max(past - pad, 0) for pad in prompt.pads]
    if not any(stats.row_hits):
        if lease is not None:
            lease.release()
        return None, None
    buffer = buffer[..., :past, :]
    if not direct:
        buffer = buffer.to(device=model.device, dtype=model.dtype)
    return adopt_cache(buffer, model.config), lease


def _run(model: Any, prompt: _Prompt, cache: Any, generate_kwargs: dict[str, Any]) -> tuple[Any, float]:
    """``model.generate`` from ``cache``: ``(output with its cache, time of the first token's scores)``."""
    from transformers import LogitsProcessorList

    stamp: list[float] = []
    kwargs = dict(generate_kwargs)
    processors = list(kwargs.pop("logits_processor", None) or [])
    processors.append(_clock_processor(stamp))
    # no do_sample default of lmkv's own: the model's generation_config decides, as in model.generate
    kwargs.update(cache_kwargs(cache))  # ``cache=`` or ``past_key_values=``, as the installed transformers names it
    kwargs.update(return_dict_in_generate=True, use_cache=True)
    out = model.generate(prompt.ids, attention_mask=prompt.mask(),
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


def _store(out: Any, prompt: _Prompt, plans: list[Any], engine: KVEngine, store_generated: bool, expand: int,
           stats: GenerateStats) -> None:
    """Store each row's prompt KV (and with ``store_generated``, one row only, the answer's) under its plan."""
    t0 = time.perf_counter()
    kv_cache = output_cache(out)
    # The cache holds KV for every token fed to the model: the prompt and all but the last generated token.
    have = kv_cache.get_seq_length()
    for row, (plan, pad) in enumerate(zip(plans, prompt.pads)):
        end = prompt.width
        if store_generated:  # one unpadded row: its answer follows its prompt
            end = min(out.sequences.shape[1] - 1, have)
            plan = engine.plan(out.sequences[0, :end].tolist())  # a different sequence: its own plan
        # generate expanded each prompt row to ``expand`` rows (beams, returned sequences): all share the prompt
        stats.stored_tokens += engine.store(plan, cache_to_kv(kv_cache, pad, end, row=row * expand))
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
        model: a transformers causal LM whose layers are full or sliding-window attention (Gemma2/3, gpt-oss,
            Mistral/Qwen2/Phi3 with ``sliding_window``); others raise :class:`lmkv.errors.Unsupported`.
        input_ids: ``[B, T]`` (or ``[T]``) prompt ids.
        engine: the :class:`lmkv.engine.KVEngine` that stores and serves KV for this model.
        attention_mask: ``[B, T]``, 0 on left padding (right padding is refused). Each row reuses its own longest
            stored prefix; the rows share one cache, as wide as every row's reach allows (a row without a hit
            limits it to that row's padding, so the batch never computes more than cold).
        reuse: look up and reuse stored KV (False: a plain cold generate, timed the same way).
        store: store the prompt's KV (new chunks only) after generating.
        store_generated: also store the answer's KV, so a next chat turn that repeats it hits (one unpadded row
            without beams; other calls store the prompts only).
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
    prompt = _as_prompt(input_ids, attention_mask)
    batch = prompt.ids.shape[0]
    if blend and (batch > 1 or prompt.pads[0]):
        raise ValueError(f"input_ids: blend=True takes one unpadded row, got shape {tuple(prompt.ids.shape)}")
    engine.check_model(model)
    cold = _cold_reason(model, generate_kwargs)
    if cold is not None and (reuse or store):
        warnings.warn(f"lmkv.hf.generate runs this call without reuse: {cold}", stacklevel=2)
        reuse = store = False
    expand = _rows(model, generate_kwargs)
    # beams reorder the cache rows, and padded rows end at different columns: only then is an answer stored
    store_generated = store_generated and expand == 1 and batch == 1 and not prompt.pads[0]
    stats = GenerateStats(prompt_tokens=prompt.width, row_hits=[0] * batch)
    t0 = time.perf_counter()
    prefix = not blend and (reuse or store)
    # each row hashed once: lookup, retrieve and store
    plans = [engine.plan(prompt.tokens(row)) for row in range(batch)] if prefix else []
    cache, lease = None, None
    try:
        if reuse and blend:
            cache, hit, stats.blend = blended_cache(model, prompt.ids, engine=engine, tokenizer=tokenizer,
                                                    separator=blend_separator)
            stats.row_hits = [hit]
            stats.tiers = dict(stats.blend["tiers"]) if stats.blend else {}
        elif reuse:
            cache, lease = _prefix_cache(model, prompt, plans, engine, stats)
        stats.hit_tokens = sum(stats.row_hits)
        stats.computed_prompt_tokens = prompt.width * batch - sum(prompt.pads) - stats.hit_tokens
        if cache is not None and expand > 1:
            cache.batch_repeat_interleave(expand)  # generate expands the prompt rows, not a cache it was given
        if cache is None and store and not blend and has_sliding_layers(model.config):
            cache = new_cache(model.config)  # sliding layers that keep the whole prompt, for the store
        out, first_token = _run(model, prompt, cache, generate_kwargs)
        del cache  # its layers hold the reused buffer only until the first forward step replaced them
        stats.ttft_s = first_token - t0
        stats.new_tokens = out.sequences.shape[1] - prompt.width
        if store and not blend:
            _store(out, prompt, plans, engine, store_generated, expand, stats)
    finally:
        if lease is not None:
            lease.release()
    stats.total_s = time.perf_counter() - t0
    return GenerateOutput(sequences=out.sequences, stats=stats, output=out)


__all__ = ["generate", "GenerateOutput", "GenerateStats"]
