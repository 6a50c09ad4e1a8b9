"""CacheGen codec agreement. Only the range coder has two implementations (``codec.ac_encode`` / ``ac_decode``:
reference/codec_rangecoder.py and csrc/cpu/codec.cpp), so the backends are compared there, on the same symbols
and tables: identical bytes, lossless decoding, identical symbols from garbage streams. The one blob pipeline
(quantize -> tables -> coder -> blob, reference/codec.py) is checked against its spec: error bounds recomputed
independently, pinned blob bytes, the blob format's validation (fuzzed), and argument errors. The Python
reference coder is slow: tiny inputs for it."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from lmkv._dispatch import Op, use_backend
from lmkv.config import CodecConfig, load
from lmkv.errors import BackendUnavailable, CodecError, ConfigError
from lmkv.ops import codec
from lmkv.reference import codec as ref
from lmkv.reference import codec_format as fmt
from lmkv.reference.codec_rangecoder import TOTAL, freq_to_cdf, normalize_counts

# The coder is the dispatched part: encode/decode's backend= selects the coder backend.
BACKENDS = codec.ac_encode.available_backends("cpu")
EXT = "ext" in BACKENDS


def needs_ext() -> None:
    if not EXT:
        pytest.skip(f"ext backend unavailable: {codec.ac_encode.unavailable_reason('ext')}")


def test_ext_backend_is_available_here() -> None:
    # CI has a compiler: a silently missing ext backend would hide every agreement test below.
    assert EXT, codec.ac_encode.unavailable_reason("ext")


def test_only_the_coder_is_dispatched() -> None:
    assert codec.ac_encode.backends() == ["ext", "cuda", "reference"] == codec.ac_decode.backends()
    assert codec.ac_decode.available_backends("cpu") == BACKENDS
    for plain in (codec.encode, codec.decode, codec.quantize, codec.dequantize, codec.cdf):
        assert not isinstance(plain, Op), plain



def test_encode_and_decode_follow_the_coder_selection() -> None:
    # encode/decode are plain functions: backend=, use_backend and LMKV_BACKEND select the coder op's backend.
    x = torch.randn(1, 2, 3, 1, 4, generator=torch.Generator().manual_seed(2))
    blob = codec.encode(x)
    with use_backend("codec.*=nope"), pytest.raises(BackendUnavailable, match="codec.ac_encode"):
        codec.encode(x)
    with use_backend("codec.ac_decode=nope"), pytest.raises(BackendUnavailable, match="codec.ac_decode"):
        codec.decode(blob)
    with pytest.raises(BackendUnavailable, match="codec.ac_encode"):
        codec.encode(x, backend="nope")
    with use_backend("reference"):
        assert codec.encode(x) == blob
        assert torch.equal(codec.decode(blob), codec.decode(blob, backend="auto"))


# ------------------------------------------------------------------------------------------------ coder
@st.composite
def streams(draw: st.DrawFn, max_s: int = 4, max_t: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbols [S, T] drawn from a per-stream distribution (uniform, skewed, single symbol) and their cdf."""
    S = draw(st.integers(1, max_s))
    T = draw(st.integers(1, max_t))
    n = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["uniform", "skew", "extreme", "single", "two"]))
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        w = torch.ones(S, n)
    elif kind == "skew":
        w = torch.rand(S, n, generator=g) ** 4
    elif kind == "extreme":
        w = torch.full((S, n), 1e-6)
        w[:, 0] = 1.0
    elif kind == "single":
        w = torch.zeros(S, n)
        w[:, n - 1] = 1.0  # the last symbol: its normalised table lends to the previous one
    else:
        w = torch.zeros(S, n)
        w[:, :2] = 1.0
    sym = torch.multinomial(w, T, replacement=True, generator=g).to(torch.uint8)
    return sym, ref.cdf(sym, n)


