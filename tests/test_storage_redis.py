"""Redis tier against a real redis-server: round trips, a killed and restarted server, corrupt values, timeouts."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest
import torch
from redis_server import RedisServer

from lmkv.plan import leading_hits
from lmkv.storage import MemoryTier, TieredStore
from lmkv.storage.disk import DiskTier
from lmkv.storage.redis_tier import RedisTier
from lmkv.storage.serde import RawSerde

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


def test_redis_roundtrip_batches_and_one_value_per_object(server: RedisServer) -> None:
    tier = _tier(server)
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
