"""CacheBlend, the executable spec: key re-rotation, KV deviation, token selection and the selective-recompute prefill.

CacheBlend (Yao et al., EuroSys'25) reuses the KV cache of text chunks that were each prefilled *on their own*
(at their own positions, without the other chunks in front of them). Two things are wrong with such a cache
once the chunks are concatenated in a new prompt:

1. **Positions.** Keys are stored after RoPE at the chunk's old positions. Rotations compose, so a key computed
   at position ``p`` is moved to ``q`` by rotating it by ``q - p`` (see :mod:`lmkv.rope`):
   :func:`rerotate`. Values carry no position and are reused as they are.
2. **Cross-attention.** A chunk's tokens never attended to the chunks now in front of them. CacheBlend
   recomputes the few tokens whose KV deviates most from a fresh computation at an early *check* layer
   (:func:`token_deviation`, :func:`select_tokens`) and reuses the rest: :func:`prefill` is that algorithm,
   layer by layer, over any model that supplies :class:`lmkv.blend_steps.BlendSteps`.

Shapes: keys are ``[..., T, H, D]`` (any leading dims, e.g. ``[L, T, H, D]`` for every layer of a chunk, or the
``K`` plane ``kv[:, 0]`` of an lmkv chunk ``[L, 2, T, H, D]``); positions are ``[T]`` integers, one per token.
"""

from __future__ import annotations

import math

import torch

from lmkv.blend_steps import BlendStats, BlendSteps, Segment
from lmkv.rope import RopeSpec, apply_rotation


def rerotate(
    keys: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor, rope: RopeSpec
) -> torch.Tensor:
    """Move RoPE-rotated keys from ``old_positions`` to ``new_positions``.

    Args:
        keys: ``[..., T, H, D]`` keys rotated at ``old_positions`` (fp32, fp16 or bf16); ``D == rope.head_dim``.
        old_positions: ``[T]`` integer positions the keys were computed at.
        new_positions: ``[T]`` integer positions they move to.
        rope: the model's :class:`RopeSpec`.

    Returns:
        A new tensor like ``keys``: every token ``t`` rotated by ``(new[t] - old[t]) * inv_freq`` on the first
        ``rope.rotary_dim`` dims (half-split), other dims copied. The math runs in fp32 (float64 for float64
        keys): the angle is the fp32 product of the integer delta (exact below 2**24) and the fp32 frequency, as
        HF computes its own angles; the result is rounded once to the keys' dtype.

    Invariants: ``rerotate(rerotate(k, p, q), q, p) == k`` up to rounding; a zero delta returns ``k`` exactly.
    """
    delta = (new_positions.to(torch.int64) - old_positions.to(torch.int64)).to(keys.device).float()  # [T]
    angle = delta[:, None] * rope.inv_freq(keys.device)[None, :]  # [T, R/2]
    return apply_rotation(keys, angle, rope.rotary_dim).to(keys.dtype)


def token_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Per-token L2 distance ``||fresh[t] - cached[t]||`` over heads and dims, in fp32.

    Args:
        fresh: ``[T, H, D]`` K or V of the tokens computed with the full prompt in front of them.
        cached: ``[T, H, D]`` the same tensor from the reused (re-rotated) cache.

    Returns:
        ``[T]`` float32 deviations. Large deviation = the token's KV depends on the context it now has.
    """
    return (fresh.float() - cached.float()).pow(2).sum(dim=(-2, -1)).sqrt()


def select_tokens(deviation: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` candidates with the largest deviation, as sorted token indices.

    Args:
        deviation: ``[T]`` float deviations (only the entries at ``candidates`` are read).
        candidates: ``[C]`` int64 token indices that may be selected.
        count: how many to keep, ``0 <= count <= C``. Ties go to the lower index (stable order).

    Returns:
        ``[count]`` int64 sorted token indices, a subset of ``candidates``.
    """
    if count <= 0 or candidates.numel() == 0:
        return candidates[:0]
    dev = deviation[candidates].float()
    # Stable descending sort instead of topk: ties are decided by index, identically on every backend.
    order = torch.sort(dev, descending=True, stable=True).indices[:count]
    return torch.sort(candidates[order]).values


