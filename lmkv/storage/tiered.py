"""TieredStore: write-through to every tier, waterfall reads with promotion, prefetch, per-tier counters.

Tiers are ordered hot to cold (memory, disk, redis). ``put`` copies the tensor into the memory tier on the
caller's thread and hands the lower tiers a pinned view of that copy (a lease), so the caller may reuse its
tensor as soon as ``put`` returns and the lower tiers write in the background; ``flush`` waits for them.
``get`` asks the tiers in order; a hit below the top is promoted into the tiers above it. A fingerprint
mismatch, or a corrupt or foreign object, is a miss with a warning (the corrupt object is deleted), never an
exception and never wrong KV. Tiers whose serde is ``cachegen`` encode on a background thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from lmkv.errors import CorruptObject
from lmkv.events import REMOVED, STORED, EventBus, KVEvent, Subscriber, model_of, tokens_of
from lmkv.plan import leading_hits
from lmkv.storage.base import Tier, log
from lmkv.storage.buffers import BufferPool
from lmkv.storage.memory import MemoryTier
from lmkv.storage.objects import MAX_FINGERPRINT, MAX_NDIM, Encoded, dtype_code, validate_fields
from lmkv.storage.serde import RawSerde, Serde, get_serde, serde_for_code

_LAST_TIER_KEYS = 4096


def _check_put_args(key: Any, kv: Any, fingerprint: Any) -> None:
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    dtype_code(kv.dtype)
    if kv.dim() > MAX_NDIM:
        raise ValueError(f"kv has {kv.dim()} dimensions; the limit is {MAX_NDIM}")
    validate_fields(key, fingerprint, tuple(kv.shape))


class TieredStore:
    def __init__(self, tiers: Sequence[Tier], serdes: Sequence[str] | None = None, *, codec_config: Any = None,
                 background_threads: int = 1) -> None:
        if not tiers:
            raise ValueError("tiers must name at least one tier")
        self.tiers: list[Tier] = list(tiers)
        names = serdes or ["raw"] * len(self.tiers)
        if len(names) != len(self.tiers):
            raise ValueError(f"serdes has {len(names)} entries for {len(self.tiers)} tiers")
        self.serdes: list[Serde] = [get_serde(n, codec_config) for n in names]
        self._codec_config = codec_config
        self._memory = self.tiers[0] if isinstance(self.tiers[0], MemoryTier) and names[0] == "raw" else None
        self._bg = ThreadPoolExecutor(background_threads, thread_name_prefix="lmkv-store")
        self._lock = threading.RLock()
        self._bg_jobs: set[Future] = set()
        self._epoch: dict[str, int] = {}  # bumped by put/remove so a stale background encode is discarded
        self._last_tier: OrderedDict[str, str] = OrderedDict()
        self._counts = {"hits": 0, "misses": 0, "fingerprint_mismatch": 0, "corrupt": 0, "promotions": 0}
        # The same events per tier (the one the object came from), and seconds per (codec, encode|decode): plain
        # numbers that lmkv.metrics reads at scrape time, so the read path never calls a metrics library.
        self._tier_counts = {t.name: {"corrupt": 0, "fingerprint_mismatch": 0, "promotions": 0} for t in self.tiers}
        self._codec_s: dict[tuple[str, str], float] = {}
        self._closed = False
        self._events = EventBus("lmkv-store-events")  # see subscribe(); idle until someone subscribes

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any = None) -> TieredStore:
        """Memory + disk by default; Redis when ``redis.enabled``. ``config`` is an LmkvConfig, a YAML path,
        a dict or None (defaults + environment), as :func:`lmkv.config.load` takes."""
        from lmkv.config import load
        from lmkv.paths import cache_dir

        cfg = load(config)
        tiers: list[Tier] = []
        serdes: list[str] = []
        reads = BufferPool(256 << 20)  # one pool of idle read buffers for disk and Redis
        if cfg.memory.enabled:
            tiers.append(MemoryTier(cfg.memory.capacity, policy=cfg.memory.policy, pinned=cfg.memory.pinned,
                                    prefault=cfg.memory.prefault))
            serdes.append(cfg.memory.serde)
        if cfg.node.enabled:
            from lmkv.storage.node import NodeTier

            tiers.append(NodeTier(cfg.node.path, cfg.node.capacity, policy=cfg.node.policy, buffer_pool=reads))
            serdes.append(cfg.node.serde)
        if cfg.disk.enabled:
            from lmkv.storage.disk import DiskTier

            path = cfg.disk.path or str(cache_dir() / "disk")
            tiers.append(DiskTier(path, cfg.disk.capacity, io_threads=cfg.disk.io_threads, o_direct=cfg.disk.o_direct,
                                  policy=cfg.disk.policy, buffer_pool=reads))
            serdes.append(cfg.disk.serde)
        if cfg.redis.enabled:
            from lmkv.storage.redis_tier import RedisTier

            r = cfg.redis
            if r.cluster:
                from lmkv.storage.redis_cluster import RedisClusterTier as RedisTier  # type: ignore[assignment]
            tiers.append(RedisTier(r.url, password=r.password, key_prefix=r.key_prefix,
                                   socket_timeout=r.socket_timeout, retry_backoff=r.retry_backoff, buffer_pool=reads))
            serdes.append(r.serde)
        if not tiers:
            raise ValueError("configuration enables no storage tier (memory, node, disk and redis are all disabled)")
        return cls(tiers, serdes, codec_config=cfg.codec)

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier named {name!r} (have {[t.name for t in self.tiers]})")

    # -- writes --------------------------------------------------------------------------------------
    def put(self, key: str, kv: torch.Tensor, *, fingerprint: bytes) -> None:
        """Store ``kv`` under ``key`` in every tier: the top tier synchronously, the others in the background."""
        _check_put_args(key, kv, fingerprint)
        if self._closed:
            raise ValueError("store is closed")
        self._store(range(len(self.tiers)), key, kv.detach(), bytes(fingerprint))

    def put_many(self, items: Sequence[tuple[str, torch.Tensor, bytes]]) -> None:
        """``put`` of every ``(key, kv, fingerprint)``; arguments are all checked before anything is written."""
        items = list(items)
        for k, kv, fp in items:
            _check_put_args(k, kv, fp)
        for k, kv, fp in items:
            self._store(range(len(self.tiers)), k, kv.detach(), bytes(fp))

    def batched_put(self, keys: Sequence[str], kvs: Sequence[torch.Tensor], fingerprints: Sequence[bytes]) -> None:
        if not (len(keys) == len(kvs) == len(fingerprints)):
            raise ValueError("keys, kvs and fingerprints must have the same length")
        self.put_many(list(zip(keys, kvs, fingerprints, strict=True)))

    def _bump(self, key: str) -> None:
        with self._lock:
            if key in self._epoch:
                self._epoch[key] += 1

    def _store(self, which: Sequence[int] | range, key: str, kv: torch.Tensor, fingerprint: bytes) -> None:
        """Write ``kv`` (any strides, any device) to the tiers ``which``, copying it once: into the memory tier's
        pool when it is among them (the others get a lease of that copy), else into a private CPU snapshot."""
        self._bump(key)
        which = list(which)
        in_memory = False
        if self._memory is not None and which and which[0] == 0:
            in_memory = self._memory.put(key, RawSerde().encode(key, kv, fingerprint, as_is=True))
            if in_memory and self._events.active:
                self._publish(STORED, key, tuple(kv.shape), self._memory.name)
            which = which[1:]
        self._store_below(which, key, kv, fingerprint, in_memory=in_memory)

    def _store_below(self, which: list[int], key: str, kv: torch.Tensor, fingerprint: bytes, *, in_memory: bool,
                     private: bool = False) -> None:
        """Write to the tiers ``which`` (not the memory tier) from a lease of the memory tier's copy when there
        is one (``in_memory``), else from a snapshot of ``kv`` (``private``: kv is ours already, no snapshot)."""
        snapshot: torch.Tensor | None = kv if private else None
        for i in which:
            tier, serde = self.tiers[i], self.serdes[i]
            lease = self._memory.peek(key) if in_memory and self._memory is not None else None
            if lease is None and snapshot is None:
                # the caller may overwrite kv once put returns: one contiguous CPU copy of it
                snapshot = kv.to("cpu", memory_format=torch.contiguous_format, copy=True)
            if isinstance(serde, RawSerde):
                obj = lease if lease is not None else RawSerde().encode(key, snapshot, fingerprint)
                if tier.put(key, obj) and self._events.active:
                    self._publish(STORED, key, tuple(kv.shape), tier.name)
            else:
                self._submit_encode(i, key, lease, snapshot, kv.dtype, tuple(kv.shape), fingerprint)

    def put_filled(self, key: str, shape: Sequence[int], dtype: torch.dtype, fingerprint: bytes,
                   fill: Callable[[torch.Tensor], object]) -> None:
        """Store the tensor of ``dtype`` and ``shape`` that ``fill(dst)`` writes into ``dst``: the memory tier's own
        slot when there is one (a gather from a paged cache lands in the pool: one copy), else a fresh tensor."""
        header = RawSerde().header(key, tuple(int(s) for s in shape), dtype, bytes(fingerprint))
        if self._closed:
            raise ValueError("store is closed")
        self._bump(key)
        below = list(range(1, len(self.tiers))) if self._memory is not None else list(range(len(self.tiers)))
        lease = self._memory.put_filled(header, fill) if self._memory is not None else None
        if lease is not None and self._events.active:
            self._publish(STORED, key, header.shape, self.tiers[0].name)
        if lease is None:
            kv = torch.empty(header.shape, dtype=dtype)
            fill(kv)
            self._store_below(below, key, kv, header.fingerprint, in_memory=False, private=True)
            return
        with lease:  # pinned: the view stays valid even if the key is evicted meanwhile
            self._store_below(below, key, RawSerde().view(lease), header.fingerprint, in_memory=True)

    def _submit_encode(self, i: int, key: str, lease: Encoded | None, snapshot: torch.Tensor | None,
                       dtype: torch.dtype, shape: tuple[int, ...], fingerprint: bytes) -> None:
        with self._lock:
            epoch = self._epoch.setdefault(key, 0)

        def job() -> None:
            try:
                if lease is not None:
                    src = RawSerde().decode(lease)  # a private copy: the lease is released right after
                else:
                    src = snapshot
                t0 = time.perf_counter()
                obj = self.serdes[i].encode(key, src, fingerprint)
                self._count_codec(self.serdes[i].name, "encode", t0)
            except Exception as exc:
                log.warning("storage: %s encode of %r for tier %s failed (%s); not stored there",
                            self.serdes[i].name, key, self.tiers[i].name, exc)
                return
            finally:
                if lease is not None:
                    lease.release()
            with self._lock:
                if self._epoch.get(key) == epoch:
                    if self.tiers[i].put(key, obj) and self._events.active:
                        self._publish(STORED, key, shape, self.tiers[i].name)
                else:
                    obj.release()

        self._spawn(job)

    def _count_codec(self, codec: str, op: str, t0: float) -> None:
        """Add the seconds since ``t0`` (a ``perf_counter`` reading) to the ``codec``'s ``op`` (encode | decode)."""
        dt = time.perf_counter() - t0
        with self._lock:
            self._codec_s[(codec, op)] = self._codec_s.get((codec, op), 0.0) + dt

    def _spawn(self, fn: Any) -> Future:
        fut = self._bg.submit(fn)
        with self._lock:
            self._bg_jobs.add(fut)
        fut.add_done_callback(self._job_done)
        return fut

    def _job_done(self, fut: Future) -> None:
        with self._lock:
            self._bg_jobs.discard(fut)
        if fut.exception() is not None:  # pragma: no cover - jobs catch their own errors
            log.warning("storage: background job failed: %s", fut.exception())

    # -- reads ---------------------------------------------------------------------------------------
    def _decode(self, idx: int, key: str, obj: Encoded, fingerprint: bytes | None, out: torch.Tensor | None,
                borrow: bool = False) -> tuple[torch.Tensor, Encoded | None] | None:
        """Decode one hit: ``(kv, held)``, or None (with a warning) for a fingerprint mismatch or a corrupt object.

        ``borrow``: a raw object is lent as a zero-copy view and ``held`` is the object it views, which the
        caller releases when done with ``kv``; otherwise ``held`` is None and ``obj`` is released here.
        """
        held = None
        try:
            h = obj.header
            if h.key != key:  # tiers check this too; a second check costs nothing
                log.warning("storage: tier %s returned key %r for %r; treating it as a miss",
                            self.tiers[idx].name, h.key, key)
                return None
            if fingerprint is not None and h.fingerprint != fingerprint:
                log.warning("storage: %r is stored for other tokens (fingerprint mismatch in tier %s); miss",
                            key, self.tiers[idx].name)
                with self._lock:
                    self._counts["fingerprint_mismatch"] += 1
                    self._tier_counts[self.tiers[idx].name]["fingerprint_mismatch"] += 1
                return None
            try:
                serde = serde_for_code(h.serde, self._codec_config)
                if borrow and out is None and isinstance(serde, RawSerde):
                    kv, held = serde.view(obj), obj
                    return kv, held  # a zero-copy view: no decoding work to time
                t0 = time.perf_counter()
                kv = serde.decode(obj, out)
                self._count_codec(serde.name, "decode", t0)
                return kv, None
            except CorruptObject as exc:
                log.warning("storage: object %r in tier %s does not decode (%s); miss", key,
                            self.tiers[idx].name, exc)
                with self._lock:
                    self._counts["corrupt"] += 1
                    self._tier_counts[self.tiers[idx].name]["corrupt"] += 1
                if self.tiers[idx].remove(key) and not hasattr(self.tiers[idx], "on_removed"):
                    self._publish(REMOVED, key, h.shape, self.tiers[idx].name)  # a tier with a hook reports it
                return None
        finally:
            if held is None:
                obj.release()

    def _hit(self, idx: int, key: str, kv: torch.Tensor, fingerprint: bytes) -> None:
        with self._lock:
            self._counts["hits"] += 1
            self._last_tier[key] = self.tiers[idx].name
            self._last_tier.move_to_end(key)
            while len(self._last_tier) > _LAST_TIER_KEYS:
                self._last_tier.popitem(last=False)
            if idx:
                self._counts["promotions"] += 1
                self._tier_counts[self.tiers[idx].name]["promotions"] += 1  # counted where the object came from
        if idx:
            self._store(range(idx), key, kv, fingerprint)

    def _miss(self, key: str) -> None:
        with self._lock:
            self._counts["misses"] += 1
            self._last_tier.pop(key, None)

    def get_with_tier(self, key: str, *, fingerprint: bytes | None = None,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str | None]:
        """``(kv, tier name)`` of a hit, ``(None, None)`` for a miss."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        if fingerprint is not None and (not isinstance(fingerprint, (bytes, bytearray))
                                        or len(fingerprint) > MAX_FINGERPRINT):
            raise TypeError(f"fingerprint must be bytes of at most {MAX_FINGERPRINT}, got {fingerprint!r}")
        hit = self._decode_fetched(key, self._first_below(-1, key), fingerprint, out)
        if hit is None:
            self._miss(key)
            return None, None
        idx, kv, stored_fp, _ = hit
        self._hit(idx, key, kv, stored_fp)
        return kv, self.tiers[idx].name

    def get(self, key: str, *, fingerprint: bytes | None = None, out: torch.Tensor | None = None
            ) -> torch.Tensor | None:
        """The tensor stored under ``key`` or None. ``out`` (contiguous, right dtype and shape) receives the
        data without an allocation."""
        return self.get_with_tier(key, fingerprint=fingerprint, out=out)[0]

    def batched_get(self, keys: Sequence[str], fingerprints: Sequence[bytes | None] | None = None
                    ) -> list[torch.Tensor | None]:
        """One result per key; each tier is asked once for every key still missing (Redis: one round trip)."""
        return [kv for kv, _ in self.get_many(keys, fingerprints)]

    def get_many(self, keys: Sequence[str], fingerprints: Sequence[bytes | None] | None = None, *,
                 prefix: bool = False, out: Callable[[int], torch.Tensor | None] | None = None,
                 on_hit: Callable[[int, torch.Tensor, str], None] | None = None, borrow: bool = False
                 ) -> list[tuple[torch.Tensor | None, str | None]]:
        """``(kv, tier name)`` per key (``(None, None)`` for a miss), asking each tier once for the keys still missing.

        Args:
            keys, fingerprints: what to read; a fingerprint mismatch is a miss (the key is taken by other tokens).
            prefix: stop at the first miss (a prefix read): later keys are misses, their objects are not decoded.
            out: ``out(i)`` is a buffer (right dtype and shape, any strides) to decode key ``i`` into, or None. A
                reused buffer is overwritten by the next decode into it: consume each hit in ``on_hit``.
            on_hit: called as ``on_hit(i, kv, tier)`` in key order, right after key ``i`` decodes.
            borrow: hand ``on_hit`` a zero-copy view of the stored bytes (a memory-tier slot, a pooled read
                buffer) that is valid only during the call; the result then holds ``(None, tier)`` per hit. The
                way to move stored KV into a consumer's memory (a model's cache, a paged cache) in one copy.
        """
        keys = list(keys)
        fps = list(fingerprints) if fingerprints is not None else [None] * len(keys)
        if len(fps) != len(keys):
            raise ValueError(f"fingerprints has {len(fps)} entries for {len(keys)} keys")
        owner = self._owners(keys)
        streams = {idx: self.tiers[idx].iter_many([k for k, o in zip(keys, owner, strict=True) if o == idx])
                   for idx in sorted({o for o in owner if o is not None})}
        result: list[tuple[torch.Tensor | None, str | None]] = [(None, None)] * len(keys)
        hits: list[tuple[int, str, torch.Tensor, bytes]] = []
        try:
            for i, key in enumerate(keys):
                # Each tier's objects arrive in key order, one at a time (Redis: replies read as they are used).
                first = None
                if owner[i] is not None:  # an object gone since the membership query: ask the tiers below
                    obj = next(streams[owner[i]], None)
                    first = (owner[i], obj) if obj is not None else self._first_below(owner[i], key)
                buf = out(i) if out is not None else None
                hit = self._decode_fetched(key, first, fps[i], buf, borrow)
                if hit is None:
                    self._miss(key)
                    if prefix:
                        break
                    continue
                idx, kv, stored_fp, held = hit
                tier = self.tiers[idx].name
                try:
                    result[i] = (None if held is not None else kv, tier)
                    if on_hit is not None:
                        on_hit(i, kv, tier)
                    if held is not None:
                        # a borrowed view dies with its object: promote now (the copy into the pool is the one
                        # promotion needs anyway); a later key it evicts is read from below instead
                        self._hit(idx, key, kv, stored_fp)
                        continue
                finally:
                    if held is not None:
                        held.release()
                # Promotion waits for the end of the batch (a promotion could evict a key that is still to be
                # read); a hit decoded into a reused buffer is copied for it, as the next decode overwrites it.
                hits.append((idx, key, kv.clone() if idx and buf is not None else kv, stored_fp))
        finally:
            for stream in streams.values():
                stream.close()
        for idx, key, kv, stored_fp in hits:
            self._hit(idx, key, kv, stored_fp)
        return result

    def _owners(self, keys: list[str]) -> list[int | None]:
        """The first tier holding each key, by one membership query per tier for the keys not found above it;
        the last tier is not asked (its reads answer that): for the usual memory / disk / Redis stack, a read
        costs Redis one round trip."""
        owner: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        last = len(self.tiers) - 1
        for idx, tier in enumerate(self.tiers):
            if not todo:
                break
            if idx == last:
                for i in todo:
                    owner[i] = idx
                break
            left = []
            for i, held in zip(todo, tier.contains_many([keys[i] for i in todo]), strict=True):
                if held:
                    owner[i] = idx
                else:
                    left.append(i)
            todo = left
        return owner

    def _decode_fetched(self, key: str, first: tuple[int, Encoded] | None, fingerprint: bytes | None,
                        out: torch.Tensor | None, borrow: bool = False
                        ) -> tuple[int, torch.Tensor, bytes, Encoded | None] | None:
        """Decode ``first = (tier index, object)``: ``(tier index, kv, stored fingerprint, held object)``, or None
        for a miss (``held``: see :meth:`_decode`). A corrupt object falls back to the tiers below it one by one;
        a fingerprint mismatch does not (the key is taken by other tokens, and lower tiers hold the same object)."""
        if first is None:
            return None
        idx, obj = first
        while True:
            stored_fp = obj.header.fingerprint
            got = self._decode(idx, key, obj, fingerprint, out, borrow)
            if got is not None:
                return idx, got[0], stored_fp, got[1]
            if fingerprint is not None and stored_fp != fingerprint:
                return None
            nxt = self._first_below(idx, key)
            if nxt is None:
                return None
            idx, obj = nxt

    def _first_below(self, idx: int, key: str) -> tuple[int, Encoded] | None:
        """The first object of ``key`` in a tier below ``idx`` (-1: in any tier), read with ``get``."""
        for j in range(idx + 1, len(self.tiers)):
            obj = self.tiers[j].get(key)
            if obj is not None:
                return j, obj
        return None

    def last_hit_tier(self, key: str) -> str | None:
        """Name of the tier that served the most recent hit of ``key`` (None after a miss)."""
        with self._lock:
            return self._last_tier.get(key)

    def contains(self, key: str) -> bool:
        return any(t.contains(key) for t in self.tiers)

    def contains_many(self, keys: Sequence[str], *, shared_only: bool = False,
                      tiers: Collection[str] | None = None) -> list[bool]:
        """Whether some tier holds each key; each tier is asked once for the keys not found above it.

        ``shared_only``: ask only the tiers another process sees (node, disk, Redis), as the vLLM scheduler must.
        ``tiers``: ask only the tiers of these names (``("memory", "node")``: is it in RAM?).
        """
        keys = list(keys)
        hit = [False] * len(keys)
        for tier in self.tiers:
            todo = [i for i, h in enumerate(hit) if not h]
            if not todo:
                break
            if (shared_only and not tier.shared) or (tiers is not None and tier.name not in tiers):
                continue
            for i, found in zip(todo, tier.contains_many([keys[i] for i in todo]), strict=True):
                hit[i] = bool(found)
        return hit

    def batched_contains(self, keys: Sequence[str], *, shared_only: bool = False,
                         tiers: Collection[str] | None = None) -> int:
        """How many of ``keys``, from the first, are held by some tier (prefix lookup); arguments as
        :meth:`contains_many`."""
        return leading_hits(self.contains_many(keys, shared_only=shared_only, tiers=tiers))

    def remove(self, key: str) -> bool:
        self._bump(key)
        found = False
        for t in self.tiers:
            if t.remove(key):
                found = True
                if not hasattr(t, "on_removed"):  # a tier with the hook reports it itself, with its token count
                    self._publish(REMOVED, key, None, t.name)
        with self._lock:
            self._last_tier.pop(key, None)
        return found

    def prefetch(self, keys: Sequence[str], fingerprints: Sequence[bytes | None] | None = None, *,
                 prefix: bool = False) -> Future:
        """Warm the top tier with ``keys`` in the background; the Future resolves to how many are there.

        ``prefix``: a prefix read (fingerprints checked, stopping at the first miss) whose lower-tier hits are
        promoted; the Future resolves to how many leading keys are then in the top tier.
        """
        keys = list(keys)

        def job() -> int:
            if prefix:
                got = self.get_many(keys, fingerprints, prefix=True, borrow=True)
                return leading_hits([tier is not None for _, tier in got])
            top = self.tiers[0].contains_many(keys)
            cold = [k for k, h in zip(keys, top, strict=True) if not h]
            return sum(top) + sum(kv is not None for kv, _ in self.get_many(cold))  # hits are promoted

        return self._spawn(job)

    # -- events --------------------------------------------------------------------------------------
    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(event)`` (an :class:`lmkv.events.KVEvent`) for every tier that stores a chunk or loses one
        from now on; returns the function that unsubscribes. Events arrive in order on the store's event thread
        (``flush`` waits for them); see :mod:`lmkv.events`.

        ``stored``: a tier accepted the object (the background tiers: when the write was queued; a queued write
        that fails later is a ``removed``). ``removed``: evicted for room, ``remove``, dropped as corrupt, or
        cleared, reported by the tier itself (memory, node, disk: its ``on_removed`` hook, installed here) or by
        this store for a tier without the hook (Redis: its own ``remove`` only, the server's evictions are
        invisible).
        """
        unsubscribe = self._events.subscribe(fn)
        for t in self.tiers:
            if hasattr(t, "on_removed") and t.on_removed is None:
                t.on_removed = self._tier_hook(t.name)
        return unsubscribe

    def _tier_hook(self, name: str) -> Callable[[str, Any], None]:
        def removed(key: str, header: Any) -> None:  # called under the tier's lock: it only queues
            self._publish(REMOVED, key, header.shape if header is not None else None, name)

        return removed

    def _publish(self, kind: str, key: str, shape: tuple[int, ...] | None, tier: str) -> None:
        if self._events.active:
            self._events.publish(KVEvent(kind, key, tokens_of(shape), tier, model_of(key)))  # type: ignore[arg-type]

    # -- lifecycle -----------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every accepted write (and background encode/prefetch) has reached its tier."""
        while True:
            with self._lock:
                jobs = list(self._bg_jobs)
            if not jobs:
                break
            for f in jobs:
                f.exception(timeout)
        for t in self.tiers:
            t.flush(timeout)
        self._events.flush(timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            store = dict(self._counts)
        return {"store": store, **{t.name: t.stats() for t in self.tiers}}

    def tier_counts(self) -> dict[str, dict[str, int]]:
        """``{tier: {"corrupt", "fingerprint_mismatch", "promotions": count}}``: what this store saw of the objects
        each tier returned (a tier's own ``stats()`` counts what the tier itself detected)."""
        with self._lock:
            return {name: dict(c) for name, c in self._tier_counts.items()}

    def codec_seconds(self) -> dict[tuple[str, str], float]:
        """``{(codec, "encode" | "decode"): seconds}`` spent by this store's serdes: background encodes for the
        tiers, decodes of hits (a raw object lent as a view, ``borrow``, costs no decode and is not counted)."""
        with self._lock:
            out = {(s.name, op): 0.0 for s in self.serdes for op in ("encode", "decode")}
            out.update(self._codec_s)
            return out

    def assert_no_leaks(self) -> None:
        self.flush()
        if self._memory is not None:
            self._memory.assert_no_leaks()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._bg.shutdown(wait=True)
        for t in self.tiers:
            t.close()
        self._events.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
