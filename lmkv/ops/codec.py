"""CacheGen KV codec: quantize, tables, range coding and the blob format, behind one interface.

``encode(chunk [L, 2, T, H, D] or [L, 1, T, D], *, config=None, backend=None) -> bytes`` and
``decode(blob, *, backend=None) -> Tensor`` (same shape and dtype). Backends: ``ext`` (C++ coder, OpenMP over
streams; auto on CPU) and the pure-Python ``reference`` (readable, slow: small inputs). All produce identical
bytes. A bad blob raises :class:`lmkv.errors.CodecError`; bad arguments raise ValueError/TypeError naming them.
"""

from __future__ import annotations

from typing import Any

import torch

from lmkv._dispatch import Backend, Op, register
from lmkv.config import CodecConfig
from lmkv.reference import codec as ref
from lmkv.reference import codec_format as fmt

_EXT = "lmkv.optimized.ext_codec"


def _ext(fn: str) -> Backend:
    return Backend("ext", f"{_EXT}:{fn}", devices={"cpu"}, auto_devices={"cpu"})


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


def _validate_encode(chunk: Any, *, config: Any = None) -> tuple[tuple, dict]:
    _check_chunk(chunk, config)
    return (chunk.detach().cpu(),), {"config": config}


def _validate_decode(blob: Any) -> None:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob: expected bytes, got {type(blob).__name__}")


def _validate_quantize(chunk: Any, config: Any = None) -> None:
    _check_chunk(chunk, config)


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


quantize = register(Op("codec.quantize", ref.quantize, validate=_validate_quantize))
dequantize = register(Op("codec.dequantize", ref.dequantize))
cdf = register(Op("codec.cdf", ref.cdf))
ac_encode = register(Op("codec.ac_encode", ref.ac_encode, _ext("ac_encode"), validate=_validate_ac_encode))
ac_decode = register(Op("codec.ac_decode", ref.ac_decode, _ext("ac_decode"), validate=_validate_ac_decode))
encode = register(Op("codec.encode", ref.encode, _ext("encode"), validate=_validate_encode))
decode = register(Op("codec.decode", ref.decode, _ext("decode"), validate=_validate_decode))


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


__all__ = ["encode", "decode", "quantize", "dequantize", "cdf", "ac_encode", "ac_decode", "resolve_bins", "inspect"]
