"""CacheBlend's shared data: a prompt's cached spans, what a blended prefill did, and the per-layer steps of a model.

The selective-recompute prefill is model-agnostic. Its reference (:func:`lmkv.reference.blend.prefill`) and its
fast path (:mod:`lmkv.optimized.blend.prefill`), both behind :data:`lmkv.ops.blend.prefill`, drive a decoder only
through :class:`BlendSteps`, which a model adapter implements (:class:`lmkv.adapters.hf.blend.HFSteps` for
transformers). Both sides import these types from here, never from each other, and never from an adapter.

Shapes are token-major like lmkv chunks: hidden states ``[n, E]``, queries ``[n, Hq, D]``, keys and values
``[n, H, D]`` for ``n`` tokens; a cached span's KV is ``[L, 2, T, H, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


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
        active_per_layer: how many tokens each layer computed (a check layer counts its survivors).
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


class BlendSteps(Protocol):
    """The per-layer pieces of a decoder-only LM (batch 1) that a blended prefill runs for its active tokens.

    Attention itself is not a step: the prefill computes it over the blended KV of every token (that is
    CacheBlend's point), with ``scaling`` as the softmax scale and query head ``j`` reading KV head
    ``j // (num_heads // num_kv_heads)`` (grouped-query attention).

    Attributes:
        num_layers: L.
        num_heads: Hq, query heads.
        num_kv_heads: H, key/value heads.
        head_dim: D.
        scaling: softmax scale of the attention scores (usually ``D ** -0.5``).
        dtype, device: of the model's weights; every tensor the steps return has them.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    dtype: torch.dtype
    device: torch.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[n]`` int64 -> hidden states ``[n, E]`` entering layer 0."""
        ...

    def qkv(self, layer: int, hidden: torch.Tensor,
            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden ``[n, E]`` at ``positions [n]`` -> ``(q [n, Hq, D], k [n, H, D], v [n, H, D])``, q and k after
        RoPE at those positions (input norm and projections included)."""
        ...

    def finish(self, layer: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of ``layer``: attention output ``attn [n, Hq, D]`` -> output projection, residual, MLP block
        -> hidden ``[n, E]`` entering the next layer."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden ``[1, E]`` of the last token after the last layer -> logits ``[V]`` (final norm, LM head)."""
        ...
