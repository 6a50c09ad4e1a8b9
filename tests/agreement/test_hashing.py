"""Chunk hashing: backends agree digest for digest, the chaining and segment properties, determinism, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from lmkv.ops import hashing as H
from lmkv.reference import hashing as ref

U32 = (1 << 32) - 1
BACKENDS = [b for b in H.chunk_keys.backends() if b != "reference"]
token_lists = st.lists(st.integers(0, U32), max_size=300)
small_tokens = st.lists(st.integers(0, 3), max_size=60)  # tiny alphabet: separators occur often


def test_an_optimized_backend_runs_here() -> None:
    assert "ext" in H.chunk_keys.available_backends("cpu"), H.chunk_keys.unavailable_reason("ext", "cpu")
    assert H.chunk_keys.resolve(None, "cpu")[0] == "ext"
    assert H.chunk_keys.unavailable_reason("ext", "cuda")


def test_known_answer() -> None:
    """The canonical bytes of reference/hashing.py, spelled out with hashlib, and a pinned digest."""
    tokens = [0, 1, 2**32 - 1, 49151, 7]

    def b(data: bytes, person: bytes) -> bytes:
        return hashlib.blake2s(data, digest_size=16, person=person).digest()

    le = b"".join(t.to_bytes(4, "little") for t in tokens)
    root = b(b"salt", b"lmkvROOT")
    k0 = b(root + b(le[:12], b"lmkvLEAF"), b"lmkvCHAN")
    k1 = b(k0 + b(le[12:], b"lmkvLEAF"), b"lmkvCHAN")
    for backend in ["reference", *BACKENDS]:
        assert H.chunk_keys(tokens, chunk_size=3, salt=b"salt", backend=backend) == [k0, k1]
    # Pinned: changing the format must be a deliberate version bump, not an accident.
    assert k1.hex() == PINNED_K1


PINNED_K1 = "e5de36c1a50c0d53b014ed78d1e6eb01"


@given(tokens=token_lists, chunk_size=st.integers(1, 40), salt=st.binary(max_size=20), partial=st.booleans())
@example(tokens=[], chunk_size=1, salt=b"", partial=True)
@example(tokens=[U32] * 32, chunk_size=16, salt=b"", partial=False)  # exactly two full chunks
@example(tokens=list(range(17 * 9)), chunk_size=17, salt=b"x", partial=True)  # 9 chunks: one SIMD group + 1
@example(tokens=list(range(8 * 16 + 5)), chunk_size=16, salt=b"", partial=True)  # 8 full lanes + partial
def test_backends_agree(tokens: list[int], chunk_size: int, salt: bytes, partial: bool) -> None:
    want = H.chunk_keys(tokens, chunk_size=chunk_size, salt=salt, include_partial=partial, backend="reference")
    assert len(want) == ref.num_chunks(len(tokens), chunk_size, partial)
    assert all(len(k) == 16 for k in want) and len(set(want)) == len(want)
    for backend in BACKENDS:
        got = H.chunk_keys(tokens, chunk_size=chunk_size, salt=salt, include_partial=partial, backend=backend)
        assert got == want, backend


@given(tokens=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=200), chunk_size=st.integers(1, 64))
def test_containers_and_dtypes_give_the_same_digests(tokens: list[int], chunk_size: int) -> None:
    want = H.chunk_keys(tokens, chunk_size=chunk_size, backend="reference")
    forms = [tuple(tokens), np.array(tokens, dtype=np.int64), np.array(tokens, dtype=np.uint32),
             np.array(tokens, dtype=np.int32), np.array(tokens, dtype=np.uint64), torch.tensor(tokens),
             torch.tensor(tokens, dtype=torch.int32), torch.tensor(tokens)[None, :][0]]
    if max(tokens) < 2**15:
        forms += [np.array(tokens, dtype=np.int16), torch.tensor(tokens, dtype=torch.int16)]
    for form in forms:
        for backend in ["reference", *BACKENDS]:
            assert H.chunk_keys(form, chunk_size=chunk_size, backend=backend) == want, (type(form), backend)


def test_noncontiguous_input() -> None:
    t = torch.arange(600)[::2]  # stride 2
    assert t.stride() == (2,)
    want = H.chunk_keys(list(range(0, 600, 2)), chunk_size=32, backend="reference")
    for backend in ["reference", *BACKENDS]:
        assert H.chunk_keys(t, chunk_size=32, backend=backend) == want


@given(tokens=st.lists(st.integers(0, U32), min_size=2, max_size=200), chunk_size=st.integers(1, 30),
       data=st.data())
def test_chaining(tokens: list[int], chunk_size: int, data: st.DataObject) -> None:
    """Changing any token of chunk j changes keys j.. and none of 0..j-1; keys of a prefix are a prefix."""
    pos = data.draw(st.integers(0, len(tokens) - 1))
    changed = list(tokens)
    changed[pos] = (changed[pos] + data.draw(st.integers(1, U32))) % (U32 + 1)
    j = pos // chunk_size
    for backend in ["reference", *BACKENDS]:
        a = H.chunk_keys(tokens, chunk_size=chunk_size, backend=backend)
        b = H.chunk_keys(changed, chunk_size=chunk_size, backend=backend)
        assert a[:j] == b[:j]
        assert all(x != y for x, y in zip(a[j:], b[j:])) and len(a) == len(b) > j
        cut = data.draw(st.integers(0, len(a)))
        assert H.chunk_keys(tokens[: cut * chunk_size], chunk_size=chunk_size, backend=backend) == a[:cut]


@given(tokens=token_lists, chunk_size=st.integers(1, 40))
def test_partial_chunk_policy(tokens: list[int], chunk_size: int) -> None:
    for backend in ["reference", *BACKENDS]:
        full = H.chunk_keys(tokens, chunk_size=chunk_size, include_partial=False, backend=backend)
        with_partial = H.chunk_keys(tokens, chunk_size=chunk_size, include_partial=True, backend=backend)
        assert len(full) == len(tokens) // chunk_size
        assert with_partial[: len(full)] == full
        assert len(with_partial) == -(-len(tokens) // chunk_size)
        if len(tokens) % chunk_size:  # the partial key is not the key the completed chunk will get
            longer = H.chunk_keys(tokens + [0] * chunk_size, chunk_size=chunk_size, backend=backend)
            assert longer[len(full)] != with_partial[-1]


def test_salt_separates_key_spaces() -> None:
    t = list(range(100))
    a = H.chunk_keys(t, chunk_size=10, salt=b"a")
    b = H.chunk_keys(t, chunk_size=10, salt=b"b")
    assert not set(a) & set(b)


@given(seqs=st.lists(token_lists, max_size=12), chunk_size=st.integers(1, 40), partial=st.booleans())
@example(seqs=[[], [1], list(range(64)), []], chunk_size=8, partial=True)
def test_batch_matches_single(seqs: list[list[int]], chunk_size: int, partial: bool) -> None:
    want = [H.chunk_keys(s, chunk_size=chunk_size, include_partial=partial, backend="reference") for s in seqs]
    mixed = [np.array(s, dtype=np.uint32) if i % 2 else torch.tensor(s, dtype=torch.int64)
             for i, s in enumerate(seqs)]
    for backend in ["reference", *BACKENDS]:
        assert H.batch_chunk_keys(seqs, chunk_size=chunk_size, include_partial=partial, backend=backend) == want
        assert H.batch_chunk_keys(mixed, chunk_size=chunk_size, include_partial=partial, backend=backend) == want


def _spans_by_hand(tokens: list[int], sep: list[int]) -> list[tuple[int, int]]:
    # Independent oracle: cut at non-overlapping leftmost separator matches, drop empty pieces.
    spans, start, i = [], 0, 0
    while i <= len(tokens) - len(sep):
        if tokens[i : i + len(sep)] == sep:
            spans.append((start, i))
            start = i = i + len(sep)
        else:
            i += 1
    spans.append((start, len(tokens)))
    return [(s, e) for s, e in spans if e > s]


@given(tokens=small_tokens, sep=st.lists(st.integers(0, 3), min_size=1, max_size=3), salt=st.binary(max_size=4))
@example(tokens=[9, 9, 1, 2, 3], sep=[9], salt=b"")  # separator at the start, repeated
@example(tokens=[1, 2, 9], sep=[9], salt=b"")  # separator at the end
@example(tokens=[1, 2, 3], sep=[9], salt=b"")  # absent
@example(tokens=[9, 9], sep=[9], salt=b"")  # nothing but separators
@example(tokens=[1, 1, 1, 2], sep=[1, 1], salt=b"")  # overlapping occurrences: leftmost wins
@example(tokens=[1], sep=[1, 2, 3], salt=b"")  # separator longer than the input
@example(tokens=[], sep=[1], salt=b"")
def test_segments(tokens: list[int], sep: list[int], salt: bytes) -> None:
    spans = _spans_by_hand(tokens, sep)
    want = H.segment_keys(tokens, separator=sep, salt=salt, backend="reference")
    assert [(s, e) for s, e, _ in want] == spans
    for backend in BACKENDS:
        assert H.segment_keys(tokens, separator=sep, salt=salt, backend=backend) == want
    # Position-free: a segment's key depends only on its tokens (and the salt).
    for s, e, d in want:
        alone = H.segment_keys(tokens[s:e], separator=[U32], salt=salt, backend="reference")
        assert alone == [(0, e - s, d)]


def test_segment_keys_are_not_chunk_keys() -> None:
    t = list(range(16))
    assert H.segment_keys(t, separator=[U32])[0][2] != H.chunk_keys(t, chunk_size=16)[0]


def test_large_input_agrees() -> None:
    """Long enough to cross the C++ parallel threshold and many SIMD groups."""
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2**32, size=70_000, dtype=np.uint64)
    want = H.chunk_keys(t, chunk_size=256, backend="reference")
    old = os.environ.get("LMKV_HASH_THREADS")
    try:
        for threads in ("1", "0", "2"):
            os.environ["LMKV_HASH_THREADS"] = threads
            for backend in BACKENDS:
                assert H.chunk_keys(t, chunk_size=256, backend=backend) == want
    finally:
        if old is None:
            os.environ.pop("LMKV_HASH_THREADS", None)
        else:
            os.environ["LMKV_HASH_THREADS"] = old


_CHILD = """
import json, sys
from lmkv.ops import hashing as H
t = list(range(0, 3000, 7)) + [2**32 - 1]
out = {b: [k.hex() for k in H.chunk_keys(t, chunk_size=64, salt=b"s", backend=b)] for b in sys.argv[1:]}
out["seg"] = [d.hex() for _, _, d in H.segment_keys(t, separator=[700], salt=b"s")]
print(json.dumps(out))
"""


def test_two_processes_with_different_hash_seeds_agree() -> None:
    results = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", _CHILD, "reference", *BACKENDS], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert results[0] == results[1]
    here = [k.hex() for k in H.chunk_keys(list(range(0, 3000, 7)) + [2**32 - 1], chunk_size=64, salt=b"s")]
    assert results[0]["reference"] == here and all(results[0][b] == here for b in BACKENDS)


@pytest.mark.parametrize("bad", [[1, -1], [2**32], np.array([3, -2]), np.array([2**32], dtype=np.int64),
                                 np.array([5, 2**40], dtype=np.uint64), torch.tensor([0, -5]),
                                 torch.tensor([2**32 + 1]), np.array([-1], dtype=np.int8)])
def test_out_of_range_ids_are_value_errors(bad) -> None:
    for backend in ["reference", *BACKENDS]:
        with pytest.raises(ValueError, match="tokens"):
            H.chunk_keys(bad, backend=backend)


@pytest.mark.parametrize("bad", [[1.0, 2.0], [1, 2.5], ["a"], np.array([1.0]), torch.tensor([1.0]),
                                 torch.tensor([True]), np.array([True]), "abc", b"abc", 5, None, {1, 2}])
def test_non_integer_tokens_are_type_errors(bad) -> None:
    with pytest.raises(TypeError, match="tokens"):
        H.chunk_keys(bad)


def test_other_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tokens"):
        H.chunk_keys(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="chunk_size"):
        H.chunk_keys([1], chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        H.chunk_keys([1], chunk_size=2.0)
    with pytest.raises(TypeError, match="chunk_size"):
        H.chunk_keys([1], chunk_size=True)
    with pytest.raises(TypeError, match="salt"):
        H.chunk_keys([1], salt="text")
    with pytest.raises(TypeError, match="include_partial"):
        H.chunk_keys([1], include_partial=1)
    with pytest.raises(ValueError, match="separator"):
        H.segment_keys([1, 2], separator=[])
    with pytest.raises(ValueError, match="separator"):
        H.segment_keys([1, 2], separator=[-1])
    with pytest.raises(ValueError, match=r"sequences\[1\]"):
        H.batch_chunk_keys([[1], [-1]])
    with pytest.raises(TypeError, match="sequences"):
        H.batch_chunk_keys(5)


def test_empty_input_is_an_empty_list() -> None:
    for backend in ["reference", *BACKENDS]:
        assert H.chunk_keys([], backend=backend) == []
        assert H.chunk_keys(np.array([], dtype=np.int64), backend=backend) == []
        assert H.chunk_keys(torch.tensor([], dtype=torch.int64), backend=backend) == []
        assert H.segment_keys([], separator=[1], backend=backend) == []
        assert H.batch_chunk_keys([], backend=backend) == []


def test_fingerprints() -> None:
    t = list(range(1000))
    fp = H.token_fingerprint(t)
    assert len(fp) == 32 and fp == H.token_fingerprint(np.array(t, dtype=np.uint32))
    assert fp != H.token_fingerprint(t, salt=b"x") and fp != H.token_fingerprint(t[:-1])
    ends = [10, 256, 1000]
    assert H.prefix_fingerprints(t, ends) == [H.token_fingerprint(t[:e]) for e in ends]
    with pytest.raises(ValueError, match="ends"):
        H.prefix_fingerprints(t, [10, 5])


# -- the ext backend's direct C entry points (csrc/cpu/hashing_py.cpp): every input route and the SIMD paths ----
@pytest.mark.parametrize("chunks", [1, 2, 3, 7, 8, 9, 15, 17])
def test_ext_padded_groups_and_transposed_loads(chunks: int) -> None:
    """1 leftover leaf (scalar), 2..7 (one padded SIMD group), full groups; chunk 64 = four transposed blocks."""
    rng = np.random.default_rng(chunks)
    t = rng.integers(0, 2**32, size=64 * chunks + 5, dtype=np.uint64)
    want = H.chunk_keys(t, chunk_size=64, backend="reference")
    forms = [t, t.astype(np.int64), t.astype(np.uint32), t.tolist(), torch.from_numpy(t.astype(np.int64))]
    for form in forms:
        for backend in BACKENDS:
            assert H.chunk_keys(form, chunk_size=64, backend=backend) == want, type(form)


def test_ext_list_items_of_every_size() -> None:
    """Ids of 0, 1 and 2 CPython digits, bools and numpy scalars (those go through as_tokens) in one list."""
    t = [0, 1, 2**30 - 1, 2**30, 2**32 - 1, True, np.int64(7), np.uint32(2**31), 49151] * 5
    want = H.chunk_keys(np.array([int(x) for x in t], dtype=np.uint64), chunk_size=16, backend="reference")
    for backend in BACKENDS:
        assert H.chunk_keys(t, chunk_size=16, backend=backend) == want
        assert H.chunk_keys(tuple(t), chunk_size=16, backend=backend) == want


def test_ext_refuses_then_names_bad_ids() -> None:
    """Bad ids found in C (list items, 64-bit and signed 32-bit memory) still raise the named errors."""
    for bad in ([1, 2**32], [1, -1], torch.tensor([1, -1], dtype=torch.int32), torch.tensor([2**33]),
                np.array([1, -3], dtype=np.int16), [np.int64(-1)]):
        with pytest.raises(ValueError, match="tokens"):
            H.chunk_keys(bad)
    with pytest.raises(ValueError, match=r"sequences\[0\]"):
        H.batch_chunk_keys([torch.tensor([2**32])])
    with pytest.raises(TypeError, match="tokens"):
        H.chunk_keys([1, 2.0])
    with pytest.raises(TypeError, match="tokens"):
        H.chunk_keys(np.array([1, 2], dtype=">i4").astype(np.float32))


def test_ext_torch_op_adapter_agrees() -> None:
    """The torch.ops.lmkv.hashing_* operators (the second adapter over the same core) give the same digests."""
    from lmkv.optimized.hashing import ext as E

    seqs = [torch.arange(1000, dtype=torch.int64), torch.arange(77, dtype=torch.int32),
            torch.tensor([], dtype=torch.int64)]
    want = H.batch_chunk_keys(seqs, chunk_size=32, salt=b"s", backend="reference")
    root = torch.frombuffer(bytearray(E.root(b"s")), dtype=torch.uint8)
    raw = torch.ops.lmkv.hashing_chunk_keys(seqs, 32, True, root, 1).numpy().tobytes()  # mixed widths
    assert [raw[i : i + 16] for i in range(0, len(raw), 16)] == [k for keys in want for k in keys]
    spans = H.segment_keys(seqs[0], separator=[500], salt=b"s", backend="reference")
    raw = torch.ops.lmkv.hashing_segment_keys(seqs[0], torch.tensor([0, 501]), torch.tensor([500, 1000]), root, 1)
    assert [raw.numpy().tobytes()[i : i + 16] for i in (0, 16)] == [d for _, _, d in spans]


def test_default_resolution_is_memoised_but_selections_still_apply() -> None:
    from lmkv._dispatch import use_backend

    t = list(range(300))
    want = H.chunk_keys(t, backend="reference")
    calls = []
    original = H.chunk_keys.reference

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    H.chunk_keys.reference = spy
    try:
        assert H.chunk_keys(t) == want and not calls
        with use_backend("reference"):
            assert H.chunk_keys(t) == want and len(calls) == 1
        os.environ["LMKV_BACKEND"] = "reference"
        try:
            assert H.chunk_keys(t) == want and len(calls) == 2
        finally:
            del os.environ["LMKV_BACKEND"]
        assert H.chunk_keys(t) == want and len(calls) == 2
    finally:
        H.chunk_keys.reference = original
