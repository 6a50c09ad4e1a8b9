"""The main job: SmolLM2 answers questions about a long document, cold vs warm from lmkv's cache, and is right.

``lmkv demo`` (``make demo``) loads SmolLM2-135M-Instruct offline, builds a document of ~4k tokens
(:func:`make_qa_document`: a long description of an island, then a paragraph of distinct facts about its
people), prefills it once into lmkv (memory + disk tiers under the cache dir, plus Redis with ``--redis URL``),
then for each question runs ``generate`` twice, greedily: cold (full prefill, no reuse) and warm (document KV
from lmkv). It prints, per question, the answer, whether it is correct (the expected word is in the answer's
first sentence, checked on the cold and on the warm answer), whether the warm answer is token-for-token
identical to the cold one, TTFT cold vs warm, hit tokens, the tier that served the hit, and the speedup; then a
summary line ("4/4 answers correct; 4/4 warm identical to cold; median TTFT speedup N.Nx").
Run it a second time in a new process: the document is served from disk.

SmolLM2-135M is small: it cannot reliably find a fact thousands of tokens back, nor tell apart many similar
facts. So the facts asked about are few, each worded differently, in the document's last paragraph, and each
question repeats its fact's wording ("What is the hobby of the village doctor?" for "The hobby of the village
doctor is chess."); the model answers these right cold, and the whole document is still the reused prefix.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

# -- a document of many similar town facts: a TTFT workload for experiments (``experiments/ttft_hf.py``) ---------
# Too many look-alike facts for SmolLM2-135M to answer questions about; the demo uses make_qa_document below.
CITIES = ["Arlen", "Brisk", "Corvo", "Dunmore", "Elsby", "Farrow", "Gilda", "Harwick", "Istra", "Jorvik",
          "Kestrel", "Lumen", "Marlow", "Norcross", "Ostend", "Pellam", "Quarry", "Rydal", "Selby", "Tamsin",
          "Ulvik", "Varna", "Wexley", "Yarrow", "Zennor", "Ashby", "Belmont", "Calder", "Dorrit", "Emsworth",
          "Fennick", "Glenroe", "Hollis", "Ivybridge", "Juniper", "Kirkby", "Lindell", "Moreton", "Nettle", "Orrin"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden"]
ANIMALS = ["fox", "owl", "bear", "otter", "heron", "lynx", "badger", "falcon", "hare", "wolf"]
FRUITS = ["apples", "pears", "plums", "cherries", "figs", "grapes", "lemons", "peaches", "melons", "dates"]


@dataclass(frozen=True)
class Fact:
    city: str
    color: str
    animal: str
    fruit: str
    population: int

    def paragraph(self) -> str:
        return (f"The town of {self.city} has {self.population} people. Its flag is {self.color}. "
                f"The {self.animal} is the symbol of {self.city}, and its farmers grow {self.fruit}.")


def make_document(target_tokens: int, tokenizer: Any, seed: int = 0) -> tuple[str, list[Fact]]:
    """Paragraphs of distinct facts until the document reaches ~``target_tokens`` tokens."""
    rng = random.Random(seed)
    facts: list[Fact] = []
    paragraphs: list[str] = []
    used: set[str] = set()
    i = 0
    while True:
        base = CITIES[i % len(CITIES)]
        quarter = ["North", "South", "East", "West", "Upper", "Lower"][i // len(CITIES) % 6]
        city = base if base not in used else f"{base} {quarter}"
        used.add(city)
        fact = Fact(city, rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(FRUITS), rng.randrange(1000, 99000))
        facts.append(fact)
        paragraphs.append(fact.paragraph())
        i += 1
        if i % 8 == 0 and len(tokenizer("\n\n".join(paragraphs))["input_ids"]) >= target_tokens:
            break
    return "\n\n".join(paragraphs), facts


# -- the demo's document: a long description of an island, then the facts its questions ask about ------------
_SCENE = [
    "The {a} {n} near the {p} was {adj2} in the {t}.",
    "Every {day}, {ppl} walk to the {p} to {act}.",
    "A narrow road leads from the {p} up to the {p2}, past {num} {adj} houses.",
    "People say that the {p} was built {num} years ago by {ppl}.",
    "When it rains, the {p} becomes {adj2} and {ppl} stay at home.",
    "There is a small {n} next to the {p}, where {ppl} often {act}.",
    "In the {t}, the wind from the sea makes the {p} feel {adj2}.",
    "On {day} afternoons the {p} is full of {ppl} who {act}.",
    "The path along the {p} is lined with {tree} trees and {adj} stone walls.",
    "Nobody remembers why the {p} has a {adj} {n} painted on its door.",
    "From the top of the {p2} you can see the {p} and the grey sea beyond it.",
    "Some of the {ppl} believe the {p} is the oldest place on the island.",
]
_SLOTS = {
    "a": ["old", "tall", "small", "wooden", "crooked", "quiet"],
    "n": ["bench", "gate", "well", "fountain", "cart", "shed", "statue", "lantern"],
    "p": ["harbour", "market square", "old mill", "chapel", "pine forest", "north beach", "stone bridge",
          "village green", "windmill", "cliff path", "bakery", "post office"],
    "p2": ["hill", "watchtower", "ridge", "chapel tower", "old fort"],
    "adj": ["white", "grey", "narrow", "mossy", "low", "ancient"],
    "adj2": ["quiet", "busy", "damp", "peaceful", "crowded", "misty", "bright", "cold"],
    "t": ["morning", "evening", "spring", "autumn", "winter", "summer"],
    "day": ["Monday", "Tuesday", "Thursday", "Saturday", "Sunday"],
    "ppl": ["the villagers", "old couples", "visitors", "children", "the shopkeepers", "farmers"],
    "act": ["sell vegetables", "talk about the weather", "watch the waves", "play cards", "drink tea",
            "read the newspaper"],
    "num": ["two", "three", "five", "seven", "twelve", "forty", "a hundred"],
    "tree": ["pine", "birch", "apple", "oak", "willow"],
}
# (statement, question, expected answer): the question repeats the statement's wording, and no two facts share a
# subject or an attribute. The first four are the default questions: SmolLM2-135M answers them right (greedy, seed
# 0) at 600, 1000 and 4000 document tokens, the test's and the demo's sizes; the last two are harder for it.
QA_FACTS: list[tuple[str, str, str]] = [
    ("The instrument that the ferry captain plays is the violin.",
     "What is the instrument that the ferry captain plays?", "violin"),
    ("The color of the fisherman's boat is yellow.", "What is the color of the fisherman's boat?", "yellow"),
    ("The country that the new school teacher comes from is Norway.",
     "What is the country that the new school teacher comes from?", "Norway"),
    ("The hobby of the village doctor is chess.", "What is the hobby of the village doctor?", "chess"),
    ("The password of the old library is marmalade.", "What is the password of the old library?", "marmalade"),
    ("The favourite fruit of the harbour master is the pineapple.",
     "What is the favourite fruit of the harbour master?", "pineapple"),
]
_FACT_ORDER = [0, 1, 2, 4, 3, 5]  # the order of the facts in the document's last paragraph


def make_qa_document(target_tokens: int, tokenizer: Any, seed: int = 0) -> tuple[str, list[tuple[str, str]]]:
    """A ~``target_tokens`` document and its questions ``[(question, expected answer), ...]``, default ones first.

    Paragraphs describing an island (no facts that any question asks about) until the document reaches
    ``target_tokens``, then one paragraph with the facts of :data:`QA_FACTS`.
    """
    rng = random.Random(seed)
    facts = " ".join(QA_FACTS[i][0] for i in _FACT_ORDER)
    paragraphs: list[str] = []
    while True:
        paragraphs.append(" ".join(
            rng.choice(_SCENE).format(**{k: rng.choice(v) for k, v in _SLOTS.items()}) for _ in range(4)))
        if len(tokenizer("\n\n".join([*paragraphs, facts]))["input_ids"]) >= target_tokens:
            break
    return "\n\n".join([*paragraphs, facts]), [(q, a) for _, q, a in QA_FACTS]


def is_correct(answer: str, expected: str) -> bool:
    """Whether ``expected`` is a whole word (case-insensitive) of the answer's first sentence."""
    first = _first_sentence(answer)
    return re.search(rf"\b{re.escape(expected)}\b", first, flags=re.IGNORECASE) is not None


