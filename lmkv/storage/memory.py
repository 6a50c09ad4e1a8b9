"""CPU RAM tier: objects live in one preallocated pool; byte capacity is the pool size, so it cannot be exceeded.

Limits: the pool is one contiguous uint8 tensor (pinned when CUDA is present and ``pinned`` is set), carved by
a first-fit allocator with coalescing, 64-byte aligned. Fragmentation can make a put evict more than the
strictly needed bytes; an object larger than the pool is rejected (a dropped write, never an error). Objects
are kept unverified (RAM is trusted): the payload checksum is computed lazily, once, when the object is first
written to a lower tier.

Prefault: with ``prefault`` the pool's pages are touched at start on a background thread, 64 MiB at a time,
and each span joins the allocator once it is touched. A copy into a fresh page costs a page fault (about 3x a
copy into mapped memory here), and the first touch of 4 GiB took 13 s when it happened lazily on the request
path. ``capacity_bytes`` reports what is usable so far; a put that finds no room while spans are still
untouched touches the next span itself before it considers evicting anything.

Copies are ``torch`` ``copy_`` calls, which run on torch's intra-op threads (every core the process may use),
from the caller's tensor, whatever its strides or device, straight into the slot: a chunk sliced out of a
longer KV tensor is copied once, not made contiguous first.

Eviction follows the policy only; evicting a pinned object unlinks it at once and its bytes come back when
it is released, so a put into a full pool may wait (bounded) for a lower tier that is still writing.

Ownership: ``get``/``peek`` return an :class:`Encoded` whose payload is a view into the pool plus a pin on
its slot. A pinned slot is never evicted or reused; ``remove`` or an overwrite of a pinned key unlinks it at
once and frees its bytes at the last release. ``assert_no_leaks`` checks that every pin was released and that
allocated + free bytes add up to the pool.
"""

from __future__ import annotations

import atexit
import ctypes
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmkv.storage.base import OneByOne, TierStats, WarnOnce
from lmkv.storage.objects import Encoded, ObjectHeader
from lmkv.storage.policy import make_policy
from lmkv.types import DTYPES_BY_CODE

ALIGN = 64
PIN_WAIT = 5.0  # seconds a put waits for evicted-but-pinned bytes (a lower tier still writing them)
FAULT_STEP = 64 << 20  # bytes touched per prefault step (~0.1 s here): the unit in which capacity comes up


# Tiers still touching their pool: stopped at interpreter exit, before daemon threads are frozen mid-touch (a
# thread frozen inside a torch op aborts the process: "terminate called without an active exception").
_PREFAULTING: weakref.WeakSet[MemoryTier] = weakref.WeakSet()


@atexit.register
def _stop_prefaulting() -> None:
    for tier in list(_PREFAULTING):
        tier._stop_prefault()


