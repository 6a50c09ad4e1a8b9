"""The node tier (RAM shared by every lmkv process on the host): round trips, host-wide capacity, LRU across
instances, several processes at once, a writer killed by SIGKILL, restart reconciliation, and faults."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tier_helpers import encode, random_bytes, read

import lmkv.storage.node as node_mod
from lmkv.config import load
from lmkv.storage import MemoryTier, Tier, TieredStore
from lmkv.storage.node import NodeTier, charge
from lmkv.storage.serde import RawSerde

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = [HealthCheck.function_scoped_fixture]


_kv, _enc, _read = random_bytes, encode, read


def _size(n_bytes: int, key: str = "k", fp: bytes = b"") -> int:
    return charge(_enc(key, _kv(n_bytes, 0), fp).header.total_len)


def _rows(path: Path, where: str = "1") -> list[tuple]:
    db = sqlite3.connect(path / "index.sqlite3", timeout=10)
    try:
        return db.execute(f"SELECT key, size, ready, owner FROM entries WHERE {where}").fetchall()
    finally:
        db.close()


def _objects(path: Path) -> list[Path]:
    return sorted((path / "objects").iterdir()) if (path / "objects").exists() else []


def _tmp_files(path: Path) -> list[Path]:
    return sorted((path / "tmp").iterdir()) if (path / "tmp").exists() else []


def _published_bytes(path: Path) -> tuple[int, int]:
    """(sum of the published files' sizes in whole pages, sum of the tmpfs blocks they hold)."""
    sts = [p.stat() for p in _objects(path)]
    return sum(charge(s.st_size) for s in sts), sum(s.st_blocks * 512 for s in sts)


# -- round trips -----------------------------------------------------------------------------------------


@settings(max_examples=25, suppress_health_check=FIXTURES)
@given(n=st.integers(0, 300_000), fp=st.binary(max_size=40),
       dtype=st.sampled_from([torch.uint8, torch.float16, torch.bfloat16, torch.float32]))
@example(n=0, fp=b"", dtype=torch.uint8)  # an empty payload: the header alone, one page charged
@example(n=4096 - 64, fp=b"", dtype=torch.uint8)  # header + payload exactly one page
@example(n=4096 - 63, fp=b"", dtype=torch.uint8)  # one byte over: two pages
@example(n=(8 << 20) + 8, fp=b"x" * 256, dtype=torch.uint8)  # large: hashed while the reader thread reads
def test_roundtrip_exact_bytes(tmp_path_factory, n: int, fp: bytes, dtype: torch.dtype) -> None:
    path = tmp_path_factory.mktemp("rt")
    tier = NodeTier(path, 64 << 20)
    kv = _kv(n, n).view(dtype) if n % torch.empty(0, dtype=dtype).element_size() == 0 else _kv(n, n)
    assert tier.put("k", _enc("k", kv, fp))
    assert tier.contains("k") and tier.keys() == ["k"]
    got = _read(tier, "k")  # served while the write may still be pending (read-your-writes)
    assert got.dtype == kv.dtype and torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
    tier.flush()
    obj = tier.get("k")
    assert obj.owned and obj.header.fingerprint == fp and obj.header.key == "k"
    assert torch.equal(RawSerde().decode(obj).view(torch.uint8), kv.view(torch.uint8))
    obj.release()
    assert tier.usage_bytes() == charge(obj.header.total_len) == _published_bytes(path)[0]
    assert len(_objects(path)) == 1 and not _tmp_files(path)
    tier.close()


def test_put_get_contains_remove_replace_and_stats(tmp_path: Path) -> None:
    tier = NodeTier(tmp_path, 1 << 20)
    assert isinstance(tier, Tier) and tier.name == "node" and tier.shared
    a1, a2, b = _kv(5000, 1), _kv(7000, 2), _kv(100, 3)
    assert tier.put("a", _enc("a", a1)) and tier.put("b", _enc("b", b))
    tier.flush()
    assert sorted(tier.keys()) == ["a", "b"] and tier.contains_many(["a", "x", "b"]) == [True, False, True]
    ino = tier.file_for("a").stat().st_ino
    tier.put("a", _enc("a", a2))  # replacing: a new file renamed over the old one
    tier.flush()
    assert torch.equal(_read(tier, "a"), a2) and tier.file_for("a").stat().st_ino != ino
    assert tier.usage_bytes() == _size(7000, "a") + _size(100, "b") == _published_bytes(tmp_path)[0]
    assert len(_rows(tmp_path)) == 2  # the replaced version's row is gone
    assert _read(tier, "missing") is None
    assert tier.remove("a") and not tier.remove("a") and not tier.contains("a") and _read(tier, "a") is None
    assert not tier.file_for("a").exists() and tier.keys() == ["b"]
    s = tier.stats()
    assert (s["puts"], s["hits"], s["misses"], s["objects"], s["pending"]) == (3, 1, 2, 1, 0)
    assert s["bytes_written"] == sum(_enc(k, v).header.total_len for k, v in (("a", a1), ("b", b), ("a", a2)))
    assert s["usage_bytes"] == _size(100, "b") and s["rejected"] == s["corrupt"] == s["errors"] == 0
    tier.close()
    tier.close()  # idempotent
    assert not tier.put("b", _enc("b", b)) and tier.get("b") is None  # a closed tier misses, never raises


def test_remove_during_a_pending_write_is_not_resurrected(tmp_path: Path, monkeypatch) -> None:
    gate = threading.Event()
    real = node_mod._write_all

    def slow(fd, bufs):
        gate.wait(5)
        real(fd, bufs)

    monkeypatch.setattr(node_mod, "_write_all", slow)
    tier = NodeTier(tmp_path, 1 << 20)
    tier.put("k", _enc("k", _kv(100, 0)))
    time.sleep(0.05)  # the writer has most likely reserved and is waiting in the write
    assert tier.remove("k")
    gate.set()
    tier.flush()
    assert not tier.contains("k") and not _objects(tmp_path) and tier.usage_bytes() == 0 and not _rows(tmp_path)
    tier.close()


def test_bad_arguments_raise_before_anything_is_created(tmp_path: Path) -> None:
    where = tmp_path / "t"
    for kwargs, name in [({"capacity": -1}, "capacity"), ({"capacity": "1MiB"}, "capacity"),
                         ({"capacity": True}, "capacity"), ({"capacity": 1.5}, "capacity"),
                         ({"policy": "mru"}, "policy"), ({"read_buffer_bytes": -1}, "read_buffer_bytes")]:
        args = {"capacity": 1 << 20, **kwargs}
        cap = args.pop("capacity")
        with pytest.raises(ValueError, match=name):
            NodeTier(where, cap, **args)
    for bad in (123, None, b"/dev/shm/x", ""):
        with pytest.raises(ValueError, match="path"):
            NodeTier(bad, 1 << 20)
    assert not where.exists()


def test_objects_larger_than_the_capacity_are_rejected(tmp_path: Path, caplog) -> None:
    tier = NodeTier(tmp_path, 8192)
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert not tier.put("big", _enc("big", _kv(9000, 0)))
    assert tier.put("fits", _enc("fits", _kv(8000, 0)))  # 8000 + header: two pages
    tier.flush()
    assert tier.get("big") is None and tier.stats()["rejected"] == 1 and "no room" in caplog.text
    assert tier.usage_bytes() == 8192 and tier.keys() == ["fits"]
    tier.close()
    zero = NodeTier(tmp_path / "z", 0)
    assert not zero.put("x", _enc("x", _kv(0, 0))) and zero.usage_bytes() == 0
    zero.close()


def test_the_default_dev_shm_location_works(tmp_path: Path) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this host")
    where = Path("/dev/shm") / f"lmkv-test-{uuid.uuid4().hex}"
    try:
        tier = NodeTier(where, 1 << 20)
        tier.put("k", _enc("k", _kv(3000, 5)))
        tier.flush()
        other = NodeTier(str(where), 1 << 20)
        assert torch.equal(_read(other, "k"), _kv(3000, 5))
        other.close()
        tier.close()
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert not where.exists()


# -- capacity and eviction ---------------------------------------------------------------------------------


@settings(max_examples=20, suppress_health_check=FIXTURES)
@given(ops=st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 20_000), st.sampled_from("ppprg")),
                    max_size=40),
       two=st.booleans())