def chat_ids(tokenizer: Any, document: str, question: str) -> torch.Tensor:
    """The chat prompt: one user turn, the document then the question (no instruction: SmolLM2-135M answers
    these questions right without one)."""
    messages = [{"role": "user", "content": f"{document}\n\n{question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    return ids


def run_demo(*, doc_tokens: int = 4000, questions: int = 4, max_new_tokens: int = 24, redis_url: str | None = None,
             config: Any = None, seed: int = 0) -> list[dict[str, Any]]:
    """Run the demo and print its table; returns the rows (one per question, at most ``len(QA_FACTS)``).

    Each row: ``question``, ``answer`` (the warm answer's first sentence), ``expected``, ``correct`` ("yes" when
    the cold and the warm answer both hold ``expected``, see :func:`is_correct`), ``identical`` ("yes" when the
    warm answer is token-for-token the cold one), ``prompt_tokens``, ``hit_tokens``, ``tier``, ``ttft_cold_s``,
    ``ttft_warm_s``, ``speedup`` and ``cold_total_s``.
    """
    from tqdm.auto import tqdm

    from lmkv import config as lmkv_config
    from lmkv.adapters.hf import build_cache, cache_to_kv, generate
    from lmkv.adapters.hf.compat import cache_kwargs
    from lmkv.engine import KVEngine
    from lmkv.tools.models import load_smollm2

    torch.manual_seed(seed)
    cfg = lmkv_config.load(config)
    if redis_url:
        cfg = lmkv_config.replace(cfg, redis={"enabled": True, "url": redis_url})
    print("[lmkv demo] loading SmolLM2-135M-Instruct (offline) ...", flush=True)
    model, tokenizer = load_smollm2(progress=True)
    engine = KVEngine.for_model(model, cfg)
    tiers = [n for n in ("memory", "disk", "redis") if getattr(cfg, n).enabled]
    print(f"[lmkv demo] engine: model_id={engine.model_id}, chunk_size={cfg.chunk_size}, tiers={tiers}", flush=True)

    document, all_qs = make_qa_document(doc_tokens, tokenizer, seed)
    qs = all_qs[: max(1, questions)]
    first_ids = chat_ids(tokenizer, document, qs[0][0])
    # The document part shared by every question: the tokens all prompts have in common.
    other = chat_ids(tokenizer, document, qs[-1][0] + " (other)")[0]
    common = 0
    for a, b in zip(first_ids[0].tolist(), other.tolist()):
        if a != b:
            break
        common += 1
    doc_tokens_list = first_ids[0, :common].tolist()
    stored = engine.lookup(doc_tokens_list)
    if stored >= (common // cfg.chunk_size) * cfg.chunk_size and stored > 0:
        print(f"[lmkv demo] document ({common} tokens) already in lmkv ({stored} tokens stored): no prefill needed",
              flush=True)
    else:
        # Prefill the document once, chunk by chunk, with a progress bar, and store its KV.
        cache = build_cache(torch.empty(engine.geometry.chunk_shape(0), dtype=model.dtype), model.config)
        step = cfg.chunk_size * 2
        with torch.no_grad():
            for s in tqdm(range(0, common, step), desc="prefill document", unit="chunk"):
                ids = first_ids[:, s : min(common, s + step)]
                model(input_ids=ids, **cache_kwargs(cache), use_cache=True,
                      cache_position=torch.arange(s, s + ids.shape[1]))
        engine.store(doc_tokens_list, cache_to_kv(cache, 0, common))
        engine.flush()
        print(f"[lmkv demo] stored the document's KV ({common} tokens) in {tiers}", flush=True)

    rows = []
    for question, expected in tqdm(qs, desc="questions", unit="q"):
        ids = chat_ids(tokenizer, document, question)
        t0 = time.perf_counter()
        cold = generate(model, ids, engine=engine, reuse=False, store=False, max_new_tokens=max_new_tokens,
                        do_sample=False)
        cold_total = time.perf_counter() - t0
        warm = generate(model, ids, engine=engine, store=False, max_new_tokens=max_new_tokens, do_sample=False)
        cold_answer = tokenizer.decode(cold.new_tokens(), skip_special_tokens=True).strip()
        answer = tokenizer.decode(warm.new_tokens(), skip_special_tokens=True).strip()
        identical = torch.equal(cold.new_tokens(), warm.new_tokens())
        correct = is_correct(cold_answer, expected) and is_correct(answer, expected)
        tier = ",".join(f"{k}" for k, v in sorted(warm.stats.tiers.items(), key=lambda kv: -kv[1]) if v) or "-"
        rows.append({
            "question": question,
            "answer": _first_sentence(answer)[:80],
            "expected": expected,
            "correct": "yes" if correct else "NO",
            "identical": "yes" if identical else "NO",
            "prompt_tokens": warm.stats.prompt_tokens,
            "hit_tokens": warm.stats.hit_tokens,
            "tier": tier,
            "ttft_cold_s": cold.stats.ttft_s,
            "ttft_warm_s": warm.stats.ttft_s,
            "speedup": cold.stats.ttft_s / max(warm.stats.ttft_s, 1e-9),
            "cold_total_s": cold_total,
        })
    _print_rows(rows)
    engine.flush()
    engine.close()
    return rows


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]


def summary(rows: list[dict[str, Any]]) -> str:
    """"4/4 answers correct; 4/4 warm identical to cold; median TTFT speedup N.Nx"."""
    right = sum(r["correct"] == "yes" for r in rows)
    same = sum(r["identical"] == "yes" for r in rows)
    speedup = statistics.median(r["speedup"] for r in rows) if rows else 0.0
    return (f"{right}/{len(rows)} answers correct; {same}/{len(rows)} warm identical to cold; "
            f"median TTFT speedup {speedup:.1f}x")


def _print_rows(rows: list[dict[str, Any]]) -> None:
    cols = ["question", "answer", "expected", "correct", "identical", "ttft_cold_s", "ttft_warm_s", "speedup",
            "hit_tokens", "tier"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.3f}" if isinstance(v, float) and c != "speedup" else
                         (f"{v:.1f}x" if c == "speedup" else str(v)))
        print("| " + " | ".join(cells) + " |")
    print(f"\n{summary(rows)}", flush=True)
