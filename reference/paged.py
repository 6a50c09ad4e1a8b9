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

Every layout is a permutation of the same five (six with the layer) axes, which :data:`LAYOUT_DIMS` records and
:func:`canonical_layer_views` exploits: the optimized kernels only need, per layer, a base address and the
strides of the canonical ``[P, NB, BS, H, D]`` view. The reference below indexes each layout explicitly instead,
so that a mistake in that table shows up as a disagreement.

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

from lmkv.layouts import BlockMap

LAYOUTS: tuple[str, ...] = ("flash_attn", "blocks_first", "flash_attn_hnd", "blocks_first_hnd", "mla", "cross_layer")

# For each layout: the index, in the engine tensor's own dim order, of the (layer, plane, block, offset, head, dim)
# axes; -1 where the axis does not exist (per-layer tensors have no layer axis, MLA has no plane/head axis).
# csrc/include/lmkv/paged.h holds the same table for the C++ and CUDA kernels (same layout codes: tuple index).
LAYOUT_DIMS: dict[str, tuple[int, int, int, int, int, int]] = {
    "flash_attn": (-1, 0, 1, 2, 3, 4),
    "blocks_first": (-1, 1, 0, 2, 3, 4),
    "flash_attn_hnd": (-1, 0, 1, 3, 2, 4),
    "blocks_first_hnd": (-1, 1, 0, 3, 2, 4),
    "mla": (-1, -1, 0, 1, -1, 2),
    "cross_layer": (1, 2, 0, 3, 4, 5),
}
LAYOUT_CODES: dict[str, int] = {name: i for i, name in enumerate(LAYOUTS)}

