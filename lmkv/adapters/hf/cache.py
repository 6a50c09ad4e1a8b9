"""lmkv chunk tensors <-> transformers caches.

Shapes: lmkv chunks are ``[L, 2, T, H, D]``; transformers keeps per layer ``keys``/``values`` of ``[B, H, T, D]``.

Caches are laid out as transformers lays them out for the model (``DynamicCache(config=...)``: a sliding-window
layer where the model has one). lmkv's sliding layers record their past: they keep every token, as full layers
do, while attention still sees only the window (transformers slices what the layer returns and masks by
position). So a reused prefix gives attention exactly what a fresh prefill would, and after generate the cache
still holds the whole prompt's KV, which is what lmkv stores.
"""

from __future__ import annotations

from typing import Any

import torch


def new_cache(config: Any = None) -> Any:
    """An empty ``DynamicCache`` with the model's layer types, its sliding-window layers recording their past."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            layer.activate_past_recording()  # present wherever support.py lets a sliding model through
    return cache


def build_cache(kv: torch.Tensor, config: Any = None) -> Any:
    """A transformers ``DynamicCache`` holding ``kv``.

    Args:
        kv: ``[L, 2, T, H, D]`` chunk tensor (T may be 0).
        config: the model config (lets transformers lay out hybrid caches; optional for full attention).
    Returns:
        ``DynamicCache`` whose layer i has keys ``kv[i, 0]`` and values ``kv[i, 1]`` as ``[1, H, T, D]``.
    """
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"kv must be [L, 2, T, H, D], got shape {tuple(kv.shape)}")
    cache = new_cache(config)
    for layer in range(kv.shape[0]):
        # [T, H, D] -> [1, H, T, D] as a view: DynamicLayer.update copies (torch.cat) into a contiguous tensor of
        # its own, so making it contiguous here would only add a second full copy of the KV.
        cache.update(kv[layer, 0].transpose(0, 1).unsqueeze(0), kv[layer, 1].transpose(0, 1).unsqueeze(0), layer)
    return cache


def cache_buffer(num_layers: int, num_heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
                 memory: torch.Tensor | None = None, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory laid out the way transformers keeps KV, and the lmkv chunk view of its first row.

    Args:
        memory: uint8 CPU tensor of at least the bytes needed (a reused buffer), or None (fresh).
        batch: rows B.
    Returns:
        ``(buffer [L, 2, B, H, T, D], chunk view [L, 2, T, H, D] of row 0)``: what
        ``engine.retrieve(..., out=view)`` writes is what :func:`adopt_cache` hands to the model
        (:func:`row_view` gives the other rows').
    """
    shape = (num_layers, 2, batch, num_heads, tokens, head_dim)
    if memory is None:
        buffer = torch.empty(shape, dtype=dtype)
    else:
        n = torch.Size(shape).numel() * dtype.itemsize
        buffer = memory[:n].view(dtype).view(shape)
    return buffer, row_view(buffer, 0)


def row_view(buffer: torch.Tensor, row: int, start: int = 0) -> torch.Tensor:
    """``[L, 2, T - start, H, D]`` chunk view of columns ``start:`` of row ``row`` of a ``[L, 2, B, H, T, D]``
    cache buffer."""
    return buffer[:, :, row, :, start:].permute(0, 1, 3, 2, 4)


def adopt_cache(buffer: torch.Tensor, config: Any = None) -> Any:
    """A ``DynamicCache`` whose layer i holds ``buffer[i, 0]`` / ``buffer[i, 1]`` (``[B, H, T, D]``) as its keys and
    values, without a copy (``build_cache`` copies, as ``DynamicLayer.update`` concatenates). The buffer must stay
    untouched until the model's first forward step, whose update replaces the layers' tensors."""
    if buffer.dim() != 6 or buffer.shape[1] != 2:
        raise ValueError(f"buffer must be [L, 2, B, H, T, D], got shape {tuple(buffer.shape)}")
    cache = new_cache(config)
    for layer in range(buffer.shape[0]):
        k, v = buffer[layer, 0], buffer[layer, 1]
        cache.update(k[:, :, :0], v[:, :, :0], layer)  # initializes the layer (device, dtype) with no tokens
        cache.layers[layer].keys, cache.layers[layer].values = k, v
        if hasattr(cache.layers[layer], "cumulative_length"):  # a sliding layer counts the tokens it has seen
            cache.layers[layer].cumulative_length = k.shape[-2]
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


__all__ = ["new_cache", "build_cache", "cache_buffer", "row_view", "adopt_cache", "cache_to_kv"]
