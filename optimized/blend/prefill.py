"""Fast path of ``blend.prefill``: CacheBlend's selective-recompute prefill, the same algorithm as the reference
(:func:`lmkv.reference.blend.prefill`, the spec), written for speed and independently of it.

What differs, none of it in what is computed:
- placement moves the keys of every moved segment in ONE call of ``rerotate``, the dispatched ``blend.rerotate``
  op (C++ CPU / Triton kernels) that :mod:`lmkv.ops.blend` passes in (optimized/ imports neither the ops nor
  the reference);
- attention is torch's ``scaled_dot_product_attention`` in the model's dtype, grouped-query heads read in place
  (``enable_gqa``) rather than copied;
- fresh K/V land with ``index_copy_``; a check layer is one stable sort over a candidate mask.

Limits: batch 1 (the steps' contract); any device the model and the rerotate op run on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmkv.blend_steps import BlendStats, BlendSteps, Segment
from lmkv.rope import RopeSpec

Rerotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RopeSpec], torch.Tensor]


def _placed(steps: BlendSteps, segments: list[Segment], num_tokens: int, rope: RopeSpec | None,
            rerotate: Rerotate) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv [L, 2, N, H, D], cached [N] bool)``: the segments' KV at their new places, keys re-rotated."""
    kv = torch.zeros((steps.num_layers, 2, num_tokens, steps.num_kv_heads, steps.head_dim), dtype=steps.dtype,
                     device=steps.device)
    cached = torch.zeros(num_tokens, dtype=torch.bool, device=steps.device)
    for seg in segments:
        kv[:, :, seg.start:seg.end].copy_(seg.kv)  # one copy casts to the model's dtype and device
        cached[seg.start:seg.end] = True
    moved = [seg for seg in segments if seg.old_start != seg.start]
    if moved:
        # All moved tokens in one kernel call: a prompt of many small chunks is one launch, not one per chunk.
        new = torch.cat([torch.arange(seg.start, seg.end) for seg in moved])
        old = torch.cat([torch.arange(seg.old_start, seg.old_start + seg.end - seg.start) for seg in moved])
        where = new.to(steps.device)
        kv[:, 0, where] = rerotate(kv[:, 0, where], old, new, rope)
    return kv, cached


def _budget(num_candidates: int, ratio: float, check_layers: list[int],
            num_layers: int) -> tuple[int, dict[int, int]]:
    """``(layers run for every token, {check layer: candidates kept})``; kept fraction ``ratio ** (i / m)``."""
    if num_candidates == 0 or ratio <= 0.0:
        return 0, {}
    if ratio >= 1.0:
        return num_layers, {}
    m = len(check_layers)
    wanted = (math.floor(ratio ** (i / m) * num_candidates + 0.5) for i in range(1, m + 1))
    kept = list(itertools.accumulate(wanted, min, initial=num_candidates))[1:]  # never grows
    return check_layers[0], dict(zip(check_layers, kept))


def _filter(fresh: torch.Tensor, before: torch.Tensor, rows: torch.Tensor, fixed: torch.Tensor, count: int,
            scores: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A check layer over the active ``rows [n]``: ``(keep [n] bool, deviation [N] (NaN off candidates), kept)``.

    ``fresh [n, H, D]`` is this layer's fresh plane, ``before [N, H, D]`` the placed one; ties keep lower indices.
    """
    open_ = ~fixed[rows]
    candidates = rows[open_]
    if scores is None:
        diff = fresh[open_].float() - before.index_select(0, candidates).float()
        score = torch.linalg.vector_norm(diff.flatten(1), dim=1)
    else:
        score = scores.index_select(0, candidates).float()
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool, device=rows.device)
    chosen[torch.argsort(score, descending=True, stable=True)[:count]] = True
    keep = ~open_
    keep[open_] = chosen
    deviation = torch.full((fixed.numel(),), float("nan"), device=rows.device)
    deviation[candidates] = score
    return keep, deviation, candidates[chosen]


def _attend(q: torch.Tensor, layer_kv: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA of queries ``q [n, Hq, D]`` at positions ``rows`` over ``layer_kv [2, N, H, D]`` -> ``[n, Hq, D]``."""
    keys, values = layer_kv.transpose(1, 2).unsqueeze(1).unbind(0)  # [1, H, N, D] each, views
    visible = torch.arange(keys.shape[2], device=q.device)[None, :] <= rows[:, None]  # [n, N]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=visible, scale=scale,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out[0].transpose(0, 1)


@torch.no_grad()
def prefill(steps: BlendSteps, input_ids: torch.Tensor, segments: list[Segment], *, rope: RopeSpec | None,
            ratio: float, check_layers: list[int], deviation: str = "value", scores: torch.Tensor | None = None,
            rerotate: Rerotate) -> tuple[torch.Tensor, torch.Tensor, BlendStats]:
    """``(kv [L, 2, N, H, D], logits [V], stats)`` of the blended prompt; arguments as the reference's, plus
    ``rerotate(keys, old_positions, new_positions, rope)``, the re-rotation kernel to use."""
    num_tokens = int(input_ids.numel())
    kv, cached = _placed(steps, segments, num_tokens, rope, rerotate)
    fixed = ~cached
    fixed[-1] = True  # the last token's logits are the output: it is always computed
    full, budget = _budget(int((cached & ~fixed).sum()), ratio, check_layers, steps.num_layers)
    stats = BlendStats(num_tokens, int(cached.sum()), int(fixed.sum()), full)
    plane = 0 if deviation == "key" else 1
    snapshot = {layer: kv[layer, plane].clone() for layer in budget}  # before fresh K/V overwrite it
    rows = fixed.nonzero().flatten() if not (full or budget) else torch.arange(num_tokens, device=steps.device)
    hidden = steps.embed(input_ids.index_select(0, rows))
    for layer in range(steps.num_layers):
        q, *fresh = steps.qkv(layer, hidden, rows)
        for which in (0, 1):
            kv[layer, which].index_copy_(0, rows, fresh[which])
        if layer in budget:
            keep, measured, kept = _filter(fresh[plane], snapshot.pop(layer), rows, fixed, budget[layer], scores)
            stats.deviation[layer], stats.selected[layer] = measured.cpu(), kept.cpu()
            rows, hidden, q = rows[keep], hidden[keep], q[keep]
        hidden = steps.finish(layer, hidden, _attend(q, kv[layer], rows, steps.scaling))
        stats.active_per_layer.append(int(rows.numel()))
    stats.recompute_fraction = sum(stats.active_per_layer) / float(num_tokens * steps.num_layers)
    return kv, steps.logits(hidden[-1:]), stats
