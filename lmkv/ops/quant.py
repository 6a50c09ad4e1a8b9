"""int8, fp8 (e4m3) and KIVI KV codecs, and the lossless raw codec: one blob format, dispatched row kernels.

``encode(chunk [L, 2, T, H, D] or MLA [L, 1, T, D], codec, *, axis, bits, group, residual, backend=None) -> bytes``
and ``decode(blob, *, expect=None, backend=None) -> Tensor`` (same shape and dtype, on the CPU) run the one blob
pipeline of :mod:`lmkv.reference.quant` (the spec: rounding rules, error bounds and the blob layout). Only the
row kernels have two implementations, so only they are dispatched: the ops ``quant.int8_quantize``,
``quant.int8_dequantize``, ``quant.fp8_quantize``, ``quant.fp8_dequantize``, ``quant.kivi_quantize`` and
``quant.kivi_dequantize`` have the ``ext`` backend (C++ CPU, csrc/cpu/quant.cpp; auto on CPU) and the
pure-PyTorch ``reference``, and they produce identical bytes. ``backend=`` of :func:`encode` / :func:`decode`
selects the kernels (as do ``use_backend("quant.*=ext")`` and ``LMKV_BACKEND``). A bad blob raises
:class:`lmkv.errors.CodecError`; bad arguments raise ValueError/TypeError naming them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lmkv._dispatch import Backend, Op, register
from lmkv.reference import quant as ref

CODECS = tuple(ref.CODEC_IDS)
VERSION = ref.VERSION
ERROR_BOUNDS = {
    "raw": "lossless: x_hat == x",
    "int8": "|x - x_hat| <= scale / 2, scale = max_c |x[l, p, t, c]| / 127 (per token)",
    "fp8": "|x - x_hat| <= max(|x| * 2**-4, scale * 2**-10), scale = absmax / 448 per token or per channel",
    "kivi": "|x - x_hat| <= scale / 2, scale = (max - min) / (2**bits - 1) per group; the last residual tokens exact",
}
_EXT = "lmkv.optimized.quant.ext"


def _ext(fn: str) -> Backend:
    return Backend("ext", f"{_EXT}:{fn}", devices={"cpu"}, auto_devices={"cpu"})


# ------------------------------------------------------------------------------------------------ validation
def _check_rows(x: Any, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.float32:
        raise TypeError(f"{name}: expected a 2-D float32 tensor [R, N]")
    if x.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got {x.device}")
    if not ref.all_finite(x):
        raise ValueError(f"{name}: contains NaN or inf; the codecs quantize finite values only")


def _check_kivi_params(bits: Any, group: Any) -> None:
    if isinstance(bits, bool) or bits not in ref.KIVI_BITS:
        raise ValueError(f"bits: expected one of {ref.KIVI_BITS}, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or not 1 <= group <= 0xFFFF:
        raise ValueError(f"group: expected an int in [1, 65535], got {group!r}")


def _check_codes(scales: Any, codes: Any, dtype: torch.dtype) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != dtype:
        raise TypeError(f"codes: expected a 2-D {dtype} tensor [R, N]")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.shape != codes.shape[:1]:
        raise TypeError(f"scales: expected float32 [{codes.shape[0]}]")


def _validate_kivi_quantize(x: Any, bits: Any, group: Any) -> None:
    _check_rows(x)
    _check_kivi_params(bits, group)


def _validate_kivi_dequantize(mins: Any, scales: Any, codes: Any, bits: Any, group: Any, n: Any) -> None:
    _check_kivi_params(bits, group)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != torch.uint8 \
            or codes.shape[1] != -(-n * bits // 8):
        raise TypeError(f"codes: expected uint8 [R, {-(-n * bits // 8)}]")
    want = (codes.shape[0], -(-n // group))
    for name, t in (("mins", mins), ("scales", scales)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != want:
            raise TypeError(f"{name}: expected float32 {list(want)}")


int8_quantize = register(Op("quant.int8_quantize", ref.int8_quantize, _ext("int8_quantize"), validate=_check_rows))
int8_dequantize = register(Op("quant.int8_dequantize", ref.int8_dequantize, _ext("int8_dequantize"),
                              validate=lambda scales, codes: _check_codes(scales, codes, torch.int8)))
fp8_quantize = register(Op("quant.fp8_quantize", ref.fp8_quantize, _ext("fp8_quantize"), validate=_check_rows))
fp8_dequantize = register(Op("quant.fp8_dequantize", ref.fp8_dequantize, _ext("fp8_dequantize"),
                             validate=lambda scales, codes: _check_codes(scales, codes, torch.uint8)))
kivi_quantize = register(Op("quant.kivi_quantize", ref.kivi_quantize, _ext("kivi_quantize"),
                            validate=_validate_kivi_quantize))
kivi_dequantize = register(Op("quant.kivi_dequantize", ref.kivi_dequantize, _ext("kivi_dequantize"),
                              validate=_validate_kivi_dequantize))
OPS = (int8_quantize, int8_dequantize, fp8_quantize, fp8_dequantize, kivi_quantize, kivi_dequantize)


def kernels(backend: str | None = None) -> ref.Kernels:
    """The row kernels ``backend`` selects (None: ``use_backend`` / ``LMKV_BACKEND``, then auto), resolved once.

    The pipeline builds valid rows by construction, so it calls the kernels themselves, not the Ops: the Ops'
    argument checks (a finiteness pass over every row) are paid once per chunk, not once per kernel."""
    return ref.Kernels(*(op.resolve(backend, "cpu")[1] for op in OPS))


def check_chunk(chunk: Any) -> None:
    """Raise TypeError/ValueError naming ``chunk`` unless it is a finite ``[L, P, T, H, D]`` (P in 1, 2) or MLA
    ``[L, 1, T, D]`` float32/float16/bfloat16 tensor within the blob format's limits."""
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"chunk: expected a torch.Tensor, got {type(chunk).__name__}")
    if chunk.dtype not in ref.DTYPES:
        raise TypeError(f"chunk: dtype {chunk.dtype} is not supported (float32, float16, bfloat16)")
    shape = tuple(chunk.shape)
    if not ((len(shape) == 5 and shape[1] in (1, 2)) or (len(shape) == 4 and shape[1] == 1)):
        raise ValueError(f"chunk: expected [L, 2, T, H, D] (or MLA [L, 1, T, D]), got shape {shape}")
    L, _, T = shape[:3]
    H, D = (1, shape[3]) if len(shape) == 4 else shape[3:]
    for name, value in (("L", L), ("T", T), ("H", H), ("D", D)):
        if not 1 <= value <= ref.LIMITS[name]:
            raise ValueError(f"chunk: {name}={value} outside [1, {ref.LIMITS[name]}] (shape {shape})")
    if chunk.numel() > ref.LIMITS["elements"]:
        raise ValueError(f"chunk: {chunk.numel()} elements exceed the codec limit {ref.LIMITS['elements']}")
    if not ref.all_finite(chunk):
        raise ValueError("chunk: contains NaN or inf; the codecs quantize finite values only")


