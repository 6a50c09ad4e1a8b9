"""Tiered KV storage: process RAM, host-shared RAM (node), local disk and Redis or a Redis Cluster behind one
store (see docs/storage.md).

``TieredStore.from_config(config)`` is what the engine uses; the tiers, the object format and the serde
plug-ins are importable for tests and experiments.
"""

from __future__ import annotations

from lmkv.storage.base import Tier, TierStats
from lmkv.storage.buffers import BufferPool
from lmkv.storage.memory import MemoryTier
from lmkv.storage.objects import Encoded, ObjectHeader, parse_header
from lmkv.storage.serde import CacheGenSerde, RawSerde, get_serde
from lmkv.storage.tiered import TieredStore


def __getattr__(name: str):  # the disk and Redis tiers load lazily (Redis needs redis-py)
    if name == "DiskTier":
        from lmkv.storage.disk import DiskTier

        return DiskTier
    if name == "NodeTier":
        from lmkv.storage.node import NodeTier

        return NodeTier
    if name == "RedisClusterTier":
        from lmkv.storage.redis_cluster import RedisClusterTier

        return RedisClusterTier
    if name == "RedisTier":
        from lmkv.storage.redis_tier import RedisTier

        return RedisTier
    raise AttributeError(name)


__all__ = ["TieredStore", "Tier", "TierStats", "MemoryTier", "NodeTier", "DiskTier", "RedisTier", "RedisClusterTier",
           "BufferPool", "Encoded", "ObjectHeader", "parse_header", "RawSerde", "CacheGenSerde", "get_serde"]
