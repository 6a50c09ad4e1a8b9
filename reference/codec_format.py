"""The lmkv CacheGen blob: a documented, versioned binary format (never pickle).

All integers are little-endian. ``P`` is the number of KV planes (2: K and V; 1: MLA latent), ``C = H * D``
the channels of one plane, ``S = L * P * C`` the streams, ``n(l, p) = 2 * ((bins(l, p) - 1) // 2) + 1`` the
alphabet of plane ``(l, p)`` and ``G`` the number of shared tables per plane (0: one table per stream)::

    offset  size              field
    0       4                 magic b"LKCG"
    4       1                 format version (2)
    5       1                 flags: bit 0 = MLA chunk [L, 1, T, D] (else [L, P, T, H, D]);
                              bit 1 + p = plane p is scaled per channel (else per token)
    6       1                 dtype code of the original chunk (lmkv.types.DTYPE_CODES: f32, f16 or bf16)
    7       1                 P
    8       4 x u32           L, T, H, D
    24      u16               G (0..256)
    26      u8                W, bits per packed stream length (0..32)
    27      u16               E, leading tokens stored exactly (0 <= E < T); the streams hold the other Q = T - E
    29      L*P x u8          bins(l, p): the quantization config, so a blob decodes without outside config
            L*P*E*C values    the first E tokens as they were, in the chunk's dtype, layout [L, P, E, C]
            scales x u16      bfloat16 bit patterns, finite and >= 0: for each plane p, [L, Q] (per token)
                              or [L, C] (per channel)
            tables x u16      16-bit frequencies: for each (l, p) in order, (G or C) tables of n(l, p) entries;
                              each table sums to 2**16 (or is all zero when unused)
            L*P*C x u8        table id of every stream (only when G > 0), each < G
            ceil(S*W/8)       stream byte lengths, W bits each, packed little-endian bit order
            sum(lengths)      payload: the range-coded streams of Q symbols each, stream order (l, p, c)
            4                 CRC-32 (zlib) of every byte before it

Every size is bounded before anything is allocated (see ``LIMITS``), the total length must match exactly,
and any violation raises :class:`lmkv.errors.CodecError`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from lmkv.errors import CodecError
from lmkv.types import DTYPE_CODES, DTYPES_BY_CODE

MAGIC = b"LKCG"
VERSION = 2
FLAG_MLA = 1
FLAG_CHANNEL_SCALES = (2, 4)  # per plane
HEADER = struct.Struct("<4sBBBBIIIIHBH")
CRC = struct.Struct("<I")
CODEC_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOTAL = 1 << 16
LIMITS = {"L": 1 << 12, "T": 1 << 24, "H": 1 << 12, "D": 1 << 16, "elements": 1 << 28, "groups": 256}


def alphabet(bins: np.ndarray | torch.Tensor | int) -> np.ndarray | torch.Tensor | int:
    """Symbols used by ``bins`` quantization bins: ``2 * C + 1`` with ``C = (bins - 1) // 2`` levels a side."""
    return 2 * ((bins - 1) // 2) + 1


@dataclass
class Blob:
    """Parsed (or to-be-packed) contents of a blob; arrays are numpy, in the layouts of the module doc."""

    mla: bool
    dtype: torch.dtype
    L: int
    P: int
    T: int
    H: int
    D: int
    groups: int
    bins: np.ndarray  # [L, P] uint8
    channel_scaled: tuple[bool, ...]  # per plane: scales per channel [L, C] instead of per token [L, T]
    scales: list[np.ndarray]  # per plane [L, T] or [L, C] uint16 (bfloat16 bits)
    tables: list[np.ndarray]  # L*P arrays [G or C, n(l, p)] of uint16
    ids: np.ndarray | None  # [L, P, C] uint8 when groups > 0
    lengths: np.ndarray  # [S] int64
    payload: bytes
    exact_tokens: int = 0  # E
    exact: bytes = b""  # the first E tokens, [L, P, E, C] in the chunk's dtype

    @property
    def C(self) -> int:
        return self.H * self.D

    def section_bytes(self) -> dict[str, int]:
        """Bytes per part: payload, tables (frequencies + table ids), scales, meta (header, bins, lengths, crc)."""
        tables = sum(t.size * 2 for t in self.tables) + (self.ids.size if self.ids is not None else 0)
        width = int(self.lengths.max()).bit_length() if self.lengths.size else 0
        meta = HEADER.size + self.bins.size + (self.lengths.size * width + 7) // 8 + CRC.size
        return {"payload": len(self.payload), "tables": tables, "scales": sum(a.size for a in self.scales) * 2,
                "exact": len(self.exact), "meta": meta}


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    if width == 0 or values.size == 0:
        return b""
    bits = ((values[:, None] >> np.arange(width, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, count: int, width: int) -> np.ndarray:
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * width, bitorder="little")
    return bits.reshape(count, width).astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))


def pack(blob: Blob) -> bytes:
    """Serialise ``blob`` (as produced by the encoder) into bytes."""
    lengths = np.asarray(blob.lengths, dtype=np.int64)
    width = int(lengths.max()).bit_length() if lengths.size else 0
    flags = (FLAG_MLA if blob.mla else 0) | sum(f for f, c in zip(FLAG_CHANNEL_SCALES, blob.channel_scaled) if c)
    head = HEADER.pack(MAGIC, VERSION, flags, DTYPE_CODES[blob.dtype], blob.P,
                       blob.L, blob.T, blob.H, blob.D, blob.groups, width, blob.exact_tokens)
    parts = [head, blob.bins.astype(np.uint8).tobytes(), blob.exact,
             *(a.astype("<u2").tobytes() for a in blob.scales)]
    parts += [t.astype("<u2").tobytes() for t in blob.tables]
    if blob.groups:
        assert blob.ids is not None
        parts.append(blob.ids.astype(np.uint8).tobytes())
    parts += [_pack_bits(lengths, width), blob.payload]
    body = b"".join(parts)
    return body + CRC.pack(zlib.crc32(body))