@example(ops=[("a", 20_000, "p"), ("b", 20_000, "p"), ("c", 0, "p"), ("a", 1, "p")], two=True)
def test_capacity_is_never_exceeded_and_values_survive(tmp_path_factory, ops, two: bool) -> None:
    path = tmp_path_factory.mktemp("cap")
    cap = 40_960  # ten pages: objects of up to five pages, so puts evict
    a = NodeTier(path, cap)
    b = NodeTier(path, cap) if two else a  # two instances on one path share the capacity
    truth: dict[str, torch.Tensor] = {}
    for i, (key, size, op) in enumerate(ops):
        tier = a if i % 2 else b
        if op == "p":
            kv = _kv(size, i)
            tier.put(key, _enc(key, kv))
            truth[key] = kv
        elif op == "r":
            tier.remove(key)
            truth.pop(key, None)
        else:
            got = _read(tier, key)
            assert got is None or torch.equal(got, truth[key])
        tier.flush()
        assert a.usage_bytes() <= cap
        pages, blocks = _published_bytes(path)
        assert pages <= cap and blocks <= cap and pages == a.usage_bytes()
        for k in a.keys():
            assert torch.equal(_read(b, k), truth[k])
    assert not _tmp_files(path) and not _rows(path, "ready = 0")
    a.close()
    if two:
        b.close()


