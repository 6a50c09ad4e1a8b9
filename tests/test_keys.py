"""Storage keys: stable, compact, parseable text; every field separates key spaces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lmkv.keys import FORMAT_VERSION, KeySpace, StorageKey
from lmkv.types import KVGeometry

GEOM = KVGeometry(30, 3, 64, torch.bfloat16)
DIGEST = bytes(range(16))


@given(model=st.text(min_size=1, max_size=40), rank=st.integers(0, 7), extra=st.integers(1, 8),
       digest=st.binary(min_size=16, max_size=16), version=st.integers(0, 999))
def test_text_round_trip(model: str, rank: int, extra: int, digest: bytes, version: int) -> None:
    key = StorageKey(model, GEOM.tag(), "bf16", version, rank, rank + extra, digest)
    text = str(key)
    assert StorageKey.parse(text) == key
    assert "/" not in text and " " not in text and "\n" not in text and text.count("+") == 5
    assert text.endswith(digest.hex())


def test_pinned_text_form() -> None:
    ks = KeySpace("HuggingFaceTB/SmolLM2-135M-Instruct", GEOM)
    assert ks.text(DIGEST) == ("HuggingFaceTB%2FSmolLM2-135M-Instruct+L30.H3.D64.bf16+bf16+v1+tp0of1+"
                               "000102030405060708090a0b0c0d0e0f")
    assert str(ks.key(DIGEST)) == ks.text(DIGEST) and ks.owns(ks.text(DIGEST))
    assert ks.key(DIGEST).version == FORMAT_VERSION


def test_every_field_separates() -> None:
    base = KeySpace("m", GEOM).text(DIGEST)
    others = [
        KeySpace("m2", GEOM).text(DIGEST),
        KeySpace("m", KVGeometry(30, 3, 64, torch.float16)).text(DIGEST),
        KeySpace("m", KVGeometry(29, 3, 64, torch.bfloat16)).text(DIGEST),
        KeySpace("m", GEOM, dtype="f8e4m3").text(DIGEST),
        KeySpace("m", GEOM, version=2).text(DIGEST),
        KeySpace("m", GEOM, rank=1, world_size=2).text(DIGEST),
        KeySpace("m", GEOM, rank=0, world_size=2).text(DIGEST),
        KeySpace("m", GEOM).text(bytes(16)),
    ]
    assert base not in others and len(set(others)) == len(others)
    assert not KeySpace("m2", GEOM).owns(base)


@pytest.mark.parametrize("text", [
    "", "m+L1.H1.D1.f16+f16+v1+tp0of1", "m+L1.H1.D1.f16+f16+v1+tp0of1+" + "0" * 31,
    "m+L1.H1.D1.f16+f16+v1+tp0of1+" + "G" * 32, "m+L1.H1.D1.f16+f16+1+tp0of1+" + "0" * 32,
    "m+L1.H1.D1.f16+f16+v1+tp1of1+" + "0" * 32, "m+L1.H1.D1.f16+f16+v01+tp0of1+" + "0" * 32,
    "m%2f+L1.H1.D1.f16+f16+v1+tp0of1+" + "0" * 32, "+L1.H1.D1.f16+f16+v1+tp0of1+" + "0" * 32,
    "m+L1 H1+f16+v1+tp0of1+" + "0" * 32, "m+L1.H1.D1.f16+f16+v1+tp0of1+" + "A" * 32,
])
def test_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        StorageKey.parse(text)


def test_bad_fields() -> None:
    with pytest.raises(ValueError, match="model_id"):
        StorageKey("", "g", "f16", digest=DIGEST)
    with pytest.raises(ValueError, match="digest"):
        StorageKey("m", "g", "f16", digest=b"short")
    with pytest.raises(ValueError, match="rank"):
        StorageKey("m", "g", "f16", rank=2, world_size=2, digest=DIGEST)
    with pytest.raises(ValueError, match="geometry"):
        StorageKey("m", "a+b", "f16", digest=DIGEST)
    with pytest.raises(TypeError, match="geometry"):
        KeySpace("m", "L1.H1")
    with pytest.raises(TypeError, match="salt"):
        KeySpace("m", GEOM, salt="x")
    with pytest.raises(ValueError, match="digest"):
        KeySpace("m", GEOM).text(b"123")
    with pytest.raises(TypeError):
        StorageKey.parse(b"bytes")
