"""Chunk hashing, the executable specification: hashlib over canonical bytes, prefix-chained.

Why BLAKE2s-128 in a two-level (leaf, chain) construction
-----------------------------------------------------------
Keys are content addresses that must match across processes, machines, Python versions and endianness, so
they are computed from explicit bytes with a standard hash, never with Python's ``hash()``. BLAKE2s is

* standard and in ``hashlib`` (``hashlib.blake2s(digest_size=16, person=...)``): the reference is readable;
* built from 32-bit add/xor/rotate only: the same few lines in C++ (eight leaves per AVX2 register),
  CUDA and numba, with no tables and no 64-bit multiplies, so every backend produces identical digests;
* a true 128-bit output (``digest_size`` is part of the parameter block), with 8 bytes of personalisation
  that give each node kind its own domain for free;
* a cryptographic hash: nobody can construct a collision, unlike 64-bit or non-cryptographic keys.

A plain chain ``key_i = H(key_{i-1} || chunk_i)`` hashes every byte sequentially, one sequence at a time.
Hashing each chunk on its own first (a *leaf*) and chaining over the 16-byte leaf digests keeps the
expensive part embarrassingly parallel (across chunks, sequences, SIMD lanes and threads) and leaves only
one 64-byte compression per chunk to the sequential chain.

Canonical bytes (format version 1)
----------------------------------
* A token sequence ``t[0..n)`` (ids in ``[0, 2**32)``) is the concatenation of ``uint32`` little-endian
  encodings: ``bytes(t) = le32(t[0]) || le32(t[1]) || ...`` (``4 n`` bytes). The int dtype or container the
  caller used does not matter, only the values.
* ``B(data, P)`` is ``BLAKE2s(data, digest_size=16, key=b"", salt=b"", person=P)``; the four domains are
  ``P_ROOT = b"lmkvROOT"``, ``P_LEAF = b"lmkvLEAF"``, ``P_CHAIN = b"lmkvCHAN"``, ``P_SEG = b"lmkvSEGM"``.
* ``root = B(salt, P_ROOT)``: the salt (any bytes: a tenant, a LoRA id, a multimodal hash) enters here.
* ``leaf(tokens) = B(bytes(tokens), P_LEAF)`` (BLAKE2 counts the length, so a partial chunk differs from
  any full one).

Prefix chunk keys (``chunk_keys``) for chunk size ``C``: chunk ``i`` is ``t[iC : min((i+1)C, n))``;
``k_{-1} = root`` and ``k_i = B(k_{i-1} || leaf(chunk_i), P_CHAIN)`` (32 bytes in). So ``k_i`` depends on the
salt and on every token of chunks ``0..i`` and on nothing after. The trailing partial chunk gets a key only
when ``include_partial``. Invariant: ``chunk_keys(t)[:j] == chunk_keys(t[:j*C])`` for every ``j``.

Segment keys (``segment_keys``, CacheBlend's position-free chunks): the tokens are split on every
non-overlapping occurrence of the separator sequence (left to right); separators are not part of any
segment and empty segments are dropped. Segment ``[s, e)`` gets ``B(root || leaf(t[s:e]), P_SEG)``, which
depends on its tokens and the salt only, not on its position or neighbours.

Shapes: ``tokens`` is 1-D (``[T]``); every digest is 16 bytes. Inputs arrive normalised by
:func:`lmkv.tokens.as_tokens` (``lmkv.ops.hashing`` calls it), so the functions here take numpy arrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

DIGEST_SIZE = 16
P_ROOT = b"lmkvROOT"
P_LEAF = b"lmkvLEAF"
P_CHAIN = b"lmkvCHAN"
P_SEG = b"lmkvSEGM"
P_FINGERPRINT = b"lmkv.fingerprint.v1\x00"


def _b(data: bytes, person: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=DIGEST_SIZE, person=person).digest()


def canonical_bytes(tokens: np.ndarray) -> bytes:
    """``le32(t[0]) || le32(t[1]) || ...`` for a validated 1-D integer array with values in [0, 2**32)."""
    return np.ascontiguousarray(tokens).astype("<u4", copy=False).tobytes()


def root(salt: bytes = b"") -> bytes:
    """``B(salt, P_ROOT)``: the chain's starting value; the only place the salt enters."""
    return _b(bytes(salt), P_ROOT)


