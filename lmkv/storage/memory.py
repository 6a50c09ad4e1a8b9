"""CPU RAM tier: objects live in one preallocated pool; byte capacity is the pool size, so it cannot be exceeded.

Limits: the pool is one contiguous uint8 tensor (pinned when CUDA is present and ``pinned`` is set), carved by
a first-fit allocator with coalescing, 64-byte aligned. Fragmentation can make a put evict more than the
strictly needed bytes; an object larger than the pool is rejected (a dropped write, never an error).
Objects are kept unverified (RAM is trusted): the payload checksum is computed lazily, once, when the object
is first written to a lower tier.

Eviction follows the policy only; evicting a pinned object unlinks it at once and its bytes come back when
it is released, so a put into a full pool may wait (bounded) for a lower tier that is still writing.

Ownership: ``get``/``peek`` return an :class:`Encoded` whose payload is a view into the pool plus a pin on
its slot. A pinned slot is never evicted or reused; ``remove`` or an overwrite of a pinned key unlinks it at
once and frees its bytes at the last release. ``assert_no_leaks`` checks that every pin was released and that
allocated + free bytes add up to the pool.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass

import torch

from lmkv.storage.base import OneByOne, TierStats, WarnOnce
from lmkv.storage.objects import Encoded, ObjectHeader
from lmkv.storage.policy import make_policy

ALIGN = 64
PIN_WAIT = 5.0  # seconds a put waits for evicted-but-pinned bytes (a lower tier still writing them)


def _round(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Arena:
    """First-fit byte allocator over ``[0, capacity)`` with neighbour coalescing (not thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: dict[int, int] = {0: capacity} if capacity else {}  # start -> size
        self._ends: dict[int, int] = {capacity: 0} if capacity else {}  # end -> start
        self.free_bytes = capacity

    def alloc(self, n: int) -> int | None:
        for start, size in self._free.items():
            if size >= n:
                del self._free[start]
                del self._ends[start + size]
                if size > n:
                    self._free[start + n] = size - n
                    self._ends[start + size] = start + n
                self.free_bytes -= n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        self.free_bytes += n
        end = start + n
        if start in self._ends:  # merge with the block before
            prev = self._ends.pop(start)
            del self._free[prev]
            start = prev
        if end in self._free:  # merge with the block after
            size = self._free.pop(end)
            del self._ends[end + size]
            end += size
        self._free[start] = end - start
        self._ends[end] = start

    def check(self, used: list[tuple[int, int]]) -> None:
        spans = sorted([(s, n, "free") for s, n in self._free.items()] + [(s, n, "used") for s, n in used])
        pos = 0
        for s, n, what in spans:
            assert s == pos, f"arena gap or overlap at {pos} (next {what} span starts at {s})"
            pos = s + n
        assert pos == self.capacity, f"arena spans end at {pos}, capacity {self.capacity}"
        assert sum(self._free.values()) == self.free_bytes


@dataclass(eq=False)
class _Slot:
    header: ObjectHeader
    offset: int
    alloc_len: int
    pins: int = 0
    dead: bool = False  # unlinked from the index; freed at the last unpin


class MemoryTier(OneByOne):
    name = "memory"
    shared = False  # this process's RAM

    def __init__(self, capacity: int, *, policy: str = "lru", pinned: bool = False) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity must be a byte count >= 0, got {capacity!r}")
        capacity = capacity // ALIGN * ALIGN
        pin = bool(pinned and torch.cuda.is_available())
        self._pool = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        self._pool_ptr = self._pool.data_ptr()
        self._pool_np = self._pool.numpy()
        self._arena = Arena(capacity)
        self._index: dict[str, _Slot] = {}
        self._policy = make_policy(policy)
        self._lock = threading.RLock()
        self._stats = TierStats()
        self._dead_pinned: set[_Slot] = set()  # unlinked slots that readers or writers still hold
        self._dead_bytes = 0
        self._freed = threading.Condition(self._lock)
        self._warn = WarnOnce()
        self._closed = False

    # -- bookkeeping ---------------------------------------------------------------------------------
    def capacity_bytes(self) -> int:
        return self._arena.capacity

    def usage_bytes(self) -> int:
        with self._lock:
            return self._arena.capacity - self._arena.free_bytes

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats.as_dict(), "usage_bytes": self.usage_bytes(), "objects": len(self._index)}

    def _retire(self, slot: _Slot) -> None:
        slot.dead = True
        if slot.pins == 0:
            self._arena.free(slot.offset, slot.alloc_len)
        else:
            self._dead_pinned.add(slot)
            self._dead_bytes += slot.alloc_len

    def _unpin(self, slot: _Slot) -> None:
        with self._lock:
            slot.pins -= 1
            assert slot.pins >= 0, "memory tier slot released more often than leased"
            if slot.pins == 0 and slot.dead:
                self._dead_pinned.discard(slot)
                self._dead_bytes -= slot.alloc_len
                self._arena.free(slot.offset, slot.alloc_len)
                self._freed.notify_all()

    def _allocate(self, n: int) -> int | None:
        """Reserve ``n`` bytes, evicting in policy order; None when it cannot fit.

        Victims are chosen by the policy alone, pinned or not, so which keys the tier holds never depends on
        the timing of background writers. A pinned victim leaves the index at once; its bytes come back at
        its last release, which this waits for (at most ``PIN_WAIT`` seconds, then it evicts further).
        """
        victims = self._policy.victims()
        deadline: float | None = None
        while True:
            off = self._arena.alloc(n)
            if off is not None:
                return off
            now = time.monotonic()
            waiting_helps = (self._dead_pinned and self._arena.free_bytes + self._dead_bytes >= n
                             and (deadline is None or now < deadline))
            if not waiting_helps:
                victim = next((v for v in victims if v in self._index), None)
                if victim is not None:
                    slot = self._index.pop(victim)
                    self._policy.remove(victim)
                    self._retire(slot)
                    self._stats.evictions += 1
                    continue
                if not self._dead_pinned:
                    return None
            deadline = now + PIN_WAIT if deadline is None else deadline
            if now >= deadline:
                return None
            self._freed.wait(deadline - now)

    # -- Tier protocol -------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def put(self, key: str, obj: Encoded) -> bool:
        """Copy ``obj`` into the pool (synchronously) and release it. False when it does not fit."""
        try:
            n = obj.header.payload_len
            alloc_len = _round(n)
            with self._lock:
                if self._closed:
                    return False
                old = self._index.pop(key, None)  # replaced: its bytes count as free for the new object
                if old is not None:
                    self._policy.remove(key)
                    self._retire(old)
                off = self._arena.alloc(alloc_len)  # the common case: no eviction needed
                if off is None and alloc_len <= self._arena.capacity:
                    off = self._allocate(alloc_len)
                if off is None:
                    self._stats.rejected += 1
                    self._warn("full", "memory tier: object %r (%d bytes) does not fit in %d bytes; not cached",
                               key, n, self._arena.capacity)
                    return False
            # The copy runs without the lock: the reserved span is in neither the index nor the free list.
            if n:
                # one memmove (GIL released): torch's per-op overhead matters next to a 2 MiB copy
                addr, keep = obj.address()
                ctypes.memmove(self._pool_ptr + off, addr, n)
                del keep
            header = obj.header  # shared: a lower tier may fill in its checksum, which is the same bytes'
            with self._lock:
                old = self._index.pop(key, None)
                if old is not None:
                    self._policy.remove(key)
                    self._retire(old)
                self._index[key] = _Slot(header, off, alloc_len)
                self._policy.insert(key)
                self._stats.puts += 1
                self._stats.bytes_written += n
            return True
        finally:
            obj.release()

    def _lease(self, key: str, *, count: bool) -> Encoded | None:
        with self._lock:
            slot = self._index.get(key)
            if slot is None:
                if count:
                    self._stats.misses += 1
                return None
            slot.pins += 1
            if count:
                self._policy.touch(key)
                self._stats.hits += 1
                self._stats.bytes_read += slot.header.payload_len
        payload = self._pool_np[slot.offset:slot.offset + slot.header.payload_len]
        return Encoded(slot.header, payload, owned=False, release=lambda: self._unpin(slot),
                       addr=self._pool_ptr + slot.offset)

    def get(self, key: str) -> Encoded | None:
        """A pinned view of the object (release it!), or None. Counts a hit/miss and refreshes recency."""
        return self._lease(key, count=True)

    def peek(self, key: str) -> Encoded | None:
        """Like get, without touching counters or recency (used to feed lower tiers)."""
        return self._lease(key, count=False)

    def remove(self, key: str) -> bool:
        with self._lock:
            slot = self._index.pop(key, None)
            if slot is None:
                return False
            self._policy.remove(key)
            self._retire(slot)
            return True

    def clear(self) -> None:
        with self._lock:
            for key in list(self._index):
                self.remove(key)

    def flush(self, timeout: float | None = None) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self.clear()
            self._closed = True

    def assert_no_leaks(self) -> None:
        """Raise AssertionError unless every lease was released and the pool accounting is exact."""
        with self._lock:
            pinned = {k: s.pins for k, s in self._index.items() if s.pins}
            assert not pinned, f"memory tier: slots still pinned: {pinned}"
            assert not self._dead_pinned, f"memory tier: {len(self._dead_pinned)} removed slots still pinned"
            used = [(s.offset, s.alloc_len) for s in self._index.values()]
            self._arena.check(used)
            assert len(self._policy) == len(self._index), "policy and index disagree"
