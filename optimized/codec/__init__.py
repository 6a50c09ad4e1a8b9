"""The CacheGen codec's optimized backend: ``ext`` (the C++ range coder of csrc/cpu/codec.cpp, parallel over
streams). Imported by string from :mod:`lmkv.ops.codec`, which dispatches only the coder (``codec.ac_encode``,
``codec.ac_decode``): quantization, tables and the blob layout have one implementation. Nothing here imports
:mod:`lmkv.reference`, so the coder agreement test compares independent code. ``cuda`` is the same coder on the GPU
(csrc/cuda/codec.cu)."""

from __future__ import annotations

import torch


def payload_and_offsets(data: bytes | bytearray | memoryview | torch.Tensor, lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The coded streams as a uint8 tensor ``[N]`` and their start offsets ``[S + 1]`` int64 (host tensors)."""
    if not isinstance(data, torch.Tensor):
        # frombuffer needs a writable, non-empty buffer: an all-empty payload (every stream one symbol) is legal.
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths.to(device="cpu", dtype=torch.int64), 0, out=offsets[1:])
    return data, offsets
