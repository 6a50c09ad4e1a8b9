"""The lean RESP reader (lmkv.storage.resp) against a real redis-server, and against fake servers for garbage."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from redis_server import RedisServer

from lmkv.storage.buffers import BufferPool, PooledBuffer
from lmkv.storage.resp import (
    _LINE_BUF,
    PEEK,
    AuthError,
    Endpoint,
    ProtocolError,
    ReplyError,
    RespReader,
    Torn,
    parse_url,
)
from lmkv.testing import CountingPool

pytestmark = pytest.mark.redis

SMALL_PIECE = 4096  # many pieces per value at test sizes
SIZES = [0, 1, 2, 7, 8, 9, PEEK - 1, PEEK, PEEK + 1, SMALL_PIECE - 1, SMALL_PIECE, SMALL_PIECE + 1, SMALL_PIECE + 2,
         2 * SMALL_PIECE, 2 * SMALL_PIECE + 1, 2 * SMALL_PIECE + 2, _LINE_BUF - 1, _LINE_BUF, _LINE_BUF + 1]


@pytest.fixture(scope="module")
def server():
    srv = RedisServer().start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def client(server):
    import redis

    c = redis.Redis(port=server.port)
    yield c
    c.close()


def _value(n: int, seed: int) -> bytes:
    """``n`` random bytes; from 8 bytes on the first 8 hold ``n`` (little-endian) for :func:`_length_of`."""
    data = bytearray(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    if n >= 8:
        data[:8] = struct.pack("<Q", n)
    return bytes(data)


def _length_of(prefix: memoryview) -> int:
    return struct.unpack_from("<Q", prefix, 0)[0]


def _reader(srv, pool: BufferPool | None = None, **kw) -> RespReader:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("max_value", 64 << 20)
    return RespReader(srv.url, pool=pool or BufferPool(64 << 20), **kw)


def _take_all(results) -> list[bytes | object]:
    """Copy every buffer out and release it (what a consumer does)."""
    out = []
    for r in results:
        if isinstance(r, PooledBuffer):
            out.append(bytes(r.view))
            r.release()
        else:
            out.append(r)
    return out


def test_parse_url_forms() -> None:
    assert parse_url("redis://127.0.0.1:6380/2") == Endpoint("127.0.0.1", 6380, None, 2, None, None)
    assert parse_url("redis://h") == Endpoint("h", 6379, None, 0, None, None)
    assert parse_url("redis://:p%40ss@h:1/0", password="other").password == "p@ss"  # the URL wins, decoded
    assert parse_url("redis://h:1/0", password="arg").password == "arg"
    assert parse_url("redis://u:p@h:1/0?db=5") == Endpoint("h", 1, None, 5, "u", "p")  # the query wins
    assert parse_url("unix:///tmp/r.sock?db=3") == Endpoint("", 0, "/tmp/r.sock", 3, None, None)
    for bad in ("rediss://h:1/0", "http://h", "redis://h/notadb", "unix://"):
        with pytest.raises(ValueError):
            parse_url(bad)


@given(sizes=st.lists(st.sampled_from(SIZES) | st.integers(0, 5 * SMALL_PIECE), min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1), pieces=st.booleans())
@example(sizes=[8 << 20], seed=1, pieces=True)
@example(sizes=[8 << 20, 3, 8 << 20], seed=2, pieces=False)
@example(sizes=SIZES, seed=3, pieces=True)
def test_values_read_back_bit_exact_through_the_pool(server, client, sizes, seed, pieces) -> None:
    pool = BufferPool(64 << 20)
    reader = _reader(server, pool, piece=SMALL_PIECE, window=2 * SMALL_PIECE)
    prefix = f"hyp-{seed}-"
    keys = [f"{prefix}{i}".encode() for i in range(len(sizes))]
    values = [_value(n, seed + i) for i, n in enumerate(sizes)]
    client.delete(*keys)
    for k, v in zip(keys, values):
        if v:
            client.set(k, v)
    got = _take_all(reader.fetch(keys, _length_of, pieces=pieces))
    # an empty value reads as a miss (GETRANGE cannot tell it from a missing key; lmkv never stores one)
    assert got == [v if v else None for v in values]
    assert reader.idle_connections() == 1  # fully read: back in the pool
    client.delete(*keys)
    reader.close()


def test_default_piece_large_values_and_misses(server, client) -> None:
    reader = _reader(server)  # the module's piece and window
    sizes = [8 << 20, 100, 0, (1 << 20) + 1, 512 << 10, (512 << 10) + 1]
    keys = [f"big{i}".encode() for i in range(len(sizes))]
    values = [_value(n, i) for i, n in enumerate(sizes)]
    for k, v in zip(keys, values):
        if v:
            client.set(k, v)
    order = [keys[0], b"absent-1", keys[1], keys[2], b"absent-2", *keys[3:]]
    want = [values[0], None, values[1], None, None, *values[3:]]
    assert _take_all(reader.fetch(order, _length_of)) == want
    assert _take_all(reader.fetch(order, _length_of, pieces=False)) == want
    client.delete(*keys)
    reader.close()


def test_warm_pool_stops_allocating(server, client) -> None:
    pool = BufferPool(64 << 20)
    reader = _reader(server, pool, piece=SMALL_PIECE, window=2 * SMALL_PIECE)
    keys = [b"warm0", b"warm1", b"warm2"]
    for i, k in enumerate(keys):
        client.set(k, _value(3 * SMALL_PIECE + 17 * i, i))
    _take_all(reader.fetch(keys, _length_of))
    allocs, cached = pool.allocations, pool.cached_bytes()
    assert allocs >= 1 and cached > 0
    for _ in range(5):
        _take_all(reader.fetch(keys, _length_of))
    assert pool.allocations == allocs and pool.cached_bytes() == cached
    assert reader.connections_made == 1  # one connection, reused every time
    client.delete(*keys)
    reader.close()


@pytest.mark.parametrize("pieces", [True, False])
def test_iterator_closed_early_discards_its_connection(server, client, pieces) -> None:
    pool = CountingPool()
    reader = _reader(server, pool, piece=SMALL_PIECE, window=2 * SMALL_PIECE)
    keys = [f"early{i}".encode() for i in range(6)]
    values = [_value(5 * SMALL_PIECE + i, 10 + i) for i in range(6)]
    for k, v in zip(keys, values):
        client.set(k, v)
    it = reader.fetch(keys, _length_of, pieces=pieces)
    first = next(it)
    assert bytes(first.view) == values[0]
    first.release()
    it.close()  # replies are still in flight
    assert reader.idle_connections() == 0 and reader.connections_made == 1
    assert pool.outstanding == 0  # buffers read ahead were given back, not leaked
    assert _take_all(reader.fetch(keys[::-1], _length_of, pieces=pieces)) == values[::-1]
    assert reader.connections_made == 2  # a fresh connection, the half-read one was closed
    client.delete(*keys)
    reader.close()


def test_error_reply_is_a_result_and_the_batch_goes_on(server, client) -> None:
    reader = _reader(server, piece=SMALL_PIECE, window=2 * SMALL_PIECE)
    client.delete(b"alist")
    client.rpush(b"alist", b"x")
    client.set(b"after", _value(3 * SMALL_PIECE, 7))
    got = _take_all(reader.fetch([b"alist", b"after"], _length_of))
    assert isinstance(got[0], ReplyError) and "WRONGTYPE" in got[0].message
    assert got[1] == _value(3 * SMALL_PIECE, 7)
    reader.close()


def test_claimed_length_that_does_not_match_is_torn(server, client) -> None:
    reader = _reader(server, piece=SMALL_PIECE, window=2 * SMALL_PIECE, max_value=1 << 20)
    n = 3 * SMALL_PIECE
    for name, claim in (("longer", n + 10), ("shorter", n - 10), ("huge", 1 << 40), ("tiny", 20)):
        v = bytearray(_value(n, 3))
        v[:8] = struct.pack("<Q", claim)
        client.set(name, bytes(v))
    client.set(b"ok", _value(n, 4))
    got = _take_all(reader.fetch([b"longer", b"shorter", b"huge", b"tiny", b"ok"], _length_of))
    assert all(isinstance(g, Torn) and g.retry for g in got[:4]), got[:4]
    assert got[4] == _value(n, 4)
    plain = _take_all(reader.fetch([b"longer"], _length_of, pieces=False))  # one GET: the value as it is
    assert len(plain[0]) == n
    assert reader.connections_made == 1
    reader.close()


def test_a_value_larger_than_the_limit_is_never_buffered(server, client) -> None:
    pool = BufferPool(64 << 20)
    reader = _reader(server, pool, max_value=1 << 16)
    client.set(b"toolong", _value(1 << 18, 5))
    client.set(b"fine", _value(100, 6))
    got = _take_all(reader.fetch([b"toolong", b"fine"], _length_of, pieces=False))
    assert isinstance(got[0], Torn) and not got[0].retry and got[1] == _value(100, 6)
    assert pool.allocations == 1  # only the small value got a buffer
    reader.close()


def test_password_and_db(client) -> None:
    srv = RedisServer(password="s3cret").start()
    try:
        import redis

        writer = redis.Redis(port=srv.port, password="s3cret", db=3)
        writer.set(b"k", _value(3 * SMALL_PIECE, 9))
        ok = RespReader(f"redis://:s3cret@127.0.0.1:{srv.port}/3", timeout=2.0, pool=BufferPool(), max_value=1 << 20,
                        piece=SMALL_PIECE)
        assert _take_all(ok.fetch([b"k"], _length_of)) == [_value(3 * SMALL_PIECE, 9)]
        other_db = RespReader(f"redis://127.0.0.1:{srv.port}/0", password="s3cret", timeout=2.0, pool=BufferPool(),
                              max_value=1 << 20)
        assert _take_all(other_db.fetch([b"k"], _length_of)) == [None]
        for bad in (f"redis://:nope@127.0.0.1:{srv.port}/0", f"redis://127.0.0.1:{srv.port}/0"):
            reader = RespReader(bad, timeout=2.0, pool=BufferPool(), max_value=1 << 20)
            with pytest.raises(AuthError):
                list(reader.fetch([b"k"], _length_of))
        writer.close()
        for r in (ok, other_db):
            r.close()
    finally:
        srv.cleanup()


def test_unix_socket() -> None:
    binary = RedisServer().binary
    if binary is None:
        pytest.skip("redis-server is not installed")
    d = tempfile.mkdtemp(prefix="lmkv-resp-unix-")
    path = os.path.join(d, "r.sock")
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no",
                             "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        import redis

        w = redis.Redis(unix_socket_path=path)
        w.set(b"u", _value(3 * SMALL_PIECE + 5, 11))
        reader = RespReader(f"unix://{path}", timeout=2.0, pool=BufferPool(), max_value=1 << 20, piece=SMALL_PIECE)
        assert _take_all(reader.fetch([b"u", b"none"], _length_of)) == [_value(3 * SMALL_PIECE + 5, 11), None]
        reader.close()
        w.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_server_killed_mid_batch_raises_promptly() -> None:
    srv = RedisServer().start()
    try:
        import redis

        w = redis.Redis(port=srv.port)
        keys = [f"kill{i}".encode() for i in range(16)]
        for i, k in enumerate(keys):
            w.set(k, _value(4 << 20, i))
        w.close()
        pool = CountingPool()
        reader = _reader(srv, pool, timeout=1.0)
        it = reader.fetch(keys, _length_of)
        buf = next(it)
        assert bytes(buf.view) == _value(4 << 20, 0)
        buf.release()
        srv.stop()
        t0 = time.monotonic()
        with pytest.raises(OSError):
            for b in it:
                b.release()
        assert time.monotonic() - t0 < 2.0
        assert reader.idle_connections() == 0 and pool.outstanding == 0
    finally:
        srv.cleanup()


def test_a_pooled_connection_to_a_restarted_server_is_replaced() -> None:
    srv = RedisServer().start()
    try:
        import redis

        reader = _reader(srv)
        assert _take_all(reader.fetch([b"r"], _length_of)) == [None]
        assert reader.idle_connections() == 1
        srv.stop()
        srv.start()  # same port: the pooled socket is dead (EOF pending)
        w = redis.Redis(port=srv.port)
        w.set(b"r", _value(3 * SMALL_PIECE, 1))
        w.close()
        assert _take_all(reader.fetch([b"r"], _length_of)) == [_value(3 * SMALL_PIECE, 1)]
        assert reader.connections_made == 2
    finally:
        srv.cleanup()


def test_stopped_server_times_out_within_the_timeout() -> None:
    srv = RedisServer().start()
    try:
        reader = _reader(srv, timeout=0.3)
        assert _take_all(reader.fetch([b"x"], _length_of)) == [None]  # a warm, pooled connection
        os.kill(srv.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                list(reader.fetch([b"x"], _length_of))
            assert time.monotonic() - t0 < 0.9
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert reader.idle_connections() == 0
    finally:
        srv.cleanup()


class _FakeServer:
    """A loopback TCP server that answers PING with PONG and every other request with ``reply``."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._talk, args=(c,), daemon=True).start()

    def _talk(self, c: socket.socket) -> None:
        try:
            while data := c.recv(65536):
                for _ in range(data.count(b"PING")):
                    c.sendall(b"+PONG\r\n")
                if b"GET" in data:  # GET or GETRANGE
                    c.sendall(self.reply)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("reply", [b"hello\r\n", b"$abc\r\n", b"$99999999999\r\n", b"*1\r\n$1\r\nx\r\n",
                                   b"$3\r\nabcXY", b":5\r\n"])
