"""Redis tier (redis-py against a real ``redis-server``): one atomic value per object, pipelined batches.

Limits: capacity and eviction belong to the server (``maxmemory`` and its policy); ``capacity_bytes`` reports
the server's ``maxmemory`` (0 = unlimited) and ``usage_bytes`` its ``used_memory``. Writes go through one
background thread (or the caller of ``flush``), in order with removals, pipelined in batches; each object is
one ``SET`` whose bulk value is sent as header buffer + payload buffer, so the payload is never concatenated
in Python and no ``GET`` can see half an object (pieced reads check, below). Values larger than 512 MiB (Redis'
default bulk limit) are dropped.

Failures never reach the caller: when the server is unreachable or slower than ``socket_timeout`` the tier logs
once, reads become misses and writes are dropped, and the connection is retried after ``retry_backoff`` seconds
(doubling, capped at 30 s); while it is down no call touches the network, so nothing blocks longer than the
timeout. redis-py's own retries are disabled for that reason. A value that fails its header or checksum
validation is a miss with a warning and is deleted; an error reply (a key of another type) is a miss with a warning.

Reads (``get``, ``get_many``, ``iter_many``) go through :mod:`lmkv.storage.resp`, a lean RESP2 reader with its own
small pool of connections, which receives every value straight into a buffer of a :class:`BufferPool` (passed
as ``buffer_pool`` to share one, or a private one keeping ``read_buffer_bytes`` of idle buffers, as the disk tier
does): no fresh ``bytes`` per reply, no copies between client buffers, and long values read as windowed GETRANGE
pieces so that the server's reply buffers stay hot (see that module for why and the measurements: a 32 MiB get
runs several times faster than redis-py's ``GET``). A returned object owns its pooled buffer: ``release`` hands it
back to the pool, unless a consumer took the payload to keep it (``Encoded.take``, as ``RawSerde.decode`` without
``out`` does). A pieced read
is not atomic, so one that does not verify is read again with one plain ``GET`` before the value is called
corrupt (``stats()["rereads"]`` counts those). Writes, EXISTS, DEL, INFO and CONFIG stay on redis-py, and so do
reads over ``rediss://`` (TLS) or with ``lean_reads=False`` (then each object owns its reply ``bytes``).
"""

from __future__ import annotations

import itertools
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from lmkv.errors import CorruptObject
from lmkv.storage.base import Queued, TierStats, WarnOnce, log
from lmkv.storage.buffers import BufferPool, PooledBuffer
from lmkv.storage.disk import ScanEntry
from lmkv.storage.objects import MAGIC, MAX_HEADER, Encoded, parse_header, verify_payload, writable_view
from lmkv.storage.resp import PIECE, ProtocolError, ReplyError, RespReader, Torn

MAX_VALUE = 512 << 20
_BATCH_BYTES = 64 << 20
_BATCH_OPS = 128
_MAX_BACKOFF = 30.0


def _claimed_length(prefix: memoryview) -> int:
    """The object length an lmkv header claims (header length at offset 6, payload length at 16; see
    :mod:`lmkv.storage.objects`): sizes a pieced read before the whole header is there. Not validated here:
    ``parse_header`` checks the complete object."""
    if len(prefix) < 24 or bytes(prefix[:4]) != MAGIC:
        raise CorruptObject("not an lmkv object (bad magic)")
    (hl,) = struct.unpack_from("<H", prefix, 6)
    (plen,) = struct.unpack_from("<Q", prefix, 16)
    return hl + plen


def pack_writes(prefix: str, ops: Sequence[_Op]) -> list[Any]:
    """SET/DEL commands as RESP buffers, packed by hand so that each value is ONE bulk string (header then
    payload, sent as separate buffers): no concatenation in Python, and Redis keeps a large bulk argument as the
    value without copying it (an APPEND would copy it server-side)."""
    parts: list[Any] = []
    small = b""
    for op in ops:
        rkey = (prefix + op.key).encode()
        if op.obj is None:
            small += b"*2\r\n$3\r\nDEL\r\n$%d\r\n%s\r\n" % (len(rkey), rkey)
            continue
        header = op.obj.header_bytes()
        payload = op.obj.view()
        small += b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(rkey), rkey, len(header) + len(payload))
        parts += [small + header, payload]
        small = b"\r\n"
    if small:
        parts.append(small)
    return parts


