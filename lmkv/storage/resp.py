"""A lean RESP2 reader for the Redis GET path: each value lands directly in a pooled, already-mapped buffer.

Why not redis-py/hiredis for reads: their reply path allocates a fresh ``bytes`` per reply (every page of it a
page fault: about a third of the rate of a copy into reused memory here) and copies between internal buffers.
This reader owns its sockets, reads each bulk reply's ``$<n>\\r\\n`` line through a small reused buffer and then
``recv_into`` s the ``n`` bytes straight into ``BufferPool.take(n)`` (the part of the value that arrived with the
line is copied over first). Nothing but the value bytes and one small line buffer per connection is touched.

Why GETRANGE pieces: measured with ``perf``, a plain ``GET`` of a 32 MiB value is bound by the *server*:
redis-server 7 copies the value into a freshly allocated reply buffer (jemalloc hands large blocks back to the
kernel, so every page faults again: 8192 minor faults per 32 MiB GET, ~21 ms of server CPU). So on a fast link a
value longer than :data:`PIECE` is read as ``GETRANGE`` pieces with about :data:`WINDOW` bytes requested and not
yet read (the next piece is requested as soon as one is read, so the pipe never drains): the server's reply
buffers stay small and hot (0 faults per read). The first request of every key is ``GETRANGE key 0 PIECE`` (one
byte more than a piece): a shorter reply is the whole value, read atomically; a full one carries the object
header, whose claimed length (``length_of``) sizes the buffer and the remaining pieces. The last piece asks for
one byte past that length, so a value that is longer, shorter or changed type is detected; such a *pieced* read
is not atomic (a concurrent ``SET`` may land between pieces), so the caller re-reads a value whose pieces or
checksum disagree with one plain ``GET`` (:meth:`RespReader.get_atomic`) before it calls the value corrupt. A
missing key reads as an empty string, i.e. a miss (lmkv never stores an empty value).

On a slow link (a connection whose round trip is >= :data:`PIPELINE_RTT`, see :class:`Connection`) the network is
the limit, not the server's allocator: every key is one ``GET``, all sent in one write, as before (a batch costs
one round trip: the [2/9] goal); a link faster than that but slower than loopback gets a window of at least
``rtt x WINDOW_RATE`` bytes.

Measured on this machine (2 shared cores, redis-server 7.0.15 on loopback; ``python -m
experiments.bench_redis_get``, medians of 21 / 11 interleaved rounds, GB/s; lmkv paths include the header
parse, the xxh3 check and the ``raw`` decode into a preallocated tensor, the baseline only returns ``bytes``)::

    op      size x n      redis-py GET  old lmkv (redis-py)  lean GET  lean pieces  lean pieces, 2 connections
    get     2 MiB x 1     2.77          2.51                 2.73      3.25         -
    get     32 MiB x 1    0.99          0.89                 1.48      4.14         -
    batch   2 MiB x 32    1.08 (pipe)   1.93                 1.97      4.12         4.69
    batch   32 MiB x 2    0.91 (pipe)   0.73                 1.34      3.02         2.89

(the 32 MiB redis-py GET ran at 0.47-0.64 GB/s in other runs, lean pieces at 2.5-3.9.) The piece size and window
were swept (``--sweep``: one object, pieces of 256 KiB-2 MiB with 1, 2 or 4 in flight): over four sweeps 512 KiB
with 2 in flight was the best or within 5 % of it in 7 of 8 cases (2 MiB: 2.7-3.7 GB/s; 32 MiB: 2.2-3.8), the
other combinations down to 1.6 and 1.4. Two connections
per batch (alternate keys, one reader thread each) were no consistent win (+14 % and -4 % above; -15 % to +4 %
in three earlier runs): the server is single-threaded and the machine has two cores, so a batch uses one
connection and no threads. In the prototype a single value split into two GETRANGE halves on two connections
was slower than one (1.04 vs 1.24 GB/s, plain GETs).

Failure handling belongs to the caller: every socket operation has the connection's timeout, socket errors and
timeouts propagate as ``OSError`` (an authentication failure as :class:`AuthError`, a ``ConnectionError``), and a
reply that is not RESP2 as we expect it raises :class:`ProtocolError`; in every case the connection is closed. A
connection whose replies were not all read (iterator closed early, error, timeout) is closed, never reused.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from lmkv.storage.buffers import BufferPool, PooledBuffer

PIECE = 512 << 10  # GETRANGE piece of a long value (measured: 256 KiB-1 MiB similar, 512 KiB best)
WINDOW = 1 << 20  # bytes requested and not yet read, on a fast link (measured: 2 pieces best)
WINDOW_RATE = 8e9  # on a slower (still < PIPELINE_RTT) link the window covers this rate x the round trip
PIPELINE_RTT = 1e-3  # at or above this round trip a connection sends plain GETs, all in one write
MAX_INFLIGHT = 256  # requests in flight at most (many small values)
PEEK = 64  # bytes of a long value's first piece handed to ``length_of``
_LINE_BUF = 64 << 10  # the per-connection buffer for reply lines (and small values); a longer line is garbage
_HINT0 = 16 << 10  # first guess of a value's size, for the window, until a reply (or RespReader.expect) tells
_MIN_EST = 1 << 10  # a key of unknown size counts at least this much against the window


class _Sent:
    def __repr__(self) -> str:
        return "SENT"


SENT = _Sent()  # what a primed fetch hands over first: its requests are on the wire


class ProtocolError(Exception):
    """The server sent something that is not the RESP2 reply expected (the connection is closed)."""


class AuthError(ConnectionError):
    """AUTH / SELECT failed, or the server requires authentication."""


@dataclass(frozen=True)
class ReplyError:
    """The server answered a key with an error reply (``-WRONGTYPE ...``): a miss, worth a warning."""

    message: str


@dataclass(frozen=True)
class Torn:
    """A key whose value could not be read as one consistent value. ``retry``: the read was pieced (not atomic)
    and the value may have changed meanwhile, so one atomic ``GET`` may succeed; otherwise the value itself is
    unusable (larger than ``max_value``)."""

    reason: str
    retry: bool = True


Result = PooledBuffer | ReplyError | Torn | None


@dataclass(frozen=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_url(url: str, password: str = "") -> Endpoint:
    """``redis://[[user]:password@]host[:port][/db]`` or ``unix://[[user]:password@]/path[?db=N]``, as redis-py
    reads them (a ``db`` query argument wins over the path; a password in the URL wins over ``password``).
    ValueError for anything else, ``rediss://`` (TLS) included: the caller keeps redis-py for that."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    db_arg = query.get("db", [None])[0]
    if parts.scheme == "redis":
        path = None
        if db_arg is None and parts.path.strip("/"):
            db_arg = parts.path.strip("/")
        host, port = parts.hostname or "localhost", parts.port or 6379
    elif parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"unix:// URL without a socket path: {url!r}")
        path, host, port = unquote(parts.path), "", 0
    else:
        raise ValueError(f"the lean reader speaks redis:// and unix://, not {parts.scheme}://")
    try:
        db = int(db_arg) if db_arg is not None else 0
    except ValueError:
        raise ValueError(f"db must be an integer in {url!r}") from None
    user = unquote(parts.username) if parts.username else None
    url_pw = unquote(parts.password) if parts.password else None
    return Endpoint(host, port, path, db, user, url_pw or password or None)


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _getrange(rkey: bytes, start: int, end: int) -> bytes:
    s, e = b"%d" % start, b"%d" % end
    return b"*4\r\n$8\r\nGETRANGE\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(rkey), rkey, len(s), s, len(e), e)


