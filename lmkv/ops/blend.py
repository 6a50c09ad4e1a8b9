"""CacheBlend ops: RoPE re-rotation of cached keys (reference, C++ CPU, Triton; CUDA source compile-checked),
KV deviation and top-ratio token selection.

``rerotate(keys, old_positions, new_positions, rope)``: keys ``[..., T, H, D]`` (any leading dims; ``T`` tokens,
``H`` KV heads, ``D == rope.head_dim``), positions ``[T]`` integers; returns new keys rotated by
``new - old`` per token. See :mod:`lmkv.reference.blend` for the math.
"""

from __future__ import annotations

from typing import Any

import torch

from lmkv._dispatch import Backend, Op, register
from lmkv.reference import blend as ref
from lmkv.reference.rope import SUPPORTED_ROPE_TYPES, RopeSpec, apply_rotation

_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _validate_rerotate(
    keys: Any, old_positions: Any, new_positions: Any, rope: Any, **kwargs: Any
) -> tuple[tuple, dict]:
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch.Tensor [..., T, H, D], got {type(keys).__name__}")
    if keys.dtype not in _KEY_DTYPES:
        raise TypeError(f"keys must be float32, float16 or bfloat16, got {keys.dtype}")
    if keys.dim() < 3:
        raise ValueError(f"keys must be [..., T, H, D] (at least 3 dims), got shape {tuple(keys.shape)}")
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope must be a RopeSpec (RopeSpec.from_hf_config(config)), got {type(rope).__name__}")
    if keys.shape[-1] != rope.head_dim:
        raise ValueError(f"keys have head dim {keys.shape[-1]}, rope.head_dim is {rope.head_dim}")
    num_tokens = keys.shape[-3]
    out = []
    for name, pos in (("old_positions", old_positions), ("new_positions", new_positions)):
        if not isinstance(pos, torch.Tensor):
            pos = torch.as_tensor(pos)
        if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.is_complex():
            raise TypeError(f"{name} must hold integers, got {pos.dtype}")
        if pos.dim() != 1 or pos.shape[0] != num_tokens:
            raise ValueError(f"{name} must be [T] with T={num_tokens} (keys dim -3), got shape {tuple(pos.shape)}")
        if pos.numel() and (pos.min() < 0 or pos.max() >= 1 << 24):
            raise ValueError(f"{name} must lie in [0, 2**24) (exact in fp32), got [{pos.min()}, {pos.max()}]")
        out.append(pos.to(device=keys.device, dtype=torch.int64).contiguous())
    return (keys, out[0], out[1], rope), kwargs


rerotate = register(
    Op(
        "blend.rerotate",
        ref.rerotate,
        Backend("ext", "lmkv.optimized.ext_blend:rerotate", devices={"cpu"}, auto_devices={"cpu"}),
        Backend("triton", "lmkv.optimized.triton.blend:rerotate", devices={"cpu", "cuda"}, auto_devices={"cuda"}),
        validate=_validate_rerotate,
    )
)


def _validate_deviation(fresh: Any, cached: Any, **kwargs: Any) -> None:
    for name, t in (("fresh", fresh), ("cached", cached)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [T, H, D], got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, D], got shape {tuple(t.shape)}")
    if fresh.shape != cached.shape:
        raise ValueError(f"fresh {tuple(fresh.shape)} and cached {tuple(cached.shape)} must have the same shape")


token_deviation = register(Op("blend.token_deviation", ref.token_deviation, validate=_validate_deviation))

select_tokens = ref.select_tokens
selection_counts = ref.selection_counts

__all__ = [
    "rerotate", "token_deviation", "select_tokens", "selection_counts",
    "RopeSpec", "apply_rotation", "SUPPORTED_ROPE_TYPES",
]
