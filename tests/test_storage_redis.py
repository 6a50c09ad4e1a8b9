"""Redis tier against a real redis-server: round trips, a killed and restarted server, corrupt values, timeouts,
and the lean read path (pooled buffers, GETRANGE pieces) at the sizes where it changes strategy."""

from __future__ import annotations

import logging
import os
import signal
import struct
import time
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

from lmkv.plan import leading_hits
from lmkv.storage import MemoryTier, TieredStore
from lmkv.storage.buffers import BufferPool
from lmkv.storage.disk import DiskTier
from lmkv.storage.objects import Encoded
from lmkv.storage.redis_tier import MAX_VALUE, RedisTier
from lmkv.storage.resp import PIECE
from lmkv.storage.serde import RawSerde
from lmkv.testing import CountingPool

pytestmark = pytest.mark.redis


@pytest.fixture()
def server():
    srv = RedisServer().start()
    yield srv
    srv.cleanup()


def _kv(seed: int, n: int = 4096) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _tier(srv: RedisServer, **kw) -> RedisTier:
    kw.setdefault("socket_timeout", 0.3)
    kw.setdefault("retry_backoff", 0.05)
    return RedisTier(srv.url, key_prefix=f"t-{uuid.uuid4().hex[:6]}:", **kw)


def _read(tier, key):
    obj = tier.get(key)
    if obj is None:
        return None
    with obj:
        return RawSerde().decode(obj)


@pytest.mark.parametrize("lean", [True, False], ids=["lean-reader", "redis-py-reads"])
def test_redis_roundtrip_batches_and_one_value_per_object(server: RedisServer, lean: bool) -> None:
    tier = _tier(server, lean_reads=lean)
    assert (tier.reader is not None) == lean
    kvs = {f"k{i}": _kv(i) for i in range(5)}
    tier.put_many([(k, RawSerde().encode(k, v, b"fp")) for k, v in kvs.items()])
    tier.flush()
    assert tier.client.dbsize() == 5  # exactly one Redis value per object
    got = tier.get_many([*kvs, "missing"])
    assert got[-1] is None
    for v, obj in zip(kvs.values(), got):
        with obj:
            assert obj.owned and torch.equal(RawSerde().decode(obj), v)
    assert leading_hits(tier.contains_many(["k0", "k1", "nope", "k2"])) == 2
    assert tier.remove("k0") and not tier.contains("k0") and not tier.remove("k0")
    tier.flush()
    assert tier.client.dbsize() == 4 and tier.stats()["puts"] == 5
    tier.close()


def test_redis_password_url(tmp_path: Path) -> None:
    srv = RedisServer(password="s3cret").start()
    try:
        tier = RedisTier(srv.url, socket_timeout=0.5)
        tier.put("k", RawSerde().encode("k", _kv(0), b""))
        tier.flush()
        assert torch.equal(_read(tier, "k"), _kv(0))
        tier.close()
        wrong = RedisTier(f"redis://:nope@127.0.0.1:{srv.port}/0", socket_timeout=0.5)
        assert wrong.get("k") is None and not wrong.contains("k")  # an auth error is a miss, never raised
        wrong.close()
    finally:
        srv.cleanup()


def test_flipped_byte_in_redis_value_is_a_miss_with_warning(server: RedisServer, caplog) -> None:
    tier = _tier(server)
    tier.put("k", RawSerde().encode("k", _kv(1), b""))
    tier.flush()
    rkey = tier.prefix + "k"
    value = bytearray(tier.client.get(rkey))
    value[-7] ^= 0x40
    tier.client.set(rkey, bytes(value))
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert tier.get("k") is None
    assert "corrupt" in caplog.text and tier.client.exists(rkey) == 0
    tier.client.set(tier.prefix + "foreign", b"\x80\x04pickle-bytes-never-unpickled")
    assert tier.get("foreign") is None and tier.stats()["corrupt"] == 2
    tier.close()


def test_redis_killed_and_restarted_mid_run(server: RedisServer, tmp_path: Path, caplog) -> None:
    redis_tier = _tier(server)
    store = TieredStore([MemoryTier(1 << 16), DiskTier(tmp_path, 1 << 20), redis_tier])
    store.put("before", _kv(1), fingerprint=b"a")
    store.flush()
    server.stop()
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        t0 = time.monotonic()
        for i in range(20):  # none of this may raise or block for long
            store.put(f"down{i}", _kv(i), fingerprint=b"b")
            assert torch.equal(store.get(f"down{i}"), _kv(i))
            assert store.get(f"never{i}") is None
            store.batched_contains([f"down{i}", f"never{i}"])
        store.flush(timeout=5)
        elapsed = time.monotonic() - t0
    assert elapsed < 5, f"calls blocked {elapsed:.1f}s while Redis was down"
    assert sum("unreachable" in r.message for r in caplog.records if r.levelno >= logging.WARNING) == 1
    assert torch.equal(store.get("before"), _kv(1))  # memory and disk are intact
    store.tier("memory").remove("before")
    assert torch.equal(store.get("before"), _kv(1)) and store.last_hit_tier("before") == "disk"
    server.start()  # same port, empty: a restarted server lost its data
    deadline = time.monotonic() + 5
    while not redis_tier.available() and time.monotonic() < deadline:
        time.sleep(0.05)
    store.put("after", _kv(99), fingerprint=b"c")
    store.flush()
    for t in ("memory", "disk"):
        store.tier(t).remove("after")
    assert torch.equal(store.get("after"), _kv(99)) and store.last_hit_tier("after") == "redis"
    store.assert_no_leaks()
    store.close()


