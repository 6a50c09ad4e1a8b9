"""Chunk hashing through the C++ CPU extension (csrc/cpu/hashing.cpp, core in csrc/include/lmkv/hash_blake2s.h).

Limits: CPU only; inputs are the validated, normalised token arrays that ``lmkv.ops.hashing`` passes
(1-D int32/uint32/int64 numpy arrays, values in [0, 2**32)). Sequences of mixed dtypes are widened to
int64 so that one compiled path serves a whole batch. Segment splitting is vectorised numpy here; only the
hashing is C++. Digests are identical to reference/hashing.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from lmkv.optimized.ext import load_component
from lmkv.reference import hashing as ref

load_component("hashing")


def unavailable_reason(device: str) -> str | None:
    # The build succeeded at import, so only the device matters; probing the compiler again on every call
    # (ext.unavailable_reason does a PATH lookup) would cost more than hashing a short prompt.
    return None if device == "cpu" else "the C++ hashing extension runs on CPU only"

_ROOTS: dict[bytes, torch.Tensor] = {}


def num_threads() -> int:
    """``LMKV_HASH_THREADS`` (default 1; 0 = OpenMP's default). One thread already hashes ~0.4 G tokens/s, and
    on a shared, oversubscribed machine a fork-join call can stall a whole time slice waiting for a worker."""
    value = os.environ.get("LMKV_HASH_THREADS", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"LMKV_HASH_THREADS must be an integer, got {value!r}") from None


def _root(salt: bytes) -> torch.Tensor:
    # Roots are tiny, but salts repeat (one per tenant or adapter), so cache a few.
    root = _ROOTS.get(salt)
    if root is None:
        root = torch.frombuffer(bytearray(ref.root(salt)), dtype=torch.uint8)
        if len(_ROOTS) < 1024:
            _ROOTS[salt] = root
    return root


def _tensor(tokens: np.ndarray) -> torch.Tensor:
    if tokens.dtype == np.uint32:
        tokens = tokens.view(np.int32)  # the kernel reads int32 as uint32 bit patterns
    return torch.from_numpy(tokens)


def _split(buf: bytes) -> list[bytes]:
    return [buf[i : i + 16] for i in range(0, len(buf), 16)]


def chunk_keys(
    tokens: np.ndarray, *, chunk_size: int = 256, salt: bytes = b"", include_partial: bool = True
) -> list[bytes]:
    out = torch.ops.lmkv.hashing_chunk_keys([_tensor(tokens)], chunk_size, include_partial, _root(salt), num_threads())
    return _split(out.numpy().tobytes())


def batch_chunk_keys(
    sequences: Sequence[np.ndarray], *, chunk_size: int = 256, salt: bytes = b"", include_partial: bool = True
) -> list[list[bytes]]:
    if not sequences:
        return []
    tensors = [_tensor(s) for s in sequences]
    if len({t.dtype for t in tensors}) > 1:
        tensors = [torch.from_numpy(np.asarray(s, dtype=np.int64)) for s in sequences]
    raw = torch.ops.lmkv.hashing_chunk_keys(tensors, chunk_size, include_partial, _root(salt), num_threads())
    out = _split(raw.numpy().tobytes())
    result: list[list[bytes]] = []
    pos = 0
    for s in sequences:
        k = ref.num_chunks(len(s), chunk_size, include_partial)
        result.append(out[pos : pos + k])
        pos += k
    return result


def split_segments(tokens: np.ndarray, separator: np.ndarray) -> list[tuple[int, int]]:
    """Vectorised form of ``reference.hashing.split_segments`` (same spans)."""
    n, m = len(tokens), len(separator)
    if m > n:
        return [(0, n)] if n else []
    t = tokens.astype(np.int64, copy=False)
    sep = separator.astype(np.int64, copy=False)
    hits = t[: n - m + 1] == sep[0]
    for j in range(1, m):
        hits &= t[j : n - m + 1 + j] == sep[j]
    spans: list[tuple[int, int]] = []
    start = 0
    for i in np.flatnonzero(hits).tolist():
        if i < start:  # overlaps the separator just taken
            continue
        if i > start:
            spans.append((start, i))
        start = i + m
    if n > start:
        spans.append((start, n))
    return spans


def segment_keys(tokens: np.ndarray, *, separator: np.ndarray, salt: bytes = b"") -> list[tuple[int, int, bytes]]:
    spans = split_segments(tokens, separator)
    if not spans:
        return []
    starts = torch.tensor([s for s, _ in spans], dtype=torch.int64)
    ends = torch.tensor([e for _, e in spans], dtype=torch.int64)
    raw = torch.ops.lmkv.hashing_segment_keys(_tensor(tokens), starts, ends, _root(salt), num_threads())
    out = _split(raw.numpy().tobytes())
    return [(s, e, d) for (s, e), d in zip(spans, out)]
