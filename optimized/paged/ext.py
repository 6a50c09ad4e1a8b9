"""C++ CPU backend of paged gather/scatter (``csrc/cpu/paged.cpp``), built on first import.

Limits: CPU tensors only. Moves raw bytes through each tensor's own strides, parallel over (layer, plane, token)
with at::parallel_for; memcpy per token row (or per head) when the innermost dims are contiguous on both sides,
element by element otherwise. A :class:`~lmkv.layouts.BlockMap` layout goes to the ``*_mapped`` ops, which
address each element through the map's offset table (memcpy per head where a table row is a run of consecutive
elements). Arguments are validated by ``lmkv.ops.paged.validate`` before this runs; the layout code
passed to the op is the layout's index in ``lmkv.layouts.LAYOUTS`` (the table in csrc/include/lmkv/paged.h).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmkv.layouts import LAYOUT_CODES, BlockMap, layer_tensors, new_chunk
from lmkv.optimized.ext import load_component

load_component("paged")


def unavailable_reason(device: str) -> str | None:
    # The library is built and loaded once this module imported, so no compiler probe per call
    # (lmkv.optimized.ext.unavailable_reason runs shutil.which: ~100 us on every dispatch).
    return None if device == "cpu" else "the paged C++ op runs on CPU tensors only"


def gather(kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, *, layout: str | BlockMap,
           out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = new_chunk(kv_caches, slot_mapping, layout)
    layers = layer_tensors(kv_caches, layout)
    if isinstance(layout, BlockMap):
        torch.ops.lmkv.paged_gather_mapped(layers, slot_mapping, layout.offsets, out)
    else:
        torch.ops.lmkv.paged_gather(layers, slot_mapping, out, LAYOUT_CODES[layout])
    num_tokens = slot_mapping.shape[0]
    return out if out.shape[2] == num_tokens else out.narrow(2, 0, num_tokens)


def scatter(chunk: torch.Tensor, kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, *,
            layout: str | BlockMap) -> None:
    layers = layer_tensors(kv_caches, layout)
    if isinstance(layout, BlockMap):
        torch.ops.lmkv.paged_scatter_mapped(chunk, layers, slot_mapping, layout.offsets)
    else:
        torch.ops.lmkv.paged_scatter(chunk, layers, slot_mapping, LAYOUT_CODES[layout])
