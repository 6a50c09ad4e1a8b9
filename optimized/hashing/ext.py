"""Chunk hashing through the C++ CPU extension (csrc/cpu/hashing*.cpp, core in csrc/include/lmkv/hash_chunks.h).

Limits: CPU only, CPython only. The hot path bypasses the torch dispatcher: ``load_component("hashing")``
builds one library holding both the ``torch.ops.lmkv.hashing_*`` operators and plain CPython functions
(csrc/cpu/hashing_py.cpp), fetched once through ``ctypes.PyDLL`` into an :class:`ExtHasher` made when this
module is imported. Those take a list/tuple of ints or a 1-D integer numpy array or a contiguous CPU int tensor
(by address) as is (C reads list items and range-checks ids) and answer None for anything they do not handle,
which sends the input through :func:`lmkv.tokens.as_tokens` (normalise, or raise the named error) and back.
Leaves may use OpenMP threads (``LMKV_HASH_THREADS``, default 1), chains are sequential. Segment splitting is
vectorised numpy here; only the hashing is C++. Digests equal reference/hashing.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkv.optimized.ext import load_component
from lmkv.tokens import as_tokens

load_component("hashing")

_SIGNED = {torch.int64: True, torch.int32: True, torch.int16: True, torch.int8: True, torch.uint8: False}
_MAX_ROOTS = 1024


def unavailable_reason(device: str) -> str | None:
    # The build succeeded at import, so only the device matters; probing the compiler again on every call
    # (ext.unavailable_reason does a PATH lookup) would cost more than hashing a short prompt.
    return None if device == "cpu" else "the C++ hashing extension runs on CPU only"


def _handled(result: list | None, what: str) -> list:
    if result is None:  # as_tokens accepted what C refused: a bug, never silently a wrong digest
        raise RuntimeError(f"hashing extension refused normalised {what}")
    return result


class ExtHasher:
    """The C entry points of csrc/cpu/hashing_py.cpp, and the small state calls share (roots, thread count).

    Args:
        api: ``{name: builtin}`` as returned by the library's ``lmkv_hashing_api()``.
    """

    def __init__(self, api: dict[str, Any]) -> None:
        self._chunk_keys = api["chunk_keys"]
        self._chunk_keys_ptr = api["chunk_keys_ptr"]
        self._batch_chunk_keys = api["batch_chunk_keys"]
        self._segment_keys = api["segment_keys"]
        self._roots: dict[bytes, bytes] = {}
        self._threads: tuple[str | None, int] = (None, 1)

    @classmethod
    def load(cls) -> ExtHasher:
        """The hasher over the ``lmkv_hashing`` library that ``load_component("hashing")`` loaded."""
        libs = [p for p in torch.ops.loaded_libraries if Path(p).name.startswith("lmkv_hashing")]
        if not libs:
            raise ImportError("the lmkv_hashing library is not loaded (load_component('hashing') found no library)")
        entry = ctypes.PyDLL(libs[-1]).lmkv_hashing_api
        entry.restype = ctypes.py_object
        return cls(entry())

    def num_threads(self) -> int:
        """``LMKV_HASH_THREADS`` (default 1; 0 = OpenMP's default). One thread already hashes ~0.4 G tokens/s, and
        on a shared, oversubscribed machine a fork-join call can stall a whole time slice waiting for a worker."""
        value = os.environ.get("LMKV_HASH_THREADS")
        if value != self._threads[0]:  # parse only when the variable changed
            try:
                self._threads = (value, 1 if value is None else int(value))
            except ValueError:
                raise ValueError(f"LMKV_HASH_THREADS must be an integer, got {value!r}") from None
        return self._threads[1]

    def root(self, salt: bytes) -> bytes:
        """``BLAKE2s-128(salt, person=b"lmkvROOT")``, the chain's start (the C core hashes token words only)."""
        r = self._roots.get(salt)
        if r is None:
            r = hashlib.blake2s(salt, digest_size=16, person=b"lmkvROOT").digest()
            if len(self._roots) < _MAX_ROOTS:  # salts repeat (one per tenant or adapter): keep a few
                self._roots[salt] = r
        return r

    def chunk_keys(self, tokens: Any, *, chunk_size: int = 256, salt: bytes = b"", include_partial: bool = True
                   ) -> list[bytes]:
        """Prefix-chained 16-byte keys of ``tokens`` ``[T]``, one per chunk (the reference's digests)."""
        r, th = self.root(salt), self.num_threads()
        out = None
        if type(tokens) is torch.Tensor:
            signed = _SIGNED.get(tokens.dtype)
            if signed is not None and tokens.is_cpu and tokens.dim() == 1 and tokens.is_contiguous():
                out = self._chunk_keys_ptr(tokens.data_ptr(), tokens.numel(), tokens.element_size(), signed,
                                           chunk_size, include_partial, r, th)
        else:
            out = self._chunk_keys(tokens, chunk_size, include_partial, r, th)
        if out is None:
            out = _handled(self._chunk_keys(as_tokens(tokens, "tokens"), chunk_size, include_partial, r, th),
                           "tokens")
        return out

    def batch_chunk_keys(self, sequences: Sequence[Any], *, chunk_size: int = 256, salt: bytes = b"",
                         include_partial: bool = True) -> list[list[bytes]]:
        """``[chunk_keys(s) for s in sequences]`` in one C call (leaves of every sequence hashed together)."""
        r, th = self.root(salt), self.num_threads()
        out = self._batch_chunk_keys(sequences, chunk_size, include_partial, r, th)
        if out is None:
            seqs = [as_tokens(s, f"sequences[{i}]") for i, s in enumerate(sequences)]
            out = _handled(self._batch_chunk_keys(seqs, chunk_size, include_partial, r, th), "sequences")
        return out

    def segment_keys(self, tokens: np.ndarray, *, separator: np.ndarray, salt: bytes = b""
                     ) -> list[tuple[int, int, bytes]]:
        """``[(start, end, key)]`` of the segments between separators (position-free keys)."""
        tokens = as_tokens(tokens, "tokens")
        spans = split_segments(tokens, as_tokens(separator, "separator"))
        if not spans:
            return []
        flat = np.asarray(spans, dtype=np.int64).reshape(-1)
        out = _handled(self._segment_keys(tokens, flat, self.root(salt), self.num_threads()), "tokens")
        return [(s, e, d) for (s, e), d in zip(spans, out)]


def split_segments(tokens: np.ndarray, separator: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the non-empty runs between non-overlapping, leftmost separator matches (vectorised)."""
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


# The backend's functions (lmkv.ops.hashing imports them by name): bound methods of the one hasher.
HASHER = ExtHasher.load()
chunk_keys = HASHER.chunk_keys
batch_chunk_keys = HASHER.batch_chunk_keys
segment_keys = HASHER.segment_keys
root = HASHER.root
num_threads = HASHER.num_threads