def test_protocol_garbage_raises_and_closes(reply: bytes) -> None:
    fake = _FakeServer(reply)
    try:
        pool = CountingPool()
        reader = RespReader(f"redis://127.0.0.1:{fake.port}/0", timeout=0.5, pool=pool, max_value=1 << 20)
        t0 = time.monotonic()
        with pytest.raises((ProtocolError, OSError)):
            list(reader.fetch([b"k"], _length_of))
        assert time.monotonic() - t0 < 1.5
        assert reader.idle_connections() == 0 and pool.outstanding == 0
    finally:
        fake.close()


def test_a_slow_link_reads_a_batch_in_one_round_trip(server, client) -> None:
    """On a link slower than PIPELINE_RTT every key is one GET, all in one write (the [2/9] one-round-trip batch);
    a fast link reads GETRANGE pieces: a long value's later pieces are requested once its first piece is in (the
    window covers the link's rate x round trip, so here they go out as the first pieces come in)."""
    from lmkv.testing import LatencyProxy

    keys = [f"slow{i}".encode() for i in range(4)]
    values = [_value(3 * SMALL_PIECE + i, 20 + i) for i in range(4)]
    for k, v in zip(keys, values):
        client.set(k, v)
    with LatencyProxy(server.port, 0.001) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        for fast in (False, True):
            reader = RespReader(url, timeout=2.0, pool=BufferPool(), max_value=1 << 20, piece=SMALL_PIECE,
                                window=2 * SMALL_PIECE, pipeline_rtt=10.0 if fast else 1e-3)
            assert _take_all(reader.fetch([b"warm"], _length_of)) == [None]  # connect (the PINGs are round trips)
            proxy.reset()
            assert _take_all(reader.fetch(keys, _length_of)) == values
            if fast:
                assert 2 <= proxy.round_trips <= len(keys) + 1
            else:
                assert proxy.round_trips == 1
            reader.close()


def test_the_redis_tier_turns_garbage_into_misses_with_one_warning(caplog) -> None:
    import logging

    from lmkv.storage.redis_tier import RedisTier

    fake = _FakeServer(b"$abc\r\n")
    try:
        tier = RedisTier(f"redis://127.0.0.1:{fake.port}/0", socket_timeout=0.5)
        with caplog.at_level(logging.WARNING, "lmkv.storage"):
            assert tier.get("k") is None and tier.get_many(["a", "b"]) == [None, None]
        assert sum("cannot parse" in r.message for r in caplog.records if r.levelno >= logging.WARNING) == 1
        assert tier.stats()["errors"] == 2 and tier.reader.idle_connections() == 0
        tier.close()
    finally:
        fake.close()
