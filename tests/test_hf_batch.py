"""Left-padded batches under lmkv.hf.generate: each row reuses its own stored prefix, and the output is
token for token model.generate's on the same batch (greedy), at B = 1, 2, 4 with rows of different lengths
and different hits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lmkv.hf
from lmkv import config as lmkv_config
from lmkv.engine import KVEngine
from lmkv.models import tiny_model

NEW = 5
PAD = 0
_models: dict[str, object] = {}


def _model(arch: str):
    if arch not in _models:
        _models[arch] = tiny_model(arch, seed=2)
    return _models[arch]


def _engine(model, chunk_size: int = 8) -> KVEngine:
    cfg = lmkv_config.load({"chunk_size": chunk_size, "memory": {"capacity": "16MiB"}, "disk": {"enabled": False}})
    return KVEngine.for_model(model, cfg)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], attention_mask [B, T])``, rows padded on the left, as a tokenizer with
    ``padding_side='left'`` gives them."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _plain(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@given(batch=st.sampled_from([1, 2, 4]), data=st.data())
@example(batch=1, data=None)  # a left-padded batch of one, with a hit
@example(batch=4, data=None)  # rows of different lengths and hits, one row without a hit
@settings(max_examples=4, deadline=None)
def test_batch_equals_plain_generate(arch: str, batch: int, data) -> None:
    model = _model(arch)
    engine = _engine(model)
    shared = _tokens(20, seed=1)  # a system prompt rows 1.. share
    if data is None:
        lengths, stored = ([14], [10]) if batch == 1 else ([9, 30, 21, 27], [0, 19, 11, 27])
    else:
        lengths = data.draw(st.lists(st.integers(2, 40), min_size=batch, max_size=batch), label="lengths")
        stored = [data.draw(st.integers(0, n), label=f"stored{i}") for i, n in enumerate(lengths)]
    rows = [(_tokens(n, seed=99) if i == 0 else shared + _tokens(n, seed=10 + i))[:n]
            for i, n in enumerate(lengths)]
    for row, m in zip(rows, stored):
        if m:  # an earlier one-row call stored this row's first m tokens
            lmkv.hf.generate(model, torch.tensor([row[:m]]), engine=engine, max_new_tokens=1, pad_token_id=PAD)
    ids, mask = _left_pad(rows)
    if data is None and batch == 1:  # padded as if it had had a longer neighbour
        ids, mask = (t[:1] for t in _left_pad([rows[0], [5] * 17]))
    want = _plain(model, ids, mask)
    got = lmkv.hf.generate(model, ids, attention_mask=mask, engine=engine, max_new_tokens=NEW, pad_token_id=PAD)
    assert torch.equal(got.sequences, want)
    assert len(got.stats.row_hits) == len(rows) and got.stats.hit_tokens == sum(got.stats.row_hits)
    assert all(0 <= h < len(r) for h, r in zip(got.stats.row_hits, rows))
    if data is None:
        assert got.stats.row_hits == ([8] if batch == 1 else [0, 16, 7, 13])
    # every row stored its whole prompt: the same batch again reuses all but each row's last token
    again = lmkv.hf.generate(model, ids, attention_mask=mask, engine=engine, max_new_tokens=NEW, pad_token_id=PAD)
    assert again.stats.row_hits == [len(r) - 1 for r in rows]
    assert torch.equal(again.sequences, want)
    engine.close()


def test_a_row_without_a_hit_limits_the_cache_to_its_padding() -> None:
    model = _model("llama")
    engine = _engine(model)
    long_row, short_row = _tokens(30, seed=3), _tokens(12, seed=4)
    lmkv.hf.generate(model, torch.tensor([short_row]), engine=engine, max_new_tokens=1, pad_token_id=PAD)
    ids, mask = _left_pad([long_row, short_row])  # the long row has no hit and no padding
    got = lmkv.hf.generate(model, ids, attention_mask=mask, engine=engine, max_new_tokens=NEW, pad_token_id=PAD)
    assert got.stats.row_hits == [0, 0]  # no column could be reused by every row: the batch runs cold
    assert torch.equal(got.sequences, _plain(model, ids, mask))
    ids, mask = _left_pad([short_row, _tokens(9, seed=5)])  # the stored row is the long one now
    got = lmkv.hf.generate(model, ids, attention_mask=mask, engine=engine, max_new_tokens=NEW, pad_token_id=PAD)
    assert got.stats.row_hits == [3, 0]  # the cache covers the unhit row's 3 padding columns only
    assert torch.equal(got.sequences, _plain(model, ids, mask))
    engine.close()


def test_bad_masks_are_refused_before_anything_runs() -> None:
    model = _model("llama")
    engine = _engine(model)
    ids = torch.tensor([_tokens(6, 1), _tokens(6, 2)])
    bad = {
        "right padding": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]),
        "shape": torch.ones(2, 5, dtype=torch.long),
        "only 0 and 1": torch.full((2, 6), 2),
        "whole row": torch.tensor([[0] * 6, [1] * 6]),
    }
    for match, mask in bad.items():
        with pytest.raises(ValueError, match=match):
            lmkv.hf.generate(model, ids, attention_mask=mask, engine=engine, max_new_tokens=1)
    with pytest.raises(ValueError, match="blend"):
        lmkv.hf.generate(model, ids, engine=engine, blend=True, blend_separator=[5])
    assert engine.lookup(ids[0].tolist()) == 0  # nothing was stored
    engine.close()