def _get(rkey: bytes) -> bytes:
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(rkey), rkey)


_PING = b"*1\r\n$4\r\nPING\r\n"


class Connection:
    """One socket to the server, authenticated and on the right db, with a small reused line buffer.

    ``rtt`` is the lowest of the recent round-trip samples: the handshake (setup and a PING in one write; one more
    PING when that looked slow) and a PING at the head of every batch (free: same write, and its reply comes
    first). A sample can only overestimate (the server answers the PING together with what it did for the rest
    of that write), so the minimum is the estimate.
    """

    def __init__(self, ep: Endpoint, timeout: float, slow: float = float("inf")) -> None:
        self.pid = os.getpid()
        if ep.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(ep.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)  # every recv / send below is bounded by it
        self.sock = sock
        self._buf = bytearray(_LINE_BUF)
        self._mv = memoryview(self._buf)
        self._r = self._w = 0
        self.samples: deque[float] = deque(maxlen=8)
        try:
            self._handshake(ep, slow)
        except BaseException:
            self.close()
            raise

    @property
    def rtt(self) -> float:
        return min(self.samples)

    def _handshake(self, ep: Endpoint, slow: float) -> None:
        setup = []
        if ep.password:
            user = [ep.username.encode()] if ep.username else []
            setup.append(_cmd(b"AUTH", *user, ep.password.encode()))
        if ep.db:
            setup.append(_cmd(b"SELECT", b"%d" % ep.db))
        t0 = time.perf_counter()
        self.sock.sendall(b"".join(setup) + _PING)  # one round trip on a fast link
        for _ in setup:
            line = self.line()
            if not line.startswith(b"+"):
                raise AuthError(f"redis handshake failed: {line[:200].decode(errors='replace')}")
        self.pong(t0)
        if self.rtt >= slow:  # slow, or a scheduling hiccup: ask once more before reading in slow-link mode
            t0 = time.perf_counter()
            self.sock.sendall(_PING)
            self.pong(t0)

    def pong(self, t0: float) -> None:
        """Read the reply to a PING sent at ``t0`` and record the round trip."""
        line = self.line()
        self.samples.append(time.perf_counter() - t0)
        if line != b"+PONG":
            if line.startswith((b"-NOAUTH", b"-WRONGPASS", b"-NOPERM")):
                raise AuthError(line[1:200].decode(errors="replace"))
            raise ProtocolError(f"unexpected PING reply {line[:80]!r}")

    # -- reading ---------------------------------------------------------------------------------------
    def _fill(self) -> None:
        if self._r == self._w:
            self._r = self._w = 0
        elif len(self._buf) - self._w < 4096:
            n = self._w - self._r
            self._mv[:n] = self._mv[self._r:self._w]
            self._r, self._w = 0, n
            if n == len(self._buf):
                raise ProtocolError(f"reply line longer than {len(self._buf)} bytes")
        got = self.sock.recv_into(self._mv[self._w:])
        if not got:
            raise ConnectionError("connection closed by the server")
        self._w += got

    def line(self) -> bytes:
        """The next reply line, without its CRLF."""
        while True:
            i = self._buf.find(b"\r\n", self._r, self._w)
            if i >= 0:
                out = bytes(self._mv[self._r:i])
                self._r = i + 2
                return out
            self._fill()

    def buffered(self) -> int:
        return self._w - self._r

    def peek(self, n: int) -> memoryview:
        """The next ``n`` bytes (not consumed); ``n`` must fit the line buffer."""
        while self._w - self._r < n:
            self._fill()
        return self._mv[self._r:self._r + n]

    def read_into(self, dst: memoryview, n: int) -> None:
        """The next ``n`` bytes into ``dst[:n]``: what is buffered is copied, the rest received in place."""
        have = min(self._w - self._r, n)
        if have:
            dst[:have] = self._mv[self._r:self._r + have]
            self._r += have
        got = have
        while got < n:
            k = self.sock.recv_into(dst[got:n], n - got)
            if not k:
                raise ConnectionError("connection closed by the server")
            got += k

    def skip(self, n: int) -> None:
        """Discard the next ``n`` bytes."""
        while n:
            if self._r == self._w:
                self._fill()
            k = min(n, self._w - self._r)
            self._r += k
            n -= k

    def crlf(self) -> None:
        if bytes(self.peek(2)) != b"\r\n":
            raise ProtocolError("bulk reply not terminated by CRLF")
        self._r += 2

    def bulk_len(self, limit: int) -> int | ReplyError:
        """The length of the next bulk reply (-1: nil) or the error reply; ProtocolError for anything else."""
        line = self.line()
        kind = line[:1]
        if kind == b"$":
            try:
                n = int(line[1:])
            except ValueError:
                raise ProtocolError(f"bad bulk length {line[:40]!r}") from None
            if n < -1 or n > limit:
                raise ProtocolError(f"bulk length {n} out of range (at most {limit} expected)")
            return n
        if kind == b"-":
            msg = line[1:].decode(errors="replace")
            if msg.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise AuthError(msg)
            return ReplyError(msg)
        raise ProtocolError(f"unexpected reply {line[:40]!r} to a GET")

    def idle_ok(self) -> bool:
        """A pooled connection is reusable when nothing is buffered or readable (EOF, stray bytes: not)."""
        if self._r != self._w or os.getpid() != self.pid:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover - closing a broken socket
            pass


