"""CacheBlend selective-recompute prefill for HF LLaMA-family models (LLaMA, Qwen2, Mistral; SmolLM2 is LLaMA).

Given a prompt whose spans were prefilled earlier *each on its own* (``segments``), :func:`blend_prefill` builds
the prompt's KV cache without a full prefill:

1. every cached span's keys are re-rotated from their old to their new positions (:func:`lmkv.ops.blend.rerotate`);
2. layers before the first check layer run in full over the whole prompt (that is where the deviation comes from);
3. at each check layer the fresh K or V of the still-active tokens is compared with the cached one, and only the
   ``ratio`` most deviating cached tokens (plus every token that has no cache: the query suffix, gaps between
   chunks, and always the last token, whose logits are needed) stay active; with several check layers the active
   set shrinks gradually (:func:`lmkv.ops.blend.selection_counts`);
4. later layers compute Q/K/V/attention/MLP for the active tokens only; their fresh K/V overwrite the cached
   ones, attention reads the blended K/V of every token (causal by position).

``ratio=1.0`` recomputes everything (a full prefill); ``ratio=0.0`` is plain reuse: no layer runs for cached
tokens, not even before the check layer (there is nothing to select). The forward is written against the
model's own modules (``embed_tokens``, ``layers[i].input_layernorm`` / ``self_attn.{q,k,v,o}_proj`` /
``post_attention_layernorm`` / ``mlp``, ``norm``, ``rotary_emb``, ``lm_head``); nothing is monkeypatched.

Continue generation from the result with ``model.generate(input_ids, past_key_values=cache_for_generate(...))``
(the last token is recomputed by generate, exactly as blend recomputes it) or step the model yourself with
``cache`` and ``logits``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmkv.adapters.hf import build_cache, cache_to_kv
from lmkv.config import BlendConfig
from lmkv.errors import ConfigError
from lmkv.ops import blend as blend_ops
from lmkv.reference.rope import RopeSpec

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_DEFAULTS = BlendConfig()


@dataclass(frozen=True)
class Segment:
    """A cached span of the prompt: tokens ``[start, end)`` whose KV ``kv [L, 2, end-start, H, D]`` was computed
    at positions ``old_start, old_start + 1, ...`` (0 for a chunk prefilled on its own)."""

    start: int
    end: int
    kv: torch.Tensor
    old_start: int = 0


@dataclass
class BlendStats:
    """What a blended prefill did.

    Attributes:
        num_tokens: prompt length N.
        num_cached: tokens covered by segments.
        num_fresh: tokens without a cache (always recomputed; includes the last token when it is cached).
        full_layers: layers that ran for every token.
        active_per_layer: how many tokens each layer computed.
        selected: ``{check_layer: sorted token indices kept active after it}``.
        deviation: ``{check_layer: [N] float32}``; NaN for tokens that were not candidates there.
        recompute_fraction: recomputed token-layers / (N * L), the compute actually spent vs a full prefill.
    """

    num_tokens: int
    num_cached: int
    num_fresh: int
    full_layers: int
    active_per_layer: list[int] = field(default_factory=list)
    selected: dict[int, torch.Tensor] = field(default_factory=dict)
    deviation: dict[int, torch.Tensor] = field(default_factory=dict)
    recompute_fraction: float = 0.0


# -- model plumbing ----------------------------------------------------------------------------------------------
def _decoder(model: Any) -> Any:
    """The decoder (``model.model`` of a ``*ForCausalLM``), refusing architectures the forward does not know."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model: blend_prefill supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if inner is None or not hasattr(inner, attr):
            raise ConfigError(f"model: expected a *ForCausalLM with .model.{attr} (LLaMA family)")
    window = getattr(config, "sliding_window", None)
    if window is not None and (getattr(config, "use_sliding_window", True) is not False):
        raise ConfigError(f"model: sliding-window attention (sliding_window={window}) is not supported by blending")
    return inner


