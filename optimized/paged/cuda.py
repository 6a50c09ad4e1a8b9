"""CUDA backend of paged gather/scatter (csrc/cuda/paged.cu through csrc/cuda/bindings.cpp), built on first import.

Limits: CUDA caches; the chunk on their device, or in pinned host memory. One thread block per (token, layer * plane)
row moves the ``H x D`` row in the widest word (up to 16 bytes) that every stride and address allows, so every
dtype is bit-exact; layers may be separate allocations with different strides. Launches go to the current torch
stream. A host chunk goes through one device buffer and one DMA copy (:mod:`.host`), which a PCIe link moves at
full speed; :func:`gather_direct` / :func:`scatter_direct` instead let the kernel read or write the pinned memory
itself (unified addressing), for the A/B of ``experiments/gpu_check.py``. A :class:`~lmkv.layouts.BlockMap`
layout reads each element's place from the map's offset table, kept on the device once per map. Arguments are
validated by :func:`lmkv.ops.paged.validate` before this runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from lmkv.layouts import LAYOUT_CODES, BlockMap, layer_tensors, new_chunk
from lmkv.optimized import cuda
from lmkv.optimized.cuda import unavailable_reason as unavailable_reason
from lmkv.optimized.paged import host

cuda.load()

Kv = torch.Tensor | Sequence[torch.Tensor]
_tables: dict[tuple[int, torch.device], tuple[BlockMap, torch.Tensor]] = {}  # the map itself pins its id
_tables_lock = threading.Lock()


def _device_offsets(layout: BlockMap, device: torch.device) -> torch.Tensor:
    key = (id(layout), device)
    hit = _tables.get(key)
    if hit is None:
        with _tables_lock:
            hit = _tables.setdefault(key, (layout, layout.offsets.to(device).contiguous()))
    return hit[1]


def gather_direct(kv_caches: Kv, slot_mapping: torch.Tensor, *, layout: str | BlockMap,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel writes straight into ``out`` (device memory, or pinned host memory over PCIe)."""
    if out is None:
        out = new_chunk(kv_caches, slot_mapping, layout)
    layers = layer_tensors(kv_caches, layout)
    if isinstance(layout, BlockMap):
        offsets = _device_offsets(layout, slot_mapping.device)
        torch.ops.lmkv.paged_gather_mapped_cuda(layers, slot_mapping, offsets, layout.span, out)
    else:
        torch.ops.lmkv.paged_gather_cuda(layers, slot_mapping, out, LAYOUT_CODES[layout])
    if out.device.type == "cpu":
        torch.cuda.current_stream(slot_mapping.device).synchronize()  # the host reads out next
    num_tokens = slot_mapping.shape[0]
    return out if out.shape[2] == num_tokens else out.narrow(2, 0, num_tokens)


def scatter_direct(chunk: torch.Tensor, kv_caches: Kv, slot_mapping: torch.Tensor, *,
                   layout: str | BlockMap) -> None:
    """The kernel reads straight from ``chunk`` (device memory, or pinned host memory over PCIe)."""
    layers = layer_tensors(kv_caches, layout)
    if isinstance(layout, BlockMap):
        offsets = _device_offsets(layout, slot_mapping.device)
        torch.ops.lmkv.paged_scatter_mapped_cuda(chunk, layers, slot_mapping, offsets, layout.span)
    else:
        torch.ops.lmkv.paged_scatter_cuda(chunk, layers, slot_mapping, LAYOUT_CODES[layout])
    if chunk.device.type == "cpu":
        torch.cuda.current_stream(slot_mapping.device).synchronize()  # the caller may reuse chunk next


def gather(kv_caches: Kv, slot_mapping: torch.Tensor, *, layout: str | BlockMap,
           out: torch.Tensor | None = None) -> torch.Tensor:
    if out is not None and out.device.type == "cpu":
        return host.gather(gather_direct, kv_caches, slot_mapping, layout, out)
    return gather_direct(kv_caches, slot_mapping, layout=layout, out=out)


def scatter(chunk: torch.Tensor, kv_caches: Kv, slot_mapping: torch.Tensor, *, layout: str | BlockMap) -> None:
    if chunk.device.type == "cpu":
        return host.scatter(scatter_direct, chunk, kv_caches, slot_mapping, layout)
    return scatter_direct(chunk, kv_caches, slot_mapping, layout=layout)
