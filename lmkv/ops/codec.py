"""CacheGen KV codec: quantize, tables, range coding and the blob format.

``encode(chunk [L, 2, T, H, D] or [L, 1, T, D], *, config=None, backend=None) -> bytes`` and
``decode(blob, *, backend=None) -> Tensor`` (same shape and dtype) run the one pipeline of
:mod:`lmkv.reference.codec` (quantize -> streams -> tables -> coder -> blob). Only the range coder has two
implementations, so only it is dispatched: the ops ``codec.ac_encode`` / ``codec.ac_decode`` have the ``ext``
backend (C++ coder, OpenMP over streams; auto on CPU), the ``cuda`` backend (one GPU thread per stream; auto on
CUDA tensors, and for ``decode(blob, device="cuda")``) and the pure-Python ``reference`` (readable, slow: small
inputs), and they produce identical bytes. ``backend=`` of :func:`encode` / :func:`decode` selects the coder
(as do ``use_backend("codec.*=ext")`` and ``LMKV_BACKEND``). :func:`quantize`, :func:`dequantize` and
:func:`cdf` are plain functions. A bad blob raises :class:`lmkv.errors.CodecError`; bad arguments raise
ValueError/TypeError naming them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmkv._dispatch import Backend, Op
from lmkv._dispatch import register as _register_op
from lmkv.config import CodecConfig
from lmkv.ops import quant as _quant  # int8 / fp8 / kivi / raw; kernels load on first use
from lmkv.reference import codec as ref
from lmkv.reference import codec_format as fmt

_EXT, _CUDA = "lmkv.optimized.codec.ext", "lmkv.optimized.codec.cuda"


def _ext(fn: str) -> Backend:
    return Backend("ext", f"{_EXT}:{fn}", devices={"cpu"}, auto_devices={"cpu"})


def _cuda(fn: str) -> Backend:
    return Backend("cuda", f"{_CUDA}:{fn}", devices={"cuda"}, auto_devices={"cuda"})


def _check_chunk(chunk: Any, config: Any) -> None:
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"chunk: expected a torch.Tensor, got {type(chunk).__name__}")
    if chunk.dtype not in fmt.CODEC_DTYPES:
        raise TypeError(f"chunk: dtype {chunk.dtype} is not supported (float32, float16, bfloat16)")
    ref.as_planes(chunk)  # raises ValueError naming chunk on a bad shape
    if chunk.numel() == 0:
        raise ValueError(f"chunk: every dimension must be >= 1, got shape {tuple(chunk.shape)}")
    if chunk.numel() > fmt.LIMITS["elements"]:
        raise ValueError(f"chunk: {chunk.numel()} elements exceed the codec limit {fmt.LIMITS['elements']}")
    if config is not None and not isinstance(config, CodecConfig):
        raise TypeError(f"config: expected lmkv.config.CodecConfig or None, got {type(config).__name__}")
    if not bool(torch.isfinite(chunk).all()):
        raise ValueError("chunk: contains NaN or inf; the codec quantizes finite values only")


def _validate_decode(blob: Any) -> None:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob: expected bytes, got {type(blob).__name__}")


def _check_cdf(cdf: Any) -> torch.Tensor:
    if not isinstance(cdf, torch.Tensor) or cdf.dim() != 2 or cdf.dtype.is_floating_point:
        raise TypeError("cdf: expected a 2-D integer tensor [S, n + 1]")
    n = cdf.shape[1] - 1
    if not 1 <= n <= 256:
        raise ValueError(f"cdf: alphabet of {n} symbols outside [1, 256]")
    c = cdf.to(torch.int64)
    if bool((c[:, 0] != 0).any() | (c[:, -1] != 1 << 16).any() | (c.diff(dim=1) < 0).any()):
        raise ValueError("cdf: each row must rise from 0 to 65536")
    return c


def _validate_ac_encode(symbols: Any, cdf: Any) -> None:
    if not isinstance(symbols, torch.Tensor) or symbols.dim() != 2 or symbols.dtype != torch.uint8:
        raise TypeError("symbols: expected a 2-D uint8 tensor [S, T]")
    c = _check_cdf(cdf)
    n = c.shape[1] - 1
    if cdf.shape[0] != symbols.shape[0]:
        raise ValueError(f"cdf: has {cdf.shape[0]} rows but symbols has {symbols.shape[0]} streams")
    if symbols.numel():
        if int(symbols.max()) >= n:
            raise ValueError(f"symbols: value {int(symbols.max())} outside the alphabet of {n}")
        s = symbols.to(torch.int64)
        if bool((c.gather(1, s + 1) == c.gather(1, s)).any()):
            raise ValueError("symbols: a symbol has zero frequency in its stream's cdf")


def _validate_ac_decode(data: Any, lengths: Any, cdf: Any, num_tokens: Any) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview, torch.Tensor)):
        raise TypeError(f"data: expected bytes, got {type(data).__name__}")
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or bool((lengths < 0).any()):
        raise ValueError("lengths: expected a 1-D tensor of non-negative stream lengths")
    if _check_cdf(cdf).shape[0] != lengths.shape[0]:
        raise ValueError("cdf: expected [S, n + 1] with one row per stream length")
    size = data.numel() if isinstance(data, torch.Tensor) else len(data)
    if int(lengths.sum()) != size:
        raise ValueError(f"lengths: sum {int(lengths.sum())} != {size} bytes of data")
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens: expected an int >= 0, got {num_tokens!r}")


def _tables_device(args: tuple, kwargs: dict) -> str:
    """A decode runs where its tables are: the payload arrives as host bytes either way."""
    cdf = kwargs.get("cdf", args[2] if len(args) > 2 else None)
    return cdf.device.type if isinstance(cdf, torch.Tensor) else "cpu"


ac_encode = _register_op(Op("codec.ac_encode", ref.ac_encode, _ext("ac_encode"), _cuda("ac_encode"),
                            validate=_validate_ac_encode))
ac_decode = _register_op(Op("codec.ac_decode", ref.ac_decode, _ext("ac_decode"), _cuda("ac_decode"),
                            validate=_validate_ac_decode, device_of=_tables_device))


def encode(chunk: torch.Tensor, *, config: CodecConfig | None = None, backend: str | None = None) -> bytes:
    """chunk ``[L, 2, T, H, D]`` or MLA ``[L, 1, T, D]`` (fp32/fp16/bf16, any device) -> blob bytes.

    ``backend`` selects the coder (``"ext"``, ``"cuda"``, ``"reference"``, ``"auto"``; None: ``use_backend`` /
    ``LMKV_BACKEND`` for ``codec.ac_encode``, then auto). Every coder gives the same bytes. Quantization and the
    tables run on the CPU, so auto picks a CPU coder even for a CUDA chunk; ``backend="cuda"`` codes the streams
    on the GPU (they are copied there).
    """
    _check_chunk(chunk, config)
    # The pipeline builds valid symbols and tables by construction: call the coder itself, not the Op, so the
    # Op's argument checks (passes over every symbol and table row) are not paid on every chunk.
    name = ac_encode.requested(backend)
    _, coder = ac_encode.resolve(backend, "cuda" if name == "cuda" else "cpu")
    return ref.encode_with(chunk.detach().cpu(), config, coder)


def decode(blob: bytes | bytearray | memoryview, *, backend: str | None = None,
           device: torch.device | str | None = None) -> torch.Tensor:
    """blob -> chunk of the encoded shape and dtype on ``device`` (default the CPU); CodecError on any bad blob.

    ``backend`` selects the coder as in :func:`encode`, among those that run on ``device``: with
    ``device="cuda"`` auto decodes the streams with the CUDA coder and dequantizes on the GPU, so only the
    compressed bytes cross PCIe. The blob's structure is checked on the host before any stream is decoded, so
    the coder only ever sees consistent lengths and tables.
    """
    _validate_decode(blob)
    target = torch.device(device) if device is not None else torch.device("cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {target} requested, but torch.cuda.is_available() is False here")
    _, decoder = ac_decode.resolve(backend, target.type)
    return ref.decode_with(blob, decoder, device=target)


def quantize(chunk: torch.Tensor, config: CodecConfig | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """chunk ``[L, 2, T, H, D]`` (or ``[L, 1, T, D]``) -> (symbols uint8 of the same shape, scales per plane).

    ``scales[p]`` is bfloat16 ``[L, T, 1, 1]`` (per token) or ``[L, 1, H, D]`` (per channel); see
    :func:`lmkv.reference.codec.quantize`. Bad arguments (and NaN/inf) raise ValueError/TypeError naming them.
    """
    _check_chunk(chunk, config)
    return ref.quantize(chunk, config)


def dequantize(symbols: torch.Tensor, scales: tuple[torch.Tensor, ...], bins: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: symbols ``[L, 2, T, H, D]`` (or ``[L, 1, T, D]``) uint8, scales as
    :func:`quantize` returns them, bins ``[L, P]`` -> values of ``dtype``, same shape."""
    return ref.dequantize(symbols, scales, bins, dtype)