def rope_spec(model: Any) -> RopeSpec:
    """The model's :class:`RopeSpec`, checked against the frequencies its own rotary embedding uses."""
    spec = RopeSpec.from_hf_config(model.config)
    rotary = _decoder(model).rotary_emb
    inv = getattr(rotary, "inv_freq", None)
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ConfigError("model: RoPE with attention scaling on cos/sin cannot be re-rotated")
    if inv is None or inv.shape[0] != spec.rotary_dim // 2 or not torch.allclose(
        inv.float().cpu(), spec.inv_freq(), rtol=1e-6, atol=0
    ):
        raise ConfigError("model: its rotary embedding does not match the RoPE read from its config")
    return spec


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF half-split RoPE on ``x [1, H, n, D]`` with ``cos/sin [1, n, R]`` (R < D: partial, rest passes)."""
    cos, sin = cos[:, None], sin[:, None]
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def kv_to_cache(kv: torch.Tensor, upto: int | None = None) -> Any:
    """A transformers ``DynamicCache`` from ``kv [L, 2, T, H, D]`` (first ``upto`` tokens), HF ``[1, H, T, D]``."""
    return build_cache(kv if upto is None else kv[:, :, :upto])


@torch.no_grad()
def prefill_kv(model: Any, input_ids: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain full prefill: ``(kv [L, 2, T, H, D], last-position logits [V])`` (how a chunk is cached on its own)."""
    ids = _as_ids(input_ids, "input_ids")
    out = model(input_ids=ids[None], use_cache=True, logits_to_keep=1)
    return cache_to_kv(out.past_key_values), out.logits[0, -1]


def _as_ids(input_ids: Any, name: str) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a [T] or [1, T] tensor of token ids, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty")
    return ids.to(torch.long)


def _normalise_segments(segments: Sequence[Any], n: int, geometry: tuple[int, int, int]) -> list[Segment]:
    layers, heads, head_dim = geometry
    out: list[Segment] = []
    for i, seg in enumerate(segments):
        if not isinstance(seg, Segment):
            if not isinstance(seg, (tuple, list)) or len(seg) != 4:
                raise TypeError(f"segments[{i}] must be a Segment or (start, end, kv, old_start), got {seg!r:.80}")
            seg = Segment(int(seg[0]), int(seg[1]), seg[2], int(seg[3]))
        if not 0 <= seg.start < seg.end <= n:
            raise ValueError(f"segments[{i}]: span [{seg.start}, {seg.end}) is empty or outside the prompt (N={n})")
        if seg.old_start < 0:
            raise ValueError(f"segments[{i}]: old_start must be >= 0, got {seg.old_start}")
        want = (layers, 2, seg.end - seg.start, heads, head_dim)
        if not isinstance(seg.kv, torch.Tensor) or tuple(seg.kv.shape) != want:
            got = tuple(seg.kv.shape) if isinstance(seg.kv, torch.Tensor) else type(seg.kv).__name__
            raise ValueError(f"segments[{i}].kv must have shape [L, 2, T, H, D] = {want}, got {got}")
        out.append(seg)
    spans = sorted((s.start, s.end) for s in out)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError(f"segments overlap: [{a0}, {a1}) and one starting at {b0}")
    return out


def _check_layers(check_layers: Sequence[int] | int, num_layers: int) -> list[int]:
    layers = [check_layers] if isinstance(check_layers, int) else list(check_layers)
    if not layers:
        raise ValueError("check_layers must name at least one layer")
    if sorted(set(layers)) != layers:
        raise ValueError(f"check_layers must be strictly increasing, got {layers}")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"check_layers must lie in [0, {num_layers}), got {layers}")
    return layers