def _fail(msg: str) -> CodecError:
    return CodecError(f"bad CacheGen blob: {msg}")


def unpack(data: bytes | bytearray | memoryview) -> Blob:
    """Parse and fully validate a blob; raises CodecError on anything truncated, corrupt or foreign."""
    mv = memoryview(data).cast("B")
    if len(mv) < HEADER.size + CRC.size:
        raise _fail(f"{len(mv)} bytes is shorter than the smallest blob ({HEADER.size + CRC.size})")
    magic, version, flags, dtype_code, P, L, T, H, D, groups, width, E = HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise _fail(f"magic {bytes(magic)!r} is not {MAGIC!r} (not an lmkv CacheGen blob)")
    if version != VERSION:
        raise _fail(f"format version {version} is not supported (this lmkv reads version {VERSION})")
    (crc,) = CRC.unpack_from(mv, len(mv) - CRC.size)
    if zlib.crc32(mv[: len(mv) - CRC.size]) != crc:
        raise _fail("checksum mismatch (corrupt or truncated)")
    if flags & ~(FLAG_MLA | FLAG_CHANNEL_SCALES[0] | FLAG_CHANNEL_SCALES[1]) or (P == 1 and flags & 4):
        raise _fail(f"unknown flags {flags:#x}")
    mla = bool(flags & FLAG_MLA)
    dtype = DTYPES_BY_CODE.get(dtype_code)
    if dtype not in CODEC_DTYPES:
        raise _fail(f"dtype code {dtype_code} is not one of f32/f16/bf16")
    if P not in (1, 2) or (mla and (P != 1 or H != 1)):
        raise _fail(f"planes={P}, H={H} do not fit mla={mla}")
    for name, value in (("L", L), ("T", T), ("H", H), ("D", D)):
        if not 1 <= value <= LIMITS[name]:
            raise _fail(f"{name}={value} outside [1, {LIMITS[name]}]")
    if L * P * T * H * D > LIMITS["elements"]:
        raise _fail(f"{L * P * T * H * D} elements exceed the limit {LIMITS['elements']}")
    if groups > LIMITS["groups"] or width > 32:
        raise _fail(f"groups={groups} or length width={width} out of range")
    if E >= T:
        raise _fail(f"exact tokens E={E} must be below T={T}")
    Q = T - E
    C = H * D
    S = L * P * C
    end = len(mv) - CRC.size
    pos = HEADER.size

    def take(nbytes: int, what: str) -> memoryview:
        nonlocal pos
        if nbytes < 0 or pos + nbytes > end:
            raise _fail(f"truncated in {what} (needs {nbytes} bytes at offset {pos}, blob body has {end})")
        out = mv[pos : pos + nbytes]
        pos += nbytes
        return out

    bins = np.frombuffer(take(L * P, "bins"), dtype=np.uint8).reshape(L, P)
    if bins.min() < 3:
        raise _fail(f"bins must be >= 3, found {int(bins.min())}")
    exact = bytes(take(L * P * E * C * dtype.itemsize, "exact tokens"))
    channel_scaled = tuple(bool(flags & FLAG_CHANNEL_SCALES[p]) for p in range(P))
    scales = []
    for p in range(P):
        n = C if channel_scaled[p] else Q
        a = np.frombuffer(take(L * n * 2, "scales"), dtype="<u2").reshape(L, n)
        if (a & 0x8000).any() or ((a & 0x7F80) == 0x7F80).any():
            raise _fail("scales must be finite and >= 0")
        scales.append(a)
    per_plane = groups if groups else C
    nsym = alphabet(bins.astype(np.int64)).reshape(-1)
    tables = []
    for n in nsym:
        t = np.frombuffer(take(int(per_plane * n * 2), "tables"), dtype="<u2").reshape(per_plane, int(n))
        sums = t.sum(-1, dtype=np.int64)
        if not np.isin(sums, (0, TOTAL)).all():
            raise _fail("a frequency table does not sum to 2**16")
        tables.append(t)
    ids = None
    if groups:
        ids = np.frombuffer(take(S, "table ids"), dtype=np.uint8).reshape(L, P, C)
        if int(ids.max()) >= groups:
            raise _fail(f"table id {int(ids.max())} >= groups {groups}")
        used = np.stack([t.sum(-1, dtype=np.int64) for t in tables]).reshape(L, P, groups)
        if (np.take_along_axis(used, ids.astype(np.int64), -1) == 0).any():
            raise _fail("a stream refers to an empty table")
    elif any((t.sum(-1, dtype=np.int64) == 0).any() for t in tables):
        raise _fail("a stream has an empty table")
    lengths = _unpack_bits(bytes(take((S * width + 7) // 8, "stream lengths")), S, width)
    payload = take(end - pos, "payload")
    if int(lengths.sum()) != len(payload):
        raise _fail(f"stream lengths sum to {int(lengths.sum())} but the payload has {len(payload)} bytes")
    return Blob(mla, dtype, L, P, T, H, D, groups, bins, channel_scaled, scales, tables, ids, lengths, bytes(payload),
                E, exact)