def close_quietly(reader: RespReader | None, client: Any) -> None:
    """Close a lean reader and a redis-py client (None: nothing to close); a broken connection is no error."""
    if reader is not None:
        reader.close()
    try:
        if client is not None:
            client.close()
    except Exception:  # pragma: no cover - closing a broken connection
        pass


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


def _scan_entry(rkey: str, key: str, value: Any, length: Any, idle: Any, verify: bool) -> ScanEntry | None:
    """One reply triple of :func:`scan_client` as an entry; None for a key deleted since SCAN named it."""
    if idle is None and not value and not isinstance(value, Exception):  # GETRANGE of a missing key is b""
        return None
    age = float(idle) if isinstance(idle, int) else None
    size = length if isinstance(length, int) else 0
    try:
        if not isinstance(value, bytes):
            raise CorruptObject(f"error reply: {value}")
        header = parse_header(value, available=size)
    except CorruptObject as exc:
        return ScanEntry(key, None, "corrupt", str(exc), size, age, rkey)
    if header.key != key:
        return ScanEntry(key, header, "foreign", f"holds key {header.key!r}", size, age, rkey)
    try:
        if verify:
            verify_payload(header, memoryview(value)[header.header_len:])
    except CorruptObject as exc:
        return ScanEntry(key, header, "corrupt", str(exc), size, age, rkey)
    return ScanEntry(key, header, "ok", "", size, age, rkey)


