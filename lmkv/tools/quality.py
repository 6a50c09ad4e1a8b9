"""Quality yardsticks for CacheBlend studies, and a synthetic RAG set whose answers are in its documents.

Used by ``experiments/blend_quality.py`` and ``blend_sweep.py``, notebook 03 and ``tests/test_blend_study.py``:
- metrics: :func:`rouge_l` (ROUGE-L F1 over words) and :func:`kl` (mean KL of next-token distributions);
- data: :func:`make_documents` (short documents about fictional towns, each with distinct facts, padded with
  neutral filler) and :func:`make_questions` (single-document lookups and two-town comparisons).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

# -- synthetic documents and questions -----------------------------------------------------------------------
_SYLLABLES = ["var", "lon", "esk", "mar", "tel", "dor", "bri", "qua", "zen", "hol", "fin", "gar", "ost", "ril", "umb"]
_FIRST = ["Elena", "Marcus", "Ingrid", "Tobias", "Amara", "Kenji", "Sofia", "Bruno", "Leila", "Oskar", "Nadia", "Ivo"]
_LAST = ["Kimura", "Vance", "Okafor", "Lindqvist", "Moreau", "Castellano", "Petrov", "Haddad", "Novak", "Brandt"]
_EXPORTS = ["copper wire", "blue cheese", "glass beads", "wool blankets", "clay pipes", "pine resin", "salted fish"]
_DISHES = ["barley stew", "plum dumplings", "smoked trout", "onion pie", "honey bread", "lentil soup"]
_MONTHS = ["January", "March", "April", "June", "August", "October", "November"]
_COLORS = ["green", "orange", "purple", "silver", "crimson", "yellow"]
_FILLER = [
    "The streets near the market are narrow and paved with old grey stones.",
    "Visitors often remark on the quiet mornings and the smell of fresh bread.",
    "Several small bridges cross the canals that run through the old quarter.",
    "In winter the hills around the town are covered with a thin layer of snow.",
    "The local library keeps a collection of maps that are several centuries old.",
    "Most houses in the centre have red tiled roofs and wooden shutters.",
    "A weekly market sells vegetables, cloth and tools from the nearby villages.",
    "The town hall stands on the main square next to a tall clock tower.",
    "Farmers in the valley grow wheat, potatoes and a few kinds of apples.",
    "An old railway line connects the town with the coast in about three hours.",
]


@dataclass
class Doc:
    town: str
    facts: dict[str, str]
    text: str


@dataclass
class Question:
    text: str
    answer: str
    towns: list[str] = field(default_factory=list)


def make_documents(n_docs: int, filler_sentences: int, seed: int = 0) -> list[Doc]:
    """Documents with distinct facts: every town has a different name, mayor, river and year."""
    rng = random.Random(seed)
    docs: list[Doc] = []
    used: set[str] = set()
    while len(docs) < n_docs:
        town = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(["holm", "wick", "stad", "burg"]))
        town = town.capitalize()
        mayor = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if town in used or mayor in used:
            continue
        used |= {town, mayor}
        facts = {
            "mayor": mayor,
            "founded": str(rng.randint(1100, 1900)),
            "population": f"{rng.randint(2, 95)},{rng.randint(100, 999)}",
            "river": (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)).capitalize(),
            "export": rng.choice(_EXPORTS),
            "dish": rng.choice(_DISHES),
            "festival": rng.choice(_MONTHS),
            "color": rng.choice(_COLORS),
        }
        sentences = [
            f"{town} is a town that was founded in the year {facts['founded']}.",
            f"The mayor of {town} is {facts['mayor']}.",
            f"{town} has a population of {facts['population']} people.",
            f"The river that flows through {town} is called the {facts['river']}.",
            f"The main export of {town} is {facts['export']}.",
            f"The traditional dish of {town} is {facts['dish']}.",
            f"Every year {town} holds its harvest festival in {facts['festival']}.",
            f"The flag of {town} is {facts['color']}.",
        ]
        filler = [rng.choice(_FILLER) for _ in range(filler_sentences)]
        body = sentences[:2] + filler[: filler_sentences // 2] + sentences[2:] + filler[filler_sentences // 2 :]
        docs.append(Doc(town, facts, f"Document about {town}. " + " ".join(body)))
    return docs


_TEMPLATES = {
    "mayor": "Who is the mayor of {town}?",
    "founded": "In which year was {town} founded?",
    "river": "What is the name of the river that flows through {town}?",
    "export": "What is the main export of {town}?",
    "dish": "What is the traditional dish of {town}?",
    "festival": "In which month does {town} hold its harvest festival?",
    "color": "What color is the flag of {town}?",
}


def make_questions(docs: list[Doc], n_questions: int, seed: int = 0) -> list[Question]:
    """Mostly single-document lookups; every fourth question compares the founding years of two towns."""
    rng = random.Random(seed + 1)
    out: list[Question] = []
    for i in range(n_questions):
        if i % 4 == 3 and len(docs) >= 2:
            a, b = rng.sample(docs, 2)
            older = a if int(a.facts["founded"]) < int(b.facts["founded"]) else b
            out.append(Question(f"Which town was founded earlier, {a.town} or {b.town}?", older.town,
                                [a.town, b.town]))
            continue
        doc = rng.choice(docs)
        key = rng.choice(sorted(_TEMPLATES))
        out.append(Question(_TEMPLATES[key].format(town=doc.town), doc.facts[key], [doc.town]))
    return out


# -- metrics --------------------------------------------------------------------------------------------------
def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words (LCS by dynamic programming)."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over positions of KL(p || q)."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
