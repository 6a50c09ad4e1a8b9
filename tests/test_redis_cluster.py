"""The real Redis Cluster the cluster tier ([4/9]) is tested against: 6 ``redis-server`` processes on loopback
(3 masters, 3 replicas), formed by ``redis-cli --cluster create``, keys spread over every master, and a failover
when a master is killed. Every process started here is stopped by PID."""

from __future__ import annotations

import os
import time

import pytest
import redis
from redis.cluster import RedisCluster

from lmkv.testing import LocalRedisCluster, RedisUnavailable


@pytest.fixture
def cluster():
    c = LocalRedisCluster()
    try:
        c.start()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    yield c
    pids = [n.proc.pid for n in c.nodes if n.proc is not None]
    c.cleanup()
    for pid in pids:  # exactly the processes it started are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _client(c: LocalRedisCluster) -> RedisCluster:
    return RedisCluster.from_url(c.url, socket_timeout=2.0)


def test_the_cluster_forms_and_spreads_keys_over_every_master(cluster: LocalRedisCluster) -> None:
    masters = cluster.masters()
    assert len(masters) == 3 and len(cluster.nodes) == 6
    client = _client(cluster)
    keys = [f"lmkv:chunk-{i}" for i in range(300)]  # no hash tags: slots follow the keys
    for k in keys:
        client.set(k, k.encode() * 3)
    assert all(client.get(k) == k.encode() * 3 for k in keys)
    per_master = [redis.Redis(port=m.port).dbsize() for m in masters]
    assert sum(per_master) == 300 and min(per_master) > 50  # about a third each
    client.close()


def test_a_killed_master_fails_over_to_its_replica(cluster: LocalRedisCluster) -> None:
    client = _client(cluster)
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
    client = _client(cluster)  # a fresh client learns the new topology from any live seed
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