def cdf(symbols: torch.Tensor, nbins: int) -> torch.Tensor:
    """Per-stream 16-bit cumulative tables: symbols ``[S, T]`` (values < nbins) -> ``[S, nbins + 1]`` int32,
    rising from 0 to 2**16, every occurring symbol with a non-zero frequency."""
    return ref.cdf(symbols, nbins)


def resolve_bins(config: CodecConfig | None, num_layers: int, planes: int = 2) -> torch.Tensor:
    """Bins per (layer, plane) that ``config`` gives a model of ``num_layers`` layers."""
    return ref.resolve_bins(config, num_layers, planes)


def inspect(blob: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Geometry, dtype, bins, exact leading tokens and bytes per part (payload, tables, scales, exact, meta) of a
    blob; CodecError if bad."""
    parsed = fmt.unpack(blob)
    values = parsed.L * parsed.P * parsed.T * parsed.C
    sections = parsed.section_bytes()
    shape = (parsed.L, 1, parsed.T, parsed.D) if parsed.mla else (parsed.L, parsed.P, parsed.T, parsed.H, parsed.D)
    return {
        "shape": shape,
        "dtype": parsed.dtype, "groups": parsed.groups, "bins": parsed.bins.copy(),
        "exact_tokens": parsed.exact_tokens, "bytes": sections,
        "bits_per_value": {k: 8 * v / values for k, v in sections.items()},
    }


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Codec:
    """A named KV codec: ``encode(chunk, config) -> bytes`` and ``decode(blob) -> chunk`` (same shape and dtype).

    Args:
        name: what tiers, the engine and experiments call it by (lowercase letters, digits, ``_``, ``-``).
        encode: ``encode(chunk [L, 2, T, H, D] or [L, 1, T, D], config) -> bytes``; ``config`` is the codec's own
            parameter object (or None for its defaults).
        decode: ``decode(blob) -> chunk``; a blob that is not this codec's (or is corrupt) raises CodecError.
        error_bound: the documented reconstruction bound, in words.
        version: the blob format version it writes (part of every blob's header).
    """

    name: str
    encode: Callable[[torch.Tensor, Any], bytes]
    decode: Callable[[bytes | bytearray | memoryview], torch.Tensor]
    error_bound: str
    version: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", self.name):
            raise ValueError(f"name: expected lowercase letters, digits, '_' or '-' (<= 64), got {self.name!r}")
        for field in ("encode", "decode"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{field}: expected a callable, got {type(getattr(self, field)).__name__}")
        if not isinstance(self.error_bound, str) or not self.error_bound:
            raise TypeError("error_bound: expected a non-empty description")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"version: expected an int >= 1, got {self.version!r}")


_CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` available by its name to :func:`get` (and so to every tier, the engine, the experiments).

    Raises TypeError for anything but a :class:`Codec`, ValueError for a name already registered."""
    if not isinstance(codec, Codec):
        raise TypeError(f"codec: expected lmkv.ops.codec.Codec, got {type(codec).__name__}")
    if codec.name in _CODECS:
        raise ValueError(f"codec: a codec named {codec.name!r} is already registered")
    _CODECS[codec.name] = codec
    return codec


def get(name: str) -> Codec:
    """The codec registered as ``name``; ValueError naming the registered ones otherwise."""
    codec = _CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise ValueError(f"codec: unknown codec {name!r} (registered: {', '.join(names())})")
    return codec


def names() -> list[str]:
    """Registered codec names, in registration order (the built-ins first)."""
    return list(_CODECS)


def _quant_codec(name: str) -> Codec:
    """A codec of lmkv.ops.quant; ``config`` is None or a mapping of its keyword parameters (axis, bits, ...)."""

    def enc(chunk: torch.Tensor, config: Any = None) -> bytes:
        return _quant.encode_config(chunk, name, config)

    def dec(blob: bytes | bytearray | memoryview) -> torch.Tensor:
        return _quant.decode(blob, expect=name)

    return Codec(name, enc, dec, _quant.ERROR_BOUNDS[name], _quant.VERSION)


def _cachegen_encode(chunk: torch.Tensor, config: Any = None) -> bytes:
    return encode(chunk, config=config)


def _cachegen_decode(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    return decode(blob)


register(_quant_codec("raw"))
register(Codec("cachegen", _cachegen_encode, _cachegen_decode,
               "|x - x_hat| <= scale / (2K) per element (scale = per-token absmax rounded up to bf16)", fmt.VERSION))
for _name in ("int8", "fp8", "kivi"):
    register(_quant_codec(_name))


__all__ = ["encode", "decode", "quantize", "dequantize", "cdf", "ac_encode", "ac_decode", "resolve_bins", "inspect",
           "Codec", "register", "get", "names"]
