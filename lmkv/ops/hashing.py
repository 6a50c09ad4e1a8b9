"""Chunk hashing: prefix-chained 128-bit chunk keys, position-free segment keys, token fingerprints.

Keys are BLAKE2s-128 digests over canonical bytes (little-endian uint32 token ids), computed per chunk
(leaves, in parallel) and chained over the 16-byte leaf digests: see reference/hashing.py for the exact
bytes and why this hash. Every backend yields identical digests in any process, machine, Python version,
endianness and ``PYTHONHASHSEED``; Python's ``hash()`` is never used.

Backends: ``ext`` (C++, eight leaves per SIMD vector, OpenMP; auto on CPU) and ``reference`` (hashlib).
``tokens`` may be a list/tuple of ints, a numpy array or an integer torch tensor (any device; copied to the
CPU), with values in ``[0, 2**32)``; anything else is a TypeError/ValueError naming the argument
(:func:`lmkv.tokens.as_tokens`, re-exported here, is the one normalisation every backend shares).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmkv._dispatch import Backend, Op, register
from lmkv.reference import hashing as ref
from lmkv.tokens import as_tokens

DIGEST_SIZE = ref.DIGEST_SIZE


def _check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return int(chunk_size)


def _check_salt(salt: Any) -> bytes:
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        raise TypeError(f"salt must be bytes, got {type(salt).__name__} (encode text salts explicitly)")
    return bytes(salt)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


_TORCH_INTS = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def _raw_tokens(tokens: Any, name: str, keep_tensor: bool = False) -> Any:
    """The common containers pass through untouched, for a backend to read as they are (the ``ext`` backend
    reads lists, int arrays and CPU int tensors in C); other CPU int tensors become numpy views; anything else
    goes through :func:`as_tokens`, which normalises it or raises the named error. Backends still call
    ``as_tokens`` on what they cannot read directly, so bad input raises the same error whichever backend runs."""
    kind = type(tokens)
    if kind is list or kind is tuple or kind is np.ndarray:
        return tokens
    if kind is torch.Tensor and tokens.is_cpu and tokens.dtype in _TORCH_INTS and not tokens.requires_grad:
        return tokens if keep_tensor else tokens.numpy()
    return as_tokens(tokens, name)


def _check_options(chunk_size: Any, salt: Any, include_partial: Any) -> dict[str, Any]:
    if type(chunk_size) is not int or chunk_size <= 0:
        chunk_size = _check_chunk_size(chunk_size)
    if type(salt) is not bytes:
        salt = _check_salt(salt)
    if type(include_partial) is not bool:
        include_partial = _check_bool(include_partial, "include_partial")
    return dict(chunk_size=chunk_size, salt=salt, include_partial=include_partial)


def _validate_chunk_keys(tokens: Any, *, chunk_size: Any = 256, salt: Any = b"", include_partial: Any = True):
    return (_raw_tokens(tokens, "tokens", keep_tensor=True),), _check_options(chunk_size, salt, include_partial)


def _validate_batch(sequences: Any, *, chunk_size: Any = 256, salt: Any = b"", include_partial: Any = True):
    if isinstance(sequences, torch.Tensor) and sequences.ndim == 2:
        sequences = as_tokens(sequences.reshape(-1), "sequences").reshape(sequences.shape)
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        sequences = list(sequences)
    if not isinstance(sequences, (list, tuple)):
        raise TypeError(f"sequences must be a list of token sequences, got {type(sequences).__name__}")
    seqs = [_raw_tokens(s, f"sequences[{i}]") for i, s in enumerate(sequences)]
    return (seqs,), _check_options(chunk_size, salt, include_partial)


def _validate_segments(tokens: Any, *, separator: Any, salt: Any = b""):
    sep = as_tokens(separator, "separator")
    if sep.size == 0:
        raise ValueError("separator must hold at least one token id")
    return (as_tokens(tokens),), dict(separator=sep, salt=_check_salt(salt))


def _ref_chunk_keys(tokens: Any, **options: Any) -> list[bytes]:
    return ref.chunk_keys(as_tokens(tokens), **options)


def _ref_batch_chunk_keys(sequences: Sequence[Any], **options: Any) -> list[list[bytes]]:
    return ref.batch_chunk_keys([as_tokens(s, f"sequences[{i}]") for i, s in enumerate(sequences)], **options)


_ref_chunk_keys.__doc__ = ref.chunk_keys.__doc__
_ref_batch_chunk_keys.__doc__ = ref.batch_chunk_keys.__doc__

_EXT = "lmkv.optimized.hashing.ext"

chunk_keys = register(Op(
    "hashing.chunk_keys", _ref_chunk_keys,
    Backend("ext", f"{_EXT}:chunk_keys", devices={"cpu"}, auto_devices={"cpu"}),
    validate=_validate_chunk_keys,
))
batch_chunk_keys = register(Op(
    "hashing.batch_chunk_keys", _ref_batch_chunk_keys,
    Backend("ext", f"{_EXT}:batch_chunk_keys", devices={"cpu"}, auto_devices={"cpu"}),
    validate=_validate_batch,
))
segment_keys = register(Op(
    "hashing.segment_keys", ref.segment_keys,
    Backend("ext", f"{_EXT}:segment_keys", devices={"cpu"}, auto_devices={"cpu"}),
    validate=_validate_segments,
))


def token_fingerprint(tokens: Any, *, salt: bytes = b"") -> bytes:
    """SHA-256 (32 bytes) of the tokens and salt: what a stored object carries so a hit can be verified.

    For a prefix chunk pass every token from 0 through the chunk's end; for a segment, its own tokens.
    """
    return ref.token_fingerprint(as_tokens(tokens), salt=_check_salt(salt))


def prefix_fingerprints(tokens: Any, ends: Sequence[int], *, salt: bytes = b"") -> list[bytes]:
    """``[token_fingerprint(tokens[:e]) for e in ends]`` in one pass (``ends`` ascending)."""
    arr = as_tokens(tokens)
    data = ref.canonical_bytes(arr)
    h = ref.fingerprint_hasher(_check_salt(salt))
    out: list[bytes] = []
    pos = 0
    for e in ends:
        if not pos <= e <= len(arr):
            raise ValueError(f"ends must be ascending positions within tokens, got {e} after {pos} (len {len(arr)})")
        h.update(data[4 * pos : 4 * e])
        pos = e
        out.append(h.copy().digest())
    return out


__all__ = ["chunk_keys", "batch_chunk_keys", "segment_keys", "token_fingerprint", "prefix_fingerprints",
           "as_tokens", "DIGEST_SIZE"]
