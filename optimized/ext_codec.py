"""C++ CPU backend of the CacheGen codec: the range coder of csrc/cpu/codec.cpp, parallel over streams.

Limits: CPU only. Quantization, tables and the blob layout are the reference's (torch, already vectorised),
so only the coder differs and the bytes are identical to the reference by construction and by test. Building
the extension takes ~30 s once (cached under ``<cache_dir>/ext``).
"""

from __future__ import annotations

import torch

from lmkv.config import CodecConfig
from lmkv.optimized.ext import load_component
from lmkv.optimized.ext import unavailable_reason as unavailable_reason
from lmkv.reference import codec as ref

load_component("codec")


def ac_encode(symbols: torch.Tensor, cdf: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    data, lengths = torch.ops.lmkv.codec_ac_encode(symbols.contiguous(), cdf.to(torch.int32).contiguous())
    return data.numpy().tobytes(), lengths


def ac_encode_tensor(symbols: torch.Tensor, cdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`ac_encode` but returns the payload as a uint8 tensor (no copy to bytes): for benchmarks."""
    return torch.ops.lmkv.codec_ac_encode(symbols, cdf)


def ac_decode(data: bytes | torch.Tensor, lengths: torch.Tensor, cdf: torch.Tensor, num_tokens: int) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths.to(torch.int64), 0, out=offsets[1:])
    return torch.ops.lmkv.codec_ac_decode(data, offsets, cdf.to(torch.int32).contiguous(), int(num_tokens))


def encode(chunk: torch.Tensor, *, config: CodecConfig | None = None) -> bytes:
    return ref.encode_with(chunk, config, ac_encode)


def decode(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    return ref.decode_with(blob, ac_decode)
