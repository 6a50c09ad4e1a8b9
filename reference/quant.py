"""Simple KV quantization codecs, reference (the executable spec): ``raw``, ``int8``, ``fp8`` and ``kivi``.

A chunk is ``[L, 2, T, H, D]`` (or MLA ``[L, 1, T, D]``, treated as ``H = 1``), float32/float16/bfloat16. Write
``P`` for its planes (2: K and V; 1: MLA latent) and ``C = H * D`` for the channels of one plane; the codecs see
the chunk as ``x[L, P, T, C]`` cast to float32 (exact). Every rule below is fixed, so every backend gives the
same bytes: all arithmetic is float32, one IEEE operation at a time (no fused multiply-add), rounding is
round-half-to-even, signed zeros in KIVI mins/scales are stored as +0.0, and a zero scale is stored as 0 and
decodes to exact zeros.

* **int8** (per-token absmax): for each row ``r = (l, p, t)`` over its ``C`` channels::

      scale[r] = max_c |x[r, c]| / 127            q = clamp(round_half_even(x / scale), -127, 127)   (int8)
      x_hat = q * scale, cast to the chunk's dtype.      Bound: |x - x_hat| <= scale / 2.

* **fp8** (e4m3, ``torch.float8_e4m3fn``: finite max 448, no inf): scale per token (row ``(l, p, t)`` over the
  ``C`` channels) or per channel (row ``(l, p, c)`` over the ``T`` tokens; then the codes are stored in that
  ``[L, P, C, T]`` row layout)::

      scale = absmax / 448       code = e4m3(clamp(x / scale, -448, 448))  (round to nearest even, saturating)
      x_hat = float(code) * scale.   Bound: |x - x_hat| <= max(|x| * 2^-4, scale * 2^-10)
      (3 mantissa bits: half an ulp is <= 2^-4 of the value; below 2^-6 e4m3 is subnormal, step 2^-9).

* **kivi** (KIVI, Liu et al., ICML'24), ``bits`` in {2, 4}, group size ``G``, residual ``R``: the last
  ``E = min(R, T)`` tokens are stored exactly in the chunk's dtype; the first ``Tq = T - E`` are quantized
  asymmetrically. Keys (plane 0, and the MLA latent) per channel: row ``(l, c)`` over the ``Tq`` tokens
  (layout ``[L, C, Tq]``); values (plane 1) per token: row ``(l, t)`` over the ``C`` channels. Each row is cut
  into groups of ``G`` consecutive elements (the last group may be shorter); per group::

      mn = min, mx = max            scale = (mx - mn) / (2^bits - 1)
      q = clamp(round_half_even((x - mn) / scale), 0, 2^bits - 1)          x_hat = q * scale + mn
      Bound: |x - x_hat| <= scale / 2.

  Codes are packed per row, little-endian: code ``i`` of a row occupies bits ``[i * bits, (i + 1) * bits)`` of
  the row's ``ceil(N * bits / 8)`` bytes (bit 0 = least significant bit of byte 0); padding bits are 0.

* **raw**: the chunk's bytes as they are (lossless).

All bounds hold up to float32 rounding (a relative ``2^-22`` of the scale), plus half an ulp of the chunk's
dtype for the final cast; a scale that underflows to 0 for subnormal inputs (``absmax < 2^-149 * qmax``)
decodes its group to zeros.

Blob (all integers little-endian; never pickled)::

    offset  size       field
    0       4          magic b"LKQZ"
    4       1          format version (1)
    5       1          codec id (CODEC_IDS: raw 0, int8 1, fp8 2, kivi 3)
    6       1          dtype code (lmkv.types.DTYPE_CODES: f32, f16, bf16)
    7       1          ndim: 5 ([L, P, T, H, D], P in {1, 2}) or 4 (MLA [L, 1, T, D])
    8       5 x u32    the shape, zero-filled after ndim entries
    28      u8         param a: fp8 scale axis (0 token, 1 channel); kivi bits (2, 4); else 0
    29      u8         reserved, 0
    30      u16        kivi group size G (>= 1); else 0
    32      u32        kivi exact residual tokens E (<= T); else 0
    36      u64        payload length
    44      ...        payload (sections below, in order)
    end-4   4          CRC-32 (zlib) of every byte before it

    raw:  the chunk's bytes, [L, P, T, C] in its dtype
    int8: scales f32 [L*P*T], codes int8 [L*P*T, C]
    fp8:  scales f32 [rows], codes u8 [rows, N] (token: rows L*P*T, N = C; channel: rows L*P*C, N = T)
    kivi: for each plane p: mins f32 [rows, NG], scales f32 [rows, NG], codes u8 [rows, ceil(N * bits / 8)]
          (keys: rows L*C, N = Tq; values: rows L*Tq, N = C; NG = ceil(N / G)); then the residual
          [L, P, E, C] in the chunk's dtype

The header is parsed and every size bounded (``LIMITS``) before anything is allocated, the payload length must
match the one the header implies exactly, and stored scales/mins/codes must be valid (finite, scales >= 0, no
int8 -128, no e4m3 NaN); any violation is a :class:`lmkv.errors.CodecError` naming what was wrong.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmkv.errors import CodecError
from lmkv.types import DTYPE_CODES, DTYPES_BY_CODE

MAGIC = b"LKQZ"
VERSION = 1
CODEC_IDS = {"raw": 0, "int8": 1, "fp8": 2, "kivi": 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
HEADER = struct.Struct("<4sBBBB5IBBHIQ")
CRC = struct.Struct("<I")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LIMITS = {"L": 1 << 12, "T": 1 << 24, "H": 1 << 12, "D": 1 << 16, "elements": 1 << 28}
INT8_MAX = 127.0
FP8_MAX = 448.0
KIVI_BITS = (2, 4)
AXES = ("token", "channel")


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of ``t`` is NaN or inf.

    A NaN or inf always makes the float32 sum non-finite, so a finite sum proves the tensor finite in one cheap
    pass; only a sum that overflowed (huge finite values) falls back to the element-wise check."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


# ------------------------------------------------------------------------------------------------- kernels
def int8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: x ``[R, N]`` float32 -> (scales ``[R]`` float32, codes ``[R, N]`` int8)."""
    scale = x.abs().amax(dim=1) / INT8_MAX
    safe = torch.where(scale == 0, 1.0, scale)[:, None]
    q = torch.round(x / safe).clamp(-INT8_MAX, INT8_MAX)
    return scale, torch.where(scale[:, None] == 0, 0.0, q).to(torch.int8)


