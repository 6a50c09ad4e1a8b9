"""Token database: chunk keys, prefix lookup over a storage's batched_contains, verification on hit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmkv.keys import KeySpace
from lmkv.ops import hashing
from lmkv.token_db import TokenDatabase
from lmkv.types import KVGeometry

GEOM = KVGeometry(2, 1, 4, torch.float32)


def make_db(chunk_size: int = 8, salt: bytes = b"", partial: bool = True) -> TokenDatabase:
    return TokenDatabase(chunk_size, KeySpace("tiny", GEOM, salt=salt), save_partial=partial)


class DictStore:
    """The storage side: key -> (fingerprint, kv). ``batched_contains`` counts leading hits."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, object]] = {}
        self.calls = 0

    def batched_contains(self, keys: list[str]) -> int:
        self.calls += 1
        n = 0
        for k in keys:
            if k not in self.objects:
                break
            n += 1
        return n

    def store(self, db: TokenDatabase, tokens: list[int]) -> None:
        for (_start, end, key), fp in zip(db.chunks(tokens), db.fingerprints(tokens)):
            self.objects[key] = (fp, ("kv of", tuple(tokens[:end])))

    def retrieve(self, db: TokenDatabase, tokens: list[int]) -> list[object]:
        """What the engine does: look up, then fetch and verify each hit chunk; a failed check ends the hit."""
        n = db.lookup(tokens, self.batched_contains)
        out = []
        for _start, end, key in db.chunks(tokens):
            if end > n:
                break
            fp, kv = self.objects[key]
            if not db.verify(tokens[:end], fp):
                break
            out.append(kv)
        return out


def test_chunks_positions_and_keys() -> None:
    db = make_db(8)
    toks = list(range(20))
    chunks = db.chunks(toks)
    assert [(s, e) for s, e, _ in chunks] == [(0, 8), (8, 16), (16, 20)]
    digests = hashing.chunk_keys(toks, chunk_size=8)
    assert [k for _, _, k in chunks] == [db.keyspace.text(d) for d in digests]
    assert [(s, e) for s, e, _ in make_db(8, partial=False).chunks(toks)] == [(0, 8), (8, 16)]
    assert db.chunks([]) == []
    assert db.batch_chunks([toks, [], toks[:3]]) == [chunks, [], db.chunks(toks[:3])]


@given(stored=st.lists(st.integers(0, 50), max_size=60), query=st.lists(st.integers(0, 50), max_size=60),
       chunk_size=st.integers(1, 9))
def test_lookup_is_the_longest_stored_chunk_prefix(stored: list[int], query: list[int], chunk_size: int) -> None:
    db, store = make_db(chunk_size), DictStore()
    store.store(db, stored)
    n = db.lookup(query, store.batched_contains)
    # Oracle: chunks of the query that are whole-prefix identical to chunks of the stored sequence.
    want = 0
    for start, end, _ in db.chunks(query):
        stored_end = min(len(stored), start + chunk_size)
        if end != stored_end or query[:end] != stored[:end]:
            break
        want = end
    assert n == want
    assert store.retrieve(db, query) == [("kv of", tuple(query[:e])) for _, e, _ in db.chunks(query) if e <= n]


def test_lookup_stops_at_first_miss_and_checks_the_storage_answer() -> None:
    db, store = make_db(4), DictStore()
    toks = list(range(16))
    store.store(db, toks)
    del store.objects[db.chunks(toks)[1][2]]
    assert db.lookup(toks, store.batched_contains) == 4
    assert db.lookup([], store.batched_contains) == 0
    for bad in (-1, 5, 1.0, True, None):
        with pytest.raises(ValueError, match="batched_contains"):
            db.lookup(toks, lambda keys, bad=bad: bad)


def test_salted_databases_do_not_share() -> None:
    a, b, store = make_db(4, salt=b"tenant-a"), make_db(4, salt=b"tenant-b"), DictStore()
    toks = list(range(12))
    store.store(a, toks)
    assert a.lookup(toks, store.batched_contains) == 12
    assert b.lookup(toks, store.batched_contains) == 0


def test_verify() -> None:
    db = make_db(4)
    toks = np.arange(10)
    fps = db.fingerprints(toks)
    assert fps == [db.fingerprint(toks[:e]) for _, e, _ in db.chunks(toks)]
    assert db.verify(toks[:8], fps[1])
    assert not db.verify(toks[:8], fps[0])
    assert not db.verify(list(range(1, 9)), fps[1])
    for junk in (b"", b"x" * 31, "text", None, 123):
        assert not db.verify(toks[:8], junk)


def test_injected_digest_collision_is_a_miss_not_wrong_kv(monkeypatch, caplog) -> None:
    """Force every sequence onto the same digests: lookups 'hit', verification refuses the foreign KV."""
    db, store = make_db(4), DictStore()
    victim, attacker = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 9, 9, 9, 9]

    real = hashing.chunk_keys

    def colliding(tokens, *, chunk_size=256, salt=b"", include_partial=True, backend=None):
        n = len(real(tokens, chunk_size=chunk_size, salt=salt, include_partial=include_partial))
        return [bytes([i]) * 16 for i in range(n)]  # same keys for any input of this length

    monkeypatch.setattr(hashing, "chunk_keys", colliding)
    store.store(db, attacker)
    assert db.chunks(victim) == db.chunks(attacker)  # the collision is real
    assert db.lookup(victim, store.batched_contains) == 8  # lookup alone is fooled ...
    with caplog.at_level(logging.WARNING, logger="lmkv.token_db"):
        assert store.retrieve(db, victim) == []  # ... but no foreign KV comes back
    assert "mismatch" in caplog.text
    assert store.retrieve(db, attacker) == [("kv of", tuple(attacker[:4])), ("kv of", tuple(attacker))]


def test_collision_in_an_earlier_chunk_is_caught_too(monkeypatch) -> None:
    """Same last chunk, different first chunk: the fingerprint covers the whole prefix, not the chunk alone."""
    db, store = make_db(4), DictStore()
    a, b = [1, 1, 1, 1, 5, 6, 7, 8], [2, 2, 2, 2, 5, 6, 7, 8]
    monkeypatch.setattr(hashing, "chunk_keys",
                        lambda tokens, **kw: [bytes([i]) * 16 for i in range(len(tokens) // 4)])
    store.store(db, a)
    fp_a = store.objects[db.chunks(a)[1][2]][0]
    assert not db.verify(b, fp_a)


def test_segments() -> None:
    db = make_db(4)
    segs = db.segments([1, 2, 0, 0, 3, 4, 5, 0, 0], separator=[0, 0])
    assert [(s, e) for s, e, _ in segs] == [(0, 2), (4, 7)]
    moved = db.segments([3, 4, 5], separator=[0, 0])
    assert moved[0][2] == segs[1][2]


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        TokenDatabase(0, KeySpace("m", GEOM))
    with pytest.raises(TypeError, match="keyspace"):
        TokenDatabase(4, "m")
    with pytest.raises(ValueError, match="tokens"):
        make_db().chunks([-1])
