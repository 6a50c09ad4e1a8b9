"""Layerwise loads and saves for :class:`lmkv.adapters.vllm.LmkvConnector` (``layerwise: true``).

vLLM calls ``wait_for_layer_load(layer)`` before each attention layer runs and ``save_kv_layer(layer, ...)`` after
it wrote the layer's KV. With ``layerwise`` on:

- **Loads** (those inside the step; background loads stay whole): ``start_load_kv`` returns at once; a thread
  reads every chunk of the step's loads into a staging buffer ``[L, 2, T, H, D]`` (each object is verified whole:
  its checksum covers every layer, so no layer of it may be used before all of it is read), then scatters it into
  vLLM's blocks one layer at a time, in forward order, releasing each layer's waiter as it lands. The forward pass
  runs its first layers' work beside the read and the later layers' scatters.
- **Saves**: each layer of the step's saves is gathered into a staging buffer as soon as the forward pass wrote it
  (while its blocks are warm in the CPU caches); ``wait_for_save`` stores the buffers (one copy into the memory
  pool). A save whose layers did not all pass through ``save_kv_layer`` (a step without a forward pass) is gathered
  whole, as without ``layerwise``.

Whether this helps is measured, not assumed (docs/results.md, "Round 2, [5/9]", run 4: on CPU it does not, so the
option is off by default). Buffers are reused across steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from lmkv.ops import paged


class StagingBuffer:
    """One reusable ``[L, 2, cap, H, D]`` tensor, grown (never shrunk) to the largest request; ``take(T)`` gives its
    first ``T`` token columns, valid until the next ``take``."""

    def __init__(self, chunk_shape: Callable[[int], tuple[int, ...]], dtype: torch.dtype) -> None:
        self._shape, self._dtype = chunk_shape, dtype
        self._buf: torch.Tensor | None = None

    def take(self, tokens: int) -> torch.Tensor:
        if self._buf is None or self._buf.shape[2] < tokens:
            cap = max(tokens, 2 * (self._buf.shape[2] if self._buf is not None else 0))
            self._buf = torch.empty(self._shape(cap), dtype=self._dtype)
        return self._buf[:, :, :tokens]


class LayerLoads:
    """One step's in-step loads, read on a thread and scattered layer by layer.

    Args:
        specs: the step's loads, each ``(token_ids, slots [T] int64, skip, end)``: tokens ``[skip, end)`` go to
            their slots (``slots`` covers ``token_ids``; -1 outside ``[skip, end)``).
        read: ``read(token_ids, out, start) -> (valid, tiers)``: load a spec's stored chunks into ``out``
            ``[L, 2, T, H, D]`` from ``start`` (the engine's ``retrieve``); ``valid`` tokens are right from 0.
        layers: one :class:`~lmkv.ops.paged.PagedCache` per layer, in forward order.
    """

    def __init__(self, specs: Sequence[tuple[list[int], torch.Tensor, int, int]],
                 read: Callable[[list[int], torch.Tensor, int], tuple[int, dict[str, int]]],
                 layers: Sequence[paged.PagedCache], staging: StagingBuffer, executor: ThreadPoolExecutor) -> None:
        self._specs, self._read, self._layers, self._staging = list(specs), read, list(layers), staging
        self._ready = [threading.Event() for _ in self._layers]
        self.future: Future = executor.submit(self._run)

    def wait(self, layer: int) -> None:
        """Until layer ``layer`` of every load is in vLLM's blocks (or the load failed: then vLLM is told which
        blocks to recompute, as for any failed load)."""
        self._ready[layer].wait()

    def _run(self) -> list[tuple[int, dict[str, int], float]]:
        """Per spec ``(valid, tiers, seconds)``."""
        t0 = time.perf_counter()
        try:
            total = sum(len(s[0]) for s in self._specs)
            stage = self._staging.take(total)
            placed, off = [], 0
            for tokens, slots, skip, end in self._specs:
                out = stage[:, :, off:off + len(tokens)]
                try:
                    valid, tiers = self._read(tokens, out, skip)
                except Exception:  # noqa: BLE001 - reported by the caller as a failed load
                    valid, tiers = skip, {}
                placed.append((out, slots, skip, max(skip, min(valid, end)), tiers))
                off += len(tokens)
            for layer, cache in enumerate(self._layers):
                for out, slots, skip, valid, _ in placed:
                    if valid > skip:
                        paged.scatter(out[layer:layer + 1, :, skip:valid].contiguous(), cache, slots[skip:valid])
                self._ready[layer].set()
            seconds = time.perf_counter() - t0
            return [(valid, tiers, seconds) for _, _, _, valid, tiers in placed]
        finally:
            for ev in self._ready:  # never leave the forward pass waiting, whatever happened
                ev.set()


class LayerSaves:
    """One step's saves, gathered layer by layer as the forward pass writes them.

    Args:
        specs: the step's saves, each ``(slots [T - first] int64, first)``: the slots of tokens ``[first, T)``.
        layers: one :class:`~lmkv.ops.paged.PagedCache` per layer, in forward order.
    """

    def __init__(self, specs: Sequence[tuple[torch.Tensor, int]], layers: Sequence[paged.PagedCache],
                 staging: Sequence[StagingBuffer]) -> None:
        self._layers = list(layers)
        self._bufs = [st.take(int(slots.shape[0])) for st, (slots, _) in zip(staging, specs, strict=True)]
        self._slots = [slots for slots, _ in specs]
        self._done: set[int] = set()

    def gather(self, layer: int) -> None:
        for buf, slots in zip(self._bufs, self._slots, strict=True):
            paged.gather(self._layers[layer], slots, out=buf[layer:layer + 1])
        self._done.add(layer)

    def complete(self) -> bool:
        """Every layer went through :meth:`gather` (the step had a forward pass)."""
        return len(self._done) == len(self._layers)

    def buffers(self) -> list[torch.Tensor]:
        """Per spec ``[L, 2, T - first, H, D]``: valid when :meth:`complete`, until the next step's saves."""
        return self._bufs


def layer_caches(kv_caches: dict[str, torch.Tensor], layout: Any) -> tuple[list[paged.PagedCache], dict[str, int]]:
    """One single-layer :class:`~lmkv.ops.paged.PagedCache` per vLLM layer, in registration (= forward) order, and
    the index of each layer name."""
    names = list(kv_caches)
    return [paged.PagedCache([kv_caches[n]], layout) for n in names], {n: i for i, n in enumerate(names)}


__all__ = ["LayerLoads", "LayerSaves", "StagingBuffer", "layer_caches"]
