"""KV geometry and dtype names shared by every component.

The canonical lmkv chunk tensor is ``[L, 2, T, H, D]`` (layers, K/V, tokens, KV heads, head dim);
for MLA models, whose cache holds one latent vector per token, it is ``[L, 1, T, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Stable short names and 1-byte codes: they go into keys and stored headers, so never renumber them.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "f8e4m3",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.float64: "f64",
    torch.float8_e5m2: "f8e5m2",
}
DTYPE_CODES: dict[torch.dtype, int] = {dt: i + 1 for i, dt in enumerate(DTYPE_NAMES)}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
DTYPES_BY_CODE: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by lmkv (supported: {sorted(DTYPES_BY_NAME)})") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r} (known: {sorted(DTYPES_BY_NAME)})") from None


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one model's KV cache.

    Attributes:
        num_layers: L, attention layers that keep a KV cache.
        num_kv_heads: H, key/value heads (1 for MLA, which caches a single latent).
        head_dim: D, per-head dimension (for MLA: the latent + rope dimension).
        dtype: the dtype of the cached tensors.
        mla: True for multi-head latent attention caches (``[L, 1, T, D]`` chunks).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVGeometry.{name} must be a positive int, got {value!r}")
        dtype_name(self.dtype)
        if self.mla and self.num_kv_heads != 1:
            raise ValueError(f"KVGeometry.num_kv_heads must be 1 for MLA, got {self.num_kv_heads}")

    @property
    def kv_planes(self) -> int:
        """2 (K and V) for ordinary attention, 1 for MLA."""
        return 1 if self.mla else 2

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        """``[L, 2, T, H, D]``, or ``[L, 1, T, D]`` for MLA."""
        if self.mla:
            return (self.num_layers, 1, num_tokens, self.head_dim)
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * self.kv_planes * self.num_kv_heads * self.head_dim * elem

    def tag(self) -> str:
        """Compact, stable text form used inside storage keys, e.g. ``L30.H3.D64.bf16``."""
        return f"L{self.num_layers}.H{self.num_kv_heads}.D{self.head_dim}.{dtype_name(self.dtype)}" + (
            ".mla" if self.mla else ""
        )

    def check_chunk(self, chunk: torch.Tensor, name: str = "chunk") -> int:
        """Validate a chunk tensor against this geometry; returns its token count T."""
        if not isinstance(chunk, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(chunk).__name__}")
        if chunk.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {chunk.dtype}, geometry expects {self.dtype}")
        want = self.chunk_shape(chunk.shape[2] if chunk.dim() >= 3 else -1)
        if chunk.dim() != len(want) or tuple(chunk.shape) != want:
            raise ValueError(f"{name} has shape {tuple(chunk.shape)}, geometry expects {want} (T free)")
        return int(chunk.shape[2])

    @classmethod
    def from_hf_config(cls, config, dtype: torch.dtype | None = None) -> KVGeometry:
        """Geometry of a transformers ``PretrainedConfig`` (LLaMA, Qwen2, Mistral and friends)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = int(text.num_hidden_layers)
        heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if dtype is None:
            dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or torch.float32
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
        return cls(layers, heads, int(head_dim), dtype)
