"""Sliding-window and hybrid models under lmkv.hf.generate: greedy output identical to plain model.generate.

A sliding layer's cache after a fresh prefill holds the last W - 1 tokens; lmkv's holds every token and lets
transformers slice the window, so a reused prefix must give attention exactly what a fresh prefill would. The
prompts here are shorter and longer than the window (W = 8), and hits end before, inside and after it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lmkv.hf
from lmkv import config as lmkv_config
from lmkv.adapters.hf.compat import output_cache
from lmkv.engine import KVEngine
from lmkv.errors import Unsupported
from lmkv.models import tiny_model

NEW = 5
WINDOW = 8
# (arch, overrides): hybrids (Gemma2/3, gpt-oss alternate sliding and full layers), all-sliding Mistral/Phi3, Qwen2
# with its upper layers sliding, and a Gemma3 whose layers are all full attention.
MODELS = {
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "gpt_oss": ("gpt_oss", {}),
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    "phi3": ("phi3", {"sliding_window": WINDOW}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}),
    "gemma3_full": ("gemma3", {"layer_types": ["full_attention"] * 4}),
}
_built: dict[str, object] = {}


def _model(name: str):
    if name not in _built:
        arch, over = MODELS[name]
        try:
            _built[name] = tiny_model(arch, seed=1, **over)
        except ValueError as e:  # an architecture the installed transformers lacks (gpt-oss before 4.55)
            pytest.skip(str(e))
    return _built[name]


def _engine(model, chunk_size: int) -> KVEngine:
    cfg = lmkv_config.load({"chunk_size": chunk_size, "memory": {"capacity": "16MiB"}, "disk": {"enabled": False}})
    return KVEngine.for_model(model, cfg)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _plain(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("name", list(MODELS))
@given(stored=st.integers(1, 30), extra=st.integers(0, 14), chunk=st.sampled_from([3, 4, 16]))
@example(stored=5, extra=0, chunk=4)  # the whole prompt shorter than the window, repeated
@example(stored=6, extra=5, chunk=4)  # a hit of 4 that ends inside the first window
@example(stored=21, extra=3, chunk=4)  # longer than the window, the hit ends inside the prompt's last window
@example(stored=30, extra=14, chunk=16)  # the computed part longer than the window
@settings(max_examples=3, deadline=None)
def test_reuse_equals_plain_generate(name: str, stored: int, extra: int, chunk: int) -> None:
    model = _model(name)
    engine = _engine(model, chunk)
    first = _ids(stored, seed=stored)
    cold = lmkv.hf.generate(model, first, engine=engine, max_new_tokens=NEW)
    assert cold.stats.hit_tokens == 0 and cold.stats.stored_tokens == stored
    assert torch.equal(cold.sequences, _plain(model, first))
    prompt = torch.cat([first, _ids(extra, seed=100 + extra)], dim=1)
    warm = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=NEW)
    want_hit = stored - 1 if extra == 0 else (stored // chunk) * chunk  # a longer prompt has other partial keys
    assert warm.stats.hit_tokens == want_hit
    assert torch.equal(warm.sequences, _plain(model, prompt))
    again = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=NEW)  # stored by the warm call
    assert again.stats.hit_tokens == prompt.shape[1] - 1
    assert torch.equal(again.sequences, warm.sequences)
    engine.close()


def test_sliding_kv_stored_is_the_whole_prompt() -> None:
    """A sliding layer stores every prompt token's KV, not only its window (a window-truncated store would serve
    wrong KV to a shorter prefix); what it stores agrees with a plain prefill's cache: all of a full layer, and the
    last W - 1 tokens a plain sliding layer keeps."""
    model = _model("gemma2")
    engine = _engine(model, 4)
    prompt = _ids(27, seed=3)
    lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=1)
    kv, n = engine.retrieve(prompt[0].tolist())
    assert n == 27
    with torch.no_grad():
        plain = output_cache(model(prompt, use_cache=True))  # transformers' own cache, window-truncated
    for i, layer in enumerate(plain.layers):
        kept = layer.keys.shape[-2]
        assert kept == (WINDOW - 1 if getattr(layer, "is_sliding", False) else 27)
        torch.testing.assert_close(kv[i, 0, 27 - kept:], layer.keys[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv[i, 1, 27 - kept:], layer.values[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    engine.close()


def test_beams_on_a_hybrid_model() -> None:
    model = _model("gemma3")
    engine = _engine(model, 4)
    prompt = _ids(19, seed=8)
    lmkv.hf.generate(model, prompt[:, :13], engine=engine, max_new_tokens=1)
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                              num_beams=3, num_return_sequences=2)
    got = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=NEW, do_sample=False, num_beams=3,
                           num_return_sequences=2)
    assert got.stats.hit_tokens == 12
    assert torch.equal(got.sequences, want)
    engine.close()


def test_layer_kinds_lmkv_cannot_rebuild_are_refused() -> None:
    """Linear-attention / recurrent hybrids (Qwen3-Next, Jamba) and chunked attention (Llama 4) keep state that a
    stored prefix does not rebuild: the shared unsupported-model error, naming the layer kind."""
    import transformers

    from lmkv.hf import refuse_unsupported

    small = dict(num_hidden_layers=4, hidden_size=64, vocab_size=256, num_attention_heads=4, num_key_value_heads=2)
    for name, kind in (("Qwen3NextConfig", "linear_attention"), ("JambaConfig", "linear_attention"),
                       ("Llama4TextConfig", "chunked_attention")):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        with pytest.raises(Unsupported, match=kind):
            refuse_unsupported(cls(**small))
    sliding = _model("mistral")
    refuse_unsupported(sliding)  # prefix reuse serves it
    with pytest.raises(Unsupported, match="sliding_attention"):
        refuse_unsupported(sliding, blend=True)  # the blend prefill computes full attention only
    engine = _engine(sliding, 4)
    with pytest.raises(Unsupported, match="CacheBlend"):
        lmkv.hf.generate(sliding, _ids(10, 1), engine=engine, blend=True, blend_separator=[5])
    engine.close()
