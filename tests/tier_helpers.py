"""Small helpers the tier tests share: random payloads, raw-serde objects, and a read that decodes and releases."""

from __future__ import annotations

import torch

from lmkv.storage.serde import RawSerde


def random_bytes(n_bytes: int, seed: int) -> torch.Tensor:
    """``[n_bytes]`` uint8, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_bytes,), generator=g, dtype=torch.uint8)


def encode(key: str, kv: torch.Tensor, fp: bytes = b""):
    return RawSerde().encode(key, kv, fp)


def read(tier, key: str) -> torch.Tensor | None:
    """The decoded object under ``key`` in ``tier`` (None on a miss); the tier's object is released."""
    obj = tier.get(key)
    if obj is None:
        return None
    with obj:
        return RawSerde().decode(obj)
