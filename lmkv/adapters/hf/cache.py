"""lmkv chunk tensors <-> transformers caches.

Shapes: lmkv chunks are ``[L, 2, T, H, D]``; transformers keeps per layer ``keys``/``values`` of ``[B, H, T, D]``
(B = 1 here).
"""

from __future__ import annotations

from typing import Any

import torch


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


__all__ = ["build_cache", "cache_to_kv"]