def selection_counts(num_cached: int, ratio: float, num_checks: int) -> list[int]:
    """How many cached tokens stay selected after each of ``num_checks`` check layers (gradual filtering).

    The kept fraction after check ``i`` (1-based) is ``ratio ** (i / num_checks)``: one check keeps ``ratio``;
    two checks keep ``sqrt(ratio)`` then ``ratio``. Counts round half up, never grow, and end at
    ``round(ratio * num_cached)``.
    """
    counts: list[int] = []
    prev = num_cached
    for i in range(1, num_checks + 1):
        frac = ratio ** (i / num_checks) if ratio > 0 else 0.0
        n = min(prev, int(math.floor(frac * num_cached + 0.5)))
        counts.append(n)
        prev = n
    return counts


# -- the selective-recompute prefill ------------------------------------------------------------------------------
def place_segments(steps: BlendSteps, segments: list[Segment], num_tokens: int,
                   rope: RopeSpec | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's KV as far as the cache knows it, before any layer runs.

    Returns:
        ``(kv [L, 2, N, H, D], cached [N] bool)`` in the steps' dtype and device: every segment's values as they
        are and its keys moved from ``old_start + i`` to ``start + i`` (:func:`rerotate`); zeros where no segment
        is (those tokens are computed at every layer, so the zeros are never read).
    """
    shape = (steps.num_layers, 2, num_tokens, steps.num_kv_heads, steps.head_dim)
    kv = torch.zeros(shape, dtype=steps.dtype, device=steps.device)
    cached = torch.zeros(num_tokens, dtype=torch.bool, device=steps.device)
    for seg in segments:
        src = seg.kv.to(device=steps.device, dtype=steps.dtype)
        keys = src[:, 0]
        if seg.old_start != seg.start:
            length = seg.end - seg.start
            old = torch.arange(seg.old_start, seg.old_start + length)
            new = torch.arange(seg.start, seg.end)
            keys = rerotate(keys, old, new, rope)
        kv[:, 0, seg.start:seg.end] = keys
        kv[:, 1, seg.start:seg.end] = src[:, 1]
        cached[seg.start:seg.end] = True
    return kv, cached


def schedule(cached: torch.Tensor, always: torch.Tensor, ratio: float, check_layers: list[int],
             num_layers: int) -> tuple[int, dict[int, int]]:
    """Which layers run for every token, and how many cached tokens each check layer keeps.

    Args:
        cached: ``[N]`` bool, tokens a segment covers.
        always: ``[N]`` bool, tokens computed at every layer whatever the selection (no cache, or the last one).

    Returns:
        ``(full_layers, counts)``. ``ratio == 0`` (or nothing to select): no layer runs for cached tokens and
        there is no check. ``ratio == 1``: every layer runs for every token. Otherwise the layers before the first
        check layer run for every token and ``counts[layer]`` is how many candidates survive that check
        (:func:`selection_counts`).
    """
    num_candidates = int((cached & ~always).sum())
    if ratio == 0.0 or num_candidates == 0:
        return 0, {}
    if ratio == 1.0:
        return num_layers, {}
    counts = selection_counts(num_candidates, float(ratio), len(check_layers))
    return check_layers[0], dict(zip(check_layers, counts))


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Causal attention of some queries over every token, as an explicit masked softmax in fp32.

    Args:
        q: ``[n, Hq, D]`` queries of the tokens at ``positions [n]``.
        keys, values: ``[N, H, D]`` of every token of the prompt; query head j reads KV head ``j // (Hq / H)``.
        scale: the softmax scale.

    Returns:
        ``[n, Hq, D]`` in q's dtype: each query attends to the tokens at or before its own position.
    """
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32, or float64 for a float64 yardstick run
    groups = q.shape[1] // keys.shape[1]
    k = keys.to(compute).repeat_interleave(groups, dim=1)  # [N, Hq, D]
    v = values.to(compute).repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(compute), k) * scale  # [Hq, n, N]
    visible = torch.arange(keys.shape[0], device=q.device)[None, :] <= positions[:, None]  # [n, N]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v).to(q.dtype)