def test_lru_order_across_two_instances(tmp_path: Path) -> None:
    one = _size(3000, "a")
    a, b = NodeTier(tmp_path, 3 * one), NodeTier(tmp_path, 3 * one)
    for k in "xyz":
        a.put(k, _enc(k, _kv(3000, 0)))
        a.flush()
    assert _read(a, "x") is not None  # x is now the most recent, once A's touch reaches the index
    a.flush()  # guaranteed: flush() records this instance's reads
    b.put("w", _enc("w", _kv(3000, 1)))
    b.flush()
    assert sorted(b.keys()) == ["w", "x", "z"] and b.stats()["evictions"] == 1
    # Without a flush, the writer thread records the touch within TOUCH_INTERVAL_S.
    assert _read(a, "z") is not None
    deadline = time.monotonic() + 10
    while a.stats()["touches_pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.stats()["touches_pending"] == 0
    b.put("v", _enc("v", _kv(3000, 2)))
    b.flush()
    assert sorted(a.keys()) == ["v", "w", "z"]  # x (read before w was written) went, not z
    a.close()
    b.close()


def test_fifo_ignores_reads(tmp_path: Path) -> None:
    one = _size(3000, "a")
    tier = NodeTier(tmp_path, 3 * one, policy="fifo")
    for k in "xyz":
        tier.put(k, _enc(k, _kv(3000, 0)))
        tier.flush()
    _read(tier, "x")
    tier.put("w", _enc("w", _kv(3000, 1)))
    tier.flush()
    assert sorted(tier.keys()) == ["w", "y", "z"]
    tier.close()


def test_a_later_opener_with_a_smaller_capacity_evicts_down_to_it(tmp_path: Path, caplog) -> None:
    one = _size(3000, "a")
    big = NodeTier(tmp_path, 4 * one)
    for k in "wxyz":
        big.put(k, _enc(k, _kv(3000, 0)))
        big.flush()
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        small = NodeTier(tmp_path, 2 * one)
    assert "capacity" in caplog.text and sorted(small.keys()) == ["y", "z"]
    assert big.put("v", _enc("v", _kv(3000, 0)))  # the shared capacity applies to the first opener too
    big.flush()
    assert big.usage_bytes() <= 2 * one and big.capacity_bytes() == 2 * one
    small.close()
    big.close()


def test_a_dead_writers_reservation_is_recovered_when_room_runs_out(tmp_path: Path) -> None:
    tier = NodeTier(tmp_path, 16384)
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.execute("INSERT INTO entries (key, fname, size, atime, ready, owner, ino) "
               "VALUES ('ghost', 'f', 16384, 0, 0, 'deadbeefdeadbeef', 1)")  # no owner file: a dead writer
    db.commit()
    db.close()
    assert tier.usage_bytes() == 16384
    tier.put("k", _enc("k", _kv(3000, 0)))
    tier.flush()
    assert torch.equal(_read(tier, "k"), _kv(3000, 0)) and tier.usage_bytes() == _size(3000)
    assert not _rows(tmp_path, "ready = 0")
    tier.close()


def test_a_reader_never_sees_a_partial_or_mixed_object(tmp_path: Path) -> None:
    """Another instance replaces a key over and over; every read is one whole version or a miss."""
    writer, reader = NodeTier(tmp_path, 8 << 20), NodeTier(tmp_path, 8 << 20)
    stop = threading.Event()
    bad: list[str] = []

    def write() -> None:
        v = 0
        while not stop.is_set():
            v += 1
            writer.put("k", _enc("k", torch.full((300_000,), v % 251, dtype=torch.uint8)))
            writer.flush()

    t = threading.Thread(target=write)
    t.start()
    hits = 0
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline or not hits:
            got = _read(reader, "k")
            if got is not None:
                hits += 1
                if not torch.all(got == got[0]):
                    bad.append("mixed versions")
            if time.monotonic() > deadline + 20:
                break
    finally:
        stop.set()
        t.join()
    assert hits and not bad and reader.stats()["corrupt"] == 0
    writer.close()
    reader.close()


# -- several processes -------------------------------------------------------------------------------------

_MIX = r"""
import json, random, sys, time
import torch
from lmkv.storage.node import NodeTier
from lmkv.storage.serde import RawSerde
path, cap, me, procs, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
SHARED, OWN = 6, 4  # keys every process writes, and keys only process i writes (own_i_j)

def value(key):
    seed = sum(key.encode()) * 7919 + len(key)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, ((12 + seed % 5 * 8) << 10,), generator=g, dtype=torch.uint8)

shared = [f"shared{j}" for j in range(SHARED)]
own = {p: [f"own{p}_{j}" for j in range(OWN)] for p in range(procs)}
mine = shared + own[me]
every = shared + [k for p in range(procs) for k in own[p]]
values = {k: value(k) for k in every}
tier = NodeTier(path, cap)
rng = random.Random(me)
out = {"puts": 0, "reads": 0, "hits": 0, "foreign_hits": 0, "bad": []}
start = time.monotonic()
while True:
    elapsed = time.monotonic() - start
    if elapsed > seconds and (out["foreign_hits"] or elapsed > seconds + 30):
        break
    key = rng.choice(every)
    if key in mine and rng.random() < 0.5:
        tier.put(key, RawSerde().encode(key, values[key], key.encode()))
        out["puts"] += 1
        if rng.random() < 0.3:
            tier.flush()
        continue
    out["reads"] += 1
    obj = tier.get(key)
    if obj is None:
        continue
    with obj:
        got = RawSerde().decode(obj)
        ok = obj.header.key == key and obj.header.fingerprint == key.encode() and torch.equal(got, values[key])
    out["hits"] += 1
    if not ok:
        out["bad"].append(key)
    elif key not in mine:
        out["foreign_hits"] += 1
tier.flush()
out["stats"] = tier.stats()
tier.close()
print(json.dumps(out))
"""


def _frozen_usage(path: Path) -> tuple[int, int, int]:
    """(charged bytes, pages of every object and temp file, their tmpfs blocks) with the index's write lock held:
    files are published and evicted only under it, so this is one consistent moment."""
    db = sqlite3.connect(path / "index.sqlite3", timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        used = db.execute("SELECT value FROM meta WHERE name = 'used'").fetchone()[0]
        sts = []
        for p in _objects(path) + _tmp_files(path):
            try:
                sts.append(p.stat())
            except FileNotFoundError:  # a temp file its writer just dropped (writers do that without the lock)
                pass
        db.execute("COMMIT")
    finally:
        db.close()
    return used, sum(charge(s.st_size) if s.st_size else 0 for s in sts), sum(s.st_blocks * 512 for s in sts)


def test_processes_share_objects_and_the_capacity(tmp_path: Path) -> None:
    procs, cap = 3, 400 << 10  # about half of what the 18 keys need: puts evict each other's objects
    NodeTier(tmp_path, cap).close()  # create the index first, so the samples below can read it
    logs = [(tmp_path.parent / f"{tmp_path.name}-child{i}.out", tmp_path.parent / f"{tmp_path.name}-child{i}.err")
            for i in range(procs)]  # files, not pipes: the parent samples instead of draining them
    children = []
    for i, (out, err) in enumerate(logs):
        with open(out, "w") as fo, open(err, "w") as fe:
            children.append(subprocess.Popen(
                [sys.executable, "-c", _MIX, str(tmp_path), str(cap), str(i), str(procs), "3"], stdout=fo, stderr=fe,
                cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": str(1000 + i)}))
    samples = []
    try:
        deadline = time.monotonic() + 180
        while any(c.poll() is None for c in children) and time.monotonic() < deadline:
            used, pages, blocks = _frozen_usage(tmp_path)
            samples.append(used)
            assert used <= cap and pages <= used and blocks <= used, (used, pages, blocks)
            time.sleep(0.02)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait(30)
    for c, (_, err) in zip(children, logs):
        assert c.returncode == 0, err.read_text()
    results = [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]
    for r in results:
        assert not r["bad"], r["bad"]  # every read exact or a miss
        assert r["foreign_hits"] > 0, r  # each process read what another one stored
        assert r["stats"]["corrupt"] == 0
    assert len(samples) >= 3 and max(samples) > cap // 2
    assert sum(r["stats"]["evictions"] for r in results) > 0
    tier = NodeTier(tmp_path, cap)
    used, pages, blocks = _frozen_usage(tmp_path)
    assert used == pages == tier.usage_bytes() <= cap and not _tmp_files(tmp_path)
    assert not _rows(tmp_path, "ready = 0") and os.listdir(tmp_path / "owners") == [tier.token]
    tier.close()


_KILLED = r"""
import os, sys, time
import torch
import lmkv.storage.node as node
from lmkv.storage.serde import RawSerde
path, stage = sys.argv[1], sys.argv[2]

def value(key, version=0):
    g = torch.Generator().manual_seed(sum(key.encode()) + 100 * version)
    return torch.randint(0, 256, (1 << 20,), generator=g, dtype=torch.uint8)

tier = node.NodeTier(path, 64 << 20)
for i in range(3):
    tier.put(f"k{i}", RawSerde().encode(f"k{i}", value(f"k{i}"), b""))
    tier.flush()
    print(f"published k{i}", flush=True)
if stage == "write":  # killed with half an object in its temp file
    real = node._write_all
    def stall(fd, bufs):
        real(fd, [bufs[0], memoryview(bufs[1])[:1000]])
        print("stalled", flush=True)
        time.sleep(120)
    node._write_all = stall
    tier.put("k3", RawSerde().encode("k3", value("k3"), b""))
else:  # killed between renaming a replacement of k1 into place and committing its publication
    real = os.rename
    def stall(src, dst):
        real(src, dst)
        print("stalled", flush=True)
        time.sleep(120)
    node.os.rename = stall
    tier.put("k1", RawSerde().encode("k1", value("k1", 1), b""))
time.sleep(120)
"""


def _value(key: str, version: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(key.encode()) + 100 * version)
    return torch.randint(0, 256, (1 << 20,), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("stage", ["write", "publish"])
def test_a_writer_killed_mid_write_leaves_nothing_after_recovery(tmp_path: Path, stage: str, caplog) -> None:
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path), stage], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    watchdog = threading.Timer(180, child.kill)  # a hung child ends the test instead of hanging it
    watchdog.start()
    lines = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if line.startswith("stalled"):
                break
        assert lines[-1:] == ["stalled"], (lines, child.stderr.read() if child.poll() is not None else "")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
    assert lines[:3] == ["published k0", "published k1", "published k2"]
    # the crash left work for the recovery pass: a reservation, and a temp file or a renamed replacement
    assert _rows(tmp_path, "ready = 0")
    assert _tmp_files(tmp_path) if stage == "write" else tier_file_is_not_indexed(tmp_path, "k1")
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        tier = NodeTier(tmp_path, 64 << 20)
    assert "recovered" in caplog.text
    assert not _tmp_files(tmp_path) and not _rows(tmp_path, "ready = 0")
    assert os.listdir(tmp_path / "owners") == [tier.token]  # the dead writer's owner file is gone
    assert tier.usage_bytes() == _published_bytes(tmp_path)[0] == sum(r[1] for r in _rows(tmp_path))
    for key in tier.keys():  # every published object reads exact
        assert torch.equal(_read(tier, key), _value(key)), key
    assert {"k0", "k2"} <= set(tier.keys()) and "k3" not in tier.keys()
    if stage == "write":
        assert torch.equal(_read(tier, "k1"), _value("k1"))
    else:  # the replacement was renamed in but never committed: recovery drops it (and the version it replaced)
        got = _read(tier, "k1")
        assert got is None or torch.equal(got, _value("k1")) or torch.equal(got, _value("k1", 1))
    assert tier.stats()["corrupt"] == 0
    tier.close()


def tier_file_is_not_indexed(path: Path, key: str) -> bool:
    """The key's published file is not the inode its committed row names (a rename whose commit never came)."""
    db = sqlite3.connect(path / "index.sqlite3", timeout=10)
    try:
        row = db.execute("SELECT ino FROM entries WHERE key = ? AND ready = 1", (key,)).fetchone()
    finally:
        db.close()
    f = path / "objects" / (NodeTier.fname_for(key) + ".obj")
    return row is not None and f.exists() and f.stat().st_ino != row[0]


# -- restart and reconciliation ----------------------------------------------------------------------------


def test_objects_survive_a_restart(tmp_path: Path) -> None:
    code = (
        "import sys, torch; from lmkv.storage.node import NodeTier; from lmkv.storage.serde import RawSerde\n"
        "t = NodeTier(sys.argv[1], 1 << 20)\n"
        "for i in range(3):\n"
        "    t.put(f'k{i}', RawSerde().encode(f'k{i}', torch.full((100,), i, dtype=torch.int8), b'fp'))\n"
        "t.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT, timeout=120)
    tier = NodeTier(tmp_path, 1 << 20)
    assert sorted(tier.keys()) == ["k0", "k1", "k2"]
    assert tier.usage_bytes() == _published_bytes(tmp_path)[0] == 3 * 4096
    for i in range(3):
        assert torch.equal(_read(tier, f"k{i}"), torch.full((100,), i, dtype=torch.int8))
    tier.close()
    assert os.listdir(tmp_path / "owners") == []


def test_restart_reconciles_missing_planted_and_replaced_files(tmp_path: Path, caplog) -> None:
    tier = NodeTier(tmp_path, 1 << 20)
    for k in ("keep", "gone", "swapped"):
        tier.put(k, _enc(k, _kv(3000, len(k))))
    tier.close()
    tier.file_for("gone").unlink()  # deleted behind the index's back
    swapped = tier.file_for("swapped")
    data = swapped.read_bytes()
    swapped.unlink()
    swapped.write_bytes(data)  # the same bytes, another inode: not the file the index names
    planted = tier.file_for("ghost")
    planted.write_bytes(_enc("ghost", _kv(10, 0)).header_bytes() + _kv(10, 0).numpy().tobytes())  # no row
    (tmp_path / "objects" / "junk").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        again = NodeTier(tmp_path, 1 << 20)
    assert "no index entry" in caplog.text and "missing or replaced" in caplog.text
    assert again.keys() == ["keep"] and [p.name for p in _objects(tmp_path)] == [tier.file_for("keep").name]
    assert torch.equal(_read(again, "keep"), _kv(3000, 4))
    assert again.usage_bytes() == _published_bytes(tmp_path)[0] == _size(3000, "keep")
    again.close()


def test_files_changed_behind_the_index_while_open_are_misses(tmp_path: Path, caplog) -> None:
    tier = NodeTier(tmp_path, 1 << 20)
    for k in ("gone", "other"):
        tier.put(k, _enc(k, _kv(3000, 1)))
    tier.flush()
    planted = tier.file_for("ghost")  # a well-formed object with no row: never served
    planted.write_bytes(tier.file_for("other").read_bytes().replace(b"other", b"ghost"))
    assert not tier.contains("ghost") and tier.get("ghost") is None
    tier.file_for("gone").unlink()
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert tier.get("gone") is None
    assert "missing or was replaced" in caplog.text and not tier.contains("gone")
    assert tier.usage_bytes() == _size(3000, "other") and tier.stats()["corrupt"] == 1
    tier.close()


def test_a_valid_object_of_the_same_key_planted_over_the_file_is_not_served(tmp_path: Path, caplog) -> None:
    """Same key, same size, a well-formed object with other bytes, renamed in behind the index: not its inode."""
    tier = NodeTier(tmp_path, 1 << 20)
    tier.put("k", _enc("k", _kv(3000, 1)))
    tier.flush()
    fake = tmp_path / "fake"
    fake.write_bytes(_enc("k", _kv(3000, 2)).header_bytes() + _kv(3000, 2).numpy().tobytes())
    os.replace(fake, tier.file_for("k"))
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert tier.get("k") is None
    assert "replaced behind the index" in caplog.text and not tier.file_for("k").exists()
    assert tier.usage_bytes() == 0 and not tier.contains("k")
    tier.close()


def test_a_padded_file_is_refused_before_anything_is_allocated_from_its_size(tmp_path: Path) -> None:
    tier = NodeTier(tmp_path, 1 << 30)
    tier.put("k", _enc("k", _kv(3000, 1)))
    tier.flush()
    os.truncate(tier.file_for("k"), 200 << 20)  # in place (the same inode), sparse: 200 MiB claimed, 2 pages held
    assert tier.get("k") is None and tier.stats()["corrupt"] == 1
    assert tier._buffers.allocations == 0  # no read buffer was made, let alone one of 200 MiB
    tier.close()


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "empty", "pad", "foreign_inplace",
                                    "foreign_renamed"])
def test_a_damaged_object_is_a_miss_with_warning_and_removed(tmp_path: Path, caplog, damage: str) -> None:
    tier = NodeTier(tmp_path, 1 << 20)
    tier.put("k", _enc("k", _kv(6000, 0)))
    tier.put("other", _enc("other", _kv(6000, 1)))
    tier.flush()
    path = tier.file_for("k")
    data = bytearray(path.read_bytes())
    if damage == "foreign_renamed":  # another key's well-formed object renamed under k's name
        os.replace(tier.file_for("other"), path)
    else:
        if damage == "flip_payload":
            data[-100] ^= 0x10
        elif damage == "flip_header":
            data[20] ^= 0x01
        elif damage == "truncate":
            data = data[:-1]
        elif damage == "empty":
            data = bytearray()
        elif damage == "pad":
            data += b"\0" * 5000
        else:
            data = bytearray(tier.file_for("other").read_bytes())  # a valid object of another key, same inode
        with open(path, "r+b") as fh:  # in place: the inode the index names
            fh.truncate(0)
            fh.write(data)
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        assert tier.get("k") is None
    assert "treating it as a miss" in caplog.text and not path.exists() and not tier.contains("k")
    assert tier.stats()["corrupt"] == 1 and tier.get("k") is None
    if damage != "foreign_renamed":
        assert torch.equal(_read(tier, "other"), _kv(6000, 1))
        assert tier.usage_bytes() == _size(6000, "other")
    tier.close()


# -- faults ------------------------------------------------------------------------------------------------


def test_a_path_nothing_can_be_created_in_is_a_tier_that_misses(tmp_path: Path, monkeypatch, caplog) -> None:
    def refuse(path, *a, **k):
        raise OSError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(node_mod.os, "makedirs", refuse)
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        tier = NodeTier(tmp_path / "n", 1 << 20)
        assert not tier.put("k", _enc("k", _kv(100, 0)))
        tier.flush()
        assert tier.get("k") is None and not tier.contains("k") and tier.contains_many(["k"]) == [False]
        assert not tier.remove("k") and tier.keys() == [] and tier.usage_bytes() == 0
    monkeypatch.undo()
    assert "cannot create" in caplog.text and tier.stats()["rejected"] == 1 and tier.stats()["misses"] == 1
    tier.close()
    assert not (tmp_path / "n").exists()


def test_a_path_under_a_file_in_a_store_is_a_tier_that_misses(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        store = TieredStore([MemoryTier(1 << 20), NodeTier(blocker / "node", 1 << 20)])
        kv = torch.randn(2, 2, 4, 2, 8)
        store.put("k", kv, fingerprint=b"f")
        store.flush()
        assert torch.equal(store.get("k"), kv)  # the memory tier still serves
        store.tier("memory").remove("k")
        assert store.get("k") is None and store.contains_many(["k"], shared_only=True) == [False]
    assert "cannot create" in caplog.text
    store.close()


def test_a_full_tmpfs_is_a_dropped_write_and_the_reservation_is_rolled_back(tmp_path: Path, monkeypatch,
                                                                              caplog) -> None:
    def full(fd, bufs):
        os.write(fd, b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    tier = NodeTier(tmp_path, 1 << 20)
    tier.put("before", _enc("before", _kv(100, 0)))
    tier.flush()
    monkeypatch.setattr(node_mod, "_write_all", full)
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        tier.put("k", _enc("k", _kv(50_000, 0)))
        tier.flush()
    assert not tier.contains("k") and tier.get("k") is None and "No space left" in caplog.text
    assert tier.usage_bytes() == 4096 and not _tmp_files(tmp_path) and not _rows(tmp_path, "ready = 0")
    assert tier.stats()["rejected"] == 1 and tier.stats()["errors"] == 1
    monkeypatch.undo()
    tier.put("k", _enc("k", _kv(50_000, 0)))  # room again
    tier.flush()
    assert torch.equal(_read(tier, "k"), _kv(50_000, 0)) and torch.equal(_read(tier, "before"), _kv(100, 0))
    tier.close()


def test_close_drops_a_reservation_a_failed_undo_left_behind(tmp_path: Path, monkeypatch) -> None:
    def full(fd, bufs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(node_mod, "_write_all", full)
    monkeypatch.setattr(NodeTier, "_abandon", lambda self, *a: None)  # as if the index was busy for 5 s
    tier = NodeTier(tmp_path, 1 << 20)
    tier.put("k", _enc("k", _kv(5000, 0)))
    tier.flush()
    assert _rows(tmp_path, "ready = 0") and _tmp_files(tmp_path) and tier.usage_bytes() == 8192
    tier.close()
    assert not _rows(tmp_path, "ready = 0") and not _tmp_files(tmp_path)
    again = NodeTier(tmp_path, 1 << 20)
    assert again.usage_bytes() == 0
    again.close()


def test_a_corrupt_index_is_a_tier_that_misses(tmp_path: Path, caplog) -> None:
    tmp_path.joinpath("index.sqlite3").write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING, "lmkv.storage"):
        tier = NodeTier(tmp_path, 1 << 20)
        assert not tier.put("k", _enc("k", _kv(100, 0))) and tier.get("k") is None
    assert "cannot open the index" in caplog.text
    tier.close()
    assert os.listdir(tmp_path / "owners") == []


# -- in a TieredStore ---------------------------------------------------------------------------------------


def test_from_config_builds_memory_node_disk_in_that_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMKV_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load({"memory": {"capacity": "1MiB"}, "node": {"enabled": True, "path": str(tmp_path / "node"),
                                                       "capacity": "1MiB"}})
    with TieredStore.from_config(cfg) as s:
        assert [t.name for t in s.tiers] == ["memory", "node", "disk"]
        node = s.tier("node")
        assert isinstance(node, NodeTier) and node.capacity_bytes() == 1 << 20 and node.shared
        assert node._buffers is s.tier("disk")._buffers  # one pool of idle read buffers
        kv = torch.randn(2, 2, 16, 2, 8).to(torch.float16)
        s.put("k", kv, fingerprint=b"f")
        s.flush()
        assert s.contains_many(["k"], shared_only=True) == [True]
        s.tier("memory").remove("k")
        got, tier = s.get_with_tier("k", fingerprint=b"f")
        assert tier == "node" and torch.equal(got, kv)
    # another process's engine (here: a second store on the same path) sees it; memory and disk are its own
    cfg2 = load({"memory": {"capacity": "1MiB"}, "disk": {"enabled": False},
                 "node": {"enabled": True, "path": str(tmp_path / "node"), "capacity": "1MiB"}})
    with TieredStore.from_config(cfg2) as s2:
        got, tier = s2.get_with_tier("k", fingerprint=b"f")
        assert tier == "node" and torch.equal(got, kv)


def test_a_tier_inherited_through_fork_misses_and_never_hangs(tmp_path: Path) -> None:
    """A child of fork() cannot use the parent's SQLite connections or writer thread: its copy of the tier is one
    that misses and skips writes, and flush/close return at once; the parent's tier keeps working."""
    tier = NodeTier(tmp_path, 1 << 20)
    tier.put("k", _enc("k", _kv(4096, 1)))
    tier.flush()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return into pytest
        code = 1
        try:
            t0 = time.monotonic()
            ok = tier.get("k") is None and not tier.put("c", _enc("c", _kv(4096, 2))) and not tier.contains("k")
            tier.flush()
            tier.close()
            code = 0 if ok and time.monotonic() - t0 < 5 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert torch.equal(_read(tier, "k"), _kv(4096, 1))  # the parent's tier is untouched
    assert not tier.contains("c")
    tier.close()
