"""Serde plug-ins: how a KV tensor becomes a stored object's payload and back.

``raw`` stores the tensor's bytes as they are: zero-copy on encode; decode copies into ``out`` (any strides)
or wraps an owned buffer without a copy; ``view`` lends the stored bytes as a tensor without any copy.
``cachegen`` stores ``lmkv.ops.codec.encode(kv)`` (lossy quantization + lossless arithmetic coding), imported
lazily so the storage layer works before the codec exists. Any other codec of the registry (``int8``, ``fp8``,
``kivi``, one a researcher registered) is :class:`CodecSerde`, whose payload names its codec. The header
always records the decoded tensor's dtype and shape, so a reader needs no configuration to decode.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from lmkv.errors import CorruptObject
from lmkv.storage.objects import Encoded, ObjectHeader, dtype_code, validate_fields
from lmkv.types import DTYPES_BY_CODE


class Serde(Protocol):
    name: str
    code: int

    def encode(self, key: str, kv: torch.Tensor, fingerprint: bytes) -> Encoded: ...

    def decode(self, obj: Encoded, out: torch.Tensor | None = None) -> torch.Tensor: ...


def _check_out(out: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype or tuple(out.shape) != shape:
        raise ValueError(f"out has {out.dtype} {tuple(out.shape)}, stored object is {dtype} {shape}")


def tensor_bytes(kv: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16/fp8 included)."""
    return memoryview(flat_bytes(kv).numpy()).cast("B")


