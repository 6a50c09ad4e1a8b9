"""TieredStore: configuration, argument checks, fingerprints, promotion, prefetch, and 8 threads at once."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import pytest
import torch

from lmkv.config import load
from lmkv.storage import MemoryTier, TieredStore
from lmkv.storage.disk import DiskTier


def _kv(seed: int, shape=(2, 2, 16, 2, 8), dtype=torch.float16) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture()
def store(tmp_path: Path):
    s = TieredStore([MemoryTier(64 << 10), DiskTier(tmp_path / "disk", 1 << 20)])
    yield s
    s.assert_no_leaks()
    s.close()


def test_from_config_defaults_to_memory_and_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMKV_CACHE_DIR", str(tmp_path))
    cfg = load({"memory": {"capacity": "1MiB"}, "disk": {"capacity": "4MiB"}})
    with TieredStore.from_config(cfg) as s:
        assert [t.name for t in s.tiers] == ["memory", "disk"]
        assert s.tier("disk").path == tmp_path / "disk"
        assert s.tier("memory").capacity_bytes() == 1 << 20
        s.put("k", _kv(0), fingerprint=b"f")
        s.flush()
        assert any((tmp_path / "disk").rglob("*.obj"))
    cfg = load({"memory": {"enabled": False}, "disk": {"path": str(tmp_path / "d2"), "policy": "fifo"}})
    with TieredStore.from_config(cfg) as s:
        assert [t.name for t in s.tiers] == ["disk"]
        s.put("k", _kv(0), fingerprint=b"f")  # no memory tier: lower tiers write from a private copy
        assert torch.equal(s.get("k"), _kv(0))


def test_from_config_with_redis(tmp_path: Path) -> None:
    from redis_server import RedisServer

    srv = RedisServer().start()
    try:
        cfg = load({"disk": {"path": str(tmp_path)}, "redis": {"enabled": True, "url": srv.url}})
        with TieredStore.from_config(cfg) as s:
            assert [t.name for t in s.tiers] == ["memory", "disk", "redis"]
            assert s.tier("disk")._buffers is s.tier("redis").buffers  # one pool of idle read buffers
            s.put("k", _kv(1), fingerprint=b"")
            s.flush()
            assert s.tier("redis").contains("k")
    finally:
        srv.cleanup()


def test_bad_arguments_raise_before_anything_is_written(store: TieredStore) -> None:
    with pytest.raises(TypeError, match="kv"):
        store.put("k", [1, 2, 3], fingerprint=b"")
    with pytest.raises(TypeError, match="fingerprint"):
        store.put("k", _kv(0), fingerprint="text")
    with pytest.raises(TypeError, match="key"):
        store.put("", _kv(0), fingerprint=b"")
    with pytest.raises(TypeError, match="dtype"):
        store.put("k", torch.zeros(2, dtype=torch.complex64), fingerprint=b"")
    with pytest.raises(ValueError, match="key"):
        store.put("x" * 5000, _kv(0), fingerprint=b"")
    with pytest.raises(TypeError, match="fingerprint"):
        store.get("k", fingerprint=123)
    with pytest.raises(ValueError, match="fingerprints"):
        store.batched_get(["a", "b"], [b""])
    store.flush()
    assert not store.contains("k") and store.tier("memory").usage_bytes() == 0


def test_put_get_and_write_through(store: TieredStore) -> None:
    kv = _kv(3)
    store.put("k", kv, fingerprint=b"tok")
    kv.fill_(0)  # caller reuses its buffer at once
    store.flush()
    assert torch.equal(store.get("k", fingerprint=b"tok"), _kv(3))
    assert store.last_hit_tier("k") == "memory"
    assert store.tier("disk").contains("k")
    out = torch.full_like(kv, float("nan"))
    assert store.get("k", out=out) is out and torch.equal(out, _kv(3))
    with pytest.raises(ValueError, match="out"):
        store.get("k", out=torch.zeros(3))


def test_fingerprint_mismatch_is_a_miss_with_warning(store: TieredStore, caplog) -> None:
    store.put("k", _kv(0), fingerprint=b"tokens-A")
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert store.get("k", fingerprint=b"tokens-B") is None
    assert "fingerprint mismatch" in caplog.text
    assert store.stats()["store"]["fingerprint_mismatch"] == 1
    assert store.get("k", fingerprint=b"tokens-A") is not None


def test_lower_tier_hit_is_promoted(store: TieredStore) -> None:
    store.put("k", _kv(5), fingerprint=b"")
    store.flush()
    store.tier("memory").remove("k")
    kv, tier = store.get_with_tier("k")
    assert tier == "disk" and torch.equal(kv, _kv(5))
    assert store.tier("memory").contains("k")
    assert store.get_with_tier("k")[1] == "memory"
    stats = store.stats()
    assert stats["store"]["promotions"] == 1 and stats["disk"]["hits"] == 1 and stats["memory"]["hits"] == 1


def test_membership_can_be_asked_of_named_tiers(store: TieredStore) -> None:
    """The vLLM scheduler asks whether a hit is in RAM (load in the step) or only lower (load in the background)."""
    store.put("a", _kv(1), fingerprint=b"")
    store.put("b", _kv(2), fingerprint=b"")
    store.flush()
    store.tier("memory").remove("b")
    assert store.contains_many(["a", "b", "c"]) == [True, True, False]
    assert store.contains_many(["a", "b", "c"], tiers=("memory",)) == [True, False, False]
    assert store.contains_many(["a", "b"], tiers=("disk",)) == [True, True]
    assert store.batched_contains(["a", "b"], tiers=("memory", "node")) == 1
    assert store.contains_many(["a"], tiers=()) == [False]


def test_corrupt_disk_object_falls_through_as_a_miss(store: TieredStore, caplog) -> None:
    store.put("k", _kv(6), fingerprint=b"")
    store.flush()
    store.tier("memory").remove("k")
    path = store.tier("disk").file_for("k")
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert store.get("k") is None
    assert "corrupt" in caplog.text and not store.contains("k")


def test_batched_ops_and_prefetch(store: TieredStore) -> None:
    keys = [f"c{i}" for i in range(6)]
    store.batched_put(keys[:4], [_kv(i) for i in range(4)], [b""] * 4)
    store.flush()
    assert store.batched_contains(keys) == 4
    assert store.batched_contains(["c1", "zz", "c2"]) == 1
    for k in keys[:4]:
        store.tier("memory").remove(k)
    assert store.prefetch(keys[:4] + ["nope"]).result(timeout=30) == 4
    assert all(store.tier("memory").contains(k) for k in keys[:4])
    got = store.batched_get(keys, [b"", b"", b"x", b"", b"", b""])
    assert torch.equal(got[0], _kv(0)) and got[2] is None and got[4] is None and got[5] is None
    assert store.remove("c0") and not store.contains("c0") and not store.remove("c0")


def test_cachegen_cold_tier_when_codec_is_present(tmp_path: Path) -> None:
    pytest.importorskip("lmkv.ops.codec", reason="lmkv.ops.codec ([3/7] CacheGen) is not in this checkout yet")
    s = TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 24)], ["raw", "cachegen"])
    kv = torch.randn(4, 2, 32, 2, 64, generator=torch.Generator().manual_seed(0))
    s.put("k", kv, fingerprint=b"")
    s.flush()
    assert s.tier("disk").usage_bytes() < kv.numel() * kv.element_size() // 2  # compressed on disk
    s.tier("memory").remove("k")
    got, tier = s.get_with_tier("k")
    assert tier == "disk" and got.shape == kv.shape and got.dtype == kv.dtype
    assert (got - kv).abs().max() < 0.5 * kv.abs().max()  # lossy, but the same tensor
    s.close()


def test_eight_threads_on_overlapping_keys(tmp_path: Path) -> None:
    """put/get/remove from 8 threads: no exception, no torn read, capacities respected, no leaks."""
    mem = MemoryTier(6 * 2048)
    disk = DiskTier(tmp_path, 12 * 2304, io_threads=2)
    store = TieredStore([mem, disk])
    keys = [f"k{i}" for i in range(10)]
    errors: list[BaseException] = []
    over: list[str] = []

    def value(key: str, version: int) -> torch.Tensor:
        # every element carries (key, version): a torn read mixes two of them
        return torch.full((512,), float(int(key[1:]) * 1000 + version), dtype=torch.float32)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                key = rng.choice(keys)
                op = rng.random()
                if op < 0.45:
                    v = rng.randrange(1000)
                    store.put(key, value(key, v), fingerprint=str(v).encode())
                elif op < 0.9:
                    got = store.get(key)
                    if got is not None:
                        first = got[0].item()
                        assert torch.all(got == first), f"torn read of {key}"
                        assert int(first) // 1000 == int(key[1:]), f"{key} returned another key's data"
                else:
                    store.remove(key)
                if mem.usage_bytes() > mem.capacity_bytes() or disk.usage_bytes() > disk.capacity_bytes():
                    over.append(key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert not over
    store.flush()
    for key in keys:  # what remains is self-consistent: fingerprint and data from the same put
        got = store.get(key)
        if got is not None:
            assert torch.all(got == got[0])
    store.assert_no_leaks()
    assert disk.usage_bytes() == sum(p.stat().st_size for p in tmp_path.rglob("*.obj"))
    store.close()