# Same-width integer type used to move each element size as raw bytes.
_BYTES_AS_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bytes_dtype(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` (any strides) as the signed integer type of the same width: a bit-preserving reinterpretation."""
    return t.view(_BYTES_AS_INT[t.element_size()])


Layout = str | BlockMap


def layer_tensors(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """The engine tensors as a list: L per-layer tensors, or ``[kv]`` for ``cross_layer``."""
    if isinstance(kv_caches, torch.Tensor):
        if layout != "cross_layer":
            raise TypeError(f"kv_caches must be a list of per-layer tensors for layout {layout!r}")
        return [kv_caches]
    return list(kv_caches)


def geometry_of(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: Layout
                ) -> tuple[int, int, int, torch.dtype, int, int]:
    """``(L, H, D, dtype, num_blocks, block_size)`` of engine tensors in ``layout`` (H = 1 for MLA)."""
    layers = layer_tensors(kv_caches, layout)
    first = layers[0]
    if isinstance(layout, BlockMap):
        return len(layers), layout.heads, layout.head_dim, first.dtype, first.shape[0], layout.block_size
    dl, _, db, do, dh, dd = LAYOUT_DIMS[layout]
    num_layers = first.shape[dl] if dl >= 0 else len(layers)
    heads = first.shape[dh] if dh >= 0 else 1
    return num_layers, heads, first.shape[dd], first.dtype, first.shape[db], first.shape[do]


def chunk_shape(num_layers: int, num_tokens: int, heads: int, head_dim: int, layout: Layout) -> tuple[int, ...]:
    """``[L, 2, T, H, D]``, or ``[L, 1, T, D]`` for MLA."""
    if layout == "mla":
        return (num_layers, 1, num_tokens, head_dim)
    return (num_layers, 2, num_tokens, heads, head_dim)


def new_chunk(kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, layout: Layout
              ) -> torch.Tensor:
    """A fresh chunk for ``gather(out=None)``: zero-filled when some slot is skipped, so skipped rows read 0."""
    num_layers, heads, head_dim, dtype, _, _ = geometry_of(kv_caches, layout)
    shape = chunk_shape(num_layers, slot_mapping.shape[0], heads, head_dim, layout)
    device = layer_tensors(kv_caches, layout)[0].device
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def canonical_layer_views(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: str) -> list[torch.Tensor]:
    """Per layer, a view ``[P, NB, BS, H, D]`` of the same memory (P = H = 1 for MLA); no data is copied.

    This is the whole content of a layout as far as a strided kernel is concerned.
    """
    dl, dp, db, do, dh, dd = LAYOUT_DIMS[layout]
    layers = layer_tensors(kv_caches, layout)
    if dl >= 0:
        (kv,) = layers
        layers = [kv.select(dl, i) for i in range(kv.shape[dl])]
        # Selecting the layer axis removes it: later axes move one place to the left.
        dp, db, do, dh, dd = (d - (d > dl) for d in (dp, db, do, dh, dd))
    views = []
    for t in layers:
        if layout == "mla":
            views.append(t.permute(db, do, dd)[None, :, :, None, :])
        else:
            views.append(t.permute(dp, db, do, dh, dd))
    return views


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


def _per_layer(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: str) -> tuple[list[torch.Tensor], str]:
    """Per-layer raw-byte tensors and the layout to index them with (cross_layer layer l is blocks_first)."""
    if layout == "cross_layer":
        kv = layer_tensors(kv_caches, layout)[0]             # [NB, L, 2, BS, H, D]
        return [as_bytes_dtype(kv[:, i]) for i in range(kv.shape[1])], "blocks_first"
    return [as_bytes_dtype(t) for t in layer_tensors(kv_caches, layout)], layout


def _blocks(layer: torch.Tensor, block_map: BlockMap) -> torch.Tensor:
    """One layer's blocks as a raw-byte ``[NB, span]`` view: row b is block b's first ``span`` elements."""
    raw = as_bytes_dtype(layer)
    return raw.as_strided((raw.shape[0], block_map.span), (raw.stride(0), 1))


def _mapped_cells(slot_mapping: torch.Tensor, block_map: BlockMap) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """``(rows, blocks, cells)``: kept token positions ``[T']``, their blocks ``[1, T', 1, 1]`` and the element
    of each (plane, token, head, dim) inside its block, ``[2, T', H, D]``."""
    rows = torch.nonzero(slot_mapping >= 0).flatten()
    slots = slot_mapping[rows]
    offsets = block_map.offsets.to(slot_mapping.device)
    cells = offsets[:, slots % block_map.block_size]
    return rows, (slots // block_map.block_size).view(1, -1, 1, 1), cells


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
        layout: one of :data:`LAYOUTS`, or a :class:`~lmkv.layouts.BlockMap`.
        out: optional chunk ``[L, 2, >=T, H, D]`` (MLA ``[L, 1, >=T, D]``) written in place.

    Returns:
        ``out[:, :, :T]`` (a fresh chunk when ``out`` is None). For every ``t`` with ``slot[t] >= 0``::

            chunk[l, p, t, h, d] == cache_l[p, slot[t] // BS, slot[t] % BS, h, d]     (flash_attn)

        and rows with a negative slot keep what ``out`` held.
    """
    if out is None:
        out = new_chunk(kv_caches, slot_mapping, layout)
    num_tokens = slot_mapping.shape[0]
    chunk = out.narrow(2, 0, num_tokens)
    if isinstance(layout, BlockMap):
        return _gather_mapped(layer_tensors(kv_caches, layout), slot_mapping, layout, chunk)
    layers, layer_layout = _per_layer(kv_caches, layout)
    block_size = geometry_of(kv_caches, layout)[5]
    rows = torch.nonzero(slot_mapping >= 0).flatten()        # token positions that are not skipped
    slots = slot_mapping[rows]
    blocks, offsets = slots // block_size, slots % block_size
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
    num_tokens = slot_mapping.shape[0]
    if isinstance(layout, BlockMap):
        return _scatter_mapped(chunk.narrow(2, 0, num_tokens), layer_tensors(kv_caches, layout), slot_mapping,
                               layout)
    source = as_bytes_dtype(chunk.narrow(2, 0, num_tokens))
    layers, layer_layout = _per_layer(kv_caches, layout)
    block_size = geometry_of(kv_caches, layout)[5]
    rows = torch.nonzero(slot_mapping >= 0).flatten()
    slots = slot_mapping[rows]
    blocks, offsets = slots // block_size, slots % block_size
    for layer, cache in enumerate(layers):
        _write_layer_rows(cache, layer_layout, blocks, offsets, source[layer].index_select(1, rows))
