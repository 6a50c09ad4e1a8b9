"""Chunk hashing through the C++ CPU extension (csrc/cpu/hashing*.cpp, core in csrc/include/lmkv/hash_chunks.h).

Limits: CPU only, CPython only. The hot path bypasses the torch dispatcher: ``load_component("hashing")``
builds one library holding both the ``torch.ops.lmkv.hashing_*`` operators and plain CPython functions
(csrc/cpu/hashing_py.cpp), fetched once here through ``ctypes.PyDLL``. Those take a list/tuple of ints or a
1-D integer numpy array or a contiguous CPU int tensor (by address) as is (C reads list items and
range-checks ids) and answer None for anything they do
not handle, which sends the input through ``lmkv.reference.hashing.as_tokens`` (normalise, or raise the named
error) and back. Leaves may use OpenMP threads (``LMKV_HASH_THREADS``, default 1), chains are sequential.
Segment splitting is vectorised numpy here; only the hashing is C++. Digests equal reference/hashing.py.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkv.optimized.ext import load_component
from lmkv.reference import hashing as ref

load_component("hashing")


def _load_api() -> dict[str, Any]:
    libs = [p for p in torch.ops.loaded_libraries if Path(p).name.startswith("lmkv_hashing")]
    if not libs:
        raise ImportError("the lmkv_hashing library is not loaded (load_component('hashing') found no library)")
    entry = ctypes.PyDLL(libs[-1]).lmkv_hashing_api
    entry.restype = ctypes.py_object
    return entry()


_API = _load_api()
_chunk_keys = _API["chunk_keys"]
_chunk_keys_ptr = _API["chunk_keys_ptr"]
_SIGNED = {torch.int64: True, torch.int32: True, torch.int16: True, torch.int8: True, torch.uint8: False}
_batch_chunk_keys = _API["batch_chunk_keys"]
_segment_keys = _API["segment_keys"]


def unavailable_reason(device: str) -> str | None:
    # The build succeeded at import, so only the device matters; probing the compiler again on every call
    # (ext.unavailable_reason does a PATH lookup) would cost more than hashing a short prompt.
    return None if device == "cpu" else "the C++ hashing extension runs on CPU only"


_ROOTS: dict[bytes, bytes] = {}
_THREADS: tuple[str | None, int] = (None, 1)


def num_threads() -> int:
    """``LMKV_HASH_THREADS`` (default 1; 0 = OpenMP's default). One thread already hashes ~0.4 G tokens/s, and
    on a shared, oversubscribed machine a fork-join call can stall a whole time slice waiting for a worker."""
    global _THREADS
    value = os.environ.get("LMKV_HASH_THREADS")
    if value != _THREADS[0]:
        try:
            _THREADS = (value, 1 if value is None else int(value))
        except ValueError:
            raise ValueError(f"LMKV_HASH_THREADS must be an integer, got {value!r}") from None
    return _THREADS[1]


def root(salt: bytes) -> bytes:
    # Roots are tiny, but salts repeat (one per tenant or adapter), so cache a few.
    r = _ROOTS.get(salt)
    if r is None:
        r = ref.root(salt)
        if len(_ROOTS) < 1024:
            _ROOTS[salt] = r
    return r


def _normalised(tokens: Any, name: str) -> np.ndarray:
    from lmkv.reference.hashing import as_tokens  # raises the named TypeError/ValueError for bad input

    return as_tokens(tokens, name)


def _handled(result: list | None, what: str) -> list:
    if result is None:  # as_tokens accepted what C refused: a bug, never silently a wrong digest
        raise RuntimeError(f"hashing extension refused normalised {what}")
    return result


def chunk_keys(tokens: Any, *, chunk_size: int = 256, salt: bytes = b"", include_partial: bool = True) -> list[bytes]:
    r, th = root(salt), num_threads()
    if type(tokens) is torch.Tensor:
        signed = _SIGNED.get(tokens.dtype)
        if signed is not None and tokens.is_cpu and tokens.dim() == 1 and tokens.is_contiguous():
            out = _chunk_keys_ptr(tokens.data_ptr(), tokens.numel(), tokens.element_size(), signed, chunk_size,
                                  include_partial, r, th)
        else:
            out = None
    else:
        out = _chunk_keys(tokens, chunk_size, include_partial, r, th)
    if out is None:
        out = _handled(_chunk_keys(_normalised(tokens, "tokens"), chunk_size, include_partial, r, th), "tokens")
    return out


def batch_chunk_keys(
    sequences: Sequence[Any], *, chunk_size: int = 256, salt: bytes = b"", include_partial: bool = True
) -> list[list[bytes]]:
    r, th = root(salt), num_threads()
    out = _batch_chunk_keys(sequences, chunk_size, include_partial, r, th)
    if out is None:
        seqs = [_normalised(s, f"sequences[{i}]") for i, s in enumerate(sequences)]
        out = _handled(_batch_chunk_keys(seqs, chunk_size, include_partial, r, th), "sequences")
    return out


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
    tokens = _normalised(tokens, "tokens")
    spans = split_segments(tokens, _normalised(separator, "separator"))
    if not spans:
        return []
    flat = np.asarray(spans, dtype=np.int64).reshape(-1)
    out = _handled(_segment_keys(tokens, flat, root(salt), num_threads()), "tokens")
    return [(s, e, d) for (s, e), d in zip(spans, out)]