def _round(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Arena:
    """First-fit byte allocator over ``[0, capacity)`` with neighbour coalescing (not thread-safe)."""

    def __init__(self, capacity: int, usable: int | None = None) -> None:
        self.capacity = capacity
        self.limit = capacity if usable is None else usable  # [0, limit) is managed; grow() extends it
        self._free: dict[int, int] = {0: self.limit} if self.limit else {}  # start -> size
        self._ends: dict[int, int] = {self.limit: 0} if self.limit else {}  # end -> start
        self.free_bytes = self.limit

    def grow(self, n: int) -> None:
        """Add ``[limit, limit + n)`` as free space (coalesced with a free span that ends at ``limit``)."""
        n = min(n, self.capacity - self.limit)
        if n > 0:
            start, self.limit = self.limit, self.limit + n
            self.free(start, n)

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
        assert pos == self.limit, f"arena spans end at {pos}, limit {self.limit}"
        assert sum(self._free.values()) == self.free_bytes


@dataclass(eq=False)
class _Slot:
    header: ObjectHeader
    offset: int
    alloc_len: int
    payload: torch.Tensor  # uint8 view of the slot's payload bytes, made once (a torch slice costs ~1 us)
    pins: int = 0
    dead: bool = False  # unlinked from the index; freed at the last unpin


class MemoryTier(OneByOne):
    name = "memory"
    shared = False  # this process's RAM
    # Called as on_removed(key, header), under the tier's lock, for every object that leaves the tier (evicted,
    # removed, cleared; not one replaced by a new put): TieredStore.subscribe installs its event hook here.
    on_removed: Callable[[str, ObjectHeader], object] | None = None

    def __init__(self, capacity: int, *, policy: str = "lru", pinned: bool = False, prefault: bool = False) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity must be a byte count >= 0, got {capacity!r}")
        capacity = capacity // ALIGN * ALIGN
        pin = bool(pinned and torch.cuda.is_available())
        self._pool = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        self._pool_ptr = self._pool.data_ptr()
        self._views: dict[torch.dtype, torch.Tensor] = {torch.uint8: self._pool}  # the pool per element type
        self._arena = Arena(capacity, usable=0 if prefault else capacity)
        self._index: dict[str, _Slot] = {}
        self._policy = make_policy(policy)
        self._lock = threading.RLock()
        self._grow_lock = threading.Lock()  # one toucher at a time, so the usable span grows in order
        self._stats = TierStats()
        self._dead_pinned: set[_Slot] = set()  # unlinked slots that readers or writers still hold
        self._dead_bytes = 0
        self._freed = threading.Condition(self._lock)
        self._warn = WarnOnce()
        self._closed = False
        self._prefaulter: threading.Thread | None = None
        self._closed_prefault = False
        if prefault and capacity:
            self._prefaulter = threading.Thread(target=self._prefault, name="lmkv-memory-prefault", daemon=True)
            _PREFAULTING.add(self)
            self._prefaulter.start()

    # -- prefault ------------------------------------------------------------------------------------
    def _grow(self, background: bool = False) -> bool:
        """Touch the next untouched span of the pool and hand it to the allocator; False when none is left (or,
        for the ``background`` prefaulter, when it was told to stop)."""
        with self._grow_lock:
            start = self._arena.limit  # only this lock's holder moves limit
            n = min(FAULT_STEP, self._arena.capacity - start)
            if n <= 0 or self._closed or (background and self._closed_prefault):
                return False
            self._pool[start:start + n].zero_()  # the page faults happen here, off the tier lock
            with self._lock:
                self._arena.grow(n)
                self._freed.notify_all()
            return True

    def _prefault(self) -> None:
        try:
            while self._grow(background=True):
                pass
        finally:
            _PREFAULTING.discard(self)

    def _stop_prefault(self) -> None:
        """Stop touching (the step in progress ends first); the untouched rest is touched by puts as needed."""
        self._closed_prefault = True
        if self._prefaulter is not None:
            self._prefaulter.join()

    def wait_prefaulted(self, timeout: float | None = None) -> bool:
        """Wait until the whole pool is usable (True), or ``timeout`` seconds (False)."""
        if self._prefaulter is not None:
            self._prefaulter.join(timeout)
        return self._arena.limit == self._arena.capacity

    # -- bookkeeping ---------------------------------------------------------------------------------
    def capacity_bytes(self) -> int:
        """Usable bytes: the configured capacity once prefaulting is done, the part touched so far before."""
        return self._arena.limit

    def usage_bytes(self) -> int:
        with self._lock:
            return self._arena.limit - self._arena.free_bytes

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats.as_dict(), "usage_bytes": self.usage_bytes(), "objects": len(self._index),
                    "capacity_bytes": self._arena.limit, "capacity_target": self._arena.capacity}

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
                    if self.on_removed is not None:
                        self.on_removed(victim, slot.header)
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

    def _reserve(self, key: str, n: int) -> int | None:
        """Offset of ``n`` free bytes (evicting in policy order once the whole pool is usable), or None."""
        first = True
        while True:
            with self._lock:
                if self._closed:
                    return None
                if first:  # replaced: the old object's bytes count as free for the new one
                    old = self._index.pop(key, None)
                    if old is not None:
                        self._policy.remove(key)
                        self._retire(old)
                    first = False
                off = self._arena.alloc(n)  # the common case: no eviction needed
                if off is not None or n > self._arena.capacity:
                    return off
                if self._arena.limit == self._arena.capacity:
                    return self._allocate(n)
                if self._prefaulter is not None and self._prefaulter.is_alive():
                    # the prefaulter adds a span every few ms (and would win the grow lock over and over)
                    self._freed.wait(1.0)
                    continue
            if not self._grow():  # untouched spans and no prefaulter: touch the next one rather than evict
                return None  # closed meanwhile

    def put(self, key: str, obj: Encoded) -> bool:
        """Copy ``obj`` into the pool (synchronously) and release it. False when it does not fit.

        A tensor payload may have any strides and live on any device: it is copied once, by ``copy_``.
        """
        try:
            src = obj.payload
            n = obj.header.payload_len
            if isinstance(src, torch.Tensor) and src.numel() * src.element_size() != n:
                raise ValueError(f"payload tensor holds {src.numel() * src.element_size()} bytes, header says {n}")
            return self._store(obj.header, lambda dst: self._copy_in(dst, obj), pins=0) is not None
        finally:
            obj.release()

    def put_filled(self, header: ObjectHeader, fill: Callable[[torch.Tensor], object]) -> Encoded | None:
        """Store an object that ``fill(dst)`` writes straight into its slot; a pinned lease of it, or None.

        ``dst`` is a tensor of ``header``'s dtype and shape over the reserved slot (a gather from an engine's
        paged cache writes there: one copy). None when it does not fit (``fill`` is not called). An exception in
        ``fill`` frees the slot and propagates; nothing is published.
        """
        dtype = DTYPES_BY_CODE[header.dtype_code]
        slot = self._store(header, lambda dst: fill(dst.view(dtype).view(header.shape)), pins=1)
        if slot is None:
            return None
        return Encoded(header, slot.payload, owned=False, release=lambda: self._unpin(slot),
                       addr=self._pool_ptr + slot.offset)

    def _store(self, header: ObjectHeader, fill: Callable[[torch.Tensor], object], pins: int) -> _Slot | None:
        """Reserve a slot, ``fill`` its uint8 payload view without the lock (the span is in neither the index
        nor the free list), then publish it under ``header.key`` with ``pins`` pins; None when it does not fit."""
        n = header.payload_len
        alloc_len = _round(n)
        off = self._reserve(header.key, alloc_len)
        if off is None:
            with self._lock:
                self._stats.rejected += 1
            self._warn("full", "memory tier: object %r (%d bytes) does not fit in %d bytes; not cached",
                       header.key, n, self._arena.capacity)
            return None
        payload = self._pool[off:off + n]
        try:
            if n:
                fill(payload)
        except BaseException:
            with self._lock:
                self._arena.free(off, alloc_len)
            raise
        # shared header: a lower tier may fill in its checksum, which is the same bytes'
        slot = _Slot(header, off, alloc_len, payload, pins=pins)
        with self._lock:
            old = self._index.pop(header.key, None)
            if old is not None:
                self._policy.remove(header.key)
                self._retire(old)
            self._index[header.key] = slot
            self._policy.insert(header.key)
            self._stats.puts += 1
            self._stats.bytes_written += n
        return slot

    def _copy_in(self, dst: torch.Tensor, obj: Encoded) -> None:
        src = obj.payload
        if isinstance(src, torch.Tensor):
            self._typed(dst, src.dtype, src.shape).copy_(src)  # strided or on another device: still one copy
        else:
            addr, keep = obj.address()
            ctypes.memmove(dst.data_ptr(), addr, obj.header.payload_len)
            del keep

    def _typed(self, payload: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """``payload`` (a uint8 slice of the pool) as ``dtype`` of ``shape``: a slice of a per-dtype view of the
        whole pool (slots are 64-byte aligned), one torch op fewer per copy than viewing the slice twice."""
        typed = self._views.get(dtype)
        if typed is None:
            typed = self._views[dtype] = self._pool.view(dtype)
        start = (payload.data_ptr() - self._pool_ptr) // dtype.itemsize
        return typed[start:start + payload.numel() // dtype.itemsize].view(shape)

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
        return Encoded(slot.header, slot.payload, owned=False, release=lambda: self._unpin(slot),
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
            if self.on_removed is not None:
                self.on_removed(key, slot.header)
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
        self._stop_prefault()

    def assert_no_leaks(self) -> None:
        """Raise AssertionError unless every lease was released and the pool accounting is exact."""
        with self._lock:
            pinned = {k: s.pins for k, s in self._index.items() if s.pins}
            assert not pinned, f"memory tier: slots still pinned: {pinned}"
            assert not self._dead_pinned, f"memory tier: {len(self._dead_pinned)} removed slots still pinned"
            used = [(s.offset, s.alloc_len) for s in self._index.values()]
            self._arena.check(used)
            assert len(self._policy) == len(self._index), "policy and index disagree"
