"""The lmkv range coder: the exact arithmetic, specified once, in readable Python.

Every backend (this file, ``csrc/include/lmkv/rangecoder.h`` used by the C++ CPU coder and the CUDA kernels)
implements exactly the integer arithmetic below, so their streams are byte-identical.

Model
-----
A stream codes ``T`` symbols ``s_0 .. s_{T-1}`` with one fixed cumulative frequency table ``cdf`` of
``n + 1`` non-decreasing integers, ``cdf[0] = 0`` and ``cdf[n] = 2**16`` (16-bit precision); symbol ``s``
owns the interval ``[cdf[s], cdf[s+1])`` and must have ``freq = cdf[s+1] - cdf[s] >= 1`` to be coded.

Encoder state: ``low`` (33 bits: 32 plus a carry), ``range`` (32 bits), a pending byte ``cache`` and the count
``pending`` of bytes waiting for a possible carry (LZMA-style carry propagation)::

    start:   low = 0, range = 2**32 - 1, cache = 0, pending = 1
    encode s:
        r = range >> 16                   # range >= 2**24 between symbols, so r >= 2**8
        low += r * cdf[s]
        range = r * freq(s)
        while range < 2**24:              # renormalise: one byte out, 8 bits of precision in
            range <<= 8
            shift_low()
    shift_low():
        if low < 0xFF000000 or low >= 2**32:    # the top byte is final (or a carry just resolved it)
            carry = low >> 32
            emit (cache + carry) & 0xFF, then (pending - 1) times (0xFF + carry) & 0xFF
            pending = 0
            cache = (low >> 24) & 0xFF
        pending += 1
        low = (low & 0x00FFFFFF) << 8
    finish:
        x = the number in [low, low + range) with the most trailing zero bits
        low = x; shift_low() five times      # pushes every byte of x out
        drop the first emitted byte (always 0: the coded value is < 1) and all trailing 0x00 bytes

Decoder (reads byte ``i`` of the stream, or 0 past its end, so the dropped trailing zeros come back)::

    code = first 4 bytes, big-endian; range = 2**32 - 1
    decode one symbol:
        r = range >> 16
        v = min(code // r, 2**16 - 1)
        s = number of i in 1..n with cdf[i] <= v      # the s with cdf[s] <= v < cdf[s+1]
        code = (code - r * cdf[s]) mod 2**32
        range = r * freq(s)
        while range < 2**24:
            code = ((code << 8) | next byte) mod 2**32
            range <<= 8

The decoder never reads more than ``len(stream) + 4`` positions and always produces exactly ``T`` symbols in
``[0, n)``, whatever the bytes: a corrupt stream gives wrong symbols, never a crash or a hang (the blob's
checksum catches corruption before that). The cost above the ideal ``-log2 p`` is below 2**-8 relative per
symbol (the truncation ``r = range >> 16``) plus at most 2 bytes per stream for the flush.

Frequency tables
----------------
:func:`normalize_counts` turns symbol counts into 16-bit frequencies with integer arithmetic only, so every
backend and the decoder (which rebuilds nothing: it reads the frequencies) agree:

    freq = floor(count * 2**16 / total), raised to 1 where count > 0; the first most frequent symbol absorbs
    the difference to 2**16; no frequency may reach 2**16 (it is stored as 16 bits), so a table with a single
    present symbol gives 1 to its neighbour (the next symbol, or the previous one for the last).
"""

from __future__ import annotations

import torch

PRECISION = 16
TOTAL = 1 << PRECISION
MAX_FREQ = TOTAL - 1
TOP = 1 << 24
MASK32 = 0xFFFFFFFF