def int8_dequantize(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int8_quantize`: scales ``[R]``, codes ``[R, N]`` int8 -> ``[R, N]`` float32."""
    return codes.to(torch.float32) * scales[:, None]


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax e4m3: x ``[R, N]`` float32 -> (scales ``[R]`` float32, codes ``[R, N]`` uint8 bit patterns)."""
    scale = x.abs().amax(dim=1) / FP8_MAX
    safe = torch.where(scale == 0, 1.0, scale)[:, None]
    # Clamping first makes the saturation explicit (torch's cast saturates too, but the spec should not rely on it).
    y = torch.where(scale[:, None] == 0, 0.0, (x / safe).clamp(-FP8_MAX, FP8_MAX))
    return scale, y.to(torch.float8_e4m3fn).view(torch.uint8)


def fp8_dequantize(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fp8_quantize`: scales ``[R]``, codes ``[R, N]`` uint8 -> ``[R, N]`` float32."""
    return codes.view(torch.float8_e4m3fn).to(torch.float32) * scales[:, None]


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[R, N]`` -> ``[R, NG, G]``, the last group padded with its row's last element (min/max unchanged)."""
    R, N = x.shape
    pad = -N % group
    if pad:
        x = torch.cat((x, x[:, -1:].expand(R, pad)), dim=1)
    return x.reshape(R, -1, group)


def kivi_quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group quantization of rows: x ``[R, N]`` float32 -> (mins ``[R, NG]``, scales ``[R, NG]``
    float32, codes ``[R, ceil(N * bits / 8)]`` uint8 packed), ``NG = ceil(N / group)``."""
    R, N = x.shape
    g = _grouped(x, group)
    # "+ 0.0" turns a -0.0 min or scale into +0.0, so a group of signed zeros has one byte pattern everywhere.
    mn = g.amin(dim=2) + 0.0
    scale = (g.amax(dim=2) - mn) / float((1 << bits) - 1) + 0.0
    safe = torch.where(scale == 0, 1.0, scale)[:, :, None]
    q = torch.round((g - mn[:, :, None]) / safe).clamp(0, (1 << bits) - 1)
    q = torch.where(scale[:, :, None] == 0, 0.0, q).reshape(R, -1)[:, :N].to(torch.uint8)
    return mn, scale, pack_bits(q, bits)


def kivi_dequantize(mins: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, bits: int, group: int,
                    n: int) -> torch.Tensor:
    """Inverse of :func:`kivi_quantize` -> ``[R, n]`` float32 (``q * scale`` then ``+ min``: two roundings)."""
    q = unpack_bits(codes, bits, n).to(torch.float32)
    s = scales.repeat_interleave(group, dim=1)[:, :n]
    m = mins.repeat_interleave(group, dim=1)[:, :n]
    return q * s + m


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[R, N]`` uint8 (< 2^bits) -> ``[R, ceil(N * bits / 8)]`` uint8, little-endian within each byte."""
    per = 8 // bits
    R, N = q.shape
    q = torch.cat((q, q.new_zeros(R, -N % per)), dim=1).reshape(R, -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (q << shifts).sum(dim=2).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[R, B]`` uint8 -> codes ``[R, n]`` uint8."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    q = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)


# ------------------------------------------------------------------------------------------------- blob
@dataclass(frozen=True)
class Header:
    """The fields of a blob header (see the module docstring)."""

    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    param: int = 0  # fp8: axis (0 token, 1 channel); kivi: bits
    group: int = 0
    exact: int = 0  # kivi: residual tokens stored exactly
    payload: int = 0

    @property
    def planes(self) -> tuple[int, int, int, int]:
        """(L, P, T, C) of the chunk."""
        s = self.shape
        return (s[0], 1, s[2], s[3]) if len(s) == 4 else (s[0], s[1], s[2], s[3] * s[4])


def _fail(msg: str) -> CodecError:
    return CodecError(f"bad lmkv quant blob: {msg}")


def pack(header: Header, sections: list[bytes | memoryview]) -> bytes:
    """Header + payload sections + CRC-32 -> blob bytes (one copy of the payload: the CRC runs over the parts)."""
    dims = (*header.shape, *(0,) * (5 - len(header.shape)))
    size = sum(len(memoryview(part).cast("B")) for part in sections)
    head = HEADER.pack(MAGIC, VERSION, CODEC_IDS[header.codec], DTYPE_CODES[header.dtype], len(header.shape), *dims,
                       header.param, 0, header.group, header.exact, size)
    crc = zlib.crc32(head)
    for part in sections:
        crc = zlib.crc32(part, crc)
    return b"".join((head, *sections, CRC.pack(crc)))


def payload_size(h: Header) -> int:
    """Bytes the payload of ``h`` must have (from the header alone: computed before any allocation)."""
    L, P, T, C = h.planes
    if h.codec == "raw":
        return L * P * T * C * h.dtype.itemsize
    if h.codec in ("int8", "fp8"):
        rows = L * P * (C if h.param == 1 else T)
        return rows * 4 + L * P * T * C
    Tq = T - h.exact
    total = L * P * h.exact * C * h.dtype.itemsize
    for p in range(P):
        rows, n = kivi_rows(L, Tq, C, p)
        total += rows * (8 * math.ceil(n / h.group) + math.ceil(n * h.param / 8))
    return total


def kivi_rows(L: int, Tq: int, C: int, plane: int) -> tuple[int, int]:
    """(rows, row length) of KIVI plane ``plane``: keys per channel ``(L*C, Tq)``, values per token ``(L*Tq, C)``."""
    return (L * C, Tq) if plane == 0 else (L * Tq, C)


def unpack(data: bytes | bytearray | memoryview, expect: str | None = None) -> tuple[Header, memoryview]:
    """Parse and bound a blob: -> (header, payload view). CodecError on anything truncated, corrupt or foreign,
    or (``expect``) of another codec."""
    mv = memoryview(data).cast("B")
    if len(mv) < HEADER.size + CRC.size:
        raise _fail(f"{len(mv)} bytes is shorter than the smallest blob ({HEADER.size + CRC.size})")
    magic, version, cid, dcode, ndim, *dims, param, reserved, group, exact, plen = HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise _fail(f"magic {bytes(magic)!r} is not {MAGIC!r} (not an lmkv quant blob)")
    if version != VERSION:
        raise _fail(f"format version {version} is not supported (this lmkv reads version {VERSION})")
    (crc,) = CRC.unpack_from(mv, len(mv) - CRC.size)
    if zlib.crc32(mv[: len(mv) - CRC.size]) != crc:
        raise _fail("checksum mismatch (corrupt or truncated)")
    codec = CODEC_NAMES.get(cid)
    if codec is None:
        raise _fail(f"unknown codec id {cid}")
    if expect is not None and codec != expect:
        raise _fail(f"blob holds codec {codec!r}, expected {expect!r}")
    dtype = DTYPES_BY_CODE.get(dcode)
    if dtype not in DTYPES:
        raise _fail(f"dtype code {dcode} is not one of f32/f16/bf16")
    shape = _check_shape(ndim, dims)
    _check_params(codec, param, reserved, group, exact, shape)
    h = Header(codec, dtype, shape, param, group, exact, plen)
    want = payload_size(h)
    if plen != want or len(mv) != HEADER.size + plen + CRC.size:
        raise _fail(f"payload is {len(mv) - HEADER.size - CRC.size} bytes (header says {plen}), shape needs {want}")
    return h, mv[HEADER.size : HEADER.size + plen]


def _check_shape(ndim: int, dims: list[int]) -> tuple[int, ...]:
    if ndim not in (4, 5) or any(dims[ndim:]):
        raise _fail(f"ndim {ndim} is not 4 (MLA) or 5")
    shape = tuple(dims[:ndim])
    L, P, T = shape[:3]
    H, D = (1, shape[3]) if ndim == 4 else shape[3:]
    if P not in ((1,) if ndim == 4 else (1, 2)):
        raise _fail(f"planes={P} do not fit ndim {ndim}")
    for name, value in (("L", L), ("T", T), ("H", H), ("D", D)):
        if not 1 <= value <= LIMITS[name]:
            raise _fail(f"{name}={value} outside [1, {LIMITS[name]}]")
    if L * P * T * H * D > LIMITS["elements"]:
        raise _fail(f"{L * P * T * H * D} elements exceed the limit {LIMITS['elements']}")
    return shape


def _check_params(codec: str, param: int, reserved: int, group: int, exact: int, shape: tuple[int, ...]) -> None:
    ok = {"raw": param == group == exact == 0, "int8": param == group == exact == 0,
          "fp8": param in (0, 1) and group == exact == 0,
          "kivi": param in KIVI_BITS and group >= 1 and exact <= shape[2]}[codec]
    if reserved or not ok:
        raise _fail(f"params (a={param}, group={group}, exact={exact}) are invalid for codec {codec!r}")


# ------------------------------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class Kernels:
    """The dispatched row kernels a pipeline uses (the reference ones, or any backend's)."""

    int8_quantize: Callable = int8_quantize
    int8_dequantize: Callable = int8_dequantize
    fp8_quantize: Callable = fp8_quantize
    fp8_dequantize: Callable = fp8_dequantize
    kivi_quantize: Callable = kivi_quantize
    kivi_dequantize: Callable = kivi_dequantize


REFERENCE = Kernels()


def as_rows(chunk: torch.Tensor) -> torch.Tensor:
    """Chunk ``[L, P, T, H, D]`` or MLA ``[L, 1, T, D]`` -> float32 ``[L, P, T, C]`` (a copy when cast)."""
    L, P, T = chunk.shape[:3]
    return chunk.reshape(L, P, T, -1).to(torch.float32)


def _tobytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` (row-major, little-endian as the CPU stores them) without a copy when contiguous."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def encode(chunk: torch.Tensor, codec: str, *, axis: str = "token", bits: int = 2, group: int = 32,
           residual: int = 32, kernels: Kernels = REFERENCE) -> bytes:
    """chunk ``[L, 2, T, H, D]`` / ``[L, 1, T, D]`` (finite, CPU) -> blob of ``codec``; params as in the doc."""
    shape, dtype = tuple(chunk.shape), chunk.dtype
    L, P, T = shape[:3]
    if codec == "raw":
        return pack(Header("raw", dtype, shape), [_tobytes(chunk)])
    x = as_rows(chunk)
    C = x.shape[3]
    if codec == "int8":
        scales, codes = kernels.int8_quantize(x.reshape(-1, C))
        return pack(Header("int8", dtype, shape), [_tobytes(scales), _tobytes(codes)])
    if codec == "fp8":
        rows = x.reshape(-1, C) if axis == "token" else x.transpose(2, 3).reshape(-1, T)
        scales, codes = kernels.fp8_quantize(rows.contiguous())
        return pack(Header("fp8", dtype, shape, AXES.index(axis)), [_tobytes(scales), _tobytes(codes)])
    E = min(residual, T)
    sections = []
    for p in range(P):
        rows = kivi_plane(x[:, p, : T - E], p)
        if rows.numel():  # else every token is in the residual: the plane's sections are empty
            sections += [_tobytes(t) for t in kernels.kivi_quantize(rows, bits, group)]
    sections.append(_tobytes(chunk.reshape(L, P, T, -1)[:, :, T - E :]))
    return pack(Header("kivi", dtype, shape, bits, group, E), sections)


def kivi_plane(xp: torch.Tensor, plane: int) -> torch.Tensor:
    """Plane ``[L, Tq, C]`` -> KIVI rows: keys ``[L*C, Tq]`` (per channel), values ``[L*Tq, C]`` (per token)."""
    L, Tq, C = xp.shape
    if plane == 0:
        return xp.transpose(1, 2).reshape(L * C, Tq).contiguous()
    return xp.reshape(L * Tq, C)


def _take(payload: memoryview, pos: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``count`` values of ``dtype`` at byte ``pos`` (a copy: the blob's buffer stays read-only) -> (values, next)."""
    nbytes = count * dtype.itemsize
    raw = bytearray(payload[pos : pos + nbytes])
    out = torch.frombuffer(raw, dtype=torch.uint8).view(dtype) if nbytes else torch.empty(0, dtype=dtype)
    return out, pos + nbytes


def _check_scales(scales: torch.Tensor, what: str = "scale") -> None:
    # Only a forged blob with a valid CRC fails here: the encoder writes finite mins and finite scales >= 0.
    if not all_finite(scales):
        raise _fail(f"a stored {what} is NaN or inf")
    if what == "scale" and scales.numel() and float(scales.min()) < 0:
        raise _fail("a stored scale is negative")


def decode(blob: bytes | bytearray | memoryview, expect: str | None = None,
           kernels: Kernels = REFERENCE) -> torch.Tensor:
    """Inverse of :func:`encode`: blob -> chunk of the encoded shape and dtype (CPU); CodecError on a bad blob."""
    h, payload = unpack(blob, expect)
    L, P, T, C = h.planes
    if h.codec == "raw":
        x, _ = _take(payload, 0, L * P * T * C, h.dtype)
    elif h.codec in ("int8", "fp8"):
        x = _decode_absmax(h, payload, kernels).to(h.dtype)
    else:
        x = _decode_kivi(h, payload, kernels)
    if not all_finite(x):  # only a forged blob (valid CRC, huge scales or NaN values) gets here
        raise _fail(f"a decoded value is NaN or overflows {h.dtype}")
    return x.reshape(h.shape).contiguous()


def _decode_absmax(h: Header, payload: memoryview, kernels: Kernels = REFERENCE) -> torch.Tensor:
    L, P, T, C = h.planes
    rows, n = (L * P * C, T) if h.param == 1 else (L * P * T, C)
    scales, pos = _take(payload, 0, rows, torch.float32)
    _check_scales(scales)
    if h.codec == "int8":
        codes, _ = _take(payload, pos, rows * n, torch.int8)
        if codes.numel() and int(codes.min()) == -128:
            raise _fail("an int8 code is -128 (codes are clamped to [-127, 127])")
        return kernels.int8_dequantize(scales, codes.reshape(rows, n)).reshape(L, P, T, C)
    codes, _ = _take(payload, pos, rows * n, torch.uint8)
    if bool(((codes & 0x7F) == 0x7F).any()):
        raise _fail("an fp8 code is NaN")
    x = kernels.fp8_dequantize(scales, codes.reshape(rows, n))
    return x.reshape(L, P, C, T).transpose(2, 3) if h.param == 1 else x.reshape(L, P, T, C)


def _decode_kivi(h: Header, payload: memoryview, kernels: Kernels) -> torch.Tensor:
    L, P, T, C = h.planes
    E, Tq = h.exact, T - h.exact
    out = torch.empty(L, P, T, C, dtype=h.dtype)
    pos = 0
    for p in range(P):
        rows, n = kivi_rows(L, Tq, C, p)
        ng = -(-n // h.group)
        mins, pos = _take(payload, pos, rows * ng, torch.float32)
        scales, pos = _take(payload, pos, rows * ng, torch.float32)
        codes, pos = _take(payload, pos, rows * -(-n * h.param // 8), torch.uint8)
        _check_scales(scales)
        _check_scales(mins, "min")
        if rows * n == 0:
            continue
        xq = kernels.kivi_dequantize(mins.reshape(rows, ng), scales.reshape(rows, ng), codes.reshape(rows, -1),
                                     h.param, h.group, n)
        xq = xq.reshape(L, C, Tq).transpose(1, 2) if p == 0 else xq.reshape(L, Tq, C)
        out[:, p, :Tq] = xq
    tail, _ = _take(payload, pos, L * P * E * C, h.dtype)
    out[:, :, Tq:] = tail.reshape(L, P, E, C)
    return out
