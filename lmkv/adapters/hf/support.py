"""The one check of what the transformers adapter serves exactly; everything else raises :class:`Unsupported`.

Prefix reuse (``generate``) serves full-attention and sliding-window layers: KV of a prefix is the same whether
computed now or earlier, and :mod:`lmkv.adapters.hf.cache` gives each layer what a fresh prefill leaves in it.
Layers of another kind (linear attention, recurrent state, chunked attention ...) are refused. CacheBlend
(``blend=True``) runs its own forward over the model's modules, so it needs full attention, a decoder it knows, and
RoPE it can re-rotate: one whose rotation depends on the position alone (:mod:`lmkv.rope`), applied without
attention scaling, and matching the frequencies the model's own rotary embedding uses.
"""

from __future__ import annotations

from typing import Any

import torch

from lmkv.errors import Unsupported
from lmkv.rope import RopeSpec

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
PREFIX_LAYER_TYPES = ("full_attention", "sliding_attention")
_DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def layer_types(config: Any) -> list[str]:
    """Each decoder layer's attention type as transformers lays out its cache (``DynamicCache(config=...)``):
    ``layer_types`` where the config has it, else ``sliding_attention`` where the layer has a ``sliding_window``."""
    from transformers import cache_utils

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    infer = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    if infer is not None:
        return list(infer(text)[0])
    found = getattr(text, "layer_types", None)  # transformers before the helper existed
    if found is None:
        window = getattr(text, "sliding_window", None)
        found = ["sliding_attention" if window else "full_attention"] * text.num_hidden_layers
    return list(found)


def has_sliding_layers(config: Any) -> bool:
    return "sliding_attention" in layer_types(config)


def _sliding_layers_record() -> bool:
    from transformers import cache_utils

    return hasattr(getattr(cache_utils, "DynamicSlidingWindowLayer", None), "activate_past_recording")


def _refuse_attention(config: Any, *, blend: bool) -> None:
    types = set(layer_types(config))
    others = types - set(PREFIX_LAYER_TYPES)
    if others:
        raise Unsupported(
            f"model has {sorted(others)} layers: lmkv reuse supports {list(PREFIX_LAYER_TYPES)} attention layers "
            "(linear-attention, recurrent and other layer kinds keep state a stored prefix cannot rebuild)"
        )
    if "sliding_attention" in types and not _sliding_layers_record():
        raise Unsupported("model uses sliding-window attention: reusing it needs a transformers whose "
                          "DynamicSlidingWindowLayer can record its past (activate_past_recording)")
    if blend and types != {"full_attention"}:
        raise Unsupported(f"model has layers of types {sorted(types)}: CacheBlend's prefill computes full "
                          "attention only")


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
    _refuse_attention(config, blend=blend)
    if blend:
        if config is model_or_config:
            raise TypeError("refuse_unsupported(blend=True) needs the model, not only its config")
        rope_spec(model_or_config)