def normalize_counts(counts: torch.Tensor) -> torch.Tensor:
    """Symbol counts ``[..., n]`` (n >= 2) -> 16-bit frequencies ``[..., n]`` int32, summing to 2**16 per row.

    Rows whose counts are all zero stay all zero (an unused table). Integer arithmetic only (see module doc).
    """
    if counts.shape[-1] < 2:
        raise ValueError(f"counts: need an alphabet of at least 2 symbols, got {counts.shape[-1]}")
    c = counts.to(torch.int64)
    total = c.sum(-1, keepdim=True)
    freq = torch.where(total > 0, c * TOTAL // total.clamp_min(1), torch.zeros_like(c))
    freq = torch.where(c > 0, freq.clamp_min(1), freq)
    top = c.argmax(-1, keepdim=True)  # first most frequent symbol
    diff = torch.where(total > 0, TOTAL - freq.sum(-1, keepdim=True), torch.zeros_like(total))
    freq.scatter_add_(-1, top, diff)
    # A lone symbol would get 2**16, which 16 bits cannot store: lend 1 to a neighbour (costs ~2e-5 bits/symbol).
    full = freq.gather(-1, top) == TOTAL
    if bool(full.any()):
        n = c.shape[-1]
        neighbour = torch.where(top + 1 < n, top + 1, top - 1)
        freq.scatter_add_(-1, top, -full.to(torch.int64))
        freq.scatter_add_(-1, neighbour, full.to(torch.int64))
    return freq.to(torch.int32)


def freq_to_cdf(freq: torch.Tensor) -> torch.Tensor:
    """Frequencies ``[..., n]`` -> cumulative table ``[..., n + 1]`` int32 with a leading 0."""
    zero = torch.zeros((*freq.shape[:-1], 1), dtype=torch.int64, device=freq.device)
    return torch.cat([zero, freq.to(torch.int64).cumsum(-1)], -1).to(torch.int32)


class RangeEncoder:
    """One stream's encoder; see the module docstring for the arithmetic."""

    def __init__(self) -> None:
        self.low = 0
        self.range = MASK32
        self.cache = 0
        self.pending = 1
        self.out = bytearray()

    def _shift_low(self) -> None:
        if self.low < 0xFF000000 or self.low > MASK32:
            carry = self.low >> 32
            self.out.append((self.cache + carry) & 0xFF)
            for _ in range(self.pending - 1):
                self.out.append((0xFF + carry) & 0xFF)
            self.pending = 0
            self.cache = (self.low >> 24) & 0xFF
        self.pending += 1
        self.low = (self.low & 0x00FFFFFF) << 8

    def encode(self, cum: int, freq: int) -> None:
        r = self.range >> PRECISION
        self.low += r * cum
        self.range = r * freq
        while self.range < TOP:
            self.range <<= 8
            self._shift_low()

    def finish(self) -> bytes:
        # The value with the most trailing zero bits inside [low, low + range): those zeros need not be sent.
        for k in range(33, -1, -1):
            step = 1 << k
            x = (self.low + step - 1) & ~(step - 1)
            if x < self.low + self.range:
                break
        self.low = x
        for _ in range(5):
            self._shift_low()
        return bytes(self.out[1:]).rstrip(b"\x00")


class RangeDecoder:
    """One stream's decoder; bytes past the end read as 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.range = MASK32
        self.code = 0
        for _ in range(4):
            self.code = (self.code << 8) | self._next()

    def _next(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def decode(self, cdf: list[int]) -> int:
        r = self.range >> PRECISION
        v = min(self.code // r, TOTAL - 1)
        s = sum(1 for c in cdf[1:] if c <= v)
        self.code = (self.code - r * cdf[s]) & MASK32
        self.range = r * (cdf[s + 1] - cdf[s])
        while self.range < TOP:
            self.code = ((self.code << 8) | self._next()) & MASK32
            self.range <<= 8
        return s


def encode_stream(symbols: list[int], cdf: list[int]) -> bytes:
    """Code one stream of symbols with one table; every symbol must have a non-zero frequency."""
    enc = RangeEncoder()
    for s in symbols:
        enc.encode(cdf[s], cdf[s + 1] - cdf[s])
    return enc.finish()


def decode_stream(data: bytes, cdf: list[int], num_symbols: int) -> list[int]:
    """Exactly ``num_symbols`` symbols from ``data`` (garbage in, garbage symbols out, never an exception)."""
    dec = RangeDecoder(data)
    return [dec.decode(cdf) for _ in range(num_symbols)]