@given(streams())
def test_reference_coder_round_trip(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    sym, table = data
    payload, lengths = codec.ac_encode(sym, table, backend="reference")
    assert int(lengths.sum()) == len(payload)
    out = codec.ac_decode(payload, lengths, table, sym.shape[1], backend="reference")
    assert torch.equal(out, sym)


@given(streams())
@example((torch.zeros(1, 1, dtype=torch.uint8), ref.cdf(torch.zeros(1, 1, dtype=torch.uint8), 2)))  # T = 1
def test_ext_coder_bytes_identical_to_reference(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    needs_ext()
    _coders_agree(*data)


def _coders_agree(sym: torch.Tensor, table: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """Both coders give the same bytes and stream lengths; returns the reference's."""
    want = codec.ac_encode(sym, table, backend="reference")
    got = codec.ac_encode(sym, table, backend="ext")
    assert got[0] == want[0]
    assert torch.equal(got[1], want[1]) and got[1].dtype == torch.int64
    return want
    out = codec.ac_decode(got[0], got[1], table, sym.shape[1], backend="ext")
    assert torch.equal(out, sym)


@given(streams(max_s=64, max_t=2000))
def test_ext_coder_round_trip_large(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    needs_ext()
    sym, table = data
    payload, lengths = codec.ac_encode(sym, table, backend="ext")
    out = codec.ac_decode(payload, lengths, table, sym.shape[1], backend="ext")
    assert torch.equal(out, sym)


def _cdf_of(freq: torch.Tensor) -> torch.Tensor:
    """Frequencies ``[S, n]`` (each row summing to 2**16) -> cumulative tables ``[S, n + 1]`` int32, built here
    rather than by the reference's normalize_counts, so the coder is tested on tables no pipeline produced."""
    assert bool((freq.sum(1) == TOTAL).all())
    return torch.cat([torch.zeros(freq.shape[0], 1, dtype=torch.int64), freq.to(torch.int64).cumsum(1)], 1).to(
        torch.int32)


def _case(sym: list[list[int]], freq: list[list[int]], t: int = 0, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed coder input (symbols [S, T] uint8, cdf [S, n + 1]); ``t`` and ``n`` size it when S = 0."""
    width = len(sym[0]) if sym else t
    n = len(freq[0]) if freq else n
    return (torch.tensor(sym, dtype=torch.uint8).reshape(len(sym), width),
            _cdf_of(torch.tensor(freq, dtype=torch.int64).reshape(len(freq), n)))


SPIKE = [TOTAL - 255] + [1] * 255  # one symbol takes nearly all the mass, 255 symbols cost 16 bits each


@st.composite
def coder_inputs(draw: st.DrawFn, max_s: int = 6, max_t: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbols [S, T] (S and T may be 0) and an independently drawn table per stream: any alphabet of 1..256
    symbols, any support (zero-frequency symbols anywhere), uniform, skewed or spiked mass. Symbols are drawn
    from each row's support only, by its frequencies or uniformly (the rare symbols then dominate)."""
    S = draw(st.integers(0, max_s))
    T = draw(st.integers(0, max_t))
    n = draw(st.sampled_from([1, 2, 3, 17, 255, 256]) | st.integers(1, 256))
    kind = draw(st.sampled_from(["uniform", "skew", "spike", "sparse"]))
    by_freq = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    support = torch.rand(S, n, generator=g) < 0.3 if kind == "sparse" else torch.ones(S, n, dtype=torch.bool)
    support[torch.arange(S), torch.randint(0, n, (S,), generator=g)] = True  # every row codes something
    w = {"uniform": torch.ones(S, n), "skew": torch.rand(S, n, generator=g) ** 6 + 1e-9,
         "spike": torch.full((S, n), 1e-9), "sparse": torch.rand(S, n, generator=g)}[kind]
    if kind == "spike":
        w[:, 0] = 1.0
    w = torch.where(support, w, 0.0).double()
    k = support.sum(1, keepdim=True)
    # Each present symbol gets 1, the rest of 2**16 is shared by weight; the first present one takes the remainder.
    freq = torch.where(support, 1 + (w / w.sum(1, keepdim=True) * (TOTAL - k)).floor().long(), 0)
    first = support.to(torch.int8).argmax(1, keepdim=True)
    freq.scatter_add_(1, first, TOTAL - freq.sum(1, keepdim=True))
    pick = freq.double() if by_freq else support.double()
    sym = torch.multinomial(pick, T, replacement=True, generator=g) if S and T else torch.zeros(S, T)
    return sym.to(torch.uint8), _cdf_of(freq)


@given(coder_inputs())
@example(_case([[0]], [[1, TOTAL - 1]]))  # one stream of one symbol
@example(_case([[0] * 9], [[TOTAL]]))  # an alphabet of one symbol: frequency 2**16, zero bytes
@example(_case([[1, 1, 1]], [[0, TOTAL, 0]]))  # the only symbol with a frequency sits between two without
@example(_case([list(range(256)) * 2] * 2, [[256] * 256] * 2))  # 256-symbol alphabet, every symbol
@example(_case([[255] * 300, [254] * 300], [SPIKE, SPIKE]))  # skewed table, only its rarest symbols: worst size
@example(_case([[0] * 200 + [255]], [SPIKE]))  # skewed table, the common symbol and one rare one
@example(_case([], [], t=5, n=7))  # no streams
@example(_case([[], [], []], [[TOTAL // 2] * 2] * 3))  # zero-length streams
def test_coder_backends_agree_on_any_table(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    needs_ext()
    sym, table = data
    want = _coders_agree(sym, table)
    assert int(want[1].sum()) == len(want[0]) and tuple(want[1].shape) == (sym.shape[0],)
    for backend in ("reference", "ext"):
        out = codec.ac_decode(want[0], want[1], table, sym.shape[1], backend=backend)
        assert out.dtype == torch.uint8 and torch.equal(out, sym), backend


@given(coder_inputs(max_s=4, max_t=32), st.data())
def test_coder_backends_agree_on_garbage_streams(data: tuple[torch.Tensor, torch.Tensor], more: st.DataObject) -> None:
    # A corrupt stream decodes to wrong symbols, never a crash: the same wrong symbols on every backend.
    needs_ext()
    _, table = data
    T = more.draw(st.integers(0, 40))
    lengths = more.draw(st.lists(st.integers(0, 12), min_size=table.shape[0], max_size=table.shape[0]))
    payload = more.draw(st.binary(min_size=sum(lengths), max_size=sum(lengths)))
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    want = codec.ac_decode(payload, lengths_t, table, T, backend="reference")
    got = codec.ac_decode(payload, lengths_t, table, T, backend="ext")
    assert torch.equal(got, want) and tuple(want.shape) == (table.shape[0], T)
    assert bool((want.to(torch.int64) < table.shape[1] - 1).all())


def test_coded_size_close_to_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.rand(8, 31, generator=g) ** 3
    sym = torch.multinomial(w, 4000, replacement=True, generator=g).to(torch.uint8)
    table = ref.cdf(sym, 31)
    backend = "ext" if EXT else "reference"
    payload, lengths = codec.ac_encode(sym, table, backend=backend)
    counts = ref.counts(sym, 31).double()
    p = counts / counts.sum(-1, keepdim=True)
    entropy_bytes = float(-(counts * torch.where(p > 0, p.log2(), 0.0)).sum()) / 8
    assert entropy_bytes * 0.999 < len(payload) <= entropy_bytes * 1.01 + 2 * sym.shape[0]


def test_single_symbol_stream_costs_nothing() -> None:
    sym = torch.full((3, 100), 4, dtype=torch.uint8)
    table = ref.cdf(sym, 9)
    payload, lengths = codec.ac_encode(sym, table, backend="reference")
    assert len(payload) == 0 and lengths.tolist() == [0, 0, 0]
    assert torch.equal(codec.ac_decode(payload, lengths, table, 100, backend="reference"), sym)


@given(st.lists(st.integers(0, 1000), min_size=2, max_size=40))
@example([0, 0, 0, 5])
@example([7, 0])
@example([0, 0])
@example([10**9, 1, 0, 1])
def test_normalize_counts(counts: list[int]) -> None:
    c = torch.tensor([counts])
    f = normalize_counts(c)[0]
    if sum(counts) == 0:
        assert int(f.abs().sum()) == 0
        return
    assert int(f.sum()) == TOTAL and int(f.max()) < TOTAL and int(f.min()) >= 0
    assert bool(((c[0] > 0) <= (f > 0)).all()), "a present symbol got zero frequency"
    cdf = freq_to_cdf(f)
    assert int(cdf[0]) == 0 and int(cdf[-1]) == TOTAL


def test_ac_encode_rejects_bad_arguments() -> None:
    sym = torch.tensor([[0, 1, 2]], dtype=torch.uint8)
    table = ref.cdf(torch.tensor([[0, 1, 1]], dtype=torch.uint8), 3)  # symbol 2 has zero frequency
    with pytest.raises(ValueError, match="symbols"):
        codec.ac_encode(sym, table)
    with pytest.raises(TypeError, match="symbols"):
        codec.ac_encode(sym.to(torch.int32), table)
    bad = table.clone()
    bad[0, -1] = TOTAL - 1
    with pytest.raises(ValueError, match="cdf"):
        codec.ac_encode(sym[:, :2], bad)
    with pytest.raises(ValueError, match="lengths"):
        codec.ac_decode(b"abc", torch.tensor([1]), table, 3)


# ------------------------------------------------------------------------------------------------ chunks
@st.composite
def chunks(draw: st.DrawFn) -> torch.Tensor:
    L = draw(st.integers(1, 3))
    T = draw(st.integers(1, 9))
    H = draw(st.integers(1, 2))
    D = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    mla = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "outliers", "zeros", "tiny", "huge"]))
    g = torch.Generator().manual_seed(seed)
    shape = (L, 1, T, D) if mla else (L, 2, T, H, D)
    x = torch.randn(shape, generator=g)
    if kind == "outliers":
        x = x * torch.where(torch.rand(shape, generator=g) < 0.05, 50.0, 1.0)
    elif kind == "zeros":
        x = torch.zeros(shape)
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "huge":
        x = x * 1e4
    return x.to(dtype)


def _check_error_bound(x: torch.Tensor, y: torch.Tensor, config: CodecConfig | None) -> None:
    """|x - y| <= scale / (2K) per element (+ the output dtype's rounding), scale recomputed independently."""
    config = config or CodecConfig()
    assert y.shape == x.shape and y.dtype == x.dtype
    xp, _ = ref.as_planes(x)
    yp, _ = ref.as_planes(y)
    L, P = xp.shape[:2]
    levels = ((ref.resolve_bins(config, L, P) - 1) // 2).double()
    eps = torch.finfo(x.dtype).eps
    tiny = torch.finfo(x.dtype).tiny
    for p in range(P):
        axis = config.key_scale_axis if p == 0 else config.value_scale_axis
        absmax = xp[:, p].double().abs().amax(dim=1 if axis == "channel" else (2, 3), keepdim=True)
        scale = absmax * (1 + 2**-7)  # bf16 rounded up: at most one bf16 ulp above
        bound = scale / (2 * levels[:, p, None, None, None]) + yp[:, p].double().abs() * eps + tiny
        err = (xp[:, p].double() - yp[:, p].double()).abs()
        assert bool((err <= bound).all()), f"plane {p}: max excess {float((err - bound).max())}"


CONFIGS = [None, CodecConfig(table_groups=0), CodecConfig(table_groups=2, key_bins_late=3),
           CodecConfig(key_scale_axis="channel"), CodecConfig(key_scale_axis="channel", value_scale_axis="channel")]


@given(chunks(), st.sampled_from(CONFIGS))
def test_decode_encode_error_bounded_and_backends_identical(x: torch.Tensor, config: CodecConfig | None) -> None:
    blob = codec.encode(x, config=config, backend="reference")
    y = codec.decode(blob, backend="reference")
    _check_error_bound(x, y, config)
    if EXT:
        assert codec.encode(x, config=config, backend="ext") == blob
        assert torch.equal(codec.decode(blob, backend="ext").view(torch.uint8), y.view(torch.uint8))


def test_real_sized_chunk_ext_round_trip_and_size() -> None:
    needs_ext()
    g = torch.Generator().manual_seed(1)
    # Channels with different spreads, as real KV has: shared tables must still code them compactly.
    spread = torch.rand(1, 1, 1, 4, 64, generator=g) * 3 + 0.1
    x = (torch.randn(8, 2, 256, 4, 64, generator=g) * spread).to(torch.float16)
    blob = codec.encode(x, backend="ext")
    y = codec.decode(blob, backend="ext")
    _check_error_bound(x, y, None)
    info = codec.inspect(blob)
    assert info["shape"] == tuple(x.shape) and info["groups"] == 16
    sections = info["bytes"]
    assert sum(sections.values()) == len(blob)
    assert sections["tables"] <= 0.10 * sections["payload"], sections
    per_stream = codec.encode(x, config=CodecConfig(table_groups=0), backend="ext")
    assert codec.inspect(per_stream)["bytes"]["tables"] > 3 * sections["tables"]
    assert torch.equal(codec.decode(per_stream), y)  # same quantization, different tables


def _pinned_chunk() -> torch.Tensor:
    """``[3, 2, 20, 2, 16]`` fp16 from integer arithmetic only (multiples of 1/32, exact in fp16; four outlier
    channels), so the input is the same on every machine and torch version."""
    i = torch.arange(3 * 2 * 20 * 2 * 16)
    x = (((i * 7919 % 251) - 125).float() / 32).reshape(3, 2, 20, 2, 16)
    x[..., :4] *= 4
    return x.half()


PINNED = [  # (config, blob length, sha256 of the blob)
    (None, 5912, "8a0bcd3e7315a4e60e97c03ecaed61b3c9d34d49efb675b2ac41839b60f039fe"),
    (CodecConfig(table_groups=0), 9086, "e6196518126e5fd8578f431b0fa4912c63aa8a58ab02596efcab560d287efc6e"),
    (CodecConfig(key_scale_axis="token", exact_leading_tokens=0), 5321,
     "439591e3ab37f5f7b2765b24c085a58169257f1da6ae356886eb26551ee9ec35"),
]


@pytest.mark.parametrize(("config", "size", "digest"), PINNED, ids=["default", "per-stream-tables", "cachegen"])
def test_blob_bytes_pinned(config: CodecConfig | None, size: int, digest: str) -> None:
    # Stored blobs outlive the code: a change here means every stored blob decodes differently. Change the
    # pipeline or the format only with a new fmt.VERSION (and new digests).
    x = _pinned_chunk()
    blob = codec.encode(x, config=config, backend="reference")
    assert (len(blob), hashlib.sha256(blob).hexdigest()) == (size, digest)
    for backend in BACKENDS:
        assert codec.encode(x, config=config, backend=backend) == blob
    _check_error_bound(x, codec.decode(blob), config)


def test_all_zero_chunk() -> None:
    x = torch.zeros(2, 2, 5, 1, 3, dtype=torch.bfloat16)
    blob = codec.encode(x, backend="reference")
    assert codec.inspect(blob)["bytes"]["payload"] == 0
    y = codec.decode(blob)
    assert torch.equal(y, x) and y.dtype == torch.bfloat16


def test_bins_follow_layer_fraction_and_travel_in_blob() -> None:
    bins = codec.resolve_bins(None, 32)
    assert bins[:10, 0].eq(32).all() and bins[10:, 0].eq(16).all()
    assert bins[:2, 1].eq(32).all() and bins[2:, 1].eq(16).all()
    config = CodecConfig(key_bins_early=5, key_bins_late=3, value_bins_early=255, value_bins_late=7)
    x = torch.randn(4, 2, 6, 1, 8)
    blob = codec.encode(x, config=config, backend="reference")
    assert codec.inspect(blob)["bins"].tolist() == ref.resolve_bins(config, 4, 2).tolist()
    _check_error_bound(x, codec.decode(blob), config)  # decoding needs no config


def test_bins_above_one_byte_are_refused_before_encoding() -> None:
    # The blob keeps bins in one byte per (layer, plane): 256 once encoded a blob that no decoder accepted.
    with pytest.raises(ValueError, match=r"bins value must be in \[3, 255\]"):
        codec.encode(torch.randn(2, 2, 4, 1, 8), config=CodecConfig(key_bins_early=256))
    with pytest.raises(ConfigError, match="codec.value_bins_late"):
        load({"codec": {"value_bins_late": 256}})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_a_clear_error(bad: float) -> None:
    x = torch.zeros(1, 2, 3, 1, 4)
    x[0, 1, 2, 0, 3] = bad
    with pytest.raises(ValueError, match="chunk.*NaN or inf"):
        codec.encode(x)
    with pytest.raises(ValueError, match="chunk"):
        codec.quantize(x)


def test_bad_chunk_arguments() -> None:
    with pytest.raises(TypeError, match="chunk"):
        codec.encode(torch.zeros(1, 2, 3, 1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk"):
        codec.encode(torch.zeros(1, 3, 3, 1, 4))
    with pytest.raises(ValueError, match="chunk"):
        codec.encode(torch.zeros(1, 2, 0, 1, 4))
    with pytest.raises(TypeError, match="chunk"):
        codec.encode(np.zeros((1, 2, 3, 1, 4)))
    with pytest.raises(TypeError, match="config"):
        codec.encode(torch.zeros(1, 2, 3, 1, 4), config={"table_groups": 1})
    with pytest.raises(TypeError, match="blob"):
        codec.decode("not bytes")


# ------------------------------------------------------------------------------------------------ fuzzing
def _sample_blob() -> bytes:
    g = torch.Generator().manual_seed(3)
    return codec.encode(torch.randn(2, 2, 7, 1, 6, generator=g), config=CodecConfig(table_groups=2),
                        backend="reference")


SAMPLE = _sample_blob()


def _reseal(body: bytes) -> bytes:
    """A forged blob: altered body with a valid CRC, so the structural checks (not the CRC) must catch it."""
    return body + struct.pack("<I", zlib.crc32(body))


def _decode_all_backends(blob: bytes) -> None:
    for backend in BACKENDS:
        with pytest.raises(CodecError):
            codec.decode(blob, backend=backend)


@given(st.data())
def test_fuzzed_blobs_raise_codec_error(data: st.DataObject) -> None:
    blob = bytearray(SAMPLE)
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "random"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=16))
    else:
        blob = bytearray(data.draw(st.binary(max_size=200)))
    assume(bytes(blob) != SAMPLE)  # two flips of one byte can cancel out; the intact blob must decode
    _decode_all_backends(bytes(blob))


@given(st.integers(0, len(SAMPLE) - 5), st.integers(1, 255))
@example(8, 0xFF)  # L
@example(12, 0x80)  # T
@example(24, 0x01)  # groups
@example(26, 0x07)  # length width
@example(27, 0x07)  # exact tokens E (>= T)
@example(33, 0x55)  # inside the exact token 0 (after 4 bins bytes)
def test_forged_blobs_with_valid_crc_raise_codec_error(pos: int, xor: int) -> None:
    body = bytearray(SAMPLE[:-4])
    body[pos] ^= xor
    forged = _reseal(bytes(body))
    for backend in BACKENDS:
        try:
            y = codec.decode(forged, backend=backend)
        except CodecError:
            continue
        # A change inside the payload or the scales can decode to other finite values of the right shape.
        assert y.shape == (2, 2, 7, 1, 6) and bool(torch.isfinite(y).all())


def test_exact_tokens_round_trip_bit_exact_and_a_forged_nan_is_refused() -> None:
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(2, 2, 9, 1, 4, generator=g) * 50).to(dtype)
        for e, want in ((0, 0), (3, 3), (100, 8)):  # at least one token is always quantized
            blob = codec.encode(x, config=CodecConfig(exact_leading_tokens=e), backend="reference")
            assert codec.inspect(blob)["exact_tokens"] == want
            y = codec.decode(blob)
            assert torch.equal(y[:, :, :want], x[:, :, :want]) and y.dtype == dtype
    parsed = fmt.unpack(SAMPLE)
    assert parsed.exact_tokens == 1
    parsed.exact = np.full(len(parsed.exact) // 4, np.nan, dtype="<f4").tobytes()
    _decode_all_backends(fmt.pack(parsed))


def test_huge_header_sizes_are_refused_before_allocation() -> None:
    head = fmt.HEADER.pack(fmt.MAGIC, fmt.VERSION, 0, 1, 2, 4096, 1 << 24, 4096, 65536, 0, 8, 0)
    _decode_all_backends(_reseal(head))
    head = fmt.HEADER.pack(fmt.MAGIC, fmt.VERSION, 0, 1, 2, 1, 1000, 1, 1, 0, 8, 0)  # claims 4000 bytes of scales
    _decode_all_backends(_reseal(head + b"\x03\x03"))
    head = fmt.HEADER.pack(fmt.MAGIC, fmt.VERSION, 0, 1, 2, 1, 1000, 1, 1, 0, 8, 999)  # 15984 exact bytes claimed
    _decode_all_backends(_reseal(head + b"\x03\x03"))
    _decode_all_backends(_reseal(b"LKCG" + bytes([3]) + SAMPLE[5:-4]))  # unknown version
    _decode_all_backends(_reseal(b"LKCG" + bytes([1]) + SAMPLE[5:-4]))  # version 1 (no E field) is foreign now
    _decode_all_backends(b"PK\x03\x04" + SAMPLE[4:])  # foreign magic


def test_stored_blob_never_unpickled() -> None:
    import pickle

    _decode_all_backends(pickle.dumps({"k": torch.zeros(2)}))
