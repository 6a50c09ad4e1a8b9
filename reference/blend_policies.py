"""CacheBlend token-selection policies, the executable spec: per-token scores computed *before* the prefill.

A blended prefill recomputes a ``ratio`` of the cached tokens. CacheBlend's own rule (``deviation``) measures
which ones at the check layers, during the prefill (:func:`lmkv.reference.blend.select_at_check`). The rules
here score every token beforehand instead: ``[N]`` float32, higher = recompute first. The prefill (both
backends) then keeps the top-``ratio`` candidates by score, ties to the lower index, at its check layers.
Tokens that are not candidates (no cache, or the last token) may hold any finite score: they are never read.

- :func:`chunk_head_scores`: EPIC's LegoLink (Hu et al., 2024, *Position-Independent Context Caching*): the
  first tokens of every chunk, the chunk-local attention sinks that a chunk prefilled on its own grew.
- :func:`random_scores`: a seeded baseline.
- :func:`attention_scores`: attention mass the always-computed tokens (the query suffix) put on each cached
  token at one layer: SnapKV's observation window (Li et al., 2024: the prompt's last tokens' attention picks
  the KV that matters) and H2O's heavy hitters (Zhang et al., 2023), used here to pick tokens to recompute.
- :func:`oracle_scores`: the true KV deviation from a full prefill, averaged over every layer: an upper bound
  for deviation-based selection that costs a full prefill.

Shapes: ``steps`` is any :class:`lmkv.blend_steps.BlendSteps`; ``input_ids [N]``; a segment's KV is
``[L, 2, T, H, D]``.
"""

from __future__ import annotations

import torch

from lmkv.blend_steps import BlendSteps, Segment
from lmkv.reference.blend import attention, place_segments, prefill, token_deviation
from lmkv.rope import RopeSpec


def is_exact_prefix(seg: Segment) -> bool:
    """A segment computed where it now stands from position 0: its KV is a prefix cache, exact, nothing to fix."""
    return seg.start == 0 and seg.old_start == 0


def chunk_head_scores(num_tokens: int, segments: list[Segment]) -> torch.Tensor:
    """EPIC / LegoLink: the earlier a token stands in its segment, the higher it scores.

    Score of a token at offset ``i`` of a reused segment is ``-i``; tokens outside every segment, and the
    tokens of an exact prefix segment (:func:`is_exact_prefix`: nothing to fix there), score ``-num_tokens``,
    below every other. With the prefill's tie rule (lower index first) a budget of ``count`` tokens takes offset
    0 of every segment in prompt order, then offset 1, ...: with ``count = k * S`` over ``S`` segments of at
    least ``k`` tokens, exactly the first ``k`` tokens of every segment (the remainder of an uneven budget goes
    to the earlier segments).

    Returns:
        ``[num_tokens]`` float32 (integers, exact).
    """
    scores = torch.full((num_tokens,), float(-num_tokens))
    for seg in segments:
        if not is_exact_prefix(seg):
            scores[seg.start:seg.end] = -torch.arange(seg.end - seg.start, dtype=torch.float32)
    return scores


