"""C++ CPU backend of paged gather/scatter (``csrc/cpu/paged.cpp``), built on first import.

Limits: CPU tensors only. Moves raw bytes through each tensor's own strides, parallel over (layer, plane, token)
with at::parallel_for; memcpy per token row (or per head) when the innermost dims are contiguous on both sides,
element by element otherwise. Arguments are validated by ``lmkv.ops.paged.validate`` before this runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmkv.optimized.ext import load_component
from lmkv.reference import paged as ref

load_component("paged")


def unavailable_reason(device: str) -> str | None:
    # The library is built and loaded once this module imported, so no compiler probe per call
    # (lmkv.optimized.ext.unavailable_reason runs shutil.which: ~100 us on every dispatch).
    return None if device == "cpu" else "the paged C++ op runs on CPU tensors only"


def gather(kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, *, layout: str,
           out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = ref.new_chunk(kv_caches, slot_mapping, layout)
    torch.ops.lmkv.paged_gather(ref.layer_tensors(kv_caches, layout), slot_mapping, out, ref.LAYOUT_CODES[layout])
    num_tokens = slot_mapping.shape[0]
    return out if out.shape[2] == num_tokens else out.narrow(2, 0, num_tokens)


def scatter(chunk: torch.Tensor, kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, *,
            layout: str) -> None:
    torch.ops.lmkv.paged_scatter(chunk, ref.layer_tensors(kv_caches, layout), slot_mapping, ref.LAYOUT_CODES[layout])
