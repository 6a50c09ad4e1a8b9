"""Paged gather/scatter, the executable specification.

An inference engine keeps its KV cache in fixed-size *blocks* (pages) of ``BS`` token slots. A token lives at
``slot = block_id * BS + offset`` and ``slot_mapping[t]`` says where token ``t`` of a chunk lives. lmkv moves
KV between that paged memory and the canonical **chunk** tensor, all layers in one call::

    chunk  [L, 2, T, H, D]      layers, K/V plane, tokens, KV heads, head dim
    chunk  [L, 1, T, D]         for MLA (one latent vector per token)

Engine layouts (``kv_caches`` is a list of L per-layer tensors, or one tensor for ``cross_layer``)::

    layout              per-layer tensor          element of (plane p, block b, offset o, head h, dim d)
    flash_attn          [2, NB, BS, H, D]         layer[p, b, o, h, d]        vLLM FlashAttention (classic)
    blocks_first        [NB, 2, BS, H, D]         layer[b, p, o, h, d]        FlashInfer, newer vLLM
    flash_attn_hnd      [2, NB, H, BS, D]         layer[p, b, h, o, d]
    blocks_first_hnd    [NB, 2, H, BS, D]         layer[b, p, h, o, d]
    mla                 [NB, BS, D]               layer[b, o, d]              (p = h = 0)
    cross_layer         [NB, L, 2, BS, H, D]      kv[b, l, p, o, h, d]        one tensor for every layer
    BlockMap(offsets)   [NB, ...] (blocks first)  layer[b].flatten()[offsets[p, o, h, d]]

A :class:`lmkv.layouts.BlockMap` is passed as ``layout`` for blocks whose inside no stride per axis describes
(vLLM's CPU kernels: keys head-dim-major beside token-row values, or AMX-packed pairs): a table of where each
(plane, offset, head, dim) lives inside its block. The chunk is ``[L, 2, T, H, D]`` as for the strided layouts.

Every layout is a permutation of the same five (six with the layer) axes, which
:data:`lmkv.layouts.LAYOUT_AXES` records and :func:`lmkv.layouts.canonical_layer_views` exploits: the optimized
kernels only need, per layer, a base address and the strides of the canonical ``[P, NB, BS, H, D]`` view. The
reference below indexes each layout explicitly instead (its shapes, block size included, are read per layout
here, not from that table), so that a mistake in the table shows up as a disagreement. Shared with the
kernels are only data types: the layout names, :class:`~lmkv.layouts.BlockMap`, the raw-byte view and the
allocation of a fresh chunk (:mod:`lmkv.layouts`).

Semantics (every backend must match these bit for bit):

* ``gather``: ``chunk[l, p, t] = cache_l[p, block(slot[t]), offset(slot[t])]`` for every ``t`` with
  ``slot[t] >= 0``; rows with a negative slot are left untouched in ``out``.
* ``scatter``: the inverse; a negative slot writes nothing. Scatter targets must be distinct (a duplicate slot
  has no defined winner in a parallel kernel; validation rejects it).
* Data is moved as raw bytes: float tensors are reinterpreted as same-width integers, so NaN payloads, negative
  zeros and fp8 bit patterns survive unchanged. Arbitrary strides (views) are read and written in place.
* ``out`` (gather) and ``chunk`` (scatter) may have more than T token rows; only the first T are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmkv.layouts import LAYOUTS, BlockMap, Layout, as_bytes_dtype, layer_tensors, new_chunk


def _layer_rows(cache: torch.Tensor, layout: str, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The rows of one layer's cache (raw-byte view) at (blocks, offsets) as ``[P, T', H, D]`` (MLA: ``[1, T', D]``).

    The result is a copy for reading; :func:`_write_layer_rows` is the in-place inverse.
    """
    if layout == "flash_attn":          # [2, NB, BS, H, D]
        return cache[:, blocks, offsets]                    # [2, T', H, D]
    if layout == "blocks_first":        # [NB, 2, BS, H, D]; cross_layer arrives here one layer at a time
        return cache[blocks, :, offsets].transpose(0, 1)    # [T', 2, H, D] -> [2, T', H, D]
    if layout == "flash_attn_hnd":      # [2, NB, H, BS, D]
        return cache[:, blocks, :, offsets].transpose(0, 1)  # indices split by a slice come first: [T', 2, H, D]
    if layout == "blocks_first_hnd":    # [NB, 2, H, BS, D]
        return cache[blocks, :, :, offsets].transpose(0, 1)
    if layout == "mla":                 # [NB, BS, D]
        return cache[blocks, offsets][None]                 # [1, T', D]
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _write_layer_rows(cache: torch.Tensor, layout: str, blocks: torch.Tensor, offsets: torch.Tensor,
                      rows: torch.Tensor) -> None:
    """``cache[... blocks, offsets ...] = rows`` in place; ``rows`` is ``[P, T', H, D]`` (MLA ``[1, T', D]``)."""
    if layout == "flash_attn":
        cache[:, blocks, offsets] = rows
    elif layout == "blocks_first":
        cache[blocks, :, offsets] = rows.transpose(0, 1)
    elif layout == "flash_attn_hnd":
        cache[:, blocks, :, offsets] = rows.transpose(0, 1)
    elif layout == "blocks_first_hnd":
        cache[blocks, :, :, offsets] = rows.transpose(0, 1)
    elif layout == "mla":
        cache[blocks, offsets] = rows[0]
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _block_size(cache: torch.Tensor, layout: str) -> int:
    """BS of one layer's cache, read from where ``layout`` puts it (see the table in the module docstring)."""
    if layout in ("flash_attn", "blocks_first"):        # [2, NB, BS, H, D], [NB, 2, BS, H, D]
        return cache.shape[2]
    if layout in ("flash_attn_hnd", "blocks_first_hnd"):  # [2, NB, H, BS, D], [NB, 2, H, BS, D]
        return cache.shape[3]
    if layout == "mla":                                   # [NB, BS, D]
        return cache.shape[1]
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _per_layer(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: str) -> tuple[list[torch.Tensor], str]:
    """Per-layer raw-byte tensors and the layout to index them with (cross_layer layer l is blocks_first)."""
    if layout == "cross_layer":
        kv = layer_tensors(kv_caches, layout)[0]             # [NB, L, 2, BS, H, D]
        return [as_bytes_dtype(kv[:, i]) for i in range(kv.shape[1])], "blocks_first"
    return [as_bytes_dtype(t) for t in layer_tensors(kv_caches, layout)], layout


