"""A pinned host chunk beside CUDA caches, for kernels that address device memory only: one DMA copy each way.

``gather`` runs the device kernel into a device buffer and copies it to the host chunk; ``scatter`` copies the host
chunk to the device, then runs the kernel. Both return when the host side is done (the copies synchronise the
current stream), as a gather into a host tensor must. A skipped slot keeps what the host chunk held: the buffer
then starts as a copy of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmkv.layouts import BlockMap

Kv = torch.Tensor | Sequence[torch.Tensor]


def gather(kernel: Callable[..., torch.Tensor], kv_caches: Kv, slot_mapping: torch.Tensor, layout: str | BlockMap,
           out: torch.Tensor) -> torch.Tensor:
    """``kernel(kv_caches, slot_mapping, layout=, out=device buffer)``, then the buffer into ``out[:, :, :T]``."""
    host = out.narrow(2, 0, slot_mapping.shape[0])
    device = slot_mapping.device
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        buffer = host.to(device)
    else:
        buffer = torch.empty(host.shape, dtype=host.dtype, device=device)
    kernel(kv_caches, slot_mapping, layout=layout, out=buffer)
    host.copy_(buffer)
    return host


def scatter(kernel: Callable[..., None], chunk: torch.Tensor, kv_caches: Kv, slot_mapping: torch.Tensor,
            layout: str | BlockMap) -> None:
    """``chunk[:, :, :T]`` to the device, then ``kernel(buffer, kv_caches, slot_mapping, layout=)``."""
    buffer = chunk.narrow(2, 0, slot_mapping.shape[0]).to(slot_mapping.device)
    kernel(buffer, kv_caches, slot_mapping, layout=layout)
