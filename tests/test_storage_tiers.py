"""Memory and disk tiers on their own: capacity, eviction order, pins and leaks, restart, and disk faults."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tier_helpers import encode, random_bytes, read

import lmkv.storage.disk as disk_mod
from lmkv.storage.disk import DiskTier
from lmkv.storage.memory import MemoryTier
from lmkv.storage.serde import RawSerde

ROOT = Path(__file__).resolve().parents[1]


_kv, _enc, _read = random_bytes, encode, read


# -- memory tier -------------------------------------------------------------------------------------------


@given(ops=st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 3000), st.booleans()), max_size=40))
def test_memory_capacity_is_never_exceeded_and_values_survive(ops) -> None:
    tier = MemoryTier(8192)
    truth: dict[str, torch.Tensor] = {}
    for i, (key, size, remove) in enumerate(ops):
        if remove:
            tier.remove(key)
            truth.pop(key, None)
        else:
            kv = _kv(size, i)
            tier.put(key, _enc(key, kv))
            truth[key] = kv
            kv.zero_()  # the tier must hold its own copy
            truth[key] = _kv(size, i)
        assert tier.usage_bytes() <= tier.capacity_bytes()
        for k in tier.keys():
            assert torch.equal(_read(tier, k), truth[k])
    tier.assert_no_leaks()


def test_memory_lru_eviction_order() -> None:
    tier = MemoryTier(3 * 1024)
    for k in "abc":
        assert tier.put(k, _enc(k, _kv(1024, 0)))
    _read(tier, "a")  # a is now the most recent: b goes first
    tier.put("d", _enc("d", _kv(1024, 1)))
    assert sorted(tier.keys()) == ["a", "c", "d"]
    assert tier.stats()["evictions"] == 1


def test_memory_rejects_objects_larger_than_the_pool() -> None:
    tier = MemoryTier(1000)
    assert not tier.put("big", _enc("big", _kv(2000, 0)))
    assert tier.get("big") is None and tier.stats()["rejected"] == 1
    assert not MemoryTier(0).put("x", _enc("x", _kv(1, 0)))
    tier.assert_no_leaks()


def test_memory_pins_protect_data_and_leak_check_sees_held_pins() -> None:
    tier = MemoryTier(2048)
    want = _kv(1024, 7)
    tier.put("a", _enc("a", want))
    lease = tier.get("a")
    tier.remove("a")  # unlinked at once, bytes kept while the lease lives
    tier.put("b", _enc("b", _kv(1024, 8)))  # fits beside a's still-pinned bytes
    assert torch.equal(RawSerde().decode(lease), want)
    with pytest.raises(AssertionError, match="pinned"):
        tier.assert_no_leaks()
    lease.release()
    lease.release()  # idempotent: a double release must not corrupt the pin count
    tier.assert_no_leaks()


def test_memory_put_waits_for_a_pinned_victim() -> None:
    tier = MemoryTier(1024)
    tier.put("a", _enc("a", _kv(1024, 0)))
    lease = tier.peek("a")
    threading.Timer(0.2, lease.release).start()
    t0 = time.monotonic()
    assert tier.put("b", _enc("b", _kv(1024, 1)))  # evicts a at once, gets its bytes after the release
    assert 0.1 < time.monotonic() - t0 < 4
    assert tier.keys() == ["b"]
    tier.assert_no_leaks()


# -- disk tier ---------------------------------------------------------------------------------------------


def _files(path: Path, suffix: str) -> list[Path]:
    return [p for p in path.rglob(f"*{suffix}")]


def test_disk_roundtrip_and_read_your_writes(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    kv = _kv(5000, 1)
    tier.put("k", _enc("k", kv, b"fp"))
    assert tier.contains("k")
    assert torch.equal(_read(tier, "k"), kv)  # served even while the write may be pending
    tier.flush()
    obj = tier.get("k")
    assert obj.owned and obj.header.fingerprint == b"fp"
    obj.release()
    assert len(_files(tmp_path, ".obj")) == 1 and not _files(tmp_path, ".tmp")
    tier.close()


def test_disk_index_survives_a_process_restart(tmp_path: Path) -> None:
    code = (
        "import sys, torch; from lmkv.storage.disk import DiskTier; from lmkv.storage.serde import RawSerde\n"
        "t = DiskTier(sys.argv[1], 1 << 20)\n"
        "for i in range(3):\n"
        "    t.put(f'k{i}', RawSerde().encode(f'k{i}', torch.full((100,), i, dtype=torch.int8), b'fp'))\n"
        "t.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT, timeout=120)
    tier = DiskTier(tmp_path, 1 << 20)
    assert tier.usage_bytes() == sum(p.stat().st_size for p in _files(tmp_path, ".obj"))
    for i in range(3):
        assert torch.equal(_read(tier, f"k{i}"), torch.full((100,), i, dtype=torch.int8))
    tier.close()


def test_disk_lru_eviction_and_capacity(tmp_path: Path) -> None:
    one = _enc("a", _kv(1000, 0)).header.total_len
    tier = DiskTier(tmp_path, 3 * one)
    for k in "abc":
        tier.put(k, _enc(k, _kv(1000, 0)))
        tier.flush()  # recency counts from when a write lands; two writer threads may land b and c either way
    _read(tier, "a")
    tier.put("d", _enc("d", _kv(1000, 1)))
    tier.flush()
    assert sorted(tier.keys()) == ["a", "c", "d"] and tier.usage_bytes() <= 3 * one
    assert sum(p.stat().st_size for p in _files(tmp_path, ".obj")) == tier.usage_bytes()
    tier.close()
    reopened = DiskTier(tmp_path, 2 * one)  # a smaller capacity on restart evicts down to it
    assert reopened.usage_bytes() <= 2 * one and len(_files(tmp_path, ".obj")) == 2
    reopened.close()


def test_disk_capacity_smaller_than_one_object(tmp_path: Path, caplog) -> None:
    tier = DiskTier(tmp_path, 100)
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert not tier.put("k", _enc("k", _kv(1000, 0)))
    tier.flush()
    assert tier.get("k") is None and not _files(tmp_path, ".obj") and tier.usage_bytes() == 0
    assert "no room" in caplog.text
    tier.close()


def test_disk_injected_enospc_is_a_dropped_write(tmp_path: Path, monkeypatch, caplog) -> None:
    def full(fd, bufs):
        os.write(fd, b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_mod, "_write_all", full)
    tier = DiskTier(tmp_path, 1 << 20)
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        tier.put("k", _enc("k", _kv(1000, 0)))
        tier.flush()
    assert not tier.contains("k") and tier.get("k") is None
    assert tier.usage_bytes() == 0 and not _files(tmp_path, ".tmp") and not _files(tmp_path, ".obj")
    assert "No space left" in caplog.text and tier.stats()["rejected"] == 1
    monkeypatch.undo()
    tier.put("k", _enc("k", _kv(1000, 0)))  # the disk has room again
    tier.flush()
    assert torch.equal(_read(tier, "k"), _kv(1000, 0))
    tier.close()


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "empty", "foreign"])
def test_disk_damaged_file_is_a_miss_with_warning(tmp_path: Path, caplog, damage: str) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("k", _enc("k", _kv(4000, 0)))
    tier.put("other", _enc("other", _kv(10, 1)))
    tier.flush()
    path = tier.file_for("k")
    data = bytearray(path.read_bytes())
    if damage == "flip_payload":
        data[-100] ^= 0x10
    elif damage == "flip_header":
        data[20] ^= 0x01
    elif damage == "truncate":
        data = data[:-1]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(tier.file_for("other").read_bytes())  # a valid object of another key
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert tier.get("k") is None
    assert "corrupt" in caplog.text and not path.exists() and not tier.contains("k")
    assert torch.equal(_read(tier, "other"), _kv(10, 1))
    tier.close()


def test_disk_restart_drops_temp_and_unreadable_files(tmp_path: Path, caplog) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("k", _enc("k", _kv(100, 0)))
    tier.close()
    sub = tier.file_for("k").parent
    crashed = sub / "deadbeef.obj.1234.tmp"
    crashed.write_bytes(b"half a write")
    old = time.time() - 2 * disk_mod._STALE_TMP_S  # a crashed write is old; a young one may be in progress
    os.utime(crashed, (old, old))
    (sub / "junk.obj").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        again = DiskTier(tmp_path, 1 << 20)
    assert [p.name for p in sub.iterdir()] == [tier.file_for("k").name]
    assert torch.equal(_read(again, "k"), _kv(100, 0))
    again.close()


def test_disk_remove_during_pending_write_is_not_resurrected(tmp_path: Path, monkeypatch) -> None:
    gate = threading.Event()
    real = disk_mod._write_all

    def slow(fd, bufs):
        gate.wait(5)
        real(fd, bufs)

    monkeypatch.setattr(disk_mod, "_write_all", slow)
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("k", _enc("k", _kv(100, 0)))
    assert tier.remove("k")
    gate.set()
    tier.flush()
    assert not tier.contains("k") and not _files(tmp_path, ".obj") and tier.usage_bytes() == 0
    tier.close()


def test_disk_o_direct_reads(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 24, o_direct=True)
    for n in (0, 1, 4096 - 64, 5000, 1 << 20):
        kv = _kv(n, n)
        tier.put(f"k{n}", _enc(f"k{n}", kv))
        tier.flush()
        assert torch.equal(_read(tier, f"k{n}"), kv)
    tier.close()


def test_disk_sees_objects_another_process_wrote_after_it_opened(tmp_path: Path) -> None:
    reader = DiskTier(tmp_path / "d", 1 << 24)  # opened first: its scan found nothing
    writer = DiskTier(tmp_path / "d", 1 << 24)
    kv = _kv(4096, 3)
    writer.put("shared", _enc("shared", kv))
    writer.flush()
    assert reader.contains("shared")
    got = _read(reader, "shared")
    assert got is not None and torch.equal(got, kv)
    assert not reader.contains("never-written")
    writer.close()
    reader.close()


def test_disk_open_keeps_young_tmp_files_and_removes_stale_ones(tmp_path: Path) -> None:
    DiskTier(tmp_path / "d", 1 << 20).close()
    sub = tmp_path / "d" / "ab"
    sub.mkdir(parents=True, exist_ok=True)
    young, stale = sub / "w1.tmp", sub / "w2.tmp"
    young.write_bytes(b"in progress")
    stale.write_bytes(b"crashed")
    old = time.time() - 2 * disk_mod._STALE_TMP_S
    os.utime(stale, (old, old))
    DiskTier(tmp_path / "d", 1 << 20).close()
    assert young.exists() and not stale.exists()
