"""C++ CPU backend of ``codec.ac_encode`` / ``codec.ac_decode``: the range coder of csrc/cpu/codec.cpp over
csrc/include/lmkv/rangecoder.h, one independent stream per row, rows in parallel (OpenMP).

Limits: CPU tensors only; symbols uint8 ``[S, T]``, cumulative tables ``[S, n + 1]`` with ``n <= 256`` (cast to
int32 here). Arguments are validated by :mod:`lmkv.ops.codec` before they get here; the C++ side checks only
what keeps it memory-safe. Building the extension takes ~30 s once (cached under ``<cache_dir>/ext``).
"""

from __future__ import annotations

import torch

from lmkv.optimized.codec import payload_and_offsets
from lmkv.optimized.ext import load_component
from lmkv.optimized.ext import unavailable_reason as unavailable_reason

load_component("codec")


def ac_encode(symbols: torch.Tensor, cdf: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """symbols ``[S, T]`` uint8, cdf ``[S, n + 1]`` -> (the S coded streams concatenated, lengths ``[S]`` int64)."""
    data, lengths = ac_encode_tensor(symbols, cdf)
    return data.numpy().tobytes(), lengths


def ac_encode_tensor(symbols: torch.Tensor, cdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`ac_encode` but returns the payload as a uint8 tensor ``[sum(lengths)]`` (no copy to bytes):
    for benchmarks."""
    return torch.ops.lmkv.codec_ac_encode(symbols.contiguous(), cdf.to(torch.int32).contiguous())


def ac_decode(data: bytes | bytearray | memoryview | torch.Tensor, lengths: torch.Tensor, cdf: torch.Tensor,
              num_tokens: int) -> torch.Tensor:
    """Inverse of :func:`ac_encode`: stream s is ``data[sum(lengths[:s]) : sum(lengths[:s + 1])]`` decoded with
    ``cdf[s]`` -> symbols ``[S, num_tokens]`` uint8."""
    data, offsets = payload_and_offsets(data, lengths)
    return torch.ops.lmkv.codec_ac_decode(data, offsets, cdf.to(torch.int32).contiguous(), int(num_tokens))