def _places(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, blocks, offsets)``, each ``[T']``: the token positions that are not skipped and where they live."""
    rows = torch.nonzero(slot_mapping >= 0).flatten()
    slots = slot_mapping[rows]
    return rows, slots // block_size, slots % block_size


def _blocks(layer: torch.Tensor, block_map: BlockMap) -> torch.Tensor:
    """One layer's blocks as a raw-byte ``[NB, span]`` view: row b is block b's first ``span`` elements."""
    raw = as_bytes_dtype(layer)
    return raw.as_strided((raw.shape[0], block_map.span), (raw.stride(0), 1))


def _mapped_cells(slot_mapping: torch.Tensor, block_map: BlockMap) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """``(rows, blocks, cells)``: kept token positions ``[T']``, their blocks ``[1, T', 1, 1]`` and the element
    of each (plane, token, head, dim) inside its block, ``[2, T', H, D]``."""
    rows, blocks, offsets = _places(slot_mapping, block_map.block_size)
    cells = block_map.offsets.to(slot_mapping.device)[:, offsets]
    return rows, blocks.view(1, -1, 1, 1), cells


def _gather_mapped(layers: list[torch.Tensor], slot_mapping: torch.Tensor, block_map: BlockMap,
                   chunk: torch.Tensor) -> torch.Tensor:
    rows, blocks, cells = _mapped_cells(slot_mapping, block_map)
    target = as_bytes_dtype(chunk)
    for layer, cache in enumerate(layers):
        target[layer].index_copy_(1, rows, _blocks(cache, block_map)[blocks, cells])
    return chunk


def _scatter_mapped(chunk: torch.Tensor, layers: list[torch.Tensor], slot_mapping: torch.Tensor,
                    block_map: BlockMap) -> None:
    rows, blocks, cells = _mapped_cells(slot_mapping, block_map)
    source = as_bytes_dtype(chunk)
    for layer, cache in enumerate(layers):
        _blocks(cache, block_map)[blocks, cells] = source[layer].index_select(1, rows)


def gather(kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, *, layout: Layout,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy the KV of ``T = len(slot_mapping)`` tokens from paged engine memory into a chunk.

    Args:
        kv_caches: L per-layer tensors in ``layout`` (one ``[NB, L, 2, BS, H, D]`` tensor for cross_layer).
        slot_mapping: int64 ``[T]``; ``slot = block * BS + offset``; negative = skip the token.
        layout: one of :data:`~lmkv.layouts.LAYOUTS`, or a :class:`~lmkv.layouts.BlockMap`.
        out: optional chunk ``[L, 2, >=T, H, D]`` (MLA ``[L, 1, >=T, D]``) written in place: on the caches'
            device or, beside CUDA caches, in pinned host memory (the same holds for scatter's ``chunk``).

    Returns:
        ``out[:, :, :T]`` (a fresh chunk when ``out`` is None). For every ``t`` with ``slot[t] >= 0``::

            chunk[l, p, t, h, d] == cache_l[p, slot[t] // BS, slot[t] % BS, h, d]     (flash_attn)

        and rows with a negative slot keep what ``out`` held.
    """
    if out is None:
        out = new_chunk(kv_caches, slot_mapping, layout)
    chunk = out.narrow(2, 0, slot_mapping.shape[0])
    if chunk.device != slot_mapping.device:  # a pinned host chunk beside device caches: through a device copy
        chunk.copy_(gather(kv_caches, slot_mapping, layout=layout, out=chunk.to(slot_mapping.device)))
        return chunk
    if isinstance(layout, BlockMap):
        return _gather_mapped(layer_tensors(kv_caches, layout), slot_mapping, layout, chunk)
    layers, layer_layout = _per_layer(kv_caches, layout)
    rows, blocks, offsets = _places(slot_mapping, _block_size(layers[0], layer_layout))
    target = as_bytes_dtype(chunk)
    for layer, cache in enumerate(layers):
        target[layer].index_copy_(1, rows, _layer_rows(cache, layer_layout, blocks, offsets))
    return chunk


def scatter(chunk: torch.Tensor, kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, *,
            layout: Layout) -> None:
    """Write a chunk's KV into paged engine memory: the inverse of :func:`gather`.

    For every ``t`` with ``slot[t] >= 0``: ``cache_l[p, slot[t] // BS, slot[t] % BS] = chunk[l, p, t]``
    (in ``layout``'s axis order). Nothing else in ``kv_caches`` changes; scatter then gather is the identity
    on the non-skipped rows.
    """
    chunk = chunk.narrow(2, 0, slot_mapping.shape[0]).to(slot_mapping.device)  # a pinned host chunk: copied over
    if isinstance(layout, BlockMap):
        return _scatter_mapped(chunk, layer_tensors(kv_caches, layout), slot_mapping, layout)
    source = as_bytes_dtype(chunk)
    layers, layer_layout = _per_layer(kv_caches, layout)
    rows, blocks, offsets = _places(slot_mapping, _block_size(layers[0], layer_layout))
    for layer, cache in enumerate(layers):
        _write_layer_rows(cache, layer_layout, blocks, offsets, source[layer].index_select(1, rows))
