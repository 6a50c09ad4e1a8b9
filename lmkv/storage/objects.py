"""The stored object format: a small versioned header followed by the payload bytes.

Every object a tier holds is ``header || payload``. The header is never unpickled: it is a fixed
little-endian struct plus the shape, key and token fingerprint, zero-padded to a multiple of 64 bytes so that
the payload that follows stays aligned for any dtype (and for O_DIRECT reads at 4 KiB granularity we only
need the buffer aligned, not the payload). Layout (format version 1)::

    offset size field
    0      4    magic b"LMKV"
    4      2    format version (1)
    6      2    header length in bytes, padding included (multiple of 64, <= 4096)
    8      1    serde code (1 raw, 2 cachegen, 3 a registered codec named in the payload)
    9      1    dtype code (lmkv.types.DTYPE_CODES) of the decoded tensor
    10     1    ndim (<= 8)
    11     1    checksum algorithm (1 xxh3-64, 2 crc32)
    12     2    key length (<= 1024)
    14     2    fingerprint length (<= 256)
    16     8    payload length in bytes (<= 2**40)
    24     8    payload checksum
    32     4    crc32 of the header bytes with this field zeroed
    36     4    reserved (0)
    40     8*n  shape
    ..          key (utf-8), fingerprint, zero padding

Every size field is bounded before anything is allocated from it, and ``parse_header`` raises
:class:`CorruptObject` (never anything else) on a truncated, foreign or damaged header, so callers can turn
it into a miss with a warning.
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmkv.errors import CorruptObject
from lmkv.types import DTYPE_CODES, DTYPES_BY_CODE

try:  # xxh3 runs at memory speed; crc32 (~1.8 GB/s here) is the dependency-free fallback
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - exercised only where xxhash is missing
    _xxhash = None

MAGIC = b"LMKV"
FORMAT_VERSION = 1
ALIGN = 64
MAX_HEADER = 4096
MAX_NDIM = 8
MAX_KEY = 1024
MAX_FINGERPRINT = 256
MAX_PAYLOAD = 1 << 40

CSUM_XXH3 = 1
CSUM_CRC32 = 2

_FIXED = struct.Struct("<4sHHBBBBHHQQII")
assert _FIXED.size == 40

Buffer = Any  # bytes, bytearray, memoryview: anything with the buffer protocol


def default_checksum_algo() -> int:
    return CSUM_XXH3 if _xxhash is not None else CSUM_CRC32


_DEFAULT_ALGO = default_checksum_algo()


def checksum(data: Buffer, algo: int) -> int:
    """64-bit checksum of ``data`` with the given algorithm; CorruptObject if this build cannot compute it."""
    if algo == CSUM_XXH3:
        if _xxhash is None:
            raise CorruptObject("object uses an xxh3 checksum but the xxhash package is not installed")
        return _xxhash.xxh3_64_intdigest(data)
    if algo == CSUM_CRC32:
        return zlib.crc32(data)
    raise CorruptObject(f"unknown checksum algorithm {algo}")


def header_length(ndim: int, key_len: int, fp_len: int) -> int:
    raw = _FIXED.size + 8 * ndim + key_len + fp_len
    return (raw + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class ObjectHeader:
    """Decoded header fields; ``checksum`` is filled in lazily by :meth:`pack` (it costs a pass over the data)."""

    key: str
    fingerprint: bytes
    dtype_code: int
    shape: tuple[int, ...]
    serde: int
    payload_len: int
    checksum: int | None = None
    checksum_algo: int = _DEFAULT_ALGO

    @property
    def header_len(self) -> int:
        return header_length(len(self.shape), len(self.key.encode()), len(self.fingerprint))

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len

    def pack(self, payload: Buffer | None = None) -> bytes:
        """Header bytes; computes the payload checksum from ``payload`` first when it is not known yet."""
        if self.checksum is None:
            if payload is None:
                raise ValueError("payload is required to pack a header whose checksum is not computed yet")
            self.checksum = checksum(payload, self.checksum_algo)
        kb = self.key.encode()
        hl = self.header_len
        fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, hl, self.serde, self.dtype_code, len(self.shape),
                            self.checksum_algo, len(kb), len(self.fingerprint), self.payload_len,
                            self.checksum, 0, 0)
        body = fixed + struct.pack(f"<{len(self.shape)}Q", *self.shape) + kb + self.fingerprint
        body += b"\0" * (hl - len(body))
        hcrc = zlib.crc32(body)
        return body[:32] + struct.pack("<I", hcrc) + body[36:]


def validate_fields(key: str, fingerprint: bytes, shape: tuple[int, ...]) -> None:
    """Raise ValueError/TypeError naming the argument when a value cannot be stored."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"key must be a non-empty str, got {key!r}")
    if len(key.encode()) > MAX_KEY:
        raise ValueError(f"key is {len(key.encode())} bytes of UTF-8; the limit is {MAX_KEY}")
    if not isinstance(fingerprint, (bytes, bytearray)):
        raise TypeError(f"fingerprint must be bytes, got {type(fingerprint).__name__}")
    if len(fingerprint) > MAX_FINGERPRINT:
        raise ValueError(f"fingerprint is {len(fingerprint)} bytes; the limit is {MAX_FINGERPRINT}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"kv has {len(shape)} dimensions; the limit is {MAX_NDIM}")


def parse_header(data: Buffer, *, available: int | None = None) -> ObjectHeader:
    """Parse and validate a header from the start of ``data``.

    ``available`` is the total object length when ``data`` holds only a prefix (a disk read of the first
    block); the payload length must then match it exactly. Raises CorruptObject on any inconsistency.
    """
    mv = memoryview(data).cast("B")
    total = len(mv) if available is None else available
    if len(mv) < _FIXED.size:
        raise CorruptObject(f"object is {len(mv)} bytes, shorter than the fixed header ({_FIXED.size})")
    (magic, version, hl, serde, dcode, ndim, algo, klen, flen, plen, csum, hcrc, _) = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptObject(f"bad magic {bytes(magic)!r} (not an lmkv object)")
    if version != FORMAT_VERSION:
        raise CorruptObject(f"unsupported object format version {version} (this build reads {FORMAT_VERSION})")
    if ndim > MAX_NDIM or klen > MAX_KEY or flen > MAX_FINGERPRINT or hl > MAX_HEADER or plen > MAX_PAYLOAD:
        raise CorruptObject("header size fields out of bounds")
    if hl != header_length(ndim, klen, flen) or len(mv) < hl:
        raise CorruptObject(f"header length {hl} inconsistent or truncated ({len(mv)} bytes read)")
    body = bytearray(mv[:hl])
    body[32:36] = b"\0\0\0\0"
    if zlib.crc32(body) != hcrc:
        raise CorruptObject("header checksum mismatch")
    if dcode not in DTYPES_BY_CODE:
        raise CorruptObject(f"unknown dtype code {dcode}")
    if total != hl + plen:
        raise CorruptObject(f"object is {total} bytes, header says {hl + plen} (truncated or padded)")
    shape = struct.unpack_from(f"<{ndim}Q", mv, _FIXED.size)
    off = _FIXED.size + 8 * ndim
    try:
        key = bytes(mv[off:off + klen]).decode()
    except UnicodeDecodeError:
        raise CorruptObject("key is not UTF-8") from None
    fp = bytes(mv[off + klen:off + klen + flen])
    return ObjectHeader(key, fp, dcode, tuple(shape), serde, plen, csum, algo)


class RunningChecksum:
    """The payload checksum computed piece by piece (equal to :func:`checksum` of the concatenation), so that a
    reader can hash one piece while the next is still arriving."""

    def __init__(self, algo: int) -> None:
        if algo == CSUM_XXH3:
            if _xxhash is None:
                raise CorruptObject("object uses an xxh3 checksum but the xxhash package is not installed")
            self._h: Any = _xxhash.xxh3_64()
        elif algo != CSUM_CRC32:
            raise CorruptObject(f"unknown checksum algorithm {algo}")
        self._algo, self._crc = algo, 0

    def update(self, data: Buffer) -> None:
        if self._algo == CSUM_XXH3:
            self._h.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> int:
        return self._h.intdigest() if self._algo == CSUM_XXH3 else self._crc


def verify_payload(header: ObjectHeader, payload: Buffer) -> None:
    if header.checksum is not None and checksum(payload, header.checksum_algo) != header.checksum:
        raise CorruptObject(f"payload checksum mismatch for key {header.key!r}")


class Encoded:
    """One stored object in flight: header + payload, with an ownership hook.

    ``payload`` is a buffer (bytes, bytearray, memoryview) or a contiguous CPU tensor (any dtype: its bytes
    are the payload); :meth:`view` gives bytes either way. ``owned`` means the payload belongs to whoever
    holds this object (a read into a buffer of its own), so it may be wrapped into a tensor without a copy:
    :meth:`take` it first, so that releasing the object does not recycle a pooled read buffer under the
    wrapper. Otherwise it is borrowed (a lease on a memory-tier pool slot, or a caller's tensor) and must be
    copied out before :meth:`release`. Whoever receives an Encoded must release it exactly once (``with``
    does that); tiers that take one in ``put`` release it when they are done.
    """

    __slots__ = ("header", "payload", "owned", "_release", "_on_take", "keepalive", "_addr")

    def __init__(self, header: ObjectHeader, payload: Buffer, *, owned: bool = False,
                 release: Callable[[], None] | None = None, keepalive: Any = None, addr: int = 0,
                 on_take: Callable[[], None] | None = None) -> None:
        self.header = header
        self.payload = payload
        self.owned = owned
        self._release = release
        self._on_take = on_take  # instead of release once the payload is taken (a pooled buffer detaches)
        self._addr = addr  # the payload's address when the producer knows it (memory pool slots)
        self.keepalive = keepalive  # keeps the object that owns ``payload`` alive (a tensor, bytes)

    def view(self) -> memoryview:
        p = self.payload
        if hasattr(p, "numpy"):  # a tensor
            if p.numel() == 0:
                return memoryview(b"")
            return memoryview(p.reshape(-1).view(torch.uint8).numpy()).cast("B")
        return memoryview(p).cast("B")

    def address(self) -> tuple[int, Any]:
        """(address of the payload's first byte, an object to keep alive while it is used)."""
        p = self.payload
        if self._addr:
            return self._addr, p
        if hasattr(p, "data_ptr"):
            return p.data_ptr(), p
        arr = np.frombuffer(self.view(), dtype=np.uint8)
        return arr.ctypes.data, arr

    def take(self) -> Buffer:
        """The payload, kept by the caller beyond :meth:`release` (owned objects only): a pooled read buffer is
        then freed with the payload instead of going back to its pool."""
        if not self.owned:
            raise ValueError("only an owned object's payload can be taken; copy a borrowed one")
        fn, self._on_take, self._release = self._on_take, None, None
        if fn is not None:
            fn()
        return self.payload

    def header_bytes(self) -> bytes:
        return self.header.pack(self.view() if self.header.checksum is None else None)

    def release(self) -> None:
        # Idempotent; a single owner releases, so the swap needs no lock (and a lock per object costs ~1 us).
        fn, self._release = self._release, None
        if fn is not None:
            fn()

    def __enter__(self) -> Encoded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def writable_view(value: bytes) -> memoryview:
    """A writable byte view of a ``bytes`` object that nothing else references (a fresh Redis reply).

    Wrapping the reply is what keeps Redis reads at the plain GET rate (no copy into a fresh buffer); torch
    refuses read-only buffers, and the reply is private to us, so a writable view of it is safe. The view
    keeps ``value`` alive.
    """
    n = len(value)
    if n == 0:
        return memoryview(bytearray())
    addr = ctypes.cast(ctypes.c_char_p(value), ctypes.c_void_p).value
    arr = (ctypes.c_ubyte * n).from_address(addr)
    arr._owner = value  # type: ignore[attr-defined]  # the bytes must outlive every view of arr
    return memoryview(arr).cast("B")


def dtype_code(dtype: Any) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"kv dtype {dtype} is not supported (supported: {list(DTYPE_CODES)})") from None


__all__ = ["ObjectHeader", "Encoded", "parse_header", "verify_payload", "checksum", "validate_fields",
           "RunningChecksum", "MAGIC", "FORMAT_VERSION", "CSUM_XXH3", "CSUM_CRC32", "default_checksum_algo",
           "dtype_code"]
