"""CacheBlend kernels, the executable spec: key re-rotation, KV deviation, top-ratio token selection.

CacheBlend (Yao et al., EuroSys'25) reuses the KV cache of text chunks that were each prefilled *on their own*
(at their own positions, without the other chunks in front of them). Two things are wrong with such a cache
once the chunks are concatenated in a new prompt:

1. **Positions.** Keys are stored after RoPE at the chunk's old positions. Rotations compose, so a key computed
   at position ``p`` is moved to ``q`` by rotating it by ``q - p`` (see :mod:`lmkv.reference.rope`):
   :func:`rerotate`. Values carry no position and are reused as they are.
2. **Cross-attention.** A chunk's tokens never attended to the chunks now in front of them. CacheBlend
   recomputes the few tokens whose KV deviates most from a fresh computation at an early *check* layer
   (:func:`token_deviation`, :func:`select_tokens`) and reuses the rest.

Shapes: keys are ``[..., T, H, D]`` (any leading dims, e.g. ``[L, T, H, D]`` for every layer of a chunk, or the
``K`` plane ``kv[:, 0]`` of an lmkv chunk ``[L, 2, T, H, D]``); positions are ``[T]`` integers, one per token.
"""

from __future__ import annotations

import math

import torch

from lmkv.reference.rope import RopeSpec, apply_rotation


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
        ``rope.rotary_dim`` dims (half-split), other dims copied. The math runs in fp32: the angle is the fp32
        product of the integer delta (exact below 2**24) and the fp32 frequency, as HF computes its own angles;
        the result is rounded once to the keys' dtype.

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
