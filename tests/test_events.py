"""KV events (lmkv.events): every tier's stored / removed of a chunk reaches subscribers, with the token count and
model of what was stored; a raising subscriber breaks nothing; nobody subscribed costs nothing."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmkv.engine import KVEngine
from lmkv.events import EventBus, KVEvent, model_of, tokens_of
from lmkv.keys import StorageKey
from lmkv.storage import MemoryTier, TieredStore
from lmkv.storage.disk import DiskTier
from lmkv.types import KVGeometry

FP = b"fp"


def _kv(tokens: int) -> torch.Tensor:
    """A chunk [L=1, 2, T, H=1, D=2] float32: 16 * T bytes of payload."""
    return torch.arange(4 * tokens, dtype=torch.float32).view(1, 2, tokens, 1, 2)


def _slot(tokens: int) -> int:
    """Bytes one such chunk takes in the memory tier (64-byte aligned)."""
    return max(64, (16 * tokens + 63) // 64 * 64)


class Recorder:
    def __init__(self) -> None:
        self.events: list[KVEvent] = []

    def __call__(self, event: KVEvent) -> None:
        self.events.append(event)

    def seen(self, kind: str | None = None) -> list[tuple[str, str, str]]:
        return [(e.kind, e.key, e.tier) for e in self.events if kind is None or e.kind == kind]


@settings(max_examples=15, deadline=None)
@given(model=st.text(min_size=1, max_size=12), tokens=st.lists(st.integers(1, 9), min_size=1, max_size=5))
@example(model="org/Model name+v2", tokens=[1])  # '/', '+' and ' ' are percent-encoded in the key
@example(model="m", tokens=[9, 9, 9, 9, 9])
def test_stored_events_carry_the_chunks_tokens_and_model(model: str, tokens: list[int]) -> None:
    keys = [str(StorageKey(model, "L1.H1.D2.fp32", "fp32", digest=bytes([i]) * 16)) for i in range(len(tokens))]
    with TieredStore([MemoryTier(1 << 16)]) as store:
        rec = Recorder()
        store.subscribe(rec)
        for key, t in zip(keys, tokens, strict=True):
            store.put(key, _kv(t), fingerprint=FP)
        store.flush()
        assert [(e.kind, e.key, e.num_tokens, e.tier, e.model) for e in rec.events] == [
            ("stored", k, t, "memory", model) for k, t in zip(keys, tokens, strict=True)]


def test_stored_once_per_tier_and_removed_from_each_on_remove(tmp_path) -> None:
    with TieredStore([MemoryTier(1 << 16), DiskTier(tmp_path, 1 << 20)]) as store:
        rec = Recorder()
        store.subscribe(rec)
        store.put("a", _kv(3), fingerprint=FP)
        store.flush()
        assert sorted(rec.seen()) == [("stored", "a", "disk"), ("stored", "a", "memory")]
        assert store.remove("a")
        store.flush()
        assert sorted(rec.seen("removed")) == [("removed", "a", "disk"), ("removed", "a", "memory")]
        assert {e.num_tokens for e in rec.events} == {3}  # removed too: read from the object's header


def test_lru_eviction_in_a_tiny_memory_tier_is_a_removed_of_the_least_recent(tmp_path) -> None:
    with TieredStore([MemoryTier(3 * _slot(2)), DiskTier(tmp_path, 1 << 20)]) as store:
        rec = Recorder()
        store.subscribe(rec)
        for k in "abc":
            store.put(k, _kv(2), fingerprint=FP)
        assert store.get("a") is not None  # a is the most recent now: b goes first
        store.put("d", _kv(2), fingerprint=FP)
        store.flush()
        assert rec.seen("removed") == [("removed", "b", "memory")]
        assert store.contains("b")  # still on disk: removed from one tier is not gone from the store
        assert [e.num_tokens for e in rec.events if e.kind == "removed"] == [2]


@pytest.mark.parametrize("under_memory", [False, True], ids=["disk-only", "memory+disk"])
def test_disk_eviction_is_a_removed_with_the_token_count(tmp_path, under_memory: bool) -> None:
    tiers: list = [MemoryTier(1 << 16)] if under_memory else []
    probe = DiskTier(tmp_path / "probe", 1 << 20)
    size = TieredStore([probe])
    size.put("k0", _kv(5), fingerprint=FP)
    size.flush()
    one = probe.usage_bytes()  # one object's file (keys of one length)
    size.close()
    with TieredStore([*tiers, DiskTier(tmp_path / "d", 2 * one)]) as store:
        rec = Recorder()
        store.subscribe(rec)
        for i in range(3):
            store.put(f"k{i}", _kv(5), fingerprint=FP)
            store.flush()
        removed = [e for e in rec.events if e.kind == "removed"]
        assert [(e.key, e.tier, e.num_tokens) for e in removed] == [("k0", "disk", 5)]
        assert not store.tier("disk").contains("k0")


def test_a_corrupt_disk_object_dropped_on_read_is_a_removed(tmp_path) -> None:
    disk = DiskTier(tmp_path, 1 << 20)
    with TieredStore([disk]) as store:
        rec = Recorder()
        store.subscribe(rec)
        store.put("a", _kv(4), fingerprint=FP)
        store.flush()
        path = disk.file_for("a")
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # payload checksum mismatch: the header still reads
        path.write_bytes(bytes(data))
        assert store.get("a") is None
        store.flush()
        assert [(e.kind, e.tier, e.num_tokens) for e in rec.events] == [("stored", "disk", 4),
                                                                           ("removed", "disk", 4)]


def test_closing_a_store_clears_its_memory_tier_and_says_so() -> None:
    store = TieredStore([MemoryTier(1 << 16)])
    rec = Recorder()
    store.subscribe(rec)
    store.put("a", _kv(1), fingerprint=FP)
    store.close()  # delivers what is queued before the bus stops
    assert rec.seen() == [("stored", "a", "memory"), ("removed", "a", "memory")]


def test_a_raising_subscriber_breaks_neither_the_store_nor_other_subscribers(caplog) -> None:
    calls = []

    def broken(event: KVEvent) -> None:
        calls.append(event)
        raise RuntimeError("subscriber bug")

    with TieredStore([MemoryTier(2 * _slot(1))]) as store:
        rec = Recorder()
        store.subscribe(broken)
        store.subscribe(rec)
        with caplog.at_level(logging.DEBUG, logger="lmkv.events"):
            for k in "abc":
                store.put(k, _kv(1), fingerprint=FP)  # c evicts a: the hook runs inside the memory tier's put
            store.flush()
        assert store.get("c") is not None and store.get("b") is not None
        assert len(calls) == len(rec.events) == 4  # 3 stored + 1 removed, to both
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "subscriber bug" in r.getMessage()]
        assert len(warned) == 1  # once, then debug
        store.assert_no_leaks()


def test_unsubscribe_stops_delivery() -> None:
    with TieredStore([MemoryTier(1 << 16)]) as store:
        rec, other = Recorder(), Recorder()
        stop = store.subscribe(rec)
        store.subscribe(other)
        store.put("a", _kv(1), fingerprint=FP)
        store.flush()
        stop()
        stop()  # twice is harmless
        store.put("b", _kv(1), fingerprint=FP)
        store.flush()
        assert rec.seen() == [("stored", "a", "memory")]
        assert other.seen() == [("stored", "a", "memory"), ("stored", "b", "memory")]


def test_nobody_subscribed_installs_nothing_and_starts_no_thread(tmp_path) -> None:
    before = {t.name for t in threading.enumerate()}
    with TieredStore([MemoryTier(2 * _slot(1)), DiskTier(tmp_path, 1 << 20)]) as store:
        for k in "abc":
            store.put(k, _kv(1), fingerprint=FP)
        store.remove("a")
        store.flush()
        assert all(t.on_removed is None for t in store.tiers)
        assert not store._events.active and store._events._published == 0
        assert "lmkv-store-events" not in {t.name for t in threading.enumerate()} - before


def test_engine_subscribe_sees_only_its_own_chunks_with_their_tokens(tmp_path) -> None:
    cfg = {"chunk_size": 4, "memory": {"capacity": "1MiB"}, "disk": {"enabled": False}, "node": {"enabled": False}}
    g = KVGeometry(1, 1, 2, torch.float32)
    with KVEngine(cfg, g, model_id="org/mine") as eng:
        other = KVEngine(cfg, g, model_id="theirs", store=eng.storage)
        rec = Recorder()
        eng.subscribe(rec)
        tokens = list(range(10))
        kv = torch.randn(g.chunk_shape(10))
        assert eng.store(tokens, kv) == 10  # [0, 4), [4, 8) and the partial [8, 10) that ends the sequence
        other.store(tokens, kv)
        eng.flush()
        plan = eng.plan(tokens)
        assert [(e.kind, e.key, e.num_tokens, e.model) for e in rec.events] == [
            ("stored", plan.keys[0], 4, "org/mine"), ("stored", plan.keys[1], 4, "org/mine"),
            ("stored", plan.keys[2], 2, "org/mine")]
        assert eng.holds(plan.keys) == [True, True, True]


def test_bad_arguments_are_refused_by_name() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="fn must be callable"):
        bus.subscribe(None)  # type: ignore[arg-type]
    assert bus.flush(0.1)  # nothing published, no thread: returns at once
    assert tokens_of((1, 2, 7, 1, 2)) == 7 and tokens_of((4,)) == 0 and tokens_of(None) == 0
    assert model_of("not a key") == "" and model_of(str(StorageKey("a/b", "g", "fp32"))) == "a/b"
