"""Triton backend of paged gather/scatter: one launch for all layers, strided loads/stores of raw bytes.

Limits: runs on CUDA, or on CPU only under ``TRITON_INTERPRET=1`` (tests; auto never picks that). Every layer is
addressed from layer 0's pointer plus an element offset held in a small int64 table with that layer's canonical
``[P, NB, BS, H, D]`` strides, so layers may be separate allocations with different strides (views). Each
program moves a tile of ``BLOCK_T`` tokens x H x D of one (layer, plane); H and D are padded to powers of two,
so very wide rows (H * D > 2^14) are refused. All offsets are int64. Data moves as same-width integers.
A :class:`~lmkv.layouts.BlockMap` layout runs a second kernel that reads each element's place in its block from
the map's offset table (per layer: an element offset from layer 0 and the block stride).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lmkv.layouts import BlockMap, as_bytes_dtype, canonical_layer_views, layer_tensors, new_chunk
from lmkv.optimized.paged import host
from lmkv.optimized.triton import unavailable_reason as unavailable_reason

_MAX_TILE = 1 << 14  # elements per program: a register budget on GPU, numpy temporaries under the interpreter


@triton.jit
def _move(cache, chunk, mask, GATHER: tl.constexpr):
    """cache -> chunk (gather) or chunk -> cache (scatter) at the given element pointers."""
    if GATHER:
        tl.store(chunk, tl.load(cache, mask=mask), mask=mask)
    else:
        tl.store(cache, tl.load(chunk, mask=mask), mask=mask)


@triton.jit
def _paged_copy_kernel(cache_ptr, meta_ptr, slot_ptr, chunk_ptr, num_tokens, planes, heads, head_dim, block_size,
                       slot_stride, k_layer, k_plane, k_token, k_head, k_dim,
                       GATHER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    lp = tl.program_id(0).to(tl.int64)
    layer = lp // planes
    plane = lp % planes
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    in_range = t < num_tokens
    slot = tl.load(slot_ptr + t * slot_stride, mask=in_range, other=-1)
    valid = in_range & (slot >= 0)
    slot = tl.where(valid, slot, 0)
    # meta row of this layer: element offset from cache_ptr, then canonical strides (plane, block, offset, head, dim)
    meta = meta_ptr + layer * 6
    base = tl.load(meta)
    s_plane = tl.load(meta + 1)
    s_block = tl.load(meta + 2)
    s_offset = tl.load(meta + 3)
    s_head = tl.load(meta + 4)
    s_dim = tl.load(meta + 5)
    h = tl.arange(0, BLOCK_H).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    row = base + plane * s_plane + (slot // block_size) * s_block + (slot % block_size) * s_offset
    cache_idx = row[:, None, None] + h[None, :, None] * s_head + d[None, None, :] * s_dim
    chunk_row = layer * k_layer + plane * k_plane + t * k_token
    chunk_idx = chunk_row[:, None, None] + h[None, :, None] * k_head + d[None, None, :] * k_dim
    mask = valid[:, None, None] & (h < heads)[None, :, None] & (d < head_dim)[None, None, :]
    _move(cache_ptr + cache_idx, chunk_ptr + chunk_idx, mask, GATHER)


@triton.jit
def _paged_mapped_kernel(cache_ptr, meta_ptr, offsets_ptr, slot_ptr, chunk_ptr, num_tokens, heads, head_dim,
                         block_size, slot_stride, k_layer, k_plane, k_token, k_head, k_dim,
                         GATHER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    lp = tl.program_id(0).to(tl.int64)
    layer = lp // 2
    plane = lp % 2
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    in_range = t < num_tokens
    slot = tl.load(slot_ptr + t * slot_stride, mask=in_range, other=-1)
    valid = in_range & (slot >= 0)
    slot = tl.where(valid, slot, 0)
    base = tl.load(meta_ptr + layer * 2)           # element offset of this layer from cache_ptr
    s_block = tl.load(meta_ptr + layer * 2 + 1)    # elements between blocks
    h = tl.arange(0, BLOCK_H).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = valid[:, None, None] & (h < heads)[None, :, None] & (d < head_dim)[None, None, :]
    # offsets[plane, slot % BS, h, d]: where the element sits inside its block
    row = (plane * block_size + slot % block_size) * heads
    cell = tl.load(offsets_ptr + (row[:, None, None] + h[None, :, None]) * head_dim + d[None, None, :], mask=mask,
                   other=0)
    cache_idx = base + (slot // block_size)[:, None, None] * s_block + cell
    chunk_row = layer * k_layer + plane * k_plane + t * k_token
    chunk_idx = chunk_row[:, None, None] + h[None, :, None] * k_head + d[None, None, :] * k_dim
    _move(cache_ptr + cache_idx, chunk_ptr + chunk_idx, mask, GATHER)


def _launch_mapped(kv_caches: Sequence[torch.Tensor], slot_mapping: torch.Tensor, chunk: torch.Tensor,
                   block_map: BlockMap, gather: bool) -> None:
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    layers = [as_bytes_dtype(t) for t in layer_tensors(kv_caches, block_map)]
    heads, head_dim, block_size = block_map.heads, block_map.head_dim, block_map.block_size
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim)
    if block_h * block_d > _MAX_TILE:
        raise ValueError(f"kv_caches rows of {heads} x {head_dim} elements exceed the Triton tile ({_MAX_TILE})")
    block_t = min(triton.next_power_of_2(num_tokens), max(1, _MAX_TILE // (block_h * block_d)))
    chunk = as_bytes_dtype(chunk)
    k_layer, k_plane, k_token, k_head, k_dim = chunk.stride()
    offsets = block_map.on(layers[0].device)
    elem = layers[0].element_size()
    deltas = [t.data_ptr() - layers[0].data_ptr() for t in layers]
    # Layers whose distance is not a whole number of elements (odd byte offsets) get one launch each.
    if all(x % elem == 0 for x in deltas):
        groups = [(layers[0], [(x // elem, t.stride(0)) for x, t in zip(deltas, layers, strict=True)], 0)]
    else:
        groups = [(t, [(0, t.stride(0))], i) for i, t in enumerate(layers)]
    for base, rows, first_layer in groups:
        meta = torch.tensor(rows, dtype=torch.int64, device=base.device)
        grid = (len(rows) * 2, triton.cdiv(num_tokens, block_t))
        _paged_mapped_kernel[grid](
            base, meta, offsets, slot_mapping, chunk[first_layer:], num_tokens, heads, head_dim, block_size,
            slot_mapping.stride(0), k_layer, k_plane, k_token, k_head, k_dim,
            GATHER=gather, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        )


def _meta(views: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor | None:
    """int64 [L, 6]: per layer (element offset from ``base``, 5 canonical strides); None if not addressable so."""
    elem = base.element_size()
    rows = []
    for v in views:
        delta = v.data_ptr() - base.data_ptr()
        if delta % elem:
            return None
        rows.append([delta // elem, *v.stride()])
    return torch.tensor(rows, dtype=torch.int64, device=base.device)


def _launch(kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, chunk: torch.Tensor,
            layout: str, gather: bool) -> None:
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    views = [as_bytes_dtype(v) for v in canonical_layer_views(kv_caches, layout)]  # [P, NB, BS, H, D]
    planes, _, block_size, heads, head_dim = views[0].shape
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim)
    if block_h * block_d > _MAX_TILE:
        raise ValueError(f"kv_caches rows of {heads} x {head_dim} elements exceed the Triton tile ({_MAX_TILE})")
    block_t = min(triton.next_power_of_2(num_tokens), max(1, _MAX_TILE // (block_h * block_d)))
    chunk = as_bytes_dtype(chunk)
    k_layer, k_plane, k_token = chunk.stride()[:3]
    k_head, k_dim = (0, chunk.stride(3)) if layout == "mla" else chunk.stride()[3:]
    meta = _meta(views, views[0])
    # Layers whose distance is not a whole number of elements (odd byte offsets) get one launch each.
    groups = [(views[0], meta, 0, len(views))] if meta is not None else [
        (v, _meta([v], v), i, 1) for i, v in enumerate(views)]
    for base, table, first_layer, count in groups:
        grid = (count * planes, triton.cdiv(num_tokens, block_t))
        _paged_copy_kernel[grid](
            base, table, slot_mapping, chunk[first_layer:], num_tokens, planes, heads, head_dim, block_size,
            slot_mapping.stride(0), k_layer, k_plane, k_token, k_head, k_dim,
            GATHER=gather, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        )


def gather(kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, *, layout: str | BlockMap,
           out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = new_chunk(kv_caches, slot_mapping, layout)
    if out.device != slot_mapping.device:  # a pinned host chunk: Triton kernels address device memory only
        return host.gather(gather, kv_caches, slot_mapping, layout, out)
    if isinstance(layout, BlockMap):
        _launch_mapped(kv_caches, slot_mapping, out, layout, gather=True)
    else:
        _launch(kv_caches, slot_mapping, out, layout, gather=True)
    num_tokens = slot_mapping.shape[0]
    return out if out.shape[2] == num_tokens else out.narrow(2, 0, num_tokens)


def scatter(chunk: torch.Tensor, kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, *,
            layout: str | BlockMap) -> None:
    if chunk.device != slot_mapping.device:
        return host.scatter(scatter, chunk, kv_caches, slot_mapping, layout)
    if isinstance(layout, BlockMap):
        _launch_mapped(kv_caches, slot_mapping, chunk, layout, gather=False)
    else:
        _launch(kv_caches, slot_mapping, chunk, layout, gather=False)
