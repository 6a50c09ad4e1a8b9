"""C++ CPU backend of ``blend.rerotate`` (csrc/cpu/blend.cpp over csrc/include/lmkv/blend.h).

Limits: CPU tensors only; fp32/fp16/bf16 keys ``[..., T, H, D]``; fp32 math with cos/sin tabulated once per
token (std::cos/std::sin, which may differ from torch's by an ulp: agreement is "within 2x the reference's own
error", not bit-exact). Builds on first import (~30 s, cached).
"""

from __future__ import annotations

import torch

from lmkv.optimized.ext import load_component
from lmkv.optimized.ext import unavailable_reason as unavailable_reason
from lmkv.rope import RopeSpec

load_component("blend")


def rerotate(keys: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor,
             rope: RopeSpec) -> torch.Tensor:
    delta = (new_positions.to(torch.int64) - old_positions.to(torch.int64)).contiguous()
    return torch.ops.lmkv.blend_rerotate(keys, delta, rope.inv_freq(keys.device), rope.rotary_dim)
