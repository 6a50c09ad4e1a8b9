"""int8 / fp8 / KIVI / raw codec agreement (lmkv.ops.quant) and the codec registry (lmkv.ops.codec).

Only the row kernels have two implementations (reference/quant.py and csrc/cpu/quant.cpp), so the backends are
compared on whole chunks: identical blob bytes and identical decoded tensors. The reconstruction is checked
against each codec's documented bound, recomputed here independently in float64; the blob format is fuzzed
(truncations, bit flips, forged headers with a valid CRC, blobs handed to another codec); the last tests plant
a difference and show that the checks catch it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmkv.errors import CodecError
from lmkv.ops import codec, quant
from lmkv.reference import quant as ref

EXT = quant.int8_quantize.unavailable_reason("ext", "cpu") is None
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Half an ulp of each dtype, relative: the final cast's rounding.
CAST = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
F32 = 2.0**-22  # slack for float32 rounding of the scale, the division and q * scale (+ min)
Case = tuple[torch.Tensor, str, dict[str, Any]]


def needs_ext() -> None:
    if not EXT:
        pytest.skip(f"ext backend unavailable: {quant.int8_quantize.unavailable_reason('ext', 'cpu')}")


def test_ext_backend_is_available_here() -> None:
    # CI has a compiler: a silently missing ext backend would hide every agreement test below.
    assert EXT, quant.int8_quantize.unavailable_reason("ext", "cpu")


def test_every_kernel_has_ext_and_reference() -> None:
    for op in quant.OPS:
        assert op.backends() == ["ext", "reference"], op
    assert not isinstance(quant.encode, type(quant.int8_quantize))


# ------------------------------------------------------------------------------------------------ inputs
def make(kind: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A chunk of ``shape`` whose values follow ``kind`` (the edge cases the codecs must survive)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "outlier_channel":
        x[..., 0] *= 50.0
    elif kind == "constant_channel":
        x[..., -1] = 3.25  # one channel constant over every token: a zero KIVI key range
    elif kind == "zeros":
        x.zero_()
    elif kind == "signed_zeros":
        x = torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0)
    elif kind == "tiny":
        x *= 1e-30
    elif kind == "large":
        x = x.clamp(-1, 1) * (6e4 if dtype == torch.float16 else 1e30)
    elif kind == "ties":  # halves with absmax 127: x / scale lands exactly on .5 (round half to even matters)
        x = torch.randint(-254, 255, shape, generator=g).float() / 2
        x.reshape(-1, shape[-1])[:, 0] = 127.0
    elif kind == "offset":
        x = 1000.0 + x * 1e-3  # a tiny range on a large offset: float32 rounding dominates KIVI's step
    return x.to(dtype)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    mla = draw(st.booleans())
    L, T, D = draw(st.integers(1, 2)), draw(st.integers(1, 40)), draw(st.integers(1, 8))
    shape = (L, 1, T, D) if mla else (L, draw(st.sampled_from([2, 2, 1])), T, draw(st.integers(1, 3)), D)
    kind = draw(st.sampled_from(["normal", "outlier_channel", "constant_channel", "zeros", "signed_zeros", "tiny",
                                 "large", "ties", "offset"]))
    x = make(kind, shape, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 1)))
    name = draw(st.sampled_from(quant.CODECS))
    params = {"axis": draw(st.sampled_from(ref.AXES)), "bits": draw(st.sampled_from(ref.KIVI_BITS)),
              "group": draw(st.integers(1, 40)), "residual": draw(st.integers(0, 40))}
    return x, name, params


def edge(kind: str, shape: tuple[int, ...], name: str, dtype: torch.dtype = torch.float32, **params: Any) -> Case:
    return make(kind, shape, dtype), name, {"axis": "token", "bits": 2, "group": 4, "residual": 2, **params}


EDGES = [
    edge("constant_channel", (2, 2, 9, 2, 4), "kivi", residual=0),
    edge("constant_channel", (2, 2, 9, 2, 4), "fp8", axis="channel"),
    edge("zeros", (1, 2, 5, 1, 3), "int8"), edge("zeros", (1, 2, 5, 1, 3), "fp8"),
    edge("zeros", (1, 2, 5, 1, 3), "kivi", residual=1),
    edge("signed_zeros", (1, 2, 6, 1, 4), "kivi", residual=0),
    edge("normal", (1, 2, 1, 1, 1), "int8"), edge("normal", (1, 2, 1, 1, 1), "kivi", residual=0),  # T = 1
    edge("normal", (1, 2, 1, 2, 3), "fp8", axis="channel"),
    edge("normal", (2, 1, 7, 8), "kivi", bits=4, group=3, residual=2),  # MLA
    edge("normal", (2, 1, 7, 8), "fp8", torch.bfloat16, axis="channel"),
    edge("normal", (2, 1, 7, 8), "int8", torch.float16), edge("normal", (2, 1, 7, 8), "raw", torch.bfloat16),
    edge("ties", (1, 2, 4, 1, 8), "int8"),
    edge("large", (1, 2, 6, 2, 4), "int8", torch.float16), edge("large", (1, 2, 6, 2, 4), "kivi", torch.float16),
    edge("tiny", (1, 2, 6, 2, 4), "fp8"), edge("offset", (1, 2, 12, 1, 4), "kivi", bits=4, residual=0),
    edge("normal", (1, 2, 5, 1, 4), "kivi", residual=40),  # every token in the residual
    edge("normal", (1, 2, 11, 1, 5), "kivi", group=1, residual=0),
    edge("normal", (1, 2, 11, 1, 5), "kivi", bits=4, group=64, residual=3),  # one group longer than the row
]


# ------------------------------------------------------------------------------------------------ checks
def assert_backends_agree(case: Case, a: ref.Kernels | str = "reference", b: ref.Kernels | str = "ext") -> bytes:
    """Both kernel sets give the same blob, and decode it (either's blob) to the same tensor; returns a's blob."""
    x, name, params = case
    ka = a if isinstance(a, ref.Kernels) else quant.kernels(a)
    kb = b if isinstance(b, ref.Kernels) else quant.kernels(b)
    blob_a = ref.encode(x, name, **params, kernels=ka)
    blob_b = ref.encode(x, name, **params, kernels=kb)
    assert blob_a == blob_b, f"{name} {params}: blobs differ"
    out_a, out_b = ref.decode(blob_a, name, kernels=ka), ref.decode(blob_a, name, kernels=kb)
    assert out_a.shape == x.shape and out_a.dtype == x.dtype
    # Compared as bytes: equal values with different signed zeros would be a difference too.
    same = torch.equal(out_a.reshape(-1).view(torch.uint8), out_b.reshape(-1).view(torch.uint8))
    assert same, f"{name} {params}: decodes differ"
    return blob_a


def _rows64(x: torch.Tensor) -> np.ndarray:
    """[L, P, T, C] float64."""
    L, P, T = x.shape[:3]
    return x.reshape(L, P, T, -1).to(torch.float64).numpy()


def _groups(v: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-element (min, max) of its group of ``group`` consecutive values along the last axis."""
    n = v.shape[-1]
    idx = np.arange(n) // group
    mins, maxs = np.empty_like(v), np.empty_like(v)
    for g in range(idx.max() + 1 if n else 0):
        sel = idx == g
        mins[..., sel] = v[..., sel].min(-1, keepdims=True)
        maxs[..., sel] = v[..., sel].max(-1, keepdims=True)
    return mins, maxs


def bound(case: Case) -> np.ndarray:
    """The documented bound per element [L, P, T, C], recomputed in float64 (plus float32 rounding slack)."""
    x, name, params = case
    v = _rows64(x)
    if name == "raw":
        return np.zeros_like(v)
    if name == "int8":
        scale = np.abs(v).max(-1, keepdims=True) / 127
        return scale / 2 + F32 * (np.abs(v) + scale)
    if name == "fp8":
        scale = np.abs(v).max(3 if params["axis"] == "token" else 2, keepdims=True) / 448
        return np.maximum(np.abs(v) * 2.0**-4, scale * 2.0**-10) + F32 * (np.abs(v) + scale)
    T = v.shape[2]
    E = min(params["residual"], T)
    out = np.zeros_like(v)
    for p in range(v.shape[1]):
        part = v[:, p, : T - E]  # keys: groups along tokens per channel; values: along channels per token
        part = part.transpose(0, 2, 1) if p == 0 else part
        mn, mx = _groups(part, params["group"])
        b = (mx - mn) / ((1 << params["bits"]) - 1) / 2 + F32 * (np.abs(part) + np.abs(mn) + np.abs(mx))
        out[:, p, : T - E] = b.transpose(0, 2, 1) if p == 0 else b
    return out


def assert_within_bound(case: Case, decoded: torch.Tensor) -> None:
    x = case[0]
    err = np.abs(_rows64(x) - _rows64(decoded))
    allowed = bound(case) * (1 + CAST[x.dtype]) + CAST[x.dtype] * np.abs(_rows64(x)) + 2.0**-126
    worst = float((err - allowed).max())
    assert worst <= 0, f"{case[1]} {case[2]}: error exceeds the documented bound by {worst}"


# ------------------------------------------------------------------------------------------------ agreement
def _with_examples(fn: Any) -> Any:
    for case in EDGES:
        fn = example(case=case)(fn)
    return fn


@settings(deadline=None)
@given(case=cases())
@_with_examples
def test_backends_identical_and_error_within_bound(case: Case) -> None:
    needs_ext()
    blob = assert_backends_agree(case)
    decoded = quant.decode(blob, expect=case[1], backend="ext")
    assert_within_bound(case, decoded)
    if case[1] == "kivi":  # the residual tokens come back exactly
        E = min(case[2]["residual"], case[0].shape[2])
        assert torch.equal(decoded[:, :, decoded.shape[2] - E :], case[0][:, :, case[0].shape[2] - E :])
    if case[1] == "raw":
        assert torch.equal(decoded, case[0])


def test_ops_follow_the_backend_selection() -> None:
    needs_ext()
    x = make("normal", (1, 2, 5, 2, 4))
    want = quant.encode(x, "kivi", backend="reference")
    assert quant.encode(x, "kivi", backend="ext") == want == quant.encode(x, "kivi")
    rows = x.reshape(-1, 4)
    for be in ("ext", "reference"):
        s, q = quant.int8_quantize(rows, backend=be)
        assert torch.equal(quant.int8_dequantize(s, q, backend=be), ref.int8_dequantize(*ref.int8_quantize(rows)))


def test_e4m3_conversion_matches_torch_on_a_dense_grid() -> None:
    needs_ext()
    # Scale 1 (a 448 in every row) makes the fp8 kernel a plain float -> e4m3 cast: every code and rounding tie.
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    exact = codes.view(torch.float8_e4m3fn).float()
    mids = (exact[:-1] + exact[1:]) / 2  # neighbours within one sign are the ties
    values = torch.cat([exact, mids, torch.linspace(-448, 448, 20001), torch.randn(5000) * 1e-2, torch.tensor([-0.0])])
    rows = torch.stack([values, torch.full_like(values, 448.0)], dim=1)
    got, want = quant.fp8_quantize(rows, backend="ext"), quant.fp8_quantize(rows, backend="reference")
    assert torch.equal(got[1], want[1]) and bool((got[0] == 1).all())
    assert torch.equal(quant.fp8_dequantize(*got, backend="ext"), quant.fp8_dequantize(*want, backend="reference"))


def test_real_sized_chunk_agrees() -> None:
    needs_ext()
    x = make("outlier_channel", (4, 2, 256, 3, 64))
    for name, params in (("int8", {}), ("fp8", {"axis": "channel"}), ("kivi", {"bits": 2, "group": 32})):
        case = (x, name, {"axis": "token", "bits": 4, "group": 32, "residual": 32, **params})
        assert_within_bound(case, ref.decode(assert_backends_agree(case), name))


# A blob format change must be deliberate: these digests pin the bytes of small blobs.
PINNED = {"raw": "10c7aeb9d7bc0d12", "int8": "798ee8d49f9ce0f9", "fp8": "e28e1600d1a08a41", "kivi": "fab1c7705e612fdf"}


@pytest.mark.parametrize("name", quant.CODECS)
def test_blob_bytes_pinned(name: str) -> None:
    blob = quant.encode(make("ties", (1, 2, 5, 2, 4), torch.bfloat16, seed=3), name, axis="channel", bits=4,
                        group=3, residual=2, backend="reference")
    assert hashlib.sha256(blob).hexdigest()[:16] == PINNED[name]


# ------------------------------------------------------------------------------------------------ the checks can fail
def _half_away(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_quantize with round half *away from zero*: a planted rounding-rule difference."""
    scale = x.abs().amax(dim=1) / 127
    safe = torch.where(scale == 0, 1.0, scale)[:, None]
    y = x / safe
    return scale, (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-127, 127).to(torch.int8)


def test_agreement_check_catches_a_planted_rounding_difference() -> None:
    planted = dataclasses.replace(ref.REFERENCE, int8_quantize=_half_away)
    case = edge("ties", (1, 2, 4, 1, 8), "int8")
    with pytest.raises(AssertionError, match="blobs differ"):
        assert_backends_agree(case, "reference", planted)
    fma = dataclasses.replace(ref.REFERENCE, kivi_dequantize=lambda m, s, q, b, g, n: torch.addcmul(
        m.repeat_interleave(g, 1)[:, :n], ref.unpack_bits(q, b, n).float(), s.repeat_interleave(g, 1)[:, :n]) + 1e-6)
    with pytest.raises(AssertionError, match="decodes differ"):
        assert_backends_agree(edge("normal", (1, 2, 9, 1, 4), "kivi", residual=0), "reference", fma)


def test_bound_check_catches_a_planted_error() -> None:
    case = edge("normal", (1, 2, 8, 2, 4), "int8")
    decoded = quant.decode(quant.encode(case[0], "int8"))
    scale = case[0].reshape(1, 2, 8, -1).abs().amax(-1, keepdim=True) / 127
    off_by_a_step = (decoded.reshape(1, 2, 8, -1) + scale * 0.51).reshape(case[0].shape)
    with pytest.raises(AssertionError, match="exceeds the documented bound"):
        assert_within_bound(case, off_by_a_step)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", quant.CODECS)
def test_non_finite_input_is_refused(bad: float, name: str) -> None:
    x = make("normal", (1, 2, 3, 1, 4))
    x[0, 1, 2, 0, 3] = bad
    with pytest.raises(ValueError, match="chunk: contains NaN or inf"):
        quant.encode(x, name)
    with pytest.raises(ValueError, match="x: contains NaN or inf"):
        quant.int8_quantize(x.reshape(-1, 4), backend="ext" if EXT else "reference")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"chunk": torch.zeros(1, 2, 3, 1, 4, dtype=torch.int32)}, "chunk: dtype"),
    ({"chunk": torch.zeros(1, 3, 3, 1, 4)}, "chunk: expected"),
    ({"chunk": torch.zeros(1, 2, 0, 1, 4)}, "chunk: T=0"),
    ({"chunk": [1.0]}, "chunk: expected a torch.Tensor"),
    ({"codec": "int4"}, "codec: expected"), ({"axis": "head"}, "axis: expected"),
    ({"bits": 3}, "bits: expected"), ({"bits": True}, "bits: expected"), ({"group": 0}, "group: expected"),
    ({"group": 1 << 16}, "group: expected"), ({"residual": -1}, "residual: expected"),
])
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    args = {"chunk": torch.zeros(1, 2, 3, 1, 4), "codec": "kivi", **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        quant.encode(args.pop("chunk"), args.pop("codec"), **args)


def test_kivi_range_overflowing_float32_is_refused() -> None:
    x = torch.tensor([3e38, -3e38]).reshape(1, 1, 2, 1, 1).expand(1, 2, 2, 1, 1).contiguous()
    with pytest.raises(ValueError, match="overflows float32"):
        quant.encode(x, "kivi", residual=0)


def test_kernel_ops_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="bits"):
        quant.kivi_quantize(torch.zeros(2, 3), 8, 2)
    with pytest.raises(TypeError, match="codes"):
        quant.kivi_dequantize(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 1, dtype=torch.uint8), 2, 2, 8)
    with pytest.raises(TypeError, match="scales"):
        quant.int8_dequantize(torch.zeros(3), torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="x: expected"):
        quant.fp8_quantize(torch.zeros(2, 3, dtype=torch.float16))


# ------------------------------------------------------------------------------------------------ blob fuzzing
def _decoders() -> list[str]:
    return ["reference", "ext"] if EXT else ["reference"]


@settings(deadline=None)
@given(case=cases(), data=st.data())
@example(case=edge("normal", (1, 2, 3, 1, 4), "kivi"), data=None)
def test_truncated_or_flipped_blob_is_a_codec_error(case: Case, data: st.DataObject | None) -> None:
    blob = ref.encode(*case[:2], **case[2])
    if data is None:
        damaged = [blob[:-1], blob[:0], blob[: ref.HEADER.size], blob + b"\0"]
    else:
        cut = data.draw(st.integers(0, len(blob) - 1))
        bit = data.draw(st.integers(0, 8 * len(blob) - 1))
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        damaged = [blob[:cut], bytes(flipped)]
    for bad in damaged:
        for be in _decoders():
            with pytest.raises(CodecError):
                quant.decode(bad, backend=be)


def _forge(blob: bytes, fmt: str, offset: int, *values: Any) -> bytes:
    """``blob`` with the fields at ``offset`` rewritten and a *valid* CRC: only the field checks can catch it."""
    body = bytearray(blob[: -ref.CRC.size])
    struct.pack_into(fmt, body, offset, *values)
    return bytes(body) + ref.CRC.pack(zlib.crc32(body))


def _blob(name: str, **params: Any) -> bytes:
    return quant.encode(make("normal", (1, 2, 5, 1, 4)), name, **params)


P0 = ref.HEADER.size  # payload offset


@pytest.mark.parametrize(("blob", "match"), [
    (_forge(_blob("int8"), "<B", 4, 2), "format version 2"),
    (_forge(_blob("int8"), "<4s", 0, b"LKCG"), "magic"),
    (_forge(_blob("int8"), "<B", 5, 9), "unknown codec id 9"),
    (_forge(_blob("int8"), "<B", 6, 5), "dtype code 5"),
    (_forge(_blob("int8"), "<B", 7, 3), "ndim 3"),
    (_forge(_blob("int8"), "<5I", 8, 4096, 2, 1 << 24, 4096, 1 << 16), "elements exceed"),  # bounded, not allocated
    (_forge(_blob("int8"), "<I", 8, 0), "L=0"),
    (_forge(_blob("int8"), "<I", 12, 3), "planes=3"),
    (_forge(_blob("int8"), "<B", 28, 1), "params"),
    (_forge(_blob("fp8"), "<B", 29, 1), "params"),
    (_forge(_blob("kivi"), "<B", 28, 3), "params"),
    (_forge(_blob("kivi"), "<H", 30, 0), "params"),
    (_forge(_blob("kivi"), "<I", 32, 6), "params"),
    (_forge(_blob("kivi"), "<I", 32, 0), "payload is"),
    (_forge(_blob("int8"), "<Q", 36, 1 << 60), "payload is"),
    (_forge(_blob("int8"), "<f", P0, float("nan")), "scale is NaN or inf"),
    (_forge(_blob("int8"), "<f", P0, -1.0), "scale is negative"),
    (_forge(_blob("int8"), "<b", P0 + 4 * 10, -128), "-128"),
    (_forge(_blob("fp8"), "<B", P0 + 4 * 10, 0xFF), "fp8 code is NaN"),
    (_forge(_blob("kivi", residual=0), "<f", P0, float("inf")), "min is NaN or inf"),
    (_forge(_blob("int8"), "<f", P0, 3e38), "overflows"),
    (_forge(_blob("raw"), "<f", P0, float("nan")), "is NaN or overflows"),
])
def test_forged_blob_with_valid_crc_is_a_codec_error(blob: bytes, match: str) -> None:
    for be in _decoders():
        with pytest.raises(CodecError, match=match):
            quant.decode(blob, backend=be)


def test_blob_of_one_codec_given_to_another_is_a_codec_error() -> None:
    x = make("normal", (1, 2, 5, 1, 4))
    blobs = {name: codec.get(name).encode(x, None) for name in codec.names()}
    for a, blob in blobs.items():
        for b in codec.names():
            if a == b:
                assert codec.get(b).decode(blob).shape == x.shape
            else:
                with pytest.raises(CodecError):
                    codec.get(b).decode(blob)
    with pytest.raises(TypeError, match="blob: expected bytes"):
        quant.decode("not bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ registry
def test_builtin_codecs_are_registered_with_bounds_and_versions() -> None:
    assert codec.names()[:5] == ["raw", "cachegen", "int8", "fp8", "kivi"]
    for name in ("raw", "int8", "fp8", "kivi"):
        assert codec.get(name).error_bound == quant.ERROR_BOUNDS[name] and codec.get(name).version == ref.VERSION
    x = make("normal", (2, 2, 40, 2, 4))
    y = codec.get("fp8").decode(codec.get("fp8").encode(x, {"axis": "channel"}))
    assert quant.inspect(codec.get("fp8").encode(x, {"axis": "channel"}))["param"] == 1
    assert_within_bound((x, "fp8", {"axis": "channel"}), y)
    with pytest.raises(ValueError, match="config: codec 'int8' has no parameter 'bits'"):
        codec.get("int8").encode(x, {"bits": 4})
    with pytest.raises(TypeError, match="config: expected None or a mapping"):
        codec.get("kivi").encode(x, 4)


def test_a_researcher_registers_a_codec_from_their_own_module() -> None:
    def enc(chunk: torch.Tensor, config: Any = None) -> bytes:
        return b"TOY1" + quant.encode(chunk, "raw")

    def dec(blob: bytes | bytearray | memoryview) -> torch.Tensor:
        if bytes(blob[:4]) != b"TOY1":
            raise CodecError("not a toy blob")
        return quant.decode(bytes(blob[4:]), expect="raw")

    toy = codec.Codec("toy-test", enc, dec, "lossless", 1)
    try:
        assert codec.register(toy) is toy
        assert codec.get("toy-test") is toy and "toy-test" in codec.names()
        x = make("normal", (1, 1, 3, 5))
        assert torch.equal(codec.get("toy-test").decode(codec.get("toy-test").encode(x, None)), x)
        with pytest.raises(ValueError, match="already registered"):
            codec.register(codec.Codec("toy-test", enc, dec, "lossless", 1))
    finally:
        codec._CODECS.pop("toy-test", None)
    assert "toy-test" not in codec.names()


def test_registry_refuses_bad_codecs_and_names() -> None:
    with pytest.raises(TypeError, match="codec: expected lmkv.ops.codec.Codec"):
        codec.register(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        codec.Codec("Bad Name", bytes, bytes, "x", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decode: expected a callable"):
        codec.Codec("ok", bytes, 3, "x", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="version"):
        codec.Codec("ok", bytes, bytes, "x", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown codec 'nope'"):
        codec.get("nope")