def select_at_check(fresh: torch.Tensor, cached_plane: torch.Tensor, active: torch.Tensor, always: torch.Tensor,
                    count: int, scores: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One check layer: keep the ``count`` active cached tokens whose fresh K or V deviates most from the cache.

    Args:
        fresh: ``[n, H, D]`` the fresh K or V of the ``active [n]`` tokens at this layer.
        cached_plane: ``[N, H, D]`` the same plane of the placed cache, before fresh K/V overwrote it.
        always: ``[N]`` bool, tokens that stay active regardless (they are not candidates).
        scores: optional ``[N]``: used instead of the measured deviation.

    Returns:
        ``(survivors, deviation, kept)``: ``[n]`` bool over ``active`` (who stays), ``[N]`` float32 deviation
        (NaN outside the candidates), and the kept candidates' sorted token indices.
    """
    is_candidate = ~always[active]
    candidates = active[is_candidate]
    if scores is None:
        measured = token_deviation(fresh[is_candidate], cached_plane[candidates])
    else:
        measured = scores[candidates].float()
    deviation = torch.full((always.shape[0],), float("nan"), device=active.device)
    deviation[candidates] = measured
    kept = select_tokens(deviation, candidates, count)
    survivors = torch.isin(active, kept) | ~is_candidate
    return survivors, deviation, kept


@torch.no_grad()
def prefill(steps: BlendSteps, input_ids: torch.Tensor, segments: list[Segment], *, rope: RopeSpec | None,
            ratio: float, check_layers: list[int], deviation: str = "value",
            scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, BlendStats]:
    """CacheBlend's selective-recompute prefill of a prompt whose spans were prefilled earlier, each on its own.

    1. :func:`place_segments`: cached keys move to their new positions, values are reused;
    2. :func:`schedule`: layers before the first check layer run for every token;
    3. at each check layer (:func:`select_at_check`) only the most deviating cached tokens stay active, plus
       every token without a cache and the last token (its logits are the output);
    4. every layer computes Q/K/V for the active tokens, whose fresh K/V overwrite the placed cache, and their
       queries attend (:func:`attention`) to the blended K/V of every token at or before their position.

    Args:
        steps: the model's :class:`BlendSteps`.
        input_ids: ``[N]`` int64 token ids on ``steps.device``.
        segments: validated cached spans (in the prompt, non-overlapping, ``kv [L, 2, end-start, H, D]``).
        rope: the model's RoPE (used when a segment moves, ``old_start != start``).
        ratio: fraction of the cached tokens recomputed after the check layers, in [0, 1].
        check_layers: strictly increasing layer indices.
        deviation: ``"key"`` or ``"value"``, the plane whose deviation selects.
        scores: optional ``[N]`` per-token scores replacing the measured deviation (higher = recompute first).

    Returns:
        ``(kv [L, 2, N, H, D], logits [V], stats)``: the blended KV of every token, the last position's logits.
    """
    num_tokens = input_ids.shape[0]
    kv, cached = place_segments(steps, segments, num_tokens, rope)
    always = ~cached
    always[-1] = True
    full_layers, counts = schedule(cached, always, ratio, check_layers, steps.num_layers)
    stats = BlendStats(num_tokens=num_tokens, num_cached=int(cached.sum()), num_fresh=int(always.sum()),
                       full_layers=full_layers)
    plane = 0 if deviation == "key" else 1
    # Deviation compares with the cache as placed: keep the check layers' plane before fresh K/V overwrite it.
    cached_planes = {layer: kv[layer, plane].clone() for layer in counts}
    everyone = full_layers > 0 or bool(counts)
    active = torch.arange(num_tokens, device=steps.device) if everyone else torch.nonzero(always).flatten()
    hidden = steps.embed(input_ids[active])
    for layer in range(steps.num_layers):
        q, k, v = steps.qkv(layer, hidden, active)  # a token's position is its index in the prompt
        kv[layer, 0, active] = k
        kv[layer, 1, active] = v
        if layer in counts:
            fresh = k if plane == 0 else v
            survivors, measured, kept = select_at_check(fresh, cached_planes[layer], active, always,
                                                        counts[layer], scores)
            stats.deviation[layer], stats.selected[layer] = measured.cpu(), kept.cpu()
            q, hidden, active = q[survivors], hidden[survivors], active[survivors]
        out = attention(q, kv[layer, 0], kv[layer, 1], active, steps.scaling)
        hidden = steps.finish(layer, hidden, out)
        stats.active_per_layer.append(int(active.numel()))
    logits = steps.logits(hidden[-1:])
    stats.recompute_fraction = sum(stats.active_per_layer) / float(num_tokens * steps.num_layers)
    return kv, logits, stats
