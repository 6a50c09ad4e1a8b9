"""Reusable read buffers: a disk or Redis read lands in memory that is already mapped.

Why: copying into freshly allocated memory runs at about a third of the copy rate into reused memory on these
machines (every new page is a page fault), so a tier that allocates a buffer per read is fault bound, not
I/O bound. A :class:`BufferPool` hands out page-aligned (O_DIRECT-ready) byte buffers and takes them back on
release; it keeps at most ``max_cached`` bytes of idle buffers (the largest are dropped first).

    pool = BufferPool(256 << 20)
    buf = pool.take(n)          # buf.data: uint8 tensor [n], buf.view: writable memoryview of the same bytes
    os.readv(fd, [buf.view])
    ...
    buf.release()               # back to the pool (idempotent)
"""

from __future__ import annotations

import bisect
import threading

import torch

PAGE = 4096
_GRAIN = 1 << 20  # buffers are sized in MiB steps above 1 MiB so that similar objects share a buffer


def _size_class(n: int) -> int:
    if n <= _GRAIN:
        return max(PAGE, (n + PAGE - 1) // PAGE * PAGE)
    return (n + _GRAIN - 1) // _GRAIN * _GRAIN


class PooledBuffer:
    """``n`` bytes of a pooled, page-aligned allocation: ``data`` (uint8 tensor [n]) and ``view`` (memoryview)."""

    __slots__ = ("data", "view", "_block", "_pool")

    def __init__(self, block: torch.Tensor, n: int, pool: BufferPool | None) -> None:
        self._block = block
        self._pool = pool
        start = (-block.data_ptr()) % PAGE
        self.data = block[start:start + n]
        self.view = memoryview(self.data.numpy()).cast("B") if n else memoryview(bytearray())

    @property
    def address(self) -> int:
        return self.data.data_ptr()

    def release(self) -> None:
        """Back to the pool (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._give_back(self._block)

    def detach(self) -> None:
        """Leave the pool for good: the memory is freed with the last tensor viewing it (a consumer kept it)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._detached(self._block)


class BufferPool:
    """Thread-safe pool of page-aligned byte buffers (see the module docstring)."""

    def __init__(self, max_cached: int = 256 << 20) -> None:
        if not isinstance(max_cached, int) or max_cached < 0:
            raise ValueError(f"max_cached must be a byte count >= 0, got {max_cached!r}")
        self.max_cached = max_cached
        self._free: list[tuple[int, int, torch.Tensor]] = []  # (capacity, id, block), sorted by capacity
        self._cached = 0
        self._lock = threading.Lock()
        self.allocations = 0  # fresh blocks made: a warm pool stops counting up

    def take(self, n: int) -> PooledBuffer:
        """A buffer of exactly ``n`` bytes (its block may be larger), reused when an idle one fits."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a byte count >= 0, got {n!r}")
        want = _size_class(n)
        with self._lock:
            i = bisect.bisect_left(self._free, (want, -1))
            # reuse a block at most twice the size needed: a small read must not pin a huge block
            if i < len(self._free) and self._free[i][0] <= 2 * want:
                cap, _, block = self._free.pop(i)
                self._cached -= cap
                return PooledBuffer(block, n, self)
            self.allocations += 1
        block = torch.empty(want + PAGE, dtype=torch.uint8)  # + PAGE: room to align the start
        return PooledBuffer(block, n, self)

    def _give_back(self, block: torch.Tensor) -> None:
        cap = block.numel() - PAGE
        with self._lock:
            if cap > self.max_cached:
                return
            bisect.insort(self._free, (cap, id(block), block))
            self._cached += cap
            while self._cached > self.max_cached:  # drop the largest idle blocks first
                big, _, _ = self._free.pop()
                self._cached -= big

    def _detached(self, block: torch.Tensor) -> None:
        """A taken buffer that will not come back (subclasses count it)."""

    def cached_bytes(self) -> int:
        with self._lock:
            return self._cached


__all__ = ["BufferPool", "PooledBuffer", "PAGE"]
