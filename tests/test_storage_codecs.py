"""Any registered codec as a tier's serde (lmkv.storage.serde.CodecSerde): a tier configured with ``serde: int8``
(fp8, kivi, or a codec a test registers) stores that codec's blob, and a reader that was told nothing decodes it
to exactly what the codec's own round trip gives; an object naming a codec this process lacks, a damaged blob or
one that decodes to another shape is a miss with a warning, never wrong KV."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmkv import config as lmkv_config
from lmkv.errors import CodecError, ConfigError, CorruptObject
from lmkv.ops import codec
from lmkv.storage import TieredStore
from lmkv.storage.disk import DiskTier, object_path
from lmkv.storage.objects import Encoded
from lmkv.storage.serde import CodecSerde, get_serde

FP = b"fp"
BUILTIN = ("int8", "fp8", "kivi")


def _chunk(tokens: int, seed: int, dtype: torch.dtype = torch.float32, mla: bool = False) -> torch.Tensor:
    """A chunk [L=2, 2, T, H=2, D=8] (MLA: [2, 1, T, 8]) of random values."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 1, tokens, 8) if mla else (2, 2, tokens, 2, 8)
    return torch.randn(shape, generator=g).to(dtype)


def _roundtrip(name: str, kv: torch.Tensor) -> torch.Tensor:
    c = codec.get(name)
    return c.decode(c.encode(kv, None))


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(BUILTIN), tokens=st.integers(1, 40), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), mla=st.booleans())
@example(name="kivi", tokens=1, seed=0, dtype=torch.float32, mla=False)
@example(name="fp8", tokens=33, seed=1, dtype=torch.bfloat16, mla=True)
def test_a_fresh_reader_decodes_what_the_writer_chose(tmp_path_factory, name, tokens, seed, dtype, mla) -> None:
    root = tmp_path_factory.mktemp("codec")
    kv = _chunk(tokens, seed, dtype, mla)
    with TieredStore([DiskTier(root, 1 << 22)], [name]) as writer:
        writer.put("k", kv, fingerprint=FP)
        writer.flush()
    with TieredStore([DiskTier(root, 1 << 22)], ["raw"]) as reader:  # configured raw: the object says its codec
        got = reader.get("k", fingerprint=FP)
    assert got is not None and got.dtype == kv.dtype and got.shape == kv.shape
    assert torch.equal(got.view(torch.uint8), _roundtrip(name, kv).view(torch.uint8))  # bit for bit
    if name != "raw":
        blob = Path(object_path(root, "k")).read_bytes()
        assert name.encode() in blob[:4096 + 70]  # the payload names its codec


def test_config_selects_a_codec_per_tier_and_refuses_an_unknown_one(tmp_path) -> None:
    cfg = {"memory": {"enabled": False}, "disk": {"path": str(tmp_path), "serde": "kivi"}}
    with TieredStore.from_config(cfg) as store:
        assert [s.name for s in store.serdes] == ["kivi"]
        kv = _chunk(64, 3)
        store.put("a", kv, fingerprint=FP)
        store.flush()
    with TieredStore.from_config(cfg) as store:
        assert torch.equal(store.get("a", fingerprint=FP), _roundtrip("kivi", kv))
    with pytest.raises(ConfigError, match="disk.serde"):
        lmkv_config.load({"disk": {"serde": "zstd"}})
    with pytest.raises(ValueError, match="registered codec"):
        get_serde("zstd")