def leaf(tokens: np.ndarray) -> bytes:
    """``B(bytes(tokens), P_LEAF)``."""
    return _b(canonical_bytes(tokens), P_LEAF)


def chain(prev: bytes, leaf_digest: bytes) -> bytes:
    """``B(prev || leaf, P_CHAIN)``."""
    return _b(prev + leaf_digest, P_CHAIN)


def num_chunks(num_tokens: int, chunk_size: int, include_partial: bool) -> int:
    full, rest = divmod(num_tokens, chunk_size)
    return full + (1 if include_partial and rest else 0)


def chunk_keys(
    tokens: np.ndarray, *, chunk_size: int = 256, salt: bytes = b"", include_partial: bool = True
) -> list[bytes]:
    """Prefix-chained 16-byte keys, one per chunk of ``chunk_size`` tokens (see the module docstring).

    Args:
        tokens: ``[T]`` integer ids in ``[0, 2**32)`` (validated by ``lmkv.ops.hashing``).
        chunk_size: ``C`` tokens per chunk.
        salt: bytes mixed into the root of the chain.
        include_partial: also key the trailing chunk of fewer than ``C`` tokens.

    Returns:
        ``[k_0, k_1, ...]``, ``num_chunks(T, C, include_partial)`` digests of 16 bytes.
    """
    data = canonical_bytes(tokens)
    n = len(data) // 4
    out: list[bytes] = []
    key = root(salt)
    for i in range(num_chunks(n, chunk_size, include_partial)):
        start, end = i * chunk_size, min((i + 1) * chunk_size, n)
        key = chain(key, _b(data[4 * start : 4 * end], P_LEAF))
        out.append(key)
    return out


def batch_chunk_keys(
    sequences: Sequence[np.ndarray], *, chunk_size: int = 256, salt: bytes = b"", include_partial: bool = True
) -> list[list[bytes]]:
    """``[chunk_keys(s, ...) for s in sequences]``: the batched form must give exactly these digests."""
    return [chunk_keys(s, chunk_size=chunk_size, salt=salt, include_partial=include_partial) for s in sequences]


def split_segments(tokens: np.ndarray, separator: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the non-empty runs between non-overlapping separator occurrences."""
    t = np.asarray(tokens).tolist()
    sep = np.asarray(separator).tolist()
    m = len(sep)
    spans: list[tuple[int, int]] = []
    start = i = 0
    while i + m <= len(t):
        if t[i : i + m] == sep:
            if i > start:
                spans.append((start, i))
            i += m
            start = i
        else:
            i += 1
    if len(t) > start:
        spans.append((start, len(t)))
    return spans


def segment_keys(tokens: np.ndarray, *, separator: np.ndarray, salt: bytes = b"") -> list[tuple[int, int, bytes]]:
    """Position-free keys of the segments between separators: ``[(start, end, B(root || leaf, P_SEG))]``."""
    r = root(salt)
    data = canonical_bytes(tokens)
    return [(s, e, _b(r + _b(data[4 * s : 4 * e], P_LEAF), P_SEG)) for s, e in split_segments(tokens, separator)]


def fingerprint_hasher(salt: bytes = b"") -> hashlib._Hash:
    """SHA-256 state after the fingerprint header ``P_FINGERPRINT || le32(len(salt)) || salt``."""
    salt = bytes(salt)
    return hashlib.sha256(P_FINGERPRINT + len(salt).to_bytes(4, "little") + salt)


def token_fingerprint(tokens: np.ndarray, *, salt: bytes = b"") -> bytes:
    """SHA-256 (32 bytes) over the header and ``bytes(tokens)``: what a stored object carries to verify tokens.

    An independent hash family from the keys: a wrong hit would need a simultaneous BLAKE2s-128 and SHA-256
    collision on the same pair of inputs. For a prefix chunk, pass all tokens from 0 through the chunk's end
    (its KV depends on them all); for a segment, the segment's tokens.
    """
    h = fingerprint_hasher(salt)
    h.update(canonical_bytes(tokens))
    return h.digest()