# -- the blended prefill ------------------------------------------------------------------------------------------
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
    scores: torch.Tensor | None = None,
) -> tuple[Any, torch.Tensor, BlendStats]:
    """Prefill ``input_ids`` reusing the cached KV of ``segments``, recomputing only a ``ratio`` of their tokens.

    Args:
        model: an HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` (batch 1, eval mode).
        input_ids: ``[N]`` or ``[1, N]`` token ids of the whole prompt.
        segments: cached spans, ``Segment`` or ``(start, end, kv [L, 2, end-start, H, D], old_start)``: the KV of
            ``input_ids[start:end]`` computed at positions ``old_start ...`` (0 for a chunk prefilled on its own),
            in any order, non-overlapping. Tokens outside every segment are computed fresh at every layer.
        ratio: fraction of the cached tokens recomputed after the check layer(s), in [0, 1].
        check_layers: increasing layer indices; several = gradual filtering (kept fraction ratio**(i/m)).
        deviation: ``"key"`` or ``"value"``: which tensor's deviation selects tokens.
        backend: backend for the re-rotation op (None = dispatch default).
        scores: optional ``[N]`` per-token scores that replace the measured deviation at the check layers (higher
            = recompute first), for studies of other selection rules such as an oracle; the check layers still
            decide where the selection happens.

    Returns:
        ``(cache, logits, stats)``: a ``DynamicCache`` holding all N tokens (``[1, H, N, D]`` per layer), the
        logits ``[V]`` of the last position, and :class:`BlendStats`.
    """
    inner = _decoder(model)
    config = model.config
    ids = _as_ids(input_ids, "input_ids")
    n = ids.shape[0]
    if not (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0) or isinstance(ratio, bool):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    if deviation not in ("key", "value"):
        raise ValueError(f"deviation must be 'key' or 'value', got {deviation!r}")
    layers = inner.layers
    num_layers = len(layers)
    checks = _check_layers(check_layers, num_layers)
    attn0 = layers[0].self_attn
    head_dim = attn0.head_dim
    heads = config.num_key_value_heads
    segs = _normalise_segments(segments, n, (num_layers, heads, head_dim))
    if scores is not None and (not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n,)
                               or not bool(torch.isfinite(scores.float()).all())):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a finite [N] = [{n}] tensor, got {got}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    ids = ids.to(device)
    spec = rope_spec(model) if segs else None

    # Blended KV of every layer, starting from the re-rotated cache; fresh K/V overwrite it layer by layer.
    kv = torch.zeros((num_layers, 2, n, heads, head_dim), dtype=dtype, device=device)
    has_cache = torch.zeros(n, dtype=torch.bool, device=device)
    for seg in segs:
        t = seg.end - seg.start
        old = torch.arange(seg.old_start, seg.old_start + t, device=device)
        new = torch.arange(seg.start, seg.end, device=device)
        src = seg.kv.to(device=device, dtype=dtype)
        keys = src[:, 0] if seg.old_start == seg.start else blend_ops.rerotate(src[:, 0], old, new, spec,
                                                                                backend=backend)
        kv[:, 0, seg.start:seg.end] = keys
        kv[:, 1, seg.start:seg.end] = src[:, 1]
        has_cache[seg.start:seg.end] = True

    always = ~has_cache
    always[-1] = True  # its logits are the output: the last token is always computed
    num_cached = int(has_cache.sum())
    num_fresh = int(always.sum())
    cached_idx = torch.nonzero(has_cache & ~always).flatten()
    num_candidates = int(cached_idx.numel())
    if ratio == 0.0 or num_candidates == 0:
        full_layers, counts = 0, {}
        active = torch.nonzero(always).flatten()
    elif ratio == 1.0:
        full_layers, counts = num_layers, {}
        active = torch.arange(n, device=device)
    else:
        full_layers = checks[0]
        counts = dict(zip(checks, blend_ops.selection_counts(num_candidates, float(ratio), len(checks))))
        active = torch.arange(n, device=device)

    plane = 0 if deviation == "key" else 1
    # Deviations compare against the cache as it was: keep the check layers' plane before fresh K/V overwrite it.
    cached_plane = {li: kv[li, plane].clone() for li in counts}
    stats = BlendStats(num_tokens=n, num_cached=num_cached, num_fresh=num_fresh, full_layers=full_layers)
    positions = torch.arange(n, device=device)
    hidden = inner.embed_tokens(ids[active])[None]  # [1, n_active, hidden]

    for li, layer in enumerate(layers):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        n_act = x.shape[1]
        q = attn.q_proj(x).view(1, n_act, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, n_act, -1, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, n_act, -1, head_dim).transpose(1, 2)
        cos, sin = inner.rotary_emb(x, positions[active][None])
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        fresh_k, fresh_v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [n_act, H, D]
        kv[li, 0, active] = fresh_k
        kv[li, 1, active] = fresh_v

        if li in counts:
            # Candidates: active tokens that have a cache (the always-computed ones stay regardless).
            cand_mask = ~always[active]
            cand_local = torch.nonzero(cand_mask).flatten()
            fresh = (fresh_k, fresh_v)[plane][cand_local]
            if scores is None:
                dev = blend_ops.token_deviation(fresh, cached_plane[li][active[cand_local]])
            else:
                dev = scores.to(device=device, dtype=torch.float32)[active[cand_local]]
            full_dev = torch.full((n,), float("nan"), device=device)
            full_dev[active[cand_local]] = dev
            keep = blend_ops.select_tokens(full_dev, active[cand_local], counts[li])
            new_active = torch.sort(torch.cat((keep, torch.nonzero(always).flatten()))).values
            stats.deviation[li] = full_dev.cpu()
            stats.selected[li] = keep.cpu()
            local = torch.searchsorted(active, new_active)  # positions of the survivors in the current set
            q, hidden = q[:, :, local], hidden[:, local]
            active = new_active
        stats.active_per_layer.append(int(active.numel()) if li in counts else n_act)

        # Queries of the active tokens attend to the blended K/V of every token at or before their position.
        keys = kv[li, 0].transpose(0, 1)[None]  # [1, H, N, D]
        values = kv[li, 1].transpose(0, 1)[None]
        groups = q.shape[1] // keys.shape[1]
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        mask = positions[None, :] <= positions[active][:, None]  # [n_act, N]
        out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask[None, None],
                                                               scale=attn.scaling)
        out = out.transpose(1, 2).reshape(1, q.shape[2], -1)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    logits = model.lm_head(inner.norm(hidden[:, -1:]))[0, -1]
    stats.recompute_fraction = sum(stats.active_per_layer) / float(n * num_layers)
    return kv_to_cache(kv), logits, stats


