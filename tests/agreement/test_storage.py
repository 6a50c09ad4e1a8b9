"""Stateful property test: random put/get/contains/remove/restart/drop sequences against the reference model.

The real TieredStore (memory pool + disk files + a real Redis) and ``lmkv.reference.storage.ReferenceStore``
get the same operations; every result must agree bit for bit, and after every step each tier must hold
exactly the keys the model says it holds. All values have the same payload size, so the memory pool never
fragments and its LRU evictions are exactly the model's. The disk tier is big enough never to evict (its
eviction order is pinned by a deterministic test in test_storage_tiers.py); objects reach Redis only through
write-through, and are served from it after a rule drops them from the tiers above (the same with a real Redis
Cluster as that tier: the cluster tier). With ``node`` the store is
memory + node tier (host-shared RAM) + disk: the node tier is also big enough never to evict, and survives a
restart (its files and index outlive the process).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from redis_server import RedisServer

from lmkv.reference.storage import ReferenceStore
from lmkv.storage import MemoryTier, TieredStore
from lmkv.storage.disk import DiskTier
from lmkv.storage.node import NodeTier, charge
from lmkv.storage.objects import header_length
from lmkv.storage.redis_cluster import RedisClusterTier
from lmkv.storage.redis_tier import RedisTier
from lmkv.testing import LocalRedisCluster, RedisUnavailable

KEYS = [f"chunk-{i}" for i in range(6)]
FPS = [b"", b"tokens-a", b"tokens-b"]
PAYLOAD = 1024
SHAPES = {torch.float32: (2, 2, 4, 2, 8), torch.bfloat16: (2, 2, 8, 2, 8), torch.uint8: (4, 2, 8, 2, 8)}
MEM_OBJECTS = 3


def _value(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, SHAPES[dtype], generator=g, dtype=torch.uint8)
    return torch.randn(SHAPES[dtype], generator=g).to(dtype)


def _mem_size(key: str, item) -> int:
    return (len(item.data) + 63) // 64 * 64


def _disk_size(key: str, item) -> int:
    return header_length(len(item.shape), len(key.encode()), len(item.fingerprint)) + len(item.data)


def _node_size(key: str, item) -> int:
    return charge(_disk_size(key, item))


@pytest.fixture(scope="module")
def redis_url():
    srv = RedisServer().start()
    yield srv.url
    srv.cleanup()


class StoreMachine(RuleBasedStateMachine):
    redis_url: str | None = None
    cluster: bool = False  # redis_url names a node of a Redis Cluster: the cluster tier
    node: bool = False

    @initialize()
    def setup(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lmkv-sm-")
        self.prefix = f"sm-{uuid.uuid4().hex[:8]}:"
        tiers = [("memory", MEM_OBJECTS * PAYLOAD, _mem_size, False), ("disk", 1 << 30, _disk_size, True)]
        if self.node:
            self.node_dir = tempfile.mkdtemp(prefix="lmkv-sm-node-")
            tiers.insert(1, ("node", 1 << 30, _node_size, True))
        if self.redis_url:
            tiers.append(("redis", 1 << 30, _disk_size, True))
        self.model = ReferenceStore(tiers)
        self.store = self._open()

    def _open(self) -> TieredStore:
        tiers = [MemoryTier(MEM_OBJECTS * PAYLOAD), DiskTier(self.dir, 1 << 30, io_threads=2)]
        if self.node:
            tiers.insert(1, NodeTier(self.node_dir, 1 << 30))
        if self.redis_url:
            kind = RedisClusterTier if self.cluster else RedisTier
            tiers.append(kind(self.redis_url, key_prefix=self.prefix, socket_timeout=2.0))
        return TieredStore(tiers)

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.assert_no_leaks()
            self.store.close()
        if hasattr(self, "node_dir"):
            shutil.rmtree(self.node_dir, ignore_errors=True)

    @rule(key=st.sampled_from(KEYS), seed=st.integers(0, 3), fp=st.sampled_from(FPS),
          dtype=st.sampled_from(list(SHAPES)))
    def put(self, key: str, seed: int, fp: bytes, dtype: torch.dtype) -> None:
        kv = _value(seed, dtype)
        self.store.put(key, kv, fingerprint=fp)
        self.model.put(key, kv, fingerprint=fp)
        kv.fill_(0)  # the store must have taken its own copy

    @rule(key=st.sampled_from(KEYS), fp=st.sampled_from([None, *FPS]))
    def get(self, key: str, fp: bytes | None) -> None:
        got, tier = self.store.get_with_tier(key, fingerprint=fp)
        want, want_tier = self.model.get_with_tier(key, fingerprint=fp)
        assert tier == want_tier
        if want is None:
            assert got is None
        else:
            assert got is not None and got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            assert self.store.last_hit_tier(key) == want_tier

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=4))
    def batched_get(self, keys: list[str]) -> None:
        keys = list(dict.fromkeys(keys))  # a key twice in one batch has no sequential model
        got = self.store.batched_get(keys)
        for k, g, want in zip(keys, got, self.model.batched_get(keys)):
            assert (g is None) == (want is None), k
            if want is not None:
                assert torch.equal(g.view(torch.uint8), want.view(torch.uint8))

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=5), fp=st.sampled_from([None, *FPS]), prefix=st.booleans())
    def get_many(self, keys: list[str], fp: bytes | None, prefix: bool) -> None:
        """The engine's read path: one request per tier, fingerprints checked, a prefix read stops at a miss."""
        keys = list(dict.fromkeys(keys))
        fps = [fp] * len(keys)
        got = self.store.get_many(keys, fps, prefix=prefix)
        for k, (g, tier), (want, want_tier) in zip(keys, got, self.model.get_many(keys, fps, prefix=prefix)):
            assert (g is None) == (want is None) and tier == want_tier, k
            if want is not None:
                assert torch.equal(g.view(torch.uint8), want.view(torch.uint8))

    @rule(key=st.sampled_from(KEYS))
    def contains(self, key: str) -> None:
        assert self.store.contains(key) == self.model.contains(key)

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=5))
    def batched_contains(self, keys: list[str]) -> None:
        assert self.store.batched_contains(keys) == self.model.batched_contains(keys)

    @rule(key=st.sampled_from(KEYS))
    def remove(self, key: str) -> None:
        assert self.store.remove(key) == self.model.remove(key)

    @rule(tier=st.sampled_from(["memory", "disk"]), key=st.sampled_from(KEYS))
    def drop_from_tier(self, tier: str, key: str) -> None:
        self.store.tier(tier).remove(key)
        self.model.drop(tier, key)

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = self._open()
        self.model.restart()

    @invariant()
    def tiers_hold_what_the_model_holds(self) -> None:
        if not hasattr(self, "store"):
            return
        mem = self.store.tier("memory")
        assert set(mem.keys()) == self.model.keys("memory")
        assert mem.usage_bytes() <= mem.capacity_bytes()
        assert set(self.store.tier("disk").keys()) == self.model.keys("disk")
        if self.node:
            node = self.store.tier("node")
            assert set(node.keys()) == self.model.keys("node")
            assert node.usage_bytes() <= node.capacity_bytes()
        if self.redis_url:
            have = self.store.tier("redis").contains_many(KEYS)
            assert {k for k, h in zip(KEYS, have) if h} == self.model.keys("redis")


class StoreMachineNode(StoreMachine):
    node = True

    @rule(key=st.sampled_from(KEYS))
    def drop_from_node(self, key: str) -> None:
        self.store.tier("node").remove(key)
        self.model.drop("node", key)


def test_store_matches_reference_memory_disk() -> None:
    run_state_machine_as_test(StoreMachine)


def test_store_matches_reference_memory_node_disk() -> None:
    run_state_machine_as_test(StoreMachineNode)


def test_store_matches_reference_with_redis(redis_url: str) -> None:
    machine = type("StoreMachineRedis", (StoreMachine,), {"redis_url": redis_url})
    run_state_machine_as_test(machine)


@pytest.fixture(scope="module")
def cluster_url():
    c = LocalRedisCluster()
    try:
        c.start()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    yield c.url
    c.cleanup()


def test_store_matches_reference_with_a_redis_cluster(cluster_url: str) -> None:
    """The same machine with the cluster tier (3 masters, 3 replicas) as the shared tier."""
    machine = type("StoreMachineCluster", (StoreMachine,), {"redis_url": cluster_url, "cluster": True})
    run_state_machine_as_test(machine)
