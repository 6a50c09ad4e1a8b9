"""Rotary position embeddings (RoPE) as HF LLaMA-family models apply them, read from a transformers config.

A model's rotary spec is shared data: the reference and the optimized re-rotation (:mod:`lmkv.reference.blend`,
:mod:`lmkv.optimized.blend`) both read it, so it lives in the core, not in either of them.

A key vector ``k`` of head dim ``D`` at position ``p`` is stored *rotated*: the first ``R`` dims (the rotary
dims, ``R = int(D * partial_rotary_factor)``, even) are split into two halves ``x1 = k[:R/2]``, ``x2 = k[R/2:R]``
(HF's ``rotate_half`` convention, not interleaved pairs) and each pair ``(x1[i], x2[i])`` is rotated by the
angle ``p * inv_freq[i]``::

    out[i]       = x1[i] * cos(p f_i) - x2[i] * sin(p f_i)
    out[i + R/2] = x2[i] * cos(p f_i) + x1[i] * sin(p f_i)          i = 0 .. R/2 - 1
    out[R:]      = k[R:]                                             (pass-through dims)

with ``f_i = inv_freq[i] = theta ** (-2i / R)`` for the default RoPE. LLaMA-3 scaled RoPE (``rope_type``
``"llama3"``) keeps the high frequencies, divides the low ones by ``factor`` and interpolates smoothly in
between; linear scaling divides every frequency by ``factor``. Rotations compose additively, so moving a key
from position ``p`` to ``q`` is one rotation by ``(q - p) f_i``: that is what CacheBlend's re-rotation does.

Only RoPE types whose rotation depends on the position alone (no ``attention_factor`` on cos/sin, no
sequence-length-dependent frequencies) can be re-rotated that way: ``default``, ``linear`` and ``llama3``.
YaRN, LongRoPE and dynamic NTK are refused with :class:`lmkv.errors.Unsupported` (a ValueError) naming the
type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lmkv.errors import Unsupported

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """Everything needed to (re-)rotate keys of one model.

    Attributes:
        head_dim: D, the per-head dimension of the keys.
        rotary_dim: R <= D, the leading dims that are rotated (even); the rest pass through.
        theta: the RoPE base (``rope_theta``).
        rope_type: ``"default"``, ``"linear"`` or ``"llama3"``.
        factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: scaling parameters
            (``factor`` for linear and llama3, the rest for llama3 only).
    """

    head_dim: int
    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"RopeSpec.head_dim must be a positive int, got {self.head_dim!r}")
        if not isinstance(self.rotary_dim, int) or self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"RopeSpec.rotary_dim must be a positive even int, got {self.rotary_dim!r}")
        if self.rotary_dim > self.head_dim:
            raise ValueError(f"RopeSpec.rotary_dim ({self.rotary_dim}) exceeds head_dim ({self.head_dim})")
        if not self.theta > 0:
            raise ValueError(f"RopeSpec.theta must be > 0, got {self.theta!r}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise Unsupported(
                f"RopeSpec.rope_type {self.rope_type!r} cannot be re-rotated (supported: {SUPPORTED_ROPE_TYPES})"
            )
        if not self.factor > 0:
            raise ValueError(f"RopeSpec.factor must be > 0, got {self.factor!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("RopeSpec: llama3 RoPE needs high_freq_factor > low_freq_factor")

    @classmethod
    def from_hf_config(cls, config: Any) -> RopeSpec:
        """Read theta, rotary dim and scaling from a transformers config (5.x ``rope_parameters``, or the older
        top-level ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor``)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        params = dict(getattr(text, "rope_parameters", None) or {})
        if params and all(isinstance(v, dict) for v in params.values()):
            raise Unsupported("config.rope_parameters is per layer type; lmkv re-rotates a single RoPE only")
        legacy = dict(getattr(text, "rope_scaling", None) or {})
        for key, value in legacy.items():
            params.setdefault(key, value)
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        theta = params.get("rope_theta", getattr(text, "rope_theta", None))
        if theta is None:
            raise Unsupported("config has no rope_theta (in rope_parameters or at top level)")
        partial = params.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None)) or 1.0
        rotary_dim = int(int(head_dim) * float(partial))
        return cls(
            head_dim=int(head_dim),
            rotary_dim=rotary_dim,
            theta=float(theta),
            rope_type=str(rope_type),
            factor=float(params.get("factor", 1.0) or 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", getattr(text, "max_position_embeddings", 8192))
            ),
        )

    def inv_freq(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[R/2]`` float32 frequencies, computed exactly as transformers computes them (same fp32 steps)."""
        dim = self.rotary_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        if self.rope_type == "linear":
            return inv / self.factor
        if self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


def apply_rotation(x: torch.Tensor, angle: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate ``x [..., T, H, D]`` by ``angle [T, R/2]`` (radians), half-split convention.

    The math runs in fp32 (float64 for float64 ``x``: what a float64 yardstick run of a whole model needs).
    Returns a new tensor of that compute dtype and the shape of ``x``; dims ``R:`` are copied unchanged.
    """
    half = rotary_dim // 2
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    cos = angle.cos().to(xf.dtype)[:, None, :]  # [T, 1, R/2]: broadcast over heads
    sin = angle.sin().to(xf.dtype)[:, None, :]
    x1, x2 = xf[..., :half], xf[..., half:rotary_dim]
    out = xf.clone()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rotary_dim] = x2 * cos + x1 * sin
    return out
