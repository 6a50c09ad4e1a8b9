"""The ``Tier`` protocol every storage tier implements, and the counters they share.

Tiers store encoded objects (:class:`lmkv.storage.objects.Encoded`: header + payload). ``put`` takes ownership
of the object it is given (it releases it when it is done, possibly later on a background thread); ``get``
hands an object to the caller, who must release it. ``put`` may complete asynchronously: ``flush`` waits for
every write accepted so far, and reads see pending writes (read-your-writes) in the meantime. A tier never
raises for a miss, a corrupt object or an unreachable backend: those are misses (with a warning) and dropped
writes, counted in :meth:`stats`.

The ``*_many`` forms take a batch and answer in order; a remote tier answers a batch in one round trip (Redis:
one pipeline), which is how :class:`lmkv.storage.TieredStore` asks each tier once per call. ``iter_many`` is
``get_many`` handed over one object at a time (Redis: all requests in one write, replies read as consumed).
``shared`` says whether another process sees what this tier holds (disk, Redis: yes; the process's RAM pool:
no): the vLLM scheduler looks up only those. Local tiers get the batch forms from :class:`OneByOne`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from lmkv.storage.objects import Encoded

log = logging.getLogger("lmkv.storage")


@runtime_checkable
class Tier(Protocol):
    name: str
    shared: bool

    def contains(self, key: str) -> bool: ...

    def contains_many(self, keys: Sequence[str]) -> list[bool]: ...

    def put(self, key: str, obj: Encoded) -> bool: ...

    def put_many(self, items: Sequence[tuple[str, Encoded]]) -> None: ...

    def get(self, key: str) -> Encoded | None: ...

    def get_many(self, keys: Sequence[str]) -> list[Encoded | None]: ...

    def iter_many(self, keys: Sequence[str]) -> Iterator[Encoded | None]: ...

    def remove(self, key: str) -> bool: ...

    def usage_bytes(self) -> int: ...

    def capacity_bytes(self) -> int: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Queued:
    """A write (or, with ``obj`` None, a removal) a tier accepted and has not finished. Its source object has one
    reference for the writer and one per reader of the pending object (read-your-writes): whoever drops the last
    one releases it (often a pinned view of the memory tier)."""

    key: str
    obj: Encoded | None
    size: int = 0  # bytes the tier accounts for it
    refs: int = 1

    def lease(self, lock: threading.RLock | threading.Lock) -> Encoded:
        """The pending object for a reader, holding a reference (``lock``: the tier's, held or not)."""
        assert self.obj is not None
        with lock:
            self.refs += 1
        obj = self.obj
        return Encoded(obj.header, obj.payload, owned=False, release=lambda: self.drop(lock), keepalive=obj.keepalive)

    def drop(self, lock: threading.RLock | threading.Lock) -> None:
        with lock:
            self.refs -= 1
            last = self.refs == 0
        if last and self.obj is not None:
            self.obj.release()


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    puts: int = 0
    evictions: int = 0
    rejected: int = 0  # writes dropped: larger than capacity, no space, disk full, backend down
    corrupt: int = 0
    errors: int = 0
    # kinds of errors (each also counted in ``errors``), exported as lmkv_tier_errors_total{kind}
    timeouts: int = 0  # a call to the backend ran past its timeout
    unavailable: int = 0  # the backend refused or dropped the connection (down, unreachable)
    write_failed: int = 0  # an accepted write failed for another reason (I/O error, error reply)

    def count_down(self, exc: BaseException, timeout: type[BaseException] = TimeoutError) -> None:
        """A failed call to a remote backend, classified as a timeout (``TimeoutError`` or the client library's
        ``timeout`` class) or as unavailable; the caller holds its tier's lock."""
        self.errors += 1
        if isinstance(exc, (TimeoutError, timeout)):
            self.timeouts += 1
        else:
            self.unavailable += 1

    def count_read(self, obj: Encoded | None) -> None:
        """A hit (and its bytes) or a miss; the caller holds its tier's lock."""
        if obj is None:
            self.misses += 1
        else:
            self.hits += 1
            self.bytes_read += obj.header.total_len

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class WarnOnce:
    """Log a warning the first time per (tier, kind), then at debug level: a flapping backend must not flood
    the logs of an inference server."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: str, msg: str, *args: object) -> None:
        with self._lock:
            first = kind not in self._seen
            self._seen.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, msg, *args)

    def reset(self, kind: str) -> None:
        with self._lock:
            self._seen.discard(kind)


class OneByOne:
    """The batch forms of the Tier protocol for a local tier, where a batch costs what its items cost."""

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.contains(k) for k in keys]  # type: ignore[attr-defined]

    def get_many(self, keys: Sequence[str]) -> list[Encoded | None]:
        return [self.get(k) for k in keys]  # type: ignore[attr-defined]

    def iter_many(self, keys: Sequence[str]) -> Iterator[Encoded | None]:
        """Lazily, in order: a file is read only when the consumer gets to it."""
        return (self.get(k) for k in keys)  # type: ignore[attr-defined]

    def put_many(self, items: Sequence[tuple[str, Encoded]]) -> None:
        for key, obj in items:
            self.put(key, obj)  # type: ignore[attr-defined]
