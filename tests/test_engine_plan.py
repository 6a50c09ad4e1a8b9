"""One request = one pass: a chunk plan is hashed once, and a remote tier is asked once per call, not per chunk.

The Redis tier sits behind :class:`lmkv.testing.LatencyProxy`, which counts request bursts (round trips) on the
wire, so "one pipelined round trip per tier per call" is checked on the traffic itself, not on timings.
"""

from __future__ import annotations

import pytest
import torch
from redis_server import RedisServer

from lmkv.engine import KVEngine
from lmkv.ops import hashing
from lmkv.plan import ChunkPlan, leading_hits
from lmkv.testing import LatencyProxy
from lmkv.types import KVGeometry

GEO = KVGeometry(2, 2, 8, torch.float32)
CHUNK = 16


def _kv(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(GEO.chunk_shape(n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def redis_engine():
    server = RedisServer().start()
    proxy = LatencyProxy(server.port)
    cfg = {"chunk_size": CHUNK, "memory": {"enabled": False}, "disk": {"enabled": False},
           "redis": {"enabled": True, "url": f"redis://127.0.0.1:{proxy.port}/0", "socket_timeout": 5.0}}
    engine = KVEngine(cfg, GEO, model_id="plan-test")
    yield engine, proxy
    engine.close()
    proxy.close()
    server.cleanup()


@pytest.mark.redis
@pytest.mark.parametrize("num_chunks", [1, 8, 32])
def test_retrieve_and_lookup_cost_one_round_trip_per_tier(redis_engine, num_chunks: int) -> None:
    engine, proxy = redis_engine
    tokens = list(range(1000, 1000 + num_chunks * CHUNK + 5))  # full chunks and a partial tail
    kv = _kv(len(tokens))
    plan = engine.plan(tokens)
    assert engine.store(plan, kv) == len(tokens)
    engine.flush()
    proxy.reset()
    assert engine.lookup(plan) == len(tokens)
    assert proxy.round_trips == 1, "a lookup asks Redis once for every chunk (one pipeline)"
    proxy.reset()
    got, n = engine.retrieve(plan)
    assert n == len(tokens) and torch.equal(got, kv)
    assert proxy.round_trips <= 3, f"retrieve of {num_chunks + 1} chunks took {proxy.round_trips} round trips"
    assert engine.last_tiers() == {"redis": len(tokens)}
    proxy.reset()
    assert engine.store(plan, kv) == 0  # everything present: one batched presence query, nothing written
    assert proxy.round_trips == 1


@pytest.mark.redis
def test_retrieve_stops_at_a_hole_and_serves_only_the_prefix(redis_engine) -> None:
    engine, _ = redis_engine
    tokens = list(range(7, 7 + 5 * CHUNK))
    kv = _kv(len(tokens), seed=1)
    plan = engine.plan(tokens)
    engine.store(plan, kv)
    engine.flush()
    engine.storage.remove(plan.keys[2])
    got, n = engine.retrieve(plan)
    assert n == 2 * CHUNK and torch.equal(got, kv[:, :, :n])
    assert engine.lookup(plan) == 2 * CHUNK


def test_a_plan_is_hashed_once_and_reused(monkeypatch, tmp_path) -> None:
    calls = []
    real = hashing.chunk_keys

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashing, "chunk_keys", counting)
    cfg = {"chunk_size": CHUNK, "memory": {"capacity": "8MiB"}, "disk": {"path": str(tmp_path / "d")}}
    with KVEngine(cfg, GEO, model_id="plan-test") as engine:
        tokens = list(range(3 * CHUNK + 3))
        plan = engine.plan(tokens)
        assert isinstance(plan, ChunkPlan) and len(calls) == 1
        engine.store(plan, _kv(len(tokens)))
        assert engine.lookup(plan) == len(tokens)
        kv, n = engine.retrieve(plan, end=len(tokens) - 1)  # the partial tail ends past `end`: full chunks only
        assert n == 3 * CHUNK
        assert len(calls) == 1, "lookup, store and retrieve of a plan must not hash again"
        assert engine.lookup(tokens) == len(tokens) and len(calls) == 2  # a token list is planned per call


def test_plan_fingerprints_are_lazy_and_match_the_prefix_fingerprints() -> None:
    from lmkv.keys import KeySpace
    from lmkv.token_db import TokenDatabase

    db = TokenDatabase(CHUNK, KeySpace("m", GEO))
    toks = list(range(40))
    plan = db.plan(toks)
    assert plan._fingerprints is None  # a lookup never pays for them
    assert plan.fingerprints == [db.fingerprint(toks[:e]) for _, e, _ in db.chunks(toks)]
    assert [c.key for c in plan.chunks()] == [k for _, _, k in db.chunks(toks)]
    assert plan.count_within(31) == 1 and plan.end_of(2) == 32 and plan.chunks(20)[0].end == 16


def test_leading_hits() -> None:
    assert leading_hits([]) == 0 and leading_hits([True, True, False, True]) == 2 and leading_hits([False]) == 0