def scan_client(client: Any, prefix: str, *, verify: bool = False, batch: int = 256) -> Iterator[ScanEntry]:
    """Every value under ``prefix`` on one server: ``SCAN MATCH <prefix>*``, then per batch of ``batch`` keys one
    pipeline of ``GETRANGE key 0 4095`` (the header; ``GET`` with ``verify``), ``STRLEN`` and ``OBJECT IDLETIME``
    (the age: seconds since last use). Connection errors propagate: an admin listing must not pass a server it
    cannot reach off as empty."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    keys = client.scan_iter(match=_glob_escape(prefix) + "*", count=batch)
    while True:
        part = list(itertools.islice(keys, batch))
        if not part:
            return
        pipe = client.pipeline(transaction=False)
        for rkey in part:
            if verify:
                pipe.get(rkey)
            else:
                pipe.getrange(rkey, 0, MAX_HEADER - 1)
            pipe.strlen(rkey)
            pipe.object("idletime", rkey)
        replies = pipe.execute(raise_on_error=False)
        for i, rkey in enumerate(part):
            text = rkey.decode(errors="replace") if isinstance(rkey, bytes) else str(rkey)
            entry = _scan_entry(text, text[len(prefix):], *replies[3 * i:3 * i + 3], verify)
            if entry is not None:
                yield entry


_Op = Queued  # obj None: a removal (tombstone)


class RedisTier:
    name = "redis"
    shared = True

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, password: str = "", key_prefix: str = "lmkv:",
                 socket_timeout: float = 0.5, retry_backoff: float = 1.0, read_buffer_bytes: int = 256 << 20,
                 buffer_pool: BufferPool | None = None, lean_reads: bool = True) -> None:
        self._init_common(url, key_prefix, socket_timeout, retry_backoff, read_buffer_bytes, buffer_pool)
        self.client = self._redis.Redis.from_url(url, password=password or None, **self._client_kwargs())
        self.reader: RespReader | None = self._lean_reader(url, password) if lean_reads else None
        self._lean = self.reader is not None
        self._start()

    def _init_common(self, url: str, key_prefix: str, socket_timeout: float, retry_backoff: float,
                     read_buffer_bytes: int, buffer_pool: BufferPool | None) -> None:
        import redis  # lazy: only deployments with a Redis tier need redis-py

        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {url!r}")
        if socket_timeout <= 0:
            raise ValueError(f"socket_timeout must be > 0, got {socket_timeout!r}")
        self._redis = redis
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self.url = url
        self.prefix = key_prefix
        self._timeout = float(socket_timeout)
        self._backoff0 = float(retry_backoff)
        self._backoff = self._backoff0
        self._down_until = 0.0
        self._piece = PIECE
        self.buffers = buffer_pool if buffer_pool is not None else BufferPool(read_buffer_bytes)
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._pending: dict[str, _Op] = {}
        self._ops: deque[_Op] = deque()  # mutations in order; popped and sent under _send_lock
        self._send_lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._stopping = False
        self._inflight = 0
        self._stats = TierStats()
        self._rereads = 0  # pieced reads that did not add up and were read again with one GET
        self._warn = WarnOnce()
        self._closed = False

    def _start(self) -> None:
        self._writer = threading.Thread(target=self._writer_loop, name="lmkv-redis-writer", daemon=True)
        self._writer.start()

    def _client_kwargs(self) -> dict[str, Any]:
        """redis-py connection settings: every call bounded by the timeout, no retries of its own (see above)."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return dict(socket_timeout=self._timeout, socket_connect_timeout=self._timeout, retry=Retry(NoBackoff(), 0),
                    retry_on_timeout=False, health_check_interval=0)

    def _lean_reader(self, url: str, password: str) -> RespReader | None:
        """The lean reader for ``url``; None (reads through redis-py) for TLS or a URL form it does not read."""
        if not url.startswith(("redis://", "unix://")):
            return None
        try:
            reader = RespReader(url, password=password, timeout=self._timeout, pool=self.buffers,
                                max_value=MAX_VALUE)
        except ValueError as exc:  # a URL form redis-py reads and the lean reader does not: keep redis-py
            log.info("redis tier: reads go through redis-py (%s)", exc)
            return None
        self._piece = reader.piece
        return reader

    # -- availability --------------------------------------------------------------------------------
    def _rkey(self, key: str) -> str:
        return self.prefix + key

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._stats.count_down(exc, self._redis.TimeoutError)
            self._down_until = time.monotonic() + self._backoff
            wait, self._backoff = self._backoff, min(_MAX_BACKOFF, max(self._backoff * 2, 0.05))
        self._warn("down", "redis tier: %s unreachable (%s); reads miss and writes are dropped, retrying in %.2fs",
                   self.url, exc, wait)

    def _ok(self) -> None:
        if self._backoff != self._backoff0:
            with self._lock:
                self._backoff = self._backoff0
            log.info("redis tier: %s reachable again", self.url)
            self._warn.reset("down")

    def _call(self, fn: Any, default: Any) -> Any:
        if not self.available():
            return default
        try:
            out = fn()
        except self._errors as exc:
            self._failed(exc)
            return default
        self._ok()
        return out

    # -- bookkeeping ---------------------------------------------------------------------------------
    def capacity_bytes(self) -> int:
        cfg = self._call(lambda: self.client.config_get("maxmemory"), {})
        return int(cfg.get("maxmemory", 0) or 0) if isinstance(cfg, dict) else 0

    def usage_bytes(self) -> int:
        info = self._call(lambda: self.client.info("memory"), {})
        return int(info.get("used_memory", 0)) if isinstance(info, dict) else 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats.as_dict(), "pending": len(self._pending), "up": int(self.available()),
                    "rereads": self._rereads}

    def scan(self, *, verify: bool = False, batch: int = 256) -> Iterator[ScanEntry]:
        """Every value under this tier's key prefix (this instance's writes flushed first): see
        :func:`scan_client`. Raises redis-py's errors when the server cannot be reached."""
        self.flush()
        return scan_client(self.client, self.prefix, verify=verify, batch=batch)

    # -- writes --------------------------------------------------------------------------------------
    def put(self, key: str, obj: Encoded) -> bool:
        with self._lock:
            accepted = self._queue_put(key, obj)
            self._work.notify()
        return accepted

    def _queue_put(self, key: str, obj: Encoded) -> bool:
        size = obj.header.total_len
        if self._closed or size > MAX_VALUE or not self.available():
            self._stats.rejected += 1
            obj.release()
            return False
        op = _Op(key, obj, size)
        self._expect(size)
        self._pending[key] = op
        self._inflight += 1
        self._ops.append(op)
        return True

    def _expect(self, size: int) -> None:
        if self.reader is not None:
            self.reader.expect(size)  # what this deployment's values weigh: the first read window needs it

    def put_many(self, items: Sequence[tuple[str, Encoded]]) -> None:
        """Every put queued at once, so that the writer sends them as one pipelined batch (per node)."""
        with self._lock:
            for key, obj in items:
                self._queue_put(key, obj)
            self._work.notify()

    def remove(self, key: str) -> bool:
        with self._lock:
            prior = self._pending.get(key)
        found = (prior.obj is not None) if prior is not None else bool(self._exists_remote([key])[0])
        op = _Op(key, None)
        with self._lock:
            self._pending[key] = op
            self._inflight += 1
            self._ops.append(op)
            self._work.notify()
        return found

    def _take_batch(self) -> list[_Op]:
        """Pop the next batch (caller holds _send_lock, so batches are sent in the order they were queued)."""
        with self._lock:
            batch: list[_Op] = []
            nbytes = 0
            while self._ops and len(batch) < _BATCH_OPS and nbytes < _BATCH_BYTES:
                op = self._ops.popleft()
                batch.append(op)
                nbytes += op.size
            return batch

    def _writer_loop(self) -> None:
        while True:
            with self._lock:
                self._work.wait_for(lambda: self._ops or self._stopping)
                if not self._ops:
                    return
            with self._send_lock:
                batch = self._take_batch()
                if batch:
                    self._send(batch)

    def _send(self, batch: list[_Op]) -> None:
        sent: list[_Op] = []
        try:
            with self._lock:
                live = [op for op in batch if self._pending.get(op.key) is op or op.obj is None]
            if live and self.available():
                sent = self._send_packed(live)
        except self._errors as exc:
            self._failed(exc)
        except Exception as exc:  # a bug or a server error reply: drop the batch, never kill the writer
            self._warn("write", "redis tier: batch write failed (%s); dropped", exc)
            with self._lock:
                self._stats.errors += 1
                self._stats.write_failed += 1
        finally:
            with self._lock:
                for op in batch:
                    if op.obj is not None:
                        if op in sent:
                            self._stats.puts += 1
                            self._stats.bytes_written += op.size
                        else:
                            self._stats.rejected += 1
                    if self._pending.get(op.key) is op:
                        del self._pending[op.key]
            for op in batch:  # release the sources (memory-tier pins) before flush can see the batch done
                op.drop(self._lock)
            with self._lock:
                self._inflight -= len(batch)
                self._idle.notify_all()

    def _send_packed(self, ops: list[_Op]) -> list[_Op]:
        """One pipelined round trip of SET/DEL commands (see :func:`pack_writes`); the ops written."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(pack_writes(self.prefix, ops))
            for _ in ops:
                conn.read_response()  # raises on an error reply
        except BaseException:
            conn.disconnect()  # unread replies would poison the next user of this connection
            raise
        finally:
            pool.release(conn)
        self._ok()
        return ops

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued write/removal. The caller sends queued batches itself rather than waiting
        for the writer thread to wake up (a handoff costs milliseconds on a busy machine)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if not self._send_lock.acquire(timeout=-1 if left is None else left):
                return
            try:
                batch = self._take_batch()
                if batch:
                    self._send(batch)
            finally:
                self._send_lock.release()
            if not batch:
                with self._lock:
                    self._idle.wait_for(lambda: self._inflight == 0, left)
                return

    # -- reads ---------------------------------------------------------------------------------------
    def _pending_lookup(self, key: str) -> tuple[bool, Encoded | None]:
        """(known, object): whether a queued put/remove decides this key, and the pending object if a put."""
        with self._lock:
            op = self._pending.get(key)
            if op is None:
                return False, None
            if op.obj is None:
                return True, None
            return True, op.lease(self._lock)

    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Membership of every key in one pipelined round trip (pending writes and removals win)."""
        keys = list(keys)
        if not keys:
            return []
        with self._lock:  # before the round trip: a write that lands meanwhile leaves the pending map
            ops = [self._pending.get(k) for k in keys]
        remote = self._exists_remote([k for k, op in zip(keys, ops) if op is None])
        it = iter(remote)
        return [(op.obj is not None) if op is not None else bool(next(it)) for op in ops]

    def _exists_remote(self, keys: list[str]) -> list[int]:
        """EXISTS of every key in one pipelined round trip; 0 for all when the server cannot be asked."""
        if not keys:
            return []

        def fetch() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._rkey(k))
            return pipe.execute()

        return self._call(fetch, None) or [0] * len(keys)

    def _delete_remote(self, key: str) -> None:
        self._call(lambda: self.client.delete(self._rkey(key)), 0)

    def _corrupt(self, key: str, why: Any) -> None:
        log.warning("redis tier: value of %r is corrupt or foreign (%s); treating it as a miss", key, why)
        with self._lock:
            self._stats.corrupt += 1
        self._delete_remote(key)

    def _decode(self, key: str, value: Any) -> Encoded | None:
        """A redis-py reply (the fallback read path) as an object that owns the reply bytes."""
        if value is None:
            return None
        try:
            if not isinstance(value, bytes):
                raise CorruptObject(f"unexpected reply type {type(value).__name__}")
            header = parse_header(value)
            if header.key != key:
                raise CorruptObject(f"value holds key {header.key!r}, expected {key!r}")
            payload = writable_view(value)[header.header_len:]
            verify_payload(header, payload)
        except CorruptObject as exc:
            self._corrupt(key, exc)
            return None
        return Encoded(header, payload, owned=True, keepalive=value)

    def _decode_lean(self, key: str, res: Any) -> Encoded | None:
        """A lean-reader result as an object borrowing its pooled buffer (released back to the pool)."""
        retried = False
        while True:
            if isinstance(res, Torn):
                if not res.retry or retried:
                    self._corrupt(key, res.reason)
                    return None
                res, retried = self._read_atomic(key), True
                continue
            if not isinstance(res, PooledBuffer):  # None: a miss (or the atomic re-read failed, logged)
                if isinstance(res, ReplyError):
                    self._warn("reply", "redis tier: error reply for %r (%s); treating it as a miss", key,
                               res.message)
                return None
            buf = res
            try:
                header = parse_header(buf.view)
                if header.key != key:
                    raise CorruptObject(f"value holds key {header.key!r}, expected {key!r}")
                hl = header.header_len
                payload = buf.view[hl:]
                verify_payload(header, payload)
            except CorruptObject as exc:
                pieced = len(buf.view) > self._piece
                buf.release()
                if pieced and not retried:  # a pieced read is not atomic: read it again in one GET
                    res, retried = self._read_atomic(key), True
                    continue
                self._corrupt(key, exc)
                return None
            return Encoded(header, payload, owned=True, release=buf.release, keepalive=buf,
                           addr=buf.address + hl, on_take=buf.detach)

    def _read_atomic(self, key: str) -> Any:
        """One plain GET through the lean reader (on another connection: the batch's is still streaming)."""
        with self._lock:
            self._rereads += 1
        try:
            return self._call(lambda: self.reader.get_atomic(self._rkey(key).encode()), None)
        except Exception as exc:  # ProtocolError (garbage), or a bug: a miss either way
            self._warn("protocol", "redis tier: re-read of %r failed (%r); treating it as a miss", key, exc)
            with self._lock:
                self._stats.errors += 1
            return None

    def _count(self, obj: Encoded | None) -> None:
        with self._lock:
            self._stats.count_read(obj)

    def get(self, key: str) -> Encoded | None:
        it = self.iter_many([key])
        try:
            return next(it)
        finally:
            it.close()

    def get_many(self, keys: Sequence[str]) -> list[Encoded | None]:
        """Every key in one pipelined stream (pending writes answer locally)."""
        return list(self.iter_many(keys))

    def iter_many(self, keys: Sequence[str]) -> Iterator[Encoded | None]:
        """Like :meth:`get_many`, one object at a time: the requests are pipelined (all GETs in one write on a slow
        link, a window of GETRANGE pieces on a fast one), and each reply is read and handed over as the consumer
        asks for it, so a large batch is never held in memory at once and decoding overlaps the transfer. Closing
        the iterator early drops the unread replies (their connection is discarded, never reused half-read) and
        releases the objects it did not hand over."""
        keys = list(keys)
        known = [self._pending_lookup(k) for k in keys]
        remote = [keys[i] for i, (kn, _) in enumerate(known) if not kn]
        replies = self._lean_objects(remote) if self._lean else self._redis_py_objects(remote)
        n = 0
        try:
            for kn, obj in known:
                if not kn:
                    obj = next(replies, None)
                n += 1
                self._count(obj)
                yield obj
        finally:
            replies.close()
            for _, obj in known[n:]:  # pending objects never handed over hold a reference on their write
                if obj is not None:
                    obj.release()

    def _lean_objects(self, keys: list[str]) -> Iterator[Encoded | None]:
        """Decoded objects of ``keys`` through the lean reader; stops early (the rest are misses) when the server
        is unreachable, times out or sends garbage."""
        if not keys or not self.available():
            return
        stream = self.reader.fetch([self._rkey(k).encode() for k in keys], _claimed_length)
        try:
            for n, key in enumerate(keys):
                try:
                    res = next(stream)
                except StopIteration:  # pragma: no cover - the reader answers every key
                    return
                except self._errors as exc:
                    self._failed(exc)
                    return
                except ProtocolError as exc:
                    self._warn("protocol", "redis tier: %s sent a reply we cannot parse (%s); connection closed, "
                               "the rest of the batch misses", self.url, exc)
                    with self._lock:
                        self._stats.errors += 1
                    return
                except Exception as exc:  # a bug must not reach the caller either: the rest of the batch misses
                    self._warn("read", "redis tier: read failed (%r); the rest of the batch misses", exc)
                    with self._lock:
                        self._stats.errors += 1
                    return
                if n == len(keys) - 1:
                    self._ok()
                yield self._decode_lean(key, res)
        finally:
            stream.close()

    def _redis_py_objects(self, keys: list[str]) -> Iterator[Encoded | None]:
        replies = self._stream_gets(keys)
        try:
            for key in keys:
                yield self._decode(key, next(replies, None))
        finally:
            replies.close()

    def _stream_gets(self, keys: list[str]) -> Iterator[Any]:
        """The raw values of ``keys`` through redis-py (None for a miss or an unreachable server), replies read
        lazily: the read path for ``rediss://`` and ``lean_reads=False``."""
        if not keys or not self.available():
            return
        pool = self.client.connection_pool
        conn, done = None, False
        try:
            conn = pool.get_connection()
            conn.send_packed_command(conn.pack_commands([("GET", self._rkey(k)) for k in keys]))
            for n in range(len(keys)):
                reply = conn.read_response()
                if n == len(keys) - 1:  # every reply read: the connection is clean even if we are closed now
                    done = True
                    self._ok()
                yield reply
        except self._errors as exc:
            self._failed(exc)
        finally:
            if conn is not None:
                if not done:
                    conn.disconnect()  # unread replies would poison the next user of this connection
                pool.release(conn)

    # -- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.flush(timeout=max(5.0, 4 * self._timeout))
        with self._lock:
            self._stopping = True
            self._work.notify_all()
        self._writer.join(timeout=5.0)
        close_quietly(self.reader, self.client)
