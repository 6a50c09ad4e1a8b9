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


def cache_buffer(num_layers: int, num_heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
                 memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory laid out the way transformers keeps KV, and the lmkv chunk view of it.

    Args:
        memory: uint8 CPU tensor of at least the bytes needed (a reused buffer), or None (fresh).
    Returns:
        ``(buffer [L, 2, 1, H, T, D], chunk view [L, 2, T, H, D] of the same memory)``: what
        ``engine.retrieve(..., out=view)`` writes is what :func:`adopt_cache` hands to the model.
    """
    shape = (num_layers, 2, 1, num_heads, tokens, head_dim)
    if memory is None:
        buffer = torch.empty(shape, dtype=dtype)
    else:
        n = torch.Size(shape).numel() * dtype.itemsize
        buffer = memory[:n].view(dtype).view(shape)
    return buffer, buffer[:, :, 0].permute(0, 1, 3, 2, 4)


def adopt_cache(buffer: torch.Tensor, config: Any = None) -> Any:
    """A ``DynamicCache`` whose layer i holds ``buffer[i, 0]`` / ``buffer[i, 1]`` (``[B, H, T, D]``) as its keys and
    values, without a copy (``build_cache`` copies, as ``DynamicLayer.update`` concatenates). The buffer must stay
    untouched until the model's first forward step, whose update replaces the layers' tensors."""
    from transformers import DynamicCache

    if buffer.dim() != 6 or buffer.shape[1] != 2:
        raise ValueError(f"buffer must be [L, 2, B, H, T, D], got shape {tuple(buffer.shape)}")
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for layer in range(buffer.shape[0]):
        k, v = buffer[layer, 0], buffer[layer, 1]
        cache.update(k[:, :, :0], v[:, :, :0], layer)  # initializes the layer (device, dtype) with no tokens
        cache.layers[layer].keys, cache.layers[layer].values = k, v
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


__all__ = ["build_cache", "cache_buffer", "adopt_cache", "cache_to_kv"]