def test_unreachable_server_never_blocks_beyond_the_timeout() -> None:
    srv = RedisServer()  # never started: connection refused
    tier = RedisTier(srv.url, socket_timeout=0.2, retry_backoff=10.0)
    t0 = time.monotonic()
    assert tier.get("k") is None
    assert not tier.put("k", RawSerde().encode("k", _kv(0), b""))  # dropped at once while down
    assert tier.get("k") is None and not tier.contains("k") and tier.get_many(["a", "b"]) == [None, None]
    assert time.monotonic() - t0 < 1.0
    tier.close()


def test_redis_url_is_validated() -> None:
    with pytest.raises(ValueError, match="url"):
        RedisTier("http://localhost:6379")


# -- the lean read path ------------------------------------------------------------------------------------------
def _bytes_kv(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _payload_for_total(key: str, total: int) -> int:
    """Payload bytes that make ``key``'s stored object exactly ``total`` bytes (header included)."""
    return total - RawSerde().encode(key, torch.empty(0, dtype=torch.uint8), b"fp").header.header_len


def _put(tier: RedisTier, key: str, kv: torch.Tensor) -> None:
    tier.put(key, RawSerde().encode(key, kv, b"fp"))
    tier.flush()


_TOTALS = [64, 65, 4096, PIECE - 1, PIECE, PIECE + 1, PIECE + 2, 2 * PIECE, 2 * PIECE + 1, 3 * PIECE + 77]


@pytest.fixture(scope="module")
def shared_server():
    srv = RedisServer().start()
    yield srv
    srv.cleanup()


@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(totals=st.lists(st.sampled_from(_TOTALS) | st.integers(64, 3 * PIECE), min_size=1, max_size=4),
       seed=st.integers(0, 2**31 - 1))
@example(totals=[8 << 20], seed=0)
@example(totals=_TOTALS, seed=1)
def test_lean_reads_are_bit_exact_at_piece_boundaries(shared_server, totals, seed) -> None:
    """Object sizes (header included) around the GETRANGE piece: read with get and get_many, bit-exact."""
    tier = _tier(shared_server)
    keys = [f"b{i}" for i in range(len(totals))]
    kvs = [_bytes_kv(_payload_for_total(k, t), seed + i) for i, (k, t) in enumerate(zip(keys, totals))]
    for k, kv in zip(keys, kvs):
        _put(tier, k, kv)
    assert [len(tier.client.get(tier.prefix + k)) for k in keys] == totals
    for k, kv in zip(keys, kvs):
        assert torch.equal(_read(tier, k), kv)
    for kv, obj in zip(kvs, tier.get_many(keys)):
        with obj:
            assert obj.owned and torch.equal(RawSerde().decode(obj), kv)  # took the buffer: it stays valid
            out = torch.empty_like(kv)
            assert torch.equal(RawSerde().decode(obj, out=out), kv)  # the memmove path (address of the view)
    assert tier.stats()["corrupt"] == 0 and tier.stats()["rereads"] == 0
    tier.client.delete(*[tier.prefix + k for k in keys])
    tier.close()


def test_batch_mixing_hits_misses_and_pending_writes(server: RedisServer) -> None:
    tier = _tier(server)
    big, small = _bytes_kv(3 * PIECE, 1), _bytes_kv(1000, 2)
    _put(tier, "big", big)
    _put(tier, "small", small)
    tier.flush()
    tier.remove("small")  # pending removal (until flushed): a miss however Redis answers
    keys = ["absent0", "big", "small", "absent1", "big"]
    got = tier.get_many(keys)
    assert [g is None for g in got] == [True, False, True, True, False]
    for g in got[1::3]:
        with g:
            assert torch.equal(RawSerde().decode(g), big)
    st = tier.stats()
    assert st["hits"] == 2 and st["misses"] == 3
    tier.close()


def test_lean_iterator_closed_early_leaves_no_half_read_connection(server: RedisServer) -> None:
    tier = _tier(server)
    kvs = [_bytes_kv(2 * PIECE + i, i) for i in range(6)]
    for i, kv in enumerate(kvs):
        _put(tier, f"e{i}", kv)
    released = []
    enc = RawSerde().encode("pending", kvs[0], b"fp")
    with tier._send_lock:  # hold the writer: "pending" stays pending, answered locally with a write reference
        tier.put("pending", Encoded(enc.header, enc.payload, release=lambda: released.append(1),
                                    keepalive=enc.keepalive))
        it = tier.iter_many([f"e{i}" for i in range(6)] + ["pending"])
        with next(it) as obj:
            assert torch.equal(RawSerde().decode(obj), kvs[0])
        it.close()
    made = tier.reader.connections_made
    assert tier.reader.idle_connections() == 0
    for obj, kv in zip(tier.get_many([f"e{i}" for i in range(5, -1, -1)]), kvs[::-1]):
        with obj:
            assert torch.equal(RawSerde().decode(obj), kv)
    assert tier.reader.connections_made == made + 1 and tier.reader.idle_connections() == 1
    tier.flush(timeout=5)
    assert released == [1]  # the pending object never handed over gave its reference back: the source is freed
    tier.close()


def test_lean_reads_reuse_the_pool_when_warm(server: RedisServer) -> None:
    pool = BufferPool(64 << 20)
    tier = _tier(server, buffer_pool=pool)
    assert tier.buffers is pool
    kvs = [_bytes_kv(n, n) for n in (100, PIECE + 3, 4 * PIECE)]
    for i, kv in enumerate(kvs):
        _put(tier, f"w{i}", kv)
    keys = [f"w{i}" for i in range(3)]

    outs = [torch.empty_like(kv) for kv in kvs]

    def read_all() -> None:  # the hot path: decode into the consumer's buffer, the pooled one goes back
        for obj, kv, out in zip(tier.get_many(keys), kvs, outs):
            with obj:
                assert torch.equal(RawSerde().decode(obj, out), kv)

    read_all()
    allocs, cached = pool.allocations, pool.cached_bytes()
    assert allocs >= 1 and cached > 0
    for _ in range(4):
        read_all()
        with tier.get("w2") as obj:
            assert torch.equal(RawSerde().decode(obj, outs[2]), kvs[2])
    assert pool.allocations == allocs and pool.cached_bytes() == cached
    kept = _read(tier, "w2")  # decoded without out: the tensor keeps the buffer, which leaves the pool
    assert torch.equal(kept, kvs[2]) and pool.cached_bytes() < cached
    read_all()
    assert torch.equal(kept, kvs[2])  # later reads never write into a kept buffer
    cached = pool.cached_bytes()
    obj = tier.get("w1")
    assert pool.cached_bytes() < cached  # a held object holds its buffer ...
    obj.release()
    assert pool.cached_bytes() == cached  # ... and gives it back on release
    tier.close()


def test_server_killed_mid_batch_is_misses_without_a_hang(server: RedisServer, caplog) -> None:
    pool = CountingPool()
    tier = _tier(server, socket_timeout=1.0, buffer_pool=pool)
    kvs = [_bytes_kv(4 << 20, i) for i in range(12)]
    for i, kv in enumerate(kvs):
        _put(tier, f"m{i}", kv)
    got = []
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        it = tier.iter_many([f"m{i}" for i in range(12)])
        obj = next(it)
        got.append(RawSerde().decode(obj))
        obj.release()
        server.stop()
        t0 = time.monotonic()
        for obj in it:  # no exception: what arrives is intact, the rest are misses
            if obj is None:
                got.append(None)
                continue
            with obj:
                got.append(RawSerde().decode(obj))
        elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"a dead server blocked the batch for {elapsed:.1f}s"
    assert len(got) == 12 and got[-1] is None and not tier.available()
    assert all(g is None or torch.equal(g, kv) for g, kv in zip(got, kvs))
    assert sum("unreachable" in r.message for r in caplog.records if r.levelno >= logging.WARNING) == 1
    assert tier.get("m0") is None  # backing off: no network at all
    assert pool.outstanding == 0
    tier.close()


def test_stopped_server_is_a_miss_within_the_socket_timeout(server: RedisServer) -> None:
    tier = _tier(server, socket_timeout=0.3, retry_backoff=10.0)
    _put(tier, "k", _bytes_kv(2 * PIECE, 0))
    assert _read(tier, "k") is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert tier.get("k") is None and tier.get_many(["k", "k"]) == [None, None]
        assert time.monotonic() - t0 < 0.9 and not tier.available()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    tier.close()


def _forge(tier: RedisTier, key: str, payload_len: int, *, claim: int | None = None, magic: bytes | None = None
           ) -> bytes:
    """A stored value for ``key`` whose header claims ``claim`` payload bytes (and/or has another magic)."""
    _put(tier, key, _bytes_kv(payload_len, 5))
    value = bytearray(tier.client.get(tier.prefix + key))
    if claim is not None:
        value[16:24] = struct.pack("<Q", claim)
    if magic is not None:
        value[:4] = magic
    tier.client.set(tier.prefix + key, bytes(value))
    return bytes(value)


@pytest.mark.parametrize("case", ["huge-claim", "short-claim", "long-claim", "bad-magic", "flipped-byte",
                                  "small-bad-magic"])
def test_forged_values_are_misses_with_warning_and_deleted(server: RedisServer, caplog, case: str) -> None:
    pool = CountingPool()
    tier = _tier(server, buffer_pool=pool)
    n = 3 * PIECE
    if case == "huge-claim":
        _forge(tier, "k", n, claim=1 << 39)
    elif case == "short-claim":
        _forge(tier, "k", n, claim=n - 1000)
    elif case == "long-claim":
        _forge(tier, "k", n, claim=n + 1000)
    elif case in ("bad-magic", "small-bad-magic"):
        _forge(tier, "k", n if case == "bad-magic" else 100, magic=b"EVIL")
    else:
        _put(tier, "k", _bytes_kv(n, 5))
        value = bytearray(tier.client.get(tier.prefix + "k"))
        value[2 * PIECE + 3] ^= 0x01
        tier.client.set(tier.prefix + "k", bytes(value))
    _put(tier, "fine", _bytes_kv(n, 6))
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        got = tier.get_many(["k", "fine"])
    assert got[0] is None and "corrupt" in caplog.text
    with got[1] as obj:
        assert torch.equal(RawSerde().decode(obj), _bytes_kv(n, 6))
    assert tier.client.exists(tier.prefix + "k") == 0 and tier.stats()["corrupt"] == 1
    assert tier.available() and pool.outstanding == 0  # the rejected value's buffer went back to the pool
    tier.close()


@pytest.mark.parametrize("grow", [4096, 0], ids=["other-length", "same-length"])
def test_value_rewritten_between_pieces_is_read_again_not_called_corrupt(server: RedisServer, grow: int) -> None:
    """A pieced read is not atomic: a SET between pieces must end in the new value, never a miss or a deletion
    (another length: the pieces do not add up; the same length: the checksum does not match)."""
    pool = CountingPool()
    tier = _tier(server, buffer_pool=pool)
    first, old = _bytes_kv(4 * PIECE, 1), _bytes_kv(8 * PIECE, 2)
    new = _bytes_kv(8 * PIECE + grow, 3)
    _put(tier, "a", first)
    _put(tier, "b", old)
    it = tier.iter_many(["a", "b"])
    with next(it) as obj:  # "b"'s first piece is in flight by now, its later pieces are not
        assert torch.equal(RawSerde().decode(obj), first)
    writer = RedisTier(server.url, key_prefix=tier.prefix, socket_timeout=1.0)
    _put(writer, "b", new)
    obj = next(it)
    assert obj is not None
    with obj:
        assert torch.equal(RawSerde().decode(obj), new)
    it.close()
    st = tier.stats()
    assert st["rereads"] == 1 and st["corrupt"] == 0 and tier.client.exists(tier.prefix + "b") == 1
    assert pool.outstanding == 0  # the torn read's buffer was given back
    writer.close()
    tier.close()


def test_error_reply_is_a_miss_with_warning(server: RedisServer, caplog) -> None:
    tier = _tier(server)
    tier.client.rpush(tier.prefix + "list", b"x")
    _put(tier, "ok", _bytes_kv(10, 1))
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        got = tier.get_many(["list", "ok"])
    assert got[0] is None and "WRONGTYPE" in caplog.text and got[1] is not None
    got[1].release()
    assert tier.available() and tier.client.exists(tier.prefix + "list") == 1  # not ours to delete
    tier.close()


def test_tls_urls_keep_the_redis_py_read_path() -> None:
    tier = RedisTier("rediss://127.0.0.1:1/0", socket_timeout=0.2)
    assert tier.reader is None
    tier.close()
    plain = RedisTier("redis://127.0.0.1:1/0", socket_timeout=0.2)
    assert plain.reader is not None and plain.reader.max_value == MAX_VALUE
    plain.close()


def test_a_port_taken_after_it_was_chosen_is_chosen_again() -> None:
    """Another process binds the chosen port before redis-server does: the server exits at once, and the ports the
    helper chose are chosen again; a port the caller fixed is not (the caller asked for that one)."""
    import socket

    srv = RedisServer()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        srv.port = taken  # as if the squatter had won the race for the port chosen in __init__
        try:
            srv.start()
            assert srv.port != taken and srv.proc is not None and srv.proc.poll() is None
        finally:
            srv.cleanup()
        fixed = RedisServer(port=taken)
        try:
            with pytest.raises(RuntimeError, match="taken"):
                fixed.start()
        finally:
            fixed.cleanup()
