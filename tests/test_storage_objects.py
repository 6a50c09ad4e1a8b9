"""Stored object format and serde plug-ins: bit-exact round trips, and every damaged header is a CorruptObject."""

from __future__ import annotations

import importlib.util
import struct

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from lmkv.errors import CorruptObject
from lmkv.storage.objects import (
    CSUM_CRC32,
    CSUM_XXH3,
    Encoded,
    parse_header,
    verify_payload,
    writable_view,
)
from lmkv.storage.serde import CacheGenSerde, RawSerde, tensor_bytes
from lmkv.types import DTYPE_CODES

DTYPES = list(DTYPE_CODES)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * torch.empty((), dtype=dtype).element_size(),),
                        generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)  # every bit pattern, NaNs included: bytes must survive untouched


def _blob(obj: Encoded) -> bytes:
    return obj.header_bytes() + bytes(obj.view())


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


@given(dtype=st.sampled_from(DTYPES), shape=shapes, seed=st.integers(0, 99),
       key=st.text(min_size=1, max_size=40), fp=st.binary(max_size=40), algo=st.sampled_from([CSUM_XXH3, CSUM_CRC32]))
@example(dtype=torch.bfloat16, shape=(2, 2, 3, 2, 4), seed=0, key="k", fp=b"", algo=CSUM_XXH3)
@example(dtype=torch.float8_e4m3fn, shape=(), seed=1, key="é", fp=b"\0" * 40, algo=CSUM_CRC32)
@example(dtype=torch.float32, shape=(0, 3), seed=2, key="empty", fp=b"x", algo=CSUM_XXH3)
def test_raw_roundtrip_bit_exact(dtype, shape, seed, key, fp, algo) -> None:
    kv = _tensor(dtype, shape, seed)
    obj = RawSerde().encode(key, kv, fp)
    obj.header.checksum_algo = algo
    blob = _blob(obj)
    assert obj.header.header_len % 64 == 0 and len(blob) == obj.header.header_len + obj.header.payload_len
    header = parse_header(blob)
    assert (header.key, header.fingerprint, header.shape) == (key, fp, tuple(shape))
    payload = memoryview(blob)[header.header_len:]
    verify_payload(header, payload)
    out = RawSerde().decode(Encoded(header, payload, owned=False))
    assert out.dtype == dtype and tuple(out.shape) == tuple(shape)
    assert torch.equal(out.reshape(-1).view(torch.uint8), kv.reshape(-1).view(torch.uint8))
    # decoding into a preallocated, poisoned buffer writes every byte
    dst = torch.full((out.numel() * out.element_size(),), 0xAB, dtype=torch.uint8).view(dtype).reshape(shape)
    RawSerde().decode(Encoded(header, payload), out=dst)
    assert torch.equal(dst.reshape(-1).view(torch.uint8), kv.reshape(-1).view(torch.uint8))


@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(pos: int, bit: int) -> None:
    kv = _tensor(torch.float16, (2, 2, 8, 2, 16), 3)
    blob = bytearray(_blob(RawSerde().encode("chunk", kv, b"tokens")))
    pos %= len(blob)
    blob[pos] ^= 1 << bit
    with pytest.raises(CorruptObject):
        header = parse_header(blob)
        if header.key != "chunk" or header.fingerprint != b"tokens":
            raise CorruptObject("foreign")  # a flip that still parses must not pass as the same object
        verify_payload(header, memoryview(blob)[header.header_len:])


@given(cut=st.integers(0, 2000))
def test_truncated_objects_are_corrupt(cut: int) -> None:
    blob = _blob(RawSerde().encode("k", _tensor(torch.float32, (4, 100), 0), b""))
    cut %= len(blob)
    with pytest.raises(CorruptObject):
        parse_header(blob[:cut])


def test_size_fields_are_bounded_before_allocation() -> None:
    blob = bytearray(_blob(RawSerde().encode("k", torch.zeros(4), b"")))
    struct.pack_into("<Q", blob, 16, 1 << 50)  # payload length far beyond any tier
    with pytest.raises(CorruptObject, match="bounds"):
        parse_header(blob)
    blob = bytearray(_blob(RawSerde().encode("k", torch.zeros(4), b"")))
    blob[10] = 200  # ndim
    with pytest.raises(CorruptObject, match="bounds"):
        parse_header(blob)
    with pytest.raises(CorruptObject, match="magic"):
        parse_header(b"PK\x03\x04" + bytes(100))  # a zip file is foreign, not a crash
    with pytest.raises(CorruptObject, match="version"):
        b = bytearray(_blob(RawSerde().encode("k", torch.zeros(4), b"")))
        b[4] = 9
        parse_header(b)


def test_encode_rejects_bad_arguments_by_name() -> None:
    with pytest.raises(TypeError, match="key"):
        RawSerde().encode("", torch.zeros(2), b"")
    with pytest.raises(TypeError, match="fingerprint"):
        RawSerde().encode("k", torch.zeros(2), "not-bytes")
    with pytest.raises(ValueError, match="fingerprint"):
        RawSerde().encode("k", torch.zeros(2), b"x" * 300)
    with pytest.raises(TypeError, match="dtype"):
        RawSerde().encode("k", torch.zeros(2, dtype=torch.complex64), b"")
    obj = RawSerde().encode("k", torch.zeros(2, 3), b"")
    with pytest.raises(ValueError, match="out"):
        RawSerde().decode(obj, out=torch.zeros(3, 2))


def test_raw_decode_rejects_payload_of_wrong_length() -> None:
    obj = RawSerde().encode("k", torch.arange(6, dtype=torch.float32), b"")
    with pytest.raises(CorruptObject):
        RawSerde().decode(Encoded(obj.header, memoryview(bytes(20))))


def test_writable_view_shares_and_keeps_alive() -> None:
    value = bytes(range(200))
    mv = writable_view(value)[8:]
    t = torch.frombuffer(mv, dtype=torch.uint8)
    del value, mv
    assert t.tolist() == list(range(8, 200))


def test_tensor_bytes_is_zero_copy() -> None:
    kv = torch.arange(8, dtype=torch.bfloat16)
    mv = tensor_bytes(kv)
    kv[0] = 5
    assert bytes(mv[:2]) == kv[:1].view(torch.uint8).numpy().tobytes()


@pytest.mark.skipif(importlib.util.find_spec("lmkv.ops.codec") is None,
                    reason="lmkv.ops.codec ([3/7] CacheGen) is not in this checkout yet")
def test_cachegen_serde_roundtrip() -> None:
    from lmkv.ops import codec

    kv = torch.randn(4, 2, 16, 2, 32, generator=torch.Generator().manual_seed(0))
    serde = CacheGenSerde()
    obj = serde.encode("k", kv, b"fp")
    blob = _blob(obj)
    header = parse_header(blob)
    assert header.serde == CacheGenSerde.code and header.payload_len < kv.numel() * 4
    out = serde.decode(Encoded(header, memoryview(blob)[header.header_len:], owned=True))
    assert torch.equal(out, codec.decode(codec.encode(kv)))  # exactly what the codec itself decodes
    broken = bytearray(blob)
    broken[header.header_len + 5] ^= 0xFF
    with pytest.raises(CorruptObject):  # the store checks this before the codec ever sees the bytes
        verify_payload(header, memoryview(broken)[header.header_len:])