def _check_params(codec: Any, axis: Any, bits: Any, group: Any, residual: Any) -> None:
    if codec not in CODECS:
        raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")
    if axis not in ref.AXES:
        raise ValueError(f"axis: expected one of {ref.AXES}, got {axis!r}")
    _check_kivi_params(bits, group)
    if isinstance(residual, bool) or not isinstance(residual, int) or not 0 <= residual < 1 << 32:
        raise ValueError(f"residual: expected an int in [0, 2**32), got {residual!r}")


# ------------------------------------------------------------------------------------------------ pipeline
def encode(chunk: torch.Tensor, codec: str, *, axis: str = "token", bits: int = 2, group: int = 32,
           residual: int = 32, backend: str | None = None) -> bytes:
    """chunk ``[L, 2, T, H, D]`` or MLA ``[L, 1, T, D]`` (fp32/fp16/bf16, any device) -> blob of ``codec``.

    ``axis`` (fp8: ``"token"`` or ``"channel"`` scales), ``bits`` (kivi: 2 or 4), ``group`` (kivi: tokens per key
    group, channels per value group) and ``residual`` (kivi: last tokens kept exact) are ignored by the codecs
    that have no such parameter. Every backend gives the same bytes.
    """
    check_chunk(chunk)
    _check_params(codec, axis, bits, group, residual)
    if codec == "kivi" and not bool(torch.isfinite(chunk.amax().float() - chunk.amin().float())):
        raise ValueError("chunk: its value range overflows float32, so no KIVI scale is finite")
    return ref.encode(chunk.detach().cpu(), codec, axis=axis, bits=bits, group=group, residual=residual,
                      kernels=kernels(backend))


PARAMS = {"raw": (), "int8": (), "fp8": ("axis",), "kivi": ("bits", "group", "residual")}


def encode_config(chunk: torch.Tensor, codec: str, config: Mapping[str, Any] | None = None, *,
                  backend: str | None = None) -> bytes:
    """:func:`encode` with the codec's parameters as a mapping (the registry's ``encode(chunk, config)``):
    ``config`` is None (defaults) or e.g. ``{"axis": "channel"}``; a key the codec does not have is an error."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config: expected None or a mapping of {codec} parameters, got {type(config).__name__}")
    params = dict(config or {})
    unknown = sorted(set(params) - set(PARAMS.get(codec, ())))
    if unknown:
        raise ValueError(f"config: codec {codec!r} has no parameter {unknown[0]!r} (has: {PARAMS.get(codec, ())})")
    return encode(chunk, codec, **params, backend=backend)


def decode(blob: bytes | bytearray | memoryview, *, expect: str | None = None,
           backend: str | None = None) -> torch.Tensor:
    """blob -> chunk of the encoded shape and dtype, on the CPU; CodecError on any bad blob, or (``expect``) on a
    blob of another codec. The header is checked and every size bounded before anything is allocated."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob: expected bytes, got {type(blob).__name__}")
    if expect is not None and expect not in CODECS:
        raise ValueError(f"expect: expected one of {CODECS} or None, got {expect!r}")
    return ref.decode(blob, expect, kernels=kernels(backend))


def inspect(blob: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Codec, params, shape, dtype and payload bytes of a blob (CodecError if bad)."""
    h, payload = ref.unpack(blob)
    return {"codec": h.codec, "version": VERSION, "shape": h.shape, "dtype": h.dtype, "param": h.param,
            "group": h.group, "exact_tokens": h.exact, "payload_bytes": len(payload),
            "bits_per_value": 8 * len(payload) / max(1, int(torch.Size(h.shape).numel()))}


__all__ = ["encode", "encode_config", "decode", "inspect", "kernels", "check_chunk", "ERROR_BOUNDS", "CODECS",
           "VERSION", "PARAMS", "int8_quantize", "int8_dequantize", "fp8_quantize", "fp8_dequantize",
           "kivi_quantize", "kivi_dequantize"]
