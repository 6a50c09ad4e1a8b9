"""CUDA backend of ``blend.rerotate`` (csrc/cuda/blend.cu over csrc/include/lmkv/blend.h), built on first import.

Limits: CUDA tensors; fp32/fp16/bf16 keys ``[..., T, H, D]`` (made contiguous); fp32 math, one thread per rotated
pair, ``sincosf`` per (token, frequency) (accurate to an ulp or two, not bit-equal to torch: agreement is "within
2x the reference's own error"). Launches go to the current torch stream.
"""

from __future__ import annotations

import torch

from lmkv.optimized import cuda
from lmkv.optimized.cuda import unavailable_reason as unavailable_reason
from lmkv.rope import RopeSpec

cuda.load()


def rerotate(keys: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor,
             rope: RopeSpec) -> torch.Tensor:
    delta = (new_positions.to(torch.int64) - old_positions.to(torch.int64)).to(keys.device).contiguous()
    return torch.ops.lmkv.blend_rerotate_cuda(keys, delta, rope.inv_freq(keys.device), rope.rotary_dim)
