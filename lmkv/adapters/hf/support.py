"""The one check of what the transformers adapter serves exactly; everything else raises :class:`Unsupported`.

Prefix reuse (``generate``) needs full attention in every layer: a sliding window, or layers of another kind
(linear attention, chunked, ...), make a reused cache differ from a fresh prefill. CacheBlend (``blend=True``)
additionally runs its own forward over the model's modules, so it needs a LLaMA-family decoder it knows, and
RoPE it can re-rotate: one whose rotation depends on the position alone (:mod:`lmkv.rope`), applied without
attention scaling, and matching the frequencies the model's own rotary embedding uses.
"""

from __future__ import annotations

from typing import Any

import torch

from lmkv.errors import Unsupported
from lmkv.rope import RopeSpec

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _refuse_attention(text: Any) -> None:
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise Unsupported(
            f"model has non-full-attention layers {sorted(set(layer_types))}: lmkv reuse supports full attention only"
        )
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) is not False:
        raise Unsupported(
            f"model uses sliding-window attention (sliding_window={window}); lmkv refuses it because a reused "
            "window cache is not equivalent to a fresh prefill"
        )


def decoder(model: Any) -> Any:
    """The decoder (``model.model`` of a ``*ForCausalLM``) whose modules the blended forward runs."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise Unsupported(f"model: blending supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    inner = getattr(model, "model", None)
    for part in _DECODER_PARTS:
        if inner is None or not hasattr(inner, part):
            raise Unsupported(f"model: expected a *ForCausalLM with .model.{part} (LLaMA family)")
    return inner


def rope_spec(model: Any) -> RopeSpec:
    """The model's :class:`RopeSpec`, checked against the frequencies its own rotary embedding uses."""
    rotary = decoder(model).rotary_emb
    spec = RopeSpec.from_hf_config(model.config)  # raises Unsupported for RoPE types that cannot be re-rotated
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise Unsupported("model: RoPE with attention scaling on cos/sin cannot be re-rotated")
    inv = getattr(rotary, "inv_freq", None)
    if inv is None or inv.shape[0] != spec.rotary_dim // 2 or not torch.allclose(
        inv.float().cpu(), spec.inv_freq(), rtol=1e-6, atol=0
    ):
        raise Unsupported("model: its rotary embedding does not match the RoPE read from its config")
    return spec


def refuse_unsupported(model_or_config: Any, *, blend: bool = False) -> None:
    """Raise :class:`lmkv.errors.Unsupported` (a ValueError) naming what lmkv cannot serve exactly.

    Args:
        model_or_config: a transformers model, or its config (enough unless ``blend``).
        blend: also check what CacheBlend needs (a known LLaMA-family decoder, re-rotatable RoPE); needs the model.
    """
    config = getattr(model_or_config, "config", model_or_config)
    _refuse_attention(_text_config(config))
    if blend:
        if config is model_or_config:
            raise TypeError("refuse_unsupported(blend=True) needs the model, not only its config")
        rope_spec(model_or_config)
