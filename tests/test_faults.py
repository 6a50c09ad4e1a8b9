"""Faults that must be misses with a warning, never exceptions: an unwritable cache directory, and well-formed
objects (valid header, checksum, key and token fingerprint: anyone who can write to the tier can make one) whose
shape or dtype is not the chunk's, in every tier, for full and partial chunks."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch

import lmkv.storage.disk as disk_mod
from lmkv.engine import KVEngine
from lmkv.storage.serde import RawSerde
from lmkv.types import KVGeometry

GEOM = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
CHUNK = 16


def _kv(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(GEOM.chunk_shape(tokens), generator=torch.Generator().manual_seed(seed)).to(GEOM.dtype)


def _engine(disk_path: Path, **over) -> KVEngine:
    cfg = {"chunk_size": CHUNK, "memory": {"capacity": 8 << 20}, "disk": {"path": str(disk_path)}, **over}
    return KVEngine(cfg, GEOM, model_id="faults")


# -- a cache directory nothing can be created in ------------------------------------------------------------------


def test_a_disk_that_refuses_directories_never_raises_and_reads_create_nothing(tmp_path: Path, monkeypatch,
                                                                                 caplog) -> None:
    calls = []

    def no_inodes(path, *a, **k):
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device (inodes)", path)

    eng = _engine(tmp_path / "d", memory={"enabled": False})
    monkeypatch.setattr(disk_mod.os, "makedirs", no_inodes)
    toks = list(range(3 * CHUNK + 5))
    with caplog.at_level(logging.WARNING, logger="lmkv.storage"):
        assert eng.lookup(toks) == 0
        assert eng.retrieve(toks)[1] == 0
        assert not calls  # reads never create anything
        eng.store(toks, _kv(len(toks)))  # a skipped put with a warning, not an error
        eng.flush()
    assert calls and "not cached" in caplog.text
    assert eng.lookup(toks) == 0 and eng.storage.stats()["disk"]["rejected"] >= 1
    eng.close()


def test_a_cache_path_under_a_file_is_a_tier_that_misses(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="lmkv.storage"):
        eng = _engine(blocker / "cache", memory={"enabled": False})
        toks = list(range(2 * CHUNK))
        eng.store(toks, _kv(2 * CHUNK))
        eng.flush()
        assert eng.lookup(toks) == 0 and eng.retrieve(toks)[1] == 0
    assert "cannot create" in caplog.text
    eng.close()


# -- well-formed objects of another shape or dtype ------------------------------------------------------------------


def _forge(tier, key: str, kv: torch.Tensor, fingerprint: bytes) -> None:
    tier.put(key, RawSerde().encode(key, kv, fingerprint))
    tier.flush()


WRONG = {
    "dtype": lambda n: torch.zeros(GEOM.chunk_shape(n), dtype=torch.float32),
    "heads": lambda n: torch.zeros(GEOM.num_layers, 2, n, GEOM.num_kv_heads + 1, GEOM.head_dim, dtype=GEOM.dtype),
    "tokens": lambda n: torch.zeros(GEOM.chunk_shape(n + 1), dtype=GEOM.dtype),
    "flat": lambda n: torch.zeros(GEOM.bytes_per_token * n // 2, dtype=GEOM.dtype),  # same bytes, no shape
}


CASES = [(tokens, bad, kind, tier) for kind in sorted(WRONG) for tier in ("memory", "disk")
         for tokens, bad in ((2 * CHUNK, 0), (3 * CHUNK + 5, 3), (3 * CHUNK + 5, 1))]  # first, partial last, middle


@pytest.mark.parametrize(("tokens", "bad", "kind", "tier"), CASES)
def test_a_forged_chunk_ends_the_prefix_with_a_warning(tmp_path: Path, caplog, tokens: int, bad: int, kind: str,
                                                       tier: str) -> None:
    eng = _engine(tmp_path / "d")
    toks = list(range(100, 100 + tokens))
    kv = _kv(tokens)
    eng.store(toks, kv)
    eng.flush()
    plan = eng.plan(toks)
    bad = min(bad, len(plan.spans) - 1)
    s, e = plan.spans[bad]
    for t in eng.storage.tiers:
        t.remove(plan.keys[bad])
    _forge(eng.storage.tier(tier), plan.keys[bad], WRONG[kind](e - s), plan.fingerprints[bad])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got, n = eng.retrieve(toks)
        assert n == s and torch.equal(got, kv[:, :, :s])  # exact up to the forged chunk, nothing after it
        caches = [torch.zeros(2, 40, 4, GEOM.num_kv_heads, GEOM.head_dim, dtype=GEOM.dtype) for _ in range(2)]
        slots = torch.arange(tokens, dtype=torch.int64)
        assert eng.retrieve_paged(toks, caches, slots, layout="flash_attn") == s
    assert "treating it as a miss" in caplog.text
    assert eng.stats()["load_errors"] >= 2
    eng.close()


def test_a_forged_chunk_in_redis_is_a_miss(tmp_path: Path, caplog) -> None:
    from redis_server import RedisServer

    srv = RedisServer().start()
    try:
        eng = _engine(tmp_path / "d", memory={"enabled": False}, disk={"enabled": False},
                      redis={"enabled": True, "url": srv.url})
        toks = list(range(2 * CHUNK + 3))
        kv = _kv(len(toks))
        eng.store(toks, kv)
        eng.flush()
        plan = eng.plan(toks)
        redis = eng.storage.tier("redis")
        _forge(redis, plan.keys[2], WRONG["dtype"](3), plan.fingerprints[2])  # the partial last chunk
        with caplog.at_level(logging.WARNING):
            got, n = eng.retrieve(toks)
        assert n == 2 * CHUNK and torch.equal(got, kv[:, :, :n]) and "treating it as a miss" in caplog.text
        eng.close()
    finally:
        srv.cleanup()


def test_a_forged_segment_is_a_miss(tmp_path: Path, caplog) -> None:
    eng = _engine(tmp_path / "d")
    toks = [5, 6, 7, 1, 8, 9, 1, 10, 11, 12]
    segs = eng.segment_plan(toks, [1])
    for seg in segs:
        eng.store_segment(seg, _kv(seg.num_tokens, seg.start))
    _forge(eng.storage.tiers[0], segs[1].key, WRONG["heads"](segs[1].num_tokens), segs[1].fingerprint)
    with caplog.at_level(logging.WARNING):
        got = eng.retrieve_segments(segs)
    assert got[1] is None and got[0] is not None and "treating it as a miss" in caplog.text
    eng.close()


def test_an_object_that_shrinks_while_read_is_a_miss(tmp_path: Path, monkeypatch) -> None:
    """The file is truncated between the size check and the read (another process replacing it)."""
    eng = _engine(tmp_path / "d", memory={"enabled": False})
    toks = list(range(CHUNK))
    eng.store(toks, _kv(CHUNK))
    eng.flush()
    disk = eng.storage.tier("disk")
    path = disk.file_for(eng.plan(toks).keys[0])
    real_fstat = os.fstat

    def shrinking_fstat(fd):
        st_ = real_fstat(fd)
        os.truncate(path, st_.st_size // 2)  # the size we saw is no longer the size we read
        return st_

    monkeypatch.setattr(disk_mod.os, "fstat", shrinking_fstat)
    assert eng.retrieve(toks)[1] == 0
    monkeypatch.undo()
    eng.close()
