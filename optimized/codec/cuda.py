"""CUDA backend of ``codec.ac_encode`` / ``codec.ac_decode``: the range coder of csrc/cuda/codec.cu over
csrc/include/lmkv/rangecoder.h (the CPU coder's arithmetic, so the bytes are identical), one GPU thread per stream.

Limits: symbols uint8 ``[S, T]``, tables ``[S, n + 1]`` with ``n <= 256``; a GPU is busy only with thousands of
streams (a 256-token chunk of a 30-layer model has ~11k). Inputs on the CPU are copied to the current CUDA device.
``ac_encode`` returns host bytes and host lengths (it synchronises once, for the payload's size); ``ac_decode``
returns the symbols on the tables' device, so dequantization can follow there. Launches go to the current torch
stream. Arguments are validated by :mod:`lmkv.ops.codec` before they get here.
"""

from __future__ import annotations

import torch

from lmkv.optimized import cuda
from lmkv.optimized.codec import payload_and_offsets
from lmkv.optimized.cuda import unavailable_reason as unavailable_reason

cuda.load()


def _device(t: torch.Tensor) -> torch.device:
    return t.device if t.is_cuda else cuda.current_device()


def ac_encode(symbols: torch.Tensor, cdf: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """symbols ``[S, T]`` uint8, cdf ``[S, n + 1]`` -> (the S coded streams concatenated, lengths ``[S]`` int64 on
    the CPU)."""
    data, lengths = ac_encode_tensor(symbols, cdf)
    return data.cpu().numpy().tobytes(), lengths.cpu()


def ac_encode_tensor(symbols: torch.Tensor, cdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`ac_encode` but the payload ``[sum(lengths)]`` and the lengths stay on the GPU (benchmarks)."""
    dev = _device(symbols)
    return torch.ops.lmkv.codec_ac_encode_cuda(symbols.to(dev).contiguous(),
                                               cdf.to(device=dev, dtype=torch.int32).contiguous())


def ac_decode(data: bytes | bytearray | memoryview | torch.Tensor, lengths: torch.Tensor, cdf: torch.Tensor,
              num_tokens: int) -> torch.Tensor:
    """Inverse of :func:`ac_encode`: stream s is ``data[sum(lengths[:s]) : sum(lengths[:s + 1])]`` decoded with
    ``cdf[s]`` -> symbols ``[S, num_tokens]`` uint8 on the tables' device."""
    dev = _device(cdf)
    data, offsets = payload_and_offsets(data, lengths)
    return torch.ops.lmkv.codec_ac_decode_cuda(data.to(dev), offsets.to(dev),
                                               cdf.to(device=dev, dtype=torch.int32).contiguous(), int(num_tokens))