def _toy_encode(chunk: torch.Tensor, config: object = None) -> bytes:
    """A researcher's codec: float16 of the values, a dtype byte, the shape. Readable, lossy, and bounded."""
    head = bytes([{torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[chunk.dtype], chunk.dim()])
    dims = b"".join(int(d).to_bytes(4, "little") for d in chunk.shape)
    return head + dims + chunk.to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes()


def _toy_decode(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    mv = memoryview(blob).cast("B")
    if len(mv) < 2 or mv[0] > 2 or not 1 <= mv[1] <= 8:
        raise CodecError("toy: bad header")
    ndim = mv[1]
    shape = [int.from_bytes(mv[2 + 4 * i:6 + 4 * i], "little") for i in range(ndim)]
    body = mv[2 + 4 * ndim:]
    n = 1
    for d in shape:
        n *= d
    if len(body) != 2 * n:
        raise CodecError("toy: truncated")
    half = torch.frombuffer(bytearray(body), dtype=torch.float16).view(shape)
    return half.to([torch.float32, torch.float16, torch.bfloat16][mv[0]])


TOY = "toy-half"
if TOY not in codec.names():
    codec.register(codec.Codec(TOY, _toy_encode, _toy_decode, "float16 rounding", 1))


def test_a_codec_registered_by_a_researcher_is_a_serde_too(tmp_path) -> None:
    kv = _chunk(5, 4)
    with TieredStore([DiskTier(tmp_path, 1 << 20)], [TOY]) as store:
        store.put("t", kv, fingerprint=FP)
        store.flush()
    with TieredStore([DiskTier(tmp_path, 1 << 20)]) as reader:
        assert torch.equal(reader.get("t", fingerprint=FP), kv.to(torch.float16).float())


@pytest.mark.parametrize("damage", ["unknown codec", "no name", "flipped blob", "wrong shape", "other dtype"])
def test_a_codec_payload_that_cannot_be_trusted_is_corrupt(damage) -> None:
    """The serde's own checks, past the tier's checksum (a writer with a bug, a forged object with a valid
    checksum): each is CorruptObject, which the store turns into a miss with a warning."""
    kv = _chunk(8, 5)
    obj = CodecSerde("int8").encode("x", kv, FP)
    payload = bytearray(obj.view())
    header = obj.header
    if damage == "unknown codec":
        payload[1:5] = b"int9"
    elif damage == "no name":
        payload[0] = 0
    elif damage == "flipped blob":
        payload[-8] ^= 0x10
    elif damage == "wrong shape":  # a sound int8 blob of another chunk's shape under this header
        payload = payload[:5] + bytearray(codec.get("int8").encode(_chunk(9, 5), None))
    else:
        payload = payload[:5] + bytearray(codec.get("int8").encode(kv.half(), None))
    forged = Encoded(replace(header, payload_len=len(payload)), bytes(payload), owned=True)
    with pytest.raises(CorruptObject):
        CodecSerde().decode(forged)


def test_a_damaged_codec_object_on_disk_is_a_miss_with_a_warning(tmp_path, caplog) -> None:
    with TieredStore([DiskTier(tmp_path, 1 << 20)], ["fp8"]) as store:
        store.put("x", _chunk(8, 6), fingerprint=FP)
        store.flush()
    path = Path(object_path(tmp_path, "x"))
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x10
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), TieredStore([DiskTier(tmp_path, 1 << 20)]) as reader:
        assert reader.get("x", fingerprint=FP) is None
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_codec_serde_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        CodecSerde("no-such-codec")


def test_notebook_02s_example_codec_keeps_its_bound_and_refuses_damage(tmp_path) -> None:
    """experiments/example_codec.py (what notebook 02 registers): within its documented bound, a tier serde by
    name, and a damaged blob is a CodecError."""
    from experiments import example_codec

    if "int4-token" not in codec.names():
        codec.register(example_codec.CODEC)
    kv = _chunk(7, 8).half()
    back = example_codec.decode(example_codec.encode(kv))
    scale = kv.float().abs().amax(dim=(-2, -1), keepdim=True).half().float() / 7
    assert back.shape == kv.shape and bool(((back.float() - kv.float()).abs() <= scale / 2 + 1e-3 * scale).all())
    blob = bytearray(example_codec.encode(kv))
    blob[20] ^= 1
    with pytest.raises(CodecError):
        example_codec.decode(bytes(blob))
    with TieredStore([DiskTier(tmp_path, 1 << 20)], ["int4-token"]) as store:
        store.put("n", kv, fingerprint=FP)
        store.flush()
    with TieredStore([DiskTier(tmp_path, 1 << 20)]) as reader:
        assert torch.equal(reader.get("n", fingerprint=FP), back)
