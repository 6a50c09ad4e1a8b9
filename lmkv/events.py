"""KV events: what a store holds, as it changes, for whoever routes requests by cache contents.

A :class:`KVEvent` says that one tier of a :class:`lmkv.storage.TieredStore` now holds a chunk (``stored``) or
no longer does (``removed``: evicted for room, removed, dropped as corrupt, cleared, or a write it had accepted
failed). Subscribers (``TieredStore.subscribe``, ``KVEngine.subscribe``; the vLLM connector turns them into
vLLM's ``BlockStored`` / ``BlockRemoved``) see every tier's events, so "the chunk left the store" is a
``removed`` after which no tier holds the key (ask the store: another tier may still have it).

Delivery is asynchronous, on one thread per :class:`EventBus`, in publication order. Tiers publish while they
hold their own locks (an eviction happens inside a put); a subscriber that asks the store something back (does
any tier still hold this key?) would otherwise deadlock two tiers that evict at once. Publishing costs the
caller one append; with nobody subscribed, the tiers' hooks are not even installed. ``flush`` waits until
everything published so far was delivered (``TieredStore.flush`` calls it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

log = logging.getLogger("lmkv.events")

STORED = "stored"
REMOVED = "removed"
KINDS = (STORED, REMOVED)


@dataclass(frozen=True)
class KVEvent:
    """One tier's change for one chunk.

    Attributes:
        kind: ``"stored"`` or ``"removed"``.
        key: the chunk's storage key (``lmkv.keys``), as in ``ChunkPlan.keys``.
        num_tokens: tokens of the chunk, from the stored object's shape (dim 2 of ``[L, 2, T, H, D]`` and of MLA's
            ``[L, 1, T, D]``); 0 when the tier no longer knows (an object whose header is unreadable).
        tier: the tier's name (``memory``, ``node``, ``disk``, ``redis``).
        model: the model id the key names ('' for a key that is not an lmkv storage key).
        time: ``time.time()`` when it was published.
    """

    kind: Literal["stored", "removed"]
    key: str
    num_tokens: int
    tier: str
    model: str
    time: float = field(default_factory=time.time)


def tokens_of(shape: tuple[int, ...] | None) -> int:
    """Tokens of a stored chunk of ``shape``: dim 2 of ``[L, 2, T, H, D]`` (MLA ``[L, 1, T, D]``), else 0."""
    return int(shape[2]) if shape is not None and len(shape) >= 3 else 0


def model_of(key: str) -> str:
    """The model id a storage key names (its first field, percent-decoded); '' for any other text."""
    parts = key.split("+")
    return unquote(parts[0]) if len(parts) == 6 else ""


Subscriber = Callable[[KVEvent], object]


class EventBus:
    """Thread-safe fan-out of :class:`KVEvent` to subscribers, delivered in order on the bus's own thread.

    A subscriber that raises is logged (a warning the first time, then at debug level) and keeps receiving
    events: a faulty subscriber never breaks storage nor the other subscribers.
    """

    def __init__(self, name: str = "lmkv-events") -> None:
        self._name = name
        self._subs: tuple[Subscriber, ...] = ()  # replaced, never mutated: delivery reads it without the lock
        self._queue: deque[KVEvent] = deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._published = 0
        self._delivered = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warned: set[int] = set()

    @property
    def active(self) -> bool:
        """Whether anyone listens (read without a lock: the hot path's only cost when nobody does)."""
        return bool(self._subs)

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(event)`` for every event published from now on; returns the function that unsubscribes."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        with self._lock:
            if self._closed:
                raise ValueError("event bus is closed")
            self._subs = (*self._subs, fn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

        def unsubscribe() -> None:
            with self._lock:
                subs = list(self._subs)
                if fn in subs:
                    subs.remove(fn)
                self._subs = tuple(subs)

        return unsubscribe

    def publish(self, event: KVEvent) -> None:
        """Queue ``event`` for the subscribers; nothing happens when there are none (or the bus is closed)."""
        if not self._subs:
            return
        with self._lock:
            if self._closed:
                return
            self._queue.append(event)
            self._published += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event published so far was delivered; False on timeout. From a subscriber (the bus's
        own thread) it returns at once: waiting for itself would never end."""
        if threading.current_thread() is self._thread:
            return False
        with self._lock:
            target = self._published
            return self._cond.wait_for(lambda: self._delivered >= target or self._thread is None, timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Deliver what is queued, then stop the thread; later publications are dropped."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                event = self._queue.popleft()
                subs = self._subs
            for fn in subs:
                self._deliver(fn, event)
            with self._lock:
                self._delivered += 1
                self._cond.notify_all()

    def _deliver(self, fn: Subscriber, event: KVEvent) -> None:
        try:
            fn(event)
        except Exception as exc:  # noqa: BLE001 - a subscriber's bug must not break storage
            first = id(fn) not in self._warned
            self._warned.add(id(fn))
            log.log(logging.WARNING if first else logging.DEBUG,
                    "events: subscriber %r raised on a %s event of %r (%s: %s); it keeps its subscription",
                    fn, event.kind, event.key, type(exc).__name__, exc)
