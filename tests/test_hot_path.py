"""The request path copies once and allocates nothing once warm: prefaulted pool, strided stores, retrieves
into the caller's memory (a strided view, a paged cache), borrowed views, pooled read buffers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import lmkv.storage.memory as memory_mod
from lmkv.engine import KVEngine
from lmkv.reference import paged as ref_paged
from lmkv.storage import TieredStore
from lmkv.storage.buffers import PAGE, BufferPool
from lmkv.storage.disk import DiskTier
from lmkv.storage.memory import MemoryTier
from lmkv.storage.serde import RawSerde
from lmkv.types import KVGeometry

GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
CHUNK = 16


def _kv(tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(GEOM.chunk_shape(tokens), generator=g).to(GEOM.dtype)


def _engine(tmp_path: Path, **over) -> KVEngine:
    cfg = {"chunk_size": CHUNK, "memory": {"capacity": 8 << 20}, "disk": {"path": str(tmp_path / "d")}, **over}
    return KVEngine(cfg, GEOM, model_id="hot")


# -- buffer pool -----------------------------------------------------------------------------------------------


def test_buffer_pool_reuses_page_aligned_blocks() -> None:
    pool = BufferPool(64 << 20)
    sizes = [1, 5000, 3 << 20, (3 << 20) + 17, 0]
    for n in sizes:
        buf = pool.take(n)
        assert buf.data.numel() == n and len(buf.view) == n
        assert n == 0 or buf.address % PAGE == 0
        buf.view[:n] = b"\x07" * n
        assert int(buf.data.sum()) == 7 * n
        buf.release()
        buf.release()  # idempotent
    made = pool.allocations
    for _ in range(3):
        bufs = [pool.take(n) for n in sizes]
        for b in bufs:
            b.release()
    assert pool.allocations == made + 1  # warm: only the second of the two same-class buffers was new
    with pytest.raises(ValueError, match="n must"):
        pool.take(-1)


def test_buffer_pool_bounds_what_it_keeps() -> None:
    pool = BufferPool(4 << 20)
    bufs = [pool.take(3 << 20) for _ in range(3)]
    for b in bufs:
        b.release()
    assert pool.cached_bytes() <= 4 << 20
    big = pool.take(8 << 20)
    big.release()  # larger than the bound: dropped, not cached
    assert pool.cached_bytes() <= 4 << 20


# -- memory tier: prefault and strided copies --------------------------------------------------------------------


def test_prefault_brings_capacity_up_and_puts_never_wait_for_all_of_it(monkeypatch) -> None:
    monkeypatch.setattr(memory_mod, "FAULT_STEP", 1 << 16)
    tier = MemoryTier(1 << 20, prefault=True)
    # a put right away succeeds: it waits for the spans it needs, never evicts or fails meanwhile
    kv = torch.arange(40000, dtype=torch.float32)
    assert tier.put("a", RawSerde().encode("a", kv, b""))
    assert tier.wait_prefaulted(timeout=30)
    assert tier.capacity_bytes() == 1 << 20 and tier.stats()["capacity_target"] == 1 << 20
    for i in range(5):  # 6 x 160 KB fit in 1 MiB: nothing is evicted
        assert tier.put(f"k{i}", RawSerde().encode(f"k{i}", kv, b""))
    assert tier.stats()["evictions"] == 0 and len(tier) == 6
    assert tier.put("k5", RawSerde().encode("k5", kv, b""))  # the seventh does not fit: the oldest goes
    assert tier.stats()["evictions"] == 1 and not tier.contains("a")
    with tier.get("k5") as obj:
        assert torch.equal(RawSerde().decode(obj), kv)
    tier.assert_no_leaks()
    tier.close()


def test_a_put_waits_for_one_span_not_for_the_whole_pool(monkeypatch) -> None:
    """The prefaulter hands each span over as it goes: a put needing one span gets in after about one step.
    (It used to lose the grow lock to the prefaulter, which re-takes it at once, until the pool was touched.)"""
    growers = []
    real_grow = MemoryTier._grow

    def grow(self, background: bool = False) -> bool:
        growers.append(threading.current_thread().name)
        return real_grow(self, background)

    monkeypatch.setattr(memory_mod, "FAULT_STEP", 4 << 20)
    monkeypatch.setattr(MemoryTier, "_grow", grow)
    tier = MemoryTier(256 << 20, prefault=True)  # 64 spans
    assert tier.put("a", RawSerde().encode("a", torch.zeros(1000), b""))
    assert tier.capacity_bytes() < 256 << 20  # in before the last span
    # the put waited for the prefaulter's next span instead of queueing on the grow lock behind it
    assert set(growers) == {"lmkv-memory-prefault"}
    assert tier.wait_prefaulted(timeout=60) and tier.capacity_bytes() == 256 << 20
    tier.close()


def test_close_and_exit_stop_the_prefaulter_and_puts_still_fit(monkeypatch) -> None:
    import subprocess
    import sys

    monkeypatch.setattr(memory_mod, "FAULT_STEP", 1 << 20)
    tier = MemoryTier(512 << 20, prefault=True)
    tier._stop_prefault()  # as close() and interpreter exit do
    assert not tier._prefaulter.is_alive() and tier.capacity_bytes() < 512 << 20
    kv = torch.zeros(300 << 18)  # 300 MiB: more than was touched; the put touches what it needs
    assert tier.put("big", RawSerde().encode("big", kv, b"")) and tier.stats()["evictions"] == 0
    tier.close()
    assert not tier.put("late", RawSerde().encode("late", kv[:10], b""))  # closed: dropped, no hang
    # a process that exits while its pool is still being touched exits cleanly (no abort in a frozen thread)
    code = ("import torch; from lmkv.storage.memory import MemoryTier\n"
            "t = MemoryTier(2 << 30, prefault=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "terminate" not in proc.stderr, proc.stderr


def test_prefault_is_not_racing_concurrent_puts(monkeypatch) -> None:
    monkeypatch.setattr(memory_mod, "FAULT_STEP", 1 << 14)
    tier = MemoryTier(2 << 20, prefault=True)
    kv = torch.arange(6000, dtype=torch.float32)  # 24 KB

    def writer(w: int) -> None:
        for i in range(20):
            tier.put(f"{w}-{i}", RawSerde().encode(f"{w}-{i}", kv + w, b""))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tier.wait_prefaulted(timeout=30)
    # 40 x 24 KB fit in 2 MiB: a put that raced the prefaulter grew the pool instead of evicting
    assert tier.stats()["evictions"] == 0 and tier.stats()["rejected"] == 0 and len(tier) == 40
    for w in range(2):
        with tier.get(f"{w}-19") as obj:
            assert torch.equal(RawSerde().decode(obj), kv + w)
    tier.assert_no_leaks()
    tier.close()


@given(start=st.integers(0, 40), length=st.integers(1, 30), seed=st.integers(0, 3))
@example(start=0, length=1, seed=0)
@example(start=17, length=30, seed=1)
def test_a_strided_slice_is_stored_exactly(start: int, length: int, seed: int) -> None:
    kv = _kv(80, seed)
    part = kv[:, :, start:start + length]  # [L, 2, T, H, D] sliced in T: not contiguous
    tier = MemoryTier(1 << 20)
    assert tier.put("s", RawSerde().encode("s", part, b"", as_is=True))
    with tier.get("s") as obj:
        assert torch.equal(RawSerde().decode(obj), part)
    tier.assert_no_leaks()


# -- retrieve into the caller's memory ---------------------------------------------------------------------------


@given(tokens=st.integers(1, 90), seed=st.integers(0, 2))
@example(tokens=CHUNK, seed=0)
@example(tokens=CHUNK * 3 + 1, seed=1)
def test_retrieve_into_a_strided_view_matches_a_plain_retrieve(tmp_path_factory, tokens: int, seed: int) -> None:
    eng = _engine(tmp_path_factory.mktemp("e"))
    toks = [seed * 1000 + i for i in range(tokens)]
    kv = _kv(tokens, seed)
    eng.store(toks, kv)
    n_full = tokens if eng.config.save_partial_chunks else tokens // CHUNK * CHUNK
    # a consumer's cache: [L, 2, H, Tcap, D] viewed as [L, 2, Tcap, H, D], with sentinel values around
    cap = tokens + 5
    cache = torch.full((GEOM.num_layers, 2, GEOM.num_kv_heads, cap, GEOM.head_dim), 7.0, dtype=GEOM.dtype)
    view = cache.permute(0, 1, 3, 2, 4)
    got, n = eng.retrieve(toks, out=view)
    assert n == n_full and got.data_ptr() == view.data_ptr()
    assert torch.equal(view[:, :, :n], kv[:, :, :n])
    assert bool((view[:, :, n:] == 7.0).all())  # nothing written past the served prefix
    plain, n2 = eng.retrieve(toks)
    assert n2 == n and torch.equal(plain, kv[:, :, :n])
    eng.close()


def test_retrieve_out_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    toks = list(range(2 * CHUNK))
    eng.store(toks, _kv(2 * CHUNK))
    for bad in (torch.zeros(GEOM.chunk_shape(CHUNK), dtype=GEOM.dtype),  # too short
                torch.zeros(GEOM.chunk_shape(2 * CHUNK), dtype=torch.float32),  # wrong dtype
                torch.zeros((3, 2, 2 * CHUNK, 2, 8), dtype=GEOM.dtype)):  # wrong layer count
        before = bad.clone()
        with pytest.raises(ValueError, match="out must"):
            eng.retrieve(toks, out=bad)
        assert torch.equal(bad, before)
    with pytest.raises(TypeError, match="out must"):
        eng.retrieve(toks, out="buffer")
    eng.close()


def test_retrieve_from_disk_promotes_and_a_decoded_tensor_survives_buffer_reuse(tmp_path: Path) -> None:
    store = TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path, 8 << 20)])
    a, b = _kv(CHUNK, 1), _kv(CHUNK, 2)
    store.put("a", a, fingerprint=b"")
    store.put("b", b, fingerprint=b"")
    store.flush()
    store.tiers[0].clear()
    got_a = store.get("a")  # decoded without out: wraps the pooled read buffer, which it takes
    store.tiers[0].clear()
    got_b = store.get("b")  # the next read would reuse a returned buffer
    assert torch.equal(got_a, a) and torch.equal(got_b, b)
    # borrowed reads promote before the view dies
    store.tiers[0].clear()
    seen = []
    res = store.get_many(["a", "b"], borrow=True, on_hit=lambda i, kv, tier: seen.append((i, kv.clone(), tier)))
    assert [(i, t) for i, _, t in seen] == [(0, "disk"), (1, "disk")]
    assert torch.equal(seen[0][1], a) and torch.equal(seen[1][1], b)
    assert res == [(None, "disk"), (None, "disk")]
    assert store.tiers[0].contains("a") and store.tiers[0].contains("b")
    store.assert_no_leaks()
    store.close()


def test_disk_reads_stop_allocating_once_warm(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 64 << 20)
    kv = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB
    for i in range(3):
        tier.put(f"k{i}", RawSerde().encode(f"k{i}", kv + i, b""))
    tier.flush()
    for _ in range(2):
        for i in range(3):
            out = torch.empty_like(kv)
            with tier.get(f"k{i}") as obj:
                RawSerde().decode(obj, out)
            assert torch.equal(out, kv + i)
    made = tier._buffers.allocations
    for i in range(3):
        with tier.get(f"k{i}") as obj:
            RawSerde().decode(obj, torch.empty_like(kv))
    assert tier._buffers.allocations == made == 1
    tier.close()


# -- paged: straight from storage into the engine's blocks -------------------------------------------------------


@given(tokens=st.integers(CHUNK, 70), start=st.integers(0, 69), seed=st.integers(0, 2))
@example(tokens=CHUNK, start=0, seed=0)
@example(tokens=3 * CHUNK + 5, start=CHUNK + 3, seed=1)
def test_retrieve_paged_scatters_the_stored_prefix_only(tmp_path_factory, tokens: int, start: int, seed: int) -> None:
    start = min(start, tokens - 1)
    eng = _engine(tmp_path_factory.mktemp("p"))
    toks = [7 + seed * 100 + i for i in range(tokens)]
    kv = _kv(tokens, seed)
    eng.store(toks, kv)
    bs, nb = 5, 20  # a block size that no chunk boundary lines up with
    caches = [torch.full((2, nb, bs, GEOM.num_kv_heads, GEOM.head_dim), -3.0, dtype=GEOM.dtype)
              for _ in range(GEOM.num_layers)]
    perm = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(seed))[:tokens]
    slots = perm.to(torch.int64)
    n = eng.retrieve_paged(toks, caches, slots, layout="flash_attn", start=start)
    served = tokens if eng.config.save_partial_chunks else tokens // CHUNK * CHUNK
    assert n == max(served, start)
    expect = [torch.full_like(c, -3.0) for c in caches]
    if served > start:
        ref_paged.scatter(kv[:, :, start:served].contiguous(), expect, slots[start:served], layout="flash_attn")
    for c, e in zip(caches, expect, strict=True):
        assert torch.equal(c, e)
    eng.close()


@given(chunks=st.integers(2, 4), skip=st.integers(1, 3), seed=st.integers(0, 2))
@example(chunks=3, skip=2, seed=0)
def test_retrieve_paged_reads_nothing_before_start(tmp_path_factory, chunks: int, skip: int, seed: int) -> None:
    """The caller holds the tokens before ``start`` (vLLM's own prefix cache): the chunks that end at or before it
    are not read at all, so one evicted from lmkv meanwhile does not stop the load, and is not counted as served."""
    skip = min(skip, chunks - 1)
    eng = _engine(tmp_path_factory.mktemp("s"))
    tokens = chunks * CHUNK + 3
    toks = [5 + seed * 100 + i for i in range(tokens)]
    kv = _kv(tokens, seed)
    eng.store(toks, kv)
    eng.flush()
    plan = eng.plan(toks)
    eng.storage.remove(plan.keys[0])  # the first chunk is gone from every tier
    caches = [torch.full((2, 20, 5, GEOM.num_kv_heads, GEOM.head_dim), -3.0, dtype=GEOM.dtype)
              for _ in range(GEOM.num_layers)]
    slots = torch.randperm(100, generator=torch.Generator().manual_seed(seed))[:tokens].to(torch.int64)
    start = skip * CHUNK + 1  # inside chunk `skip`: that chunk and the later ones are read
    tiers: dict[str, int] = {}
    assert eng.retrieve_paged(toks, caches, slots, layout="flash_attn", start=start, tiers_out=tiers) == tokens
    assert sum(tiers.values()) == tokens - skip * CHUNK  # what was read: from chunk `skip` on
    expect = [torch.full_like(c, -3.0) for c in caches]
    ref_paged.scatter(kv[:, :, start:].contiguous(), expect, slots[start:], layout="flash_attn")
    assert all(torch.equal(c, e) for c, e in zip(caches, expect, strict=True))
    assert eng.retrieve_paged(toks, caches, slots, layout="flash_attn", start=0) == 0  # from 0: chunk 0 is missing
    eng.close()


@given(tokens=st.integers(1, 70), start=st.integers(0, 69), seed=st.integers(0, 2))
@example(tokens=CHUNK, start=0, seed=0)
@example(tokens=3 * CHUNK + 5, start=CHUNK + 3, seed=1)
def test_store_paged_gathers_into_storage_exactly(tmp_path_factory, tokens: int, start: int, seed: int) -> None:
    start = min(start, tokens - 1)
    eng = _engine(tmp_path_factory.mktemp("sp"))
    toks = [11 + seed * 100 + i for i in range(tokens)]
    bs, nb = 5, 20
    g = torch.Generator().manual_seed(seed)
    caches = [torch.randn(2, nb, bs, GEOM.num_kv_heads, GEOM.head_dim, generator=g).to(GEOM.dtype)
              for _ in range(GEOM.num_layers)]
    slots = torch.randperm(nb * bs, generator=g)[:tokens].to(torch.int64)
    stored = eng.store_paged(toks, caches, slots, layout="flash_attn", start=start)
    first = start // CHUNK * CHUNK
    ends = [e for e in range(CHUNK, tokens + 1, CHUNK)] + ([tokens] if eng.config.save_partial_chunks
                                                              and tokens % CHUNK else [])
    assert stored == sum(min(e, tokens) - (e - 1) // CHUNK * CHUNK for e in ends if e > first)
    expect = ref_paged.gather(caches, slots, layout="flash_attn")  # the executable spec
    eng.flush()
    for e in ends:
        if e <= first:
            continue
        lo = (e - 1) // CHUNK * CHUNK
        got = eng.storage.get(eng.plan(toks).keys[lo // CHUNK])
        assert torch.equal(got, expect[:, :, lo:e])
    eng.storage.assert_no_leaks()
    eng.close()


def test_store_paged_checks_everything_before_writing(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    toks = list(range(40))
    caches = [torch.zeros(2, 10, 5, 2, 8, dtype=GEOM.dtype) for _ in range(GEOM.num_layers)]
    bad_slots = torch.arange(40, dtype=torch.int64)
    bad_slots[-1] = 10_000  # past the cache: only the last chunk's gather would see it
    with pytest.raises(ValueError, match="slot_mapping"):
        eng.store_paged(toks, caches, bad_slots, layout="flash_attn")
    other = [torch.zeros(2, 10, 5, 3, 8, dtype=GEOM.dtype) for _ in range(GEOM.num_layers)]  # 3 heads, not 2
    from lmkv.errors import GeometryMismatch

    with pytest.raises(GeometryMismatch, match="kv_caches"):
        eng.store_paged(toks, other, torch.arange(40, dtype=torch.int64), layout="flash_attn")
    assert eng.lookup(toks) == 0 and len(eng.storage.tiers[0]) == 0
    eng.close()


def test_put_filled_frees_the_slot_when_fill_fails_and_falls_back_when_full(tmp_path: Path) -> None:
    store = TieredStore([MemoryTier(4096), DiskTier(tmp_path, 1 << 20)])

    def boom(dst: torch.Tensor) -> None:
        dst.fill_(1)
        raise RuntimeError("gather failed")

    with pytest.raises(RuntimeError, match="gather failed"):
        store.put_filled("x", (8, 8), torch.float32, b"f", boom)
    assert not store.contains("x")
    store.assert_no_leaks()
    store.put_filled("small", (8, 8), torch.float32, b"f", lambda d: d.fill_(2.0))  # 256 B: in the pool
    store.put_filled("big", (64, 64), torch.float32, b"f", lambda d: d.fill_(3.0))  # 16 KB: only on disk
    store.flush()
    assert store.tiers[0].contains("small") and not store.tiers[0].contains("big")
    assert bool((store.get("big", fingerprint=b"f") == 3.0).all())
    with store.tiers[1].get("small") as obj:  # the lower tier got the pool's copy
        assert bool((RawSerde().decode(obj) == 2.0).all())
    store.assert_no_leaks()
    store.close()


@pytest.fixture(scope="module")
def small_pieces():
    """Read-ahead pieces of 8 KiB from 16 KiB on (not 4 / 8 MiB), so that small objects take the threaded path."""
    import lmkv.storage.disk as disk_mod

    saved = disk_mod._PIECE, disk_mod._OVERLAP_MIN
    disk_mod._PIECE, disk_mod._OVERLAP_MIN = 8192, 16384
    yield
    disk_mod._PIECE, disk_mod._OVERLAP_MIN = saved


@given(nbytes=st.integers(0, 60_000), o_direct=st.booleans(), corrupt_at=st.one_of(st.none(), st.floats(0, 1)))
@example(nbytes=16384 - 4, o_direct=False, corrupt_at=None)  # payload ends just below the overlap threshold
@example(nbytes=16384 * 2, o_direct=True, corrupt_at=0.99)  # damage in the last piece the reader thread reads
@example(nbytes=8192 * 3 + 1, o_direct=True, corrupt_at=None)
def test_large_disk_reads_hash_while_reading_and_still_catch_damage(tmp_path_factory, small_pieces, nbytes: int,
                                                                    o_direct: bool, corrupt_at: float | None) -> None:
    tier = DiskTier(tmp_path_factory.mktemp("ov"), 1 << 20, o_direct=o_direct)
    kv = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    tier.put("k", RawSerde().encode("k", kv, b"f"))
    tier.flush()
    if corrupt_at is not None and nbytes:
        path = tier.file_for("k")
        data = bytearray(path.read_bytes())
        pos = len(data) - nbytes + min(nbytes - 1, int(corrupt_at * nbytes))
        data[pos] ^= 0x40
        path.write_bytes(bytes(data))
        assert tier.get("k") is None and tier.stats()["corrupt"] == 1
    else:
        with tier.get("k") as obj:
            assert torch.equal(RawSerde().decode(obj, torch.empty_like(kv)), kv)
    tier.close()


def test_a_truncated_large_file_is_a_miss(tmp_path: Path, small_pieces) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    tier.put("k", RawSerde().encode("k", torch.zeros(50_000, dtype=torch.uint8), b""))
    tier.flush()
    path = tier.file_for("k")
    path.write_bytes(path.read_bytes()[:30_000])
    assert tier.get("k") is None
    tier.close()


def test_prefetch_promotes_the_stored_prefix_into_ram(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    toks = list(range(500, 500 + 3 * CHUNK + 4))
    kv = _kv(len(toks))
    eng.store(toks, kv)
    eng.flush()
    plan = eng.plan(toks)
    memory = eng.storage.tiers[0]
    memory.clear()
    assert eng.prefetch(toks).result(timeout=30) == len(toks)
    assert all(memory.contains(k) for k in plan.keys)
    got, n = eng.retrieve(toks)
    assert n == len(toks) and torch.equal(got, kv) and eng.last_tiers() == {"memory": len(toks)}
    # a chunk stored for other tokens ends the prefetched prefix (fingerprints are checked), as it ends a retrieve
    memory.clear()
    eng.storage.tier("disk").put(plan.keys[2], RawSerde().encode(plan.keys[2], kv[:, :, 32:48], b"other tokens"))
    eng.storage.tier("disk").flush()
    assert eng.prefetch(toks).result(timeout=30) == 2 * CHUNK
    assert memory.contains(plan.keys[1]) and not memory.contains(plan.keys[2]) and not memory.contains(plan.keys[3])
    assert eng.prefetch(list(range(9000, 9010))).result(timeout=30) == 0
    eng.storage.assert_no_leaks()
    eng.close()
