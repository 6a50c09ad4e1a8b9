"""The study's own yardsticks (no model): ROUGE-L, KL, and a synthetic set whose answers are in the documents."""

from __future__ import annotations

import math

import torch

from lmkv.tools import quality as bq


def test_rouge_l_known_values() -> None:
    assert bq.rouge_l("the cat sat", "the cat sat") == 1.0
    assert bq.rouge_l("", "") == 1.0 and bq.rouge_l("a", "") == 0.0
    assert bq.rouge_l("dog", "the cat sat") == 0.0
    # LCS "the sat" = 2 of 3 and 2 of 4 words: F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2)
    assert math.isclose(bq.rouge_l("the big sat", "the cat dog sat"), 2 * (2 / 3 * 0.5) / (2 / 3 + 0.5))


def test_kl_is_zero_only_for_identical_distributions() -> None:
    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), -1)
    q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0]]), -1)
    assert bq.kl(p, p) == 0.0 and bq.kl(p, q) > 0.1


def test_documents_hold_the_answers() -> None:
    docs = bq.make_documents(6, 4, seed=1)
    assert len({d.town for d in docs}) == 6 and len({d.facts["mayor"] for d in docs}) == 6
    for q in bq.make_questions(docs, 12, seed=1):
        assert any(q.answer in d.text for d in docs if d.town in q.towns) or q.answer in q.towns