def random_scores(num_tokens: int, seed: int) -> torch.Tensor:
    """``[num_tokens]`` float32 uniform in [0, 1) from ``torch.Generator().manual_seed(seed)`` on the CPU: the
    same seed gives the same scores on every machine, a new seed new ones."""
    return torch.rand(num_tokens, generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def full_kv(steps: BlendSteps, input_ids: torch.Tensor) -> torch.Tensor:
    """``[L, 2, N, H, D]``: the prompt's KV from a full prefill (the blended prefill with nothing cached)."""
    kv, _logits, _stats = prefill(steps, input_ids, [], rope=None, ratio=1.0, check_layers=[0])
    return kv


@torch.no_grad()
def oracle_scores(steps: BlendSteps, input_ids: torch.Tensor, segments: list[Segment],
                  rope: RopeSpec | None) -> torch.Tensor:
    """How far each cached token's K and V, as placed (keys re-rotated), are from a full prefill's.

    For every layer ``l >= 1`` and plane ``p`` (K, V): ``d[l, p, t] = ||full[l, p, t] - placed[l, p, t]||``
    (:func:`token_deviation`), divided by its mean over the cached tokens (so that every layer and plane weighs
    the same); the score is the mean of those normalised rows, leaving out rows whose mean is 0. Layer 0 carries
    no signal (see the comment below). Uncached tokens, and every token of a one-layer model, score 0.
    Cost: one full prefill on top of the blended one.

    Returns:
        ``[N]`` float32.
    """
    num_tokens = input_ids.shape[0]
    full = full_kv(steps, input_ids)
    placed, cached = place_segments(steps, segments, num_tokens, rope)
    scores = torch.zeros(num_tokens, device=steps.device)
    if not bool(cached.any()):
        return scores
    rows = []
    # Layer 0 is left out: its K/V depend on a token's id and position only, so their deviation is 0 up to
    # rounding, and normalised by its mean that rounding noise would weigh as much as a real layer.
    for layer in range(1, steps.num_layers):
        for plane in (0, 1):
            dev = token_deviation(full[layer, plane, cached], placed[layer, plane, cached])  # [C]
            mean = dev.mean()
            if mean > 0:
                rows.append(dev / mean)
    if rows:
        scores[cached] = torch.stack(rows).mean(dim=0)
    return scores


@torch.no_grad()
def attention_scores(steps: BlendSteps, input_ids: torch.Tensor, segments: list[Segment], rope: RopeSpec | None,
                     layer: int) -> torch.Tensor:
    """Attention mass the always-computed tokens put on each cached token at ``layer``.

    1. The cache is placed (keys re-rotated, :func:`place_segments`).
    2. The *queries* ``Q`` = every uncached token (the suffix, gaps) and the last token run layers
       ``0 .. layer-1`` over the placed cache (plain full reuse for the others, as a ratio-0 blend), then give
       their queries at ``layer``.
    3. ``w[h, q, t] = softmax_t(Q_h K_t * scale)`` over the tokens at or before the query (causal), with
       ``K`` the placed keys of ``layer`` (the queries' own fresh keys for uncached tokens), GQA head mapping as
       in the prefill.
    4. ``score[t] = mean over heads h and queries q of w[h, q, t]`` (each query's row sums to 1, so the scores
       sum to 1 over all tokens); uncached tokens then score 0.

    Cost: ``layer + 1`` layers for the uncached tokens only, one attention map ``[Hq, |Q|, N]``.

    Returns:
        ``[N]`` float32, >= 0, summing to the mass the queries put on cached tokens (<= 1).
    """
    num_tokens = input_ids.shape[0]
    kv, cached = place_segments(steps, segments, num_tokens, rope)
    always = ~cached
    always[-1] = True
    active = torch.nonzero(always).flatten()  # [n] the query tokens
    hidden = steps.embed(input_ids[active])
    for li in range(layer + 1):
        q, k, v = steps.qkv(li, hidden, active)
        kv[li, 0, active], kv[li, 1, active] = k, v
        if li == layer:
            break
        hidden = steps.finish(li, hidden, attention(q, kv[li, 0], kv[li, 1], active, steps.scaling))
    weights = _weights(q, kv[layer, 0], active, steps.scaling)  # [Hq, n, N]
    scores = weights.mean(dim=(0, 1))
    return torch.where(cached, scores, torch.zeros_like(scores))


def _weights(q: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax weights ``[Hq, n, N]`` in fp32 of queries ``q [n, Hq, D]`` at ``positions [n]`` over
    ``keys [N, H, D]`` (query head j reads KV head ``j // (Hq / H)``)."""
    groups = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(groups, dim=1)  # [N, Hq, D]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    visible = torch.arange(keys.shape[0], device=q.device)[None, :] <= positions[:, None]  # [n, N]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)