class _Key:
    __slots__ = ("rkey", "buf", "total", "next", "result", "final", "torn")

    def __init__(self, rkey: bytes) -> None:
        self.rkey = rkey
        self.buf: PooledBuffer | None = None
        self.total = -1  # the value's length, once known
        self.next = 0  # next offset to request
        self.result: Result = None
        self.final = False
        self.torn = False


class RespReader:
    """GETs into pooled buffers over a few pooled connections to one server (see the module docstring).

    Args:
        url, password: ``redis://`` or ``unix://`` (see :func:`parse_url`).
        timeout: seconds for every connect, send and recv.
        pool: where values land; the caller releases each returned buffer.
        max_value: a value claimed or found longer is not read into memory (:class:`Torn`, retry False).
        piece, window: GETRANGE piece size and bytes in flight on a fast link; ``window=None``: always plain GETs.
        pipeline_rtt: connections at least this slow send plain GETs, all in one write.
    """

    def __init__(self, url: str, *, password: str = "", timeout: float, pool: BufferPool, max_value: int,
                 piece: int = PIECE, window: int | None = WINDOW, pipeline_rtt: float = PIPELINE_RTT,
                 max_idle: int = 4) -> None:
        if piece < PEEK:
            raise ValueError(f"piece must be >= {PEEK} bytes, got {piece}")
        self.endpoint = parse_url(url, password)
        self.timeout = float(timeout)
        self.pool = pool
        self.max_value = int(max_value)
        self.piece = int(piece)
        self.window = window
        self.pipeline_rtt = pipeline_rtt
        self.max_idle = max_idle
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._hint = _HINT0
        self._closed = False
        self.connections_made = 0  # for tests: a clean connection is reused, a dirty one replaced

    # -- connection pool -------------------------------------------------------------------------------
    def _acquire(self) -> Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if conn.idle_ok():
                return conn
            conn.close()
        conn = Connection(self.endpoint, self.timeout, self.pipeline_rtt)
        with self._lock:
            self.connections_made += 1
        return conn

    def _release(self, conn: Connection, clean: bool) -> None:
        if clean and os.getpid() == conn.pid:
            with self._lock:
                if len(self._idle) < self.max_idle and not self._closed:
                    self._idle.append(conn)
                    return
        conn.close()

    def expect(self, size: int) -> None:
        """A hint: values are about ``size`` bytes (the tier's writes say so), for the first window of a batch."""
        self._hint = max(0, int(size))

    def idle_connections(self) -> int:
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        """Close the idle connections; one in use closes when its batch ends. Reads after this still work (on
        fresh connections, closed after use)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- reads -----------------------------------------------------------------------------------------
    def get_atomic(self, rkey: bytes) -> Result:
        """One plain ``GET`` (atomic however long the value): for a pieced read that did not add up."""
        it = self.fetch([rkey], pieces=False)
        try:
            return next(it)
        finally:
            it.close()

    def fetch(self, rkeys: Sequence[bytes], length_of: Callable[[memoryview], int] | None = None, *,
              pieces: bool = True, primed: bool = False) -> Iterator[Result]:
        """One result per key, in order (see :data:`Result`); each ``PooledBuffer`` belongs to the consumer.

        ``length_of(prefix)`` gives a long value's full length from its first :data:`PEEK` bytes (raising
        for a foreign value); without it, or with ``pieces=False``, or on a slow link, every key is one GET.
        ``primed``: the first item is :data:`SENT`, handed over as soon as the first requests are written (before
        any reply is read), so that a caller reading from several servers (a cluster) sends to all of them before
        it waits on any. Raises OSError / ProtocolError (the connection is then closed and unread results
        dropped)."""
        rkeys = list(rkeys)
        if not rkeys:
            return
        conn = self._acquire()
        clean = False
        windowed = pieces and length_of is not None and self.window is not None and conn.rtt < self.pipeline_rtt
        if windowed:
            window = max(int(self.window), int(conn.rtt * WINDOW_RATE))
            stream = self._pieced(conn, rkeys, length_of, window)
        else:
            stream = self._plain(conn, rkeys)
        try:
            if next(stream) is not SENT:  # pragma: no cover - both streams announce their first write
                raise ProtocolError("internal: stream did not announce its first write")
            if primed:
                yield SENT
            for n, res in enumerate(stream):
                if n == len(rkeys) - 1:
                    clean = True  # every reply read: reusable even if the consumer stops here
                yield res
        finally:
            stream.close()  # releases what the consumer never got
            self._release(conn, clean)

    def _plain(self, conn: Connection, rkeys: list[bytes]) -> Iterator[Result]:
        t0 = time.perf_counter()
        conn.sock.sendall(_PING + b"".join(_get(k) for k in rkeys))
        yield SENT
        conn.pong(t0)
        for _ in rkeys:
            n = conn.bulk_len(1 << 62)
            if isinstance(n, ReplyError):
                yield n
            elif n < 0:
                yield None
            elif n > self.max_value:  # not ours (we never write one): drain it rather than hold it
                conn.skip(n)
                conn.crlf()
                yield Torn(f"value of {n} bytes exceeds the {self.max_value}-byte limit", retry=False)
            else:
                yield self._receive(conn, n)

    def _receive(self, conn: Connection, n: int) -> PooledBuffer:
        """The ``n`` bytes of a bulk reply (its ``$n`` line already read) in a pooled buffer, CRLF consumed."""
        buf = self.pool.take(n)
        try:
            conn.read_into(buf.view, n)
            conn.crlf()
        except BaseException:
            buf.release()
            raise
        return buf

    def _pieced(self, conn: Connection, rkeys: list[bytes], length_of: Callable[[memoryview], int],
                window: int) -> Iterator[Result]:
        keys = [_Key(k) for k in rkeys]
        piece = self.piece
        first = piece + 1  # the first request of a key: a reply shorter than this is the whole value
        inflight: deque[tuple[int, int, int, int]] = deque()  # (key index, start, bytes asked, bytes counted)
        sized: deque[int] = deque()  # keys whose length is known and that have pieces left to request
        state = {"cursor": 0, "out": 0}
        pinged = [0.0]  # when the PING at the head of the first write went out (0: its reply is read)
        yielded = 0

        def pump() -> None:
            reqs = [_PING] if not state["cursor"] else []
            while state["out"] < window and len(inflight) < MAX_INFLIGHT:
                while sized and keys[sized[0]].next > keys[sized[0]].total:
                    sized.popleft()
                if sized:
                    j = sized[0]
                    k = keys[j]
                    a, b = k.next, min(k.next + piece, k.total + 1)  # the last piece asks one byte past the end
                    k.next = b
                    reqs.append(_getrange(k.rkey, a, b - 1))
                    inflight.append((j, a, b - a, b - a))
                    state["out"] += b - a
                elif state["cursor"] < len(keys):
                    j = state["cursor"]
                    state["cursor"] += 1
                    est = max(_MIN_EST, min(first, self._hint))
                    reqs.append(_getrange(keys[j].rkey, 0, first - 1))
                    inflight.append((j, 0, first, est))
                    state["out"] += est
                else:
                    break
            if reqs:
                if reqs[0] is _PING:
                    pinged[0] = time.perf_counter()
                conn.sock.sendall(b"".join(reqs))

        def tear(k: _Key, reason: str) -> None:
            if k.buf is not None:
                k.buf.release()
                k.buf = None
            k.torn = True
            k.next = k.total + 1  # nothing more is requested; pieces in flight are drained
            k.result, k.final = Torn(reason), True

        def read_one() -> None:
            if pinged[0]:
                conn.pong(pinged[0])
                pinged[0] = 0.0
            j, a, asked, counted = inflight.popleft()
            state["out"] -= counted
            k = keys[j]
            m = conn.bulk_len(asked)
            if isinstance(m, ReplyError):
                if a == 0:
                    k.result, k.final = m, True
                elif not k.torn:
                    tear(k, f"error reply to a later piece: {m.message}")
                return
            if m < 0:
                raise ProtocolError("nil reply to GETRANGE")
            if a == 0:
                if m < first:  # the whole value, in one reply
                    if m == 0:  # a missing key (lmkv never stores an empty value)
                        conn.crlf()
                        k.final = True
                        return
                    self._hint = m
                    k.result, k.final = self._receive(conn, m), True
                    return
                try:
                    total = int(length_of(conn.peek(PEEK)))
                except Exception as exc:  # a foreign value: re-read atomically, the caller judges it
                    total, why = -1, f"no length in the value's first bytes ({exc})"
                else:
                    why = f"value claims {total} bytes but has more than {piece}"
                    if total > self.max_value:
                        why = f"value claims {total} bytes, more than the {self.max_value}-byte limit"
                if total < first or total > self.max_value:
                    conn.skip(m)
                    conn.crlf()
                    tear(k, why)
                    return
                self._hint = total
                k.total, k.next = total, m
                k.buf = self.pool.take(total)
                conn.read_into(k.buf.view, m)
                conn.crlf()
                sized.append(j)
                return
            expect = min(a + asked, k.total) - a  # value bytes this piece must carry
            if k.torn:
                conn.skip(m)
            elif m == expect:
                conn.read_into(k.buf.view[a:a + m], m)
            else:
                conn.skip(m)
                tear(k, "value changed length while it was read in pieces")
            conn.crlf()
            if a + asked == k.total + 1 and not k.torn:
                k.result, k.final = k.buf, True
                k.buf = None

        try:
            pump()
            yield SENT
            last = len(keys) - 1
            for j, k in enumerate(keys):
                while not k.final or (j == last and inflight):
                    pump()
                    if not inflight:
                        raise ProtocolError("internal: nothing in flight for an unfinished key")
                    read_one()
                res, k.result = k.result, None
                yielded = j + 1
                yield res
        finally:  # closed early or failed: release what the consumer never got
            for k in keys[yielded:]:
                for b in (k.buf, k.result):
                    if isinstance(b, PooledBuffer):
                        b.release()
                k.buf = k.result = None


__all__ = ["RespReader", "Connection", "Endpoint", "parse_url", "ProtocolError", "AuthError", "ReplyError", "Torn",
           "SENT", "PIECE", "WINDOW", "PIPELINE_RTT"]