def flat_bytes(kv: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a 1-D uint8 tensor view (no copy)."""
    if kv.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return kv.reshape(-1).view(torch.uint8)


def _bytes_tensor(buf: Any) -> tuple[torch.Tensor, bool]:
    """(uint8 tensor over ``buf``, whether it is a private copy). Read-only buffers are copied: torch has
    no read-only tensors."""
    if isinstance(buf, torch.Tensor):
        return flat_bytes(buf), False
    mv = memoryview(buf).cast("B")
    if len(mv) == 0:
        return torch.empty(0, dtype=torch.uint8), True
    if mv.readonly:
        return torch.frombuffer(bytearray(mv), dtype=torch.uint8), True
    return torch.frombuffer(mv, dtype=torch.uint8), False


def _nbytes(payload: Any) -> int:
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    return memoryview(payload).nbytes


class RawSerde:
    name = "raw"
    code = 1

    def encode(self, key: str, kv: torch.Tensor, fingerprint: bytes, *, as_is: bool = False) -> Encoded:
        """The object of ``kv``'s bytes. ``as_is``: the payload is ``kv`` itself, whatever its strides and device,
        for a tier that copies tensors (the memory tier, with one ``copy_``), and the caller has validated ``key``
        and ``fingerprint``; otherwise a contiguous CPU tensor."""
        shape = tuple(kv.shape)
        if not as_is:
            if kv.device.type != "cpu":
                kv = kv.to("cpu")
            kv = kv.contiguous()
            validate_fields(key, fingerprint, shape)  # as_is callers (TieredStore) checked every argument
        header = ObjectHeader(key, bytes(fingerprint), dtype_code(kv.dtype), shape, self.code,
                              kv.numel() * kv.dtype.itemsize)
        return Encoded(header, kv, owned=False, keepalive=kv)

    def header(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, fingerprint: bytes) -> ObjectHeader:
        """The header of a raw object of ``dtype`` and ``shape`` (for a payload written in place)."""
        validate_fields(key, fingerprint, shape)
        return ObjectHeader(key, bytes(fingerprint), dtype_code(dtype), shape, self.code,
                            math.prod(shape) * dtype.itemsize)

    def view(self, obj: Encoded) -> torch.Tensor:
        """The stored tensor as a zero-copy view of ``obj``'s payload: valid until ``obj`` is released."""
        h = obj.header
        dtype = DTYPES_BY_CODE[h.dtype_code]
        shape = tuple(h.shape)
        n = math.prod(shape)
        if n * dtype.itemsize != h.payload_len or _nbytes(obj.payload) != h.payload_len:
            raise CorruptObject(f"raw payload of {h.payload_len} bytes does not hold {dtype} {shape}")
        if not n:
            return torch.empty(shape, dtype=dtype)
        p = obj.payload
        if isinstance(p, torch.Tensor) and p.dtype == torch.uint8 and p.dim() == 1:  # pool slots, pooled reads
            return p.view(dtype).view(shape)
        return _bytes_tensor(p)[0].view(dtype).view(shape)

    def decode(self, obj: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor: copied into ``out`` (right dtype and shape, any strides and device), else a tensor
        that owns its memory (the payload itself when ``obj`` owns it, a copy otherwise)."""
        h = obj.header
        src = self.view(obj)
        if out is not None:
            _check_out(out, src.dtype, tuple(h.shape))
            if src.numel():
                out.copy_(src)  # torch's intra-op threads: every core the process may use
            return out
        if obj.owned:
            obj.take()  # the result wraps the payload: it must outlive the object's release
            return src
        if not src.numel() or not isinstance(obj.payload, torch.Tensor) and _readonly(obj.payload):
            return src  # a private copy made by _bytes_tensor
        return src.clone()


def _readonly(buf: Any) -> bool:
    return memoryview(buf).readonly


def _decoded(what: str, h: ObjectHeader, decode: Any, out: torch.Tensor | None) -> torch.Tensor:
    """``decode()`` of a codec payload, checked against its header ``h`` and copied into ``out`` if given; a blob
    the codec refuses (CodecError is a ValueError) or one of another dtype or shape is a CorruptObject."""
    dtype = DTYPES_BY_CODE[h.dtype_code]
    try:
        kv = decode()
    except (ValueError, RuntimeError) as exc:
        raise CorruptObject(f"{what} payload of {h.key!r} does not decode: {exc}") from None
    if not isinstance(kv, torch.Tensor) or kv.dtype != dtype or tuple(kv.shape) != tuple(h.shape):
        got = f"{kv.dtype} {tuple(kv.shape)}" if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise CorruptObject(f"{what} payload decodes to {got}, header says {dtype} {tuple(h.shape)}")
    if out is not None:
        _check_out(out, dtype, tuple(h.shape))
        out.copy_(kv)
        return out
    return kv


class CacheGenSerde:
    name = "cachegen"
    code = 2

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @staticmethod
    def _codec() -> Any:
        from lmkv.ops import codec  # lazy: the codec is optional for storage

        return codec

    def encode(self, key: str, kv: torch.Tensor, fingerprint: bytes) -> Encoded:
        shape = tuple(int(s) for s in kv.shape)
        validate_fields(key, fingerprint, shape)
        blob = self._codec().encode(kv.contiguous(), config=self.config)
        header = ObjectHeader(key, bytes(fingerprint), dtype_code(kv.dtype), shape, self.code, len(blob))
        return Encoded(header, blob, owned=True)

    def decode(self, obj: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        return _decoded("cachegen", obj.header, lambda: self._codec().decode(bytes(obj.view())), out)


class CodecSerde:
    """Any codec of the registry (:func:`lmkv.ops.codec.get`: ``int8``, ``fp8``, ``kivi`` or a researcher's own).

    The payload is ``[u8 n][n bytes: the codec's name][the codec's blob]``: the object names its codec, so a reader
    decodes whatever codec the writer chose, without configuration. A name this process has not registered, a
    blob its codec refuses (``CodecError``: corrupt, truncated, another codec's) or one that decodes to another
    dtype or shape than the header's is a :class:`CorruptObject` (a miss with a warning, never wrong KV).

    ``name`` None: a reader only (``serde_for_code``), which learns the codec from each payload.
    """

    code = 3
    MAX_NAME = 64

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self._codec(name)  # ValueError naming the registered codecs
        self.name = name or "codec"

    @staticmethod
    def _codec(name: str) -> Any:
        from lmkv.ops import codec  # lazy: the codecs are optional for storage

        return codec.get(name)

    def encode(self, key: str, kv: torch.Tensor, fingerprint: bytes) -> Encoded:
        shape = tuple(int(s) for s in kv.shape)
        validate_fields(key, fingerprint, shape)
        name = self.name.encode()
        blob = self._codec(self.name).encode(kv.contiguous(), None)
        payload = bytes([len(name)]) + name + bytes(blob)
        header = ObjectHeader(key, bytes(fingerprint), dtype_code(kv.dtype), shape, self.code, len(payload))
        return Encoded(header, payload, owned=True)

    def decode(self, obj: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        h = obj.header
        mv = memoryview(obj.view()).cast("B")
        n = mv[0] if len(mv) else 0
        if not 1 <= n <= min(self.MAX_NAME, len(mv) - 1):
            raise CorruptObject(f"codec payload of {h.key!r} names no codec (name length {n})")
        try:
            name = bytes(mv[1:1 + n]).decode("ascii")
            codec = self._codec(name)
        except (UnicodeDecodeError, ValueError):
            raise CorruptObject(f"object {h.key!r} was written by codec {bytes(mv[1:1 + n])!r}, which this process "
                                "has not registered (lmkv.ops.codec.register)") from None
        return _decoded(name, h, lambda: codec.decode(mv[1 + n:]), out)


SERDES: dict[str, type] = {"raw": RawSerde, "cachegen": CacheGenSerde}
SERDE_NAMES_BY_CODE = {RawSerde.code: "raw", CacheGenSerde.code: "cachegen", CodecSerde.code: "codec"}


def get_serde(name: str, config: Any = None) -> Serde:
    """The serde a tier encodes with: ``raw``, ``cachegen`` (``config``: its CodecConfig), or any codec registered
    in :mod:`lmkv.ops.codec` by name (``int8``, ``fp8``, ``kivi``, your own) with its default parameters."""
    if name == "raw":
        return RawSerde()
    if name == "cachegen":
        return CacheGenSerde(config)
    try:
        return CodecSerde(name)
    except (ValueError, TypeError):
        raise ValueError(f"serde must be raw, cachegen or a registered codec, got {name!r}") from None


def serde_for_code(code: int, config: Any = None) -> Serde:
    """The serde that decodes objects whose header carries ``code`` (a codec object names its own codec)."""
    if code == CodecSerde.code:
        return CodecSerde()
    try:
        return get_serde(SERDE_NAMES_BY_CODE[code], config)
    except KeyError:
        raise CorruptObject(f"unknown serde code {code}") from None


__all__ = ["Serde", "RawSerde", "CacheGenSerde", "CodecSerde", "get_serde", "serde_for_code", "tensor_bytes"]