def cache_for_generate(cache: Any) -> Any:
    """A copy of a blended cache without its last token, for ``model.generate(input_ids, past_key_values=...)``:
    generate then recomputes the last prompt token over the blended cache, exactly as blend_prefill did."""
    kv = cache_to_kv(cache)
    return kv_to_cache(kv, upto=kv.shape[2] - 1)


@torch.no_grad()
def kv_deviation_by_layer(
    model: Any, input_ids: torch.Tensor | Sequence[int], segments: Sequence[Any]
) -> dict[str, torch.Tensor]:
    """Per-layer, per-token deviation between a full prefill's K/V and the re-rotated cached K/V.

    Returns ``{"key": [L, N], "value": [L, N]}`` float32 (NaN for tokens no segment covers): what the check layer
    sees, for every layer at once (used to study which layers separate the tokens best).
    """
    ids = _as_ids(input_ids, "input_ids")
    full, _ = prefill_kv(model, ids)
    num_layers, _, n, heads, head_dim = full.shape
    segs = _normalise_segments(segments, n, (num_layers, heads, head_dim))
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


__all__ = [
    "Segment", "BlendStats", "blend_prefill", "prefill_kv", "kv_to_cache", "cache_to_kv", "cache_for_generate",
    "kv_deviation_by_layer", "segments_from_chunks", "rope_spec", "SUPPORTED_MODEL_TYPES",
]
