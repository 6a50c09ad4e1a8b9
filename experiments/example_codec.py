"""A researcher's own KV codec in ~30 lines: 4-bit per-token absmax (``int4-token``), registered by name.

Notebook 02 shows this file and registers it; then every tier takes ``serde: int4-token`` through
``TieredStore(tiers, serdes=["int4-token"])`` and ``experiments/codec_frontier.py`` puts it on the frontier.
Blob: magic, ndim, 6 dims, an fp16 scale per token vector, 4-bit codes two per byte, CRC-32 of all before.
"""

from __future__ import annotations

import math
import struct
import zlib

import torch

from lmkv.errors import CodecError
from lmkv.ops import codec

HEAD = struct.Struct("<4sB6I")


def encode(chunk: torch.Tensor, config: object = None) -> bytes:
    """``[L, 2, T, H, D]`` (even ``H * D``) -> blob; ``|x - x_hat| <= scale / 2`` with ``scale = absmax / 7``."""
    x = chunk.float().reshape(-1, chunk.shape[-2] * chunk.shape[-1])  # one row per (layer, plane, token)
    scale = (x.abs().amax(1, keepdim=True) / 7).half().float()
    q = (torch.where(scale > 0, torch.round(x / scale.clamp_min(1e-30)), 0).clamp(-7, 7) + 8).to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    body = HEAD.pack(b"I4TK", chunk.dim(), *chunk.shape, *[0] * (6 - chunk.dim()))
    body += scale.half().numpy().tobytes() + packed.numpy().tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def decode(blob: bytes | bytearray | memoryview) -> torch.Tensor:
    blob = bytes(blob)
    if len(blob) < HEAD.size + 4 or blob[:4] != b"I4TK" or zlib.crc32(blob[:-4]) != int.from_bytes(blob[-4:], "little"):
        raise CodecError("int4-token: not an int4-token blob, or corrupt")
    _, ndim, *dims = HEAD.unpack_from(blob)
    shape = dims[:ndim] if 3 <= ndim <= 5 else []
    rows, width = math.prod(shape[:-2]), math.prod(shape[-2:])
    if not shape or width % 2 or len(blob) != HEAD.size + 2 * rows + rows * width // 2 + 4:
        raise CodecError("int4-token: bad shape or truncated")
    scale = torch.frombuffer(bytearray(blob[HEAD.size:HEAD.size + 2 * rows]), dtype=torch.float16).float()
    packed = torch.frombuffer(bytearray(blob[HEAD.size + 2 * rows:-4]), dtype=torch.uint8).view(rows, width // 2)
    q = torch.stack([packed & 15, packed >> 4], dim=-1).view(rows, width).float() - 8
    return (q * scale[:, None]).view(shape).half()


CODEC = codec.Codec("int4-token", encode, decode, "|x - x_hat| <= scale / 2, scale = per-token absmax / 7", 1)
