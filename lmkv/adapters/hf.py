"""HuggingFace transformers adapter: ``generate()`` with KV-cache reuse, and the cache builder under it.

The model is never patched. lmkv hands transformers an ordinary ``DynamicCache`` pre-filled with the stored
KV of the longest stored prefix; ``model.generate`` then prefills only the remaining tokens (it derives
``cache_position`` from the cache length) and decodes as usual. The last prompt token is always left uncached
so that its logits, which choose the first new token, are computed by the model.

Shapes: lmkv chunks are ``[L, 2, T, H, D]``; transformers keeps per layer ``keys``/``values`` of
``[B, H, T, D]`` (B = 1 here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmkv.engine import KVEngine


# -- cache <-> chunk tensor ----------------------------------------------------------------------------------
def refuse_unsupported(config: Any) -> None:
    """Raise ValueError for model configurations whose cache lmkv cannot reuse exactly."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"model has non-full-attention layers {sorted(set(layer_types))}: lmkv reuse supports full attention only"
        )
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        raise ValueError(
            f"model uses sliding-window attention (sliding_window={text.sliding_window}); lmkv refuses it because "
            "a reused window cache is not equivalent to a fresh prefill"
        )


def build_cache(kv: torch.Tensor, config: Any = None) -> Any:
    """A transformers ``DynamicCache`` holding ``kv``.

    Args:
        kv: ``[L, 2, T, H, D]`` chunk tensor (T may be 0).
        config: the model config (lets transformers lay out hybrid caches; optional for full attention).
    Returns:
        ``DynamicCache`` whose layer i has keys ``kv[i, 0]`` and values ``kv[i, 1]`` as ``[1, H, T, D]``.
    """
    from transformers import DynamicCache

    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"kv must be [L, 2, T, H, D], got shape {tuple(kv.shape)}")
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for layer in range(kv.shape[0]):
        # [T, H, D] -> [1, H, T, D] as a view: DynamicLayer.update copies (torch.cat) into a contiguous tensor of
        # its own, so making it contiguous here would only add a second full copy of the KV.
        cache.update(kv[layer, 0].transpose(0, 1).unsqueeze(0), kv[layer, 1].transpose(0, 1).unsqueeze(0), layer)
    return cache


def cache_to_kv(cache: Any, start: int = 0, end: int | None = None, row: int = 0) -> torch.Tensor:
    """``[L, 2, T, H, D]`` view-copy of tokens ``start:end`` of batch row ``row`` of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}: expected a transformers Cache with .layers")
    out = []
    for layer in layers:
        k = layer.keys[row, :, start:end]  # [H, T, D]
        v = layer.values[row, :, start:end]
        out.append(torch.stack((k, v)).transpose(1, 2))  # [2, T, H, D]
    return torch.stack(out).contiguous()


# -- generate --------------------------------------------------------------------------------------------------
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
    sequences: torch.Tensor  # [1, T + new]
    stats: GenerateStats

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
        model: a transformers causal LM with full attention (sliding-window models are refused).
        input_ids: ``[1, T]`` (or ``[T]``) prompt ids.
        engine: the :class:`lmkv.engine.KVEngine` that stores and serves KV for this model.
        reuse: look up and reuse stored KV (False: a plain cold generate, timed the same way).
        store: store the prompt's KV (new chunks only) after generating.
        store_generated: also store the answer's KV, so a next chat turn that repeats it hits.
        blend: reuse non-prefix chunks with CacheBlend (see :mod:`lmkv.adapters.hf_blend`); the prompt's chunks
            are separated by ``blend_separator`` (token ids) or ``config.blend.separator`` tokenized with
            ``tokenizer``. Blended KV is approximate, so it is not stored under prefix keys.
        **generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample`` ...).
    Returns:
        :class:`GenerateOutput` with ``sequences [1, T + new]`` and :class:`GenerateStats`.
    """
    refuse_unsupported(model.config)
    input_ids = _as_single_row(input_ids, attention_mask)
    engine.check_model(model)
    tokens = input_ids[0].tolist()
    prompt_len = len(tokens)
    stats = GenerateStats(prompt_tokens=prompt_len)
    device = input_ids.device
    t0 = time.perf_counter()

    cache = None
    hit = 0
    if reuse and blend:
        from lmkv.adapters.hf_blend import blended_cache

        cache, hit, blend_stats = blended_cache(model, input_ids, engine=engine, tokenizer=tokenizer,
                                                separator=blend_separator)
        stats.blend = blend_stats
    elif reuse:
        hit = min(engine.lookup(tokens), prompt_len - 1)  # keep >= 1 prompt token for the model to compute
        if hit > 0:
            t_r = time.perf_counter()
            kv, hit = engine.retrieve(tokens[:hit])
            stats.retrieve_s = time.perf_counter() - t_r
            if hit > 0:
                cache = build_cache(kv[:, :, :hit].to(device=device, dtype=model.dtype), model.config)
    stats.hit_tokens = hit
    stats.computed_prompt_tokens = prompt_len - hit
    stats.tiers = engine.last_tiers() if hit else {}

    stamp: list[float] = []
    processors = list(generate_kwargs.pop("logits_processor", None) or [])
    from transformers import LogitsProcessorList

    processors.append(_clock_processor(stamp))
    generate_kwargs.setdefault("do_sample", False)
    kwargs = dict(generate_kwargs)
    if cache is not None:
        kwargs["past_key_values"] = cache
    kwargs["return_dict_in_generate"] = True
    kwargs["use_cache"] = True
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        logits_processor=LogitsProcessorList(processors),
        **kwargs,
    )
    t_done = time.perf_counter()
    stats.ttft_s = (stamp[0] if stamp else t_done) - t0
    sequences = out.sequences
    stats.new_tokens = sequences.shape[1] - prompt_len

    if store and not blend:
        t_s = time.perf_counter()
        full = sequences[0].tolist()
        # The cache holds KV for every token fed to the model: the prompt and all but the last generated token.
        usable = len(full) - 1 if store_generated else prompt_len
        usable = min(usable, out.past_key_values.get_seq_length())
        stats.stored_tokens = engine.store(full[:usable], cache_to_kv(out.past_key_values, 0, usable))
        stats.store_s = time.perf_counter() - t_s
    stats.total_s = time.perf_counter() - t0
    return GenerateOutput(sequences=sequences, stats=stats)


__all__ = ["build_cache", "cache_to_kv", "generate", "GenerateOutput", "GenerateStats", "refuse_unsupported"]
