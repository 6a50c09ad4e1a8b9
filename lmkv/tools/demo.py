"""The main job: SmolLM2 answers questions about a long document, cold vs warm from lmkv's cache.

``lmkv demo`` (``make demo``) loads SmolLM2-135M-Instruct offline, builds a synthetic document of short,
distinct paragraphs (~4k tokens), prefills it once into lmkv (memory + disk tiers under the cache dir, plus
Redis with ``--redis URL``), then for each question runs ``generate`` twice: cold (full prefill, no reuse) and
warm (document KV from lmkv). It prints, per question, the answer, whether the warm answer is token-for-token
identical to the cold one, TTFT cold vs warm, hit tokens, the tier that served the hit, and the speedup.
Run it a second time in a new process: the document is served from disk.

SmolLM2-135M is small: it answers simple lookups about a short paragraph, not hard questions; the demo claims
no accuracy, only identical answers at lower time-to-first-token.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

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


def questions_for(facts: list[Fact], n: int, seed: int = 1) -> list[tuple[str, str]]:
    """``n`` simple lookups (question, expected answer) spread over the document."""
    rng = random.Random(seed)
    picks = rng.sample(facts, min(n, len(facts)))
    kinds = [
        lambda f: (f"What color is the flag of {f.city}?", f.color),
        lambda f: (f"Which animal is the symbol of {f.city}?", f.animal),
        lambda f: (f"What do the farmers of {f.city} grow?", f.fruit),
    ]
    return [kinds[i % len(kinds)](f) for i, f in enumerate(picks)]


def chat_ids(tokenizer: Any, document: str, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": f"{document}\n\nAnswer in one short sentence. {question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    return ids


def run_demo(*, doc_tokens: int = 4000, questions: int = 4, max_new_tokens: int = 24, redis_url: str | None = None,
             config: Any = None, seed: int = 0) -> list[dict[str, Any]]:
    """Run the demo and print its table; returns the rows (one per question)."""
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

    document, facts = make_document(doc_tokens, tokenizer, seed)
    qs = questions_for(facts, questions)
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
        cold = generate(model, ids, engine=engine, reuse=False, store=False, max_new_tokens=max_new_tokens)
        cold_total = time.perf_counter() - t0
        warm = generate(model, ids, engine=engine, store=False, max_new_tokens=max_new_tokens)
        answer = tokenizer.decode(warm.new_tokens(), skip_special_tokens=True).strip()
        identical = torch.equal(cold.new_tokens(), warm.new_tokens())
        tier = ",".join(f"{k}" for k, v in sorted(warm.stats.tiers.items(), key=lambda kv: -kv[1]) if v) or "-"
        rows.append({
            "question": question,
            "answer": answer.replace("\n", " ")[:60],
            "expected": expected,
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


def _print_rows(rows: list[dict[str, Any]]) -> None:
    cols = ["question", "answer", "identical", "ttft_cold_s", "ttft_warm_s", "speedup", "hit_tokens", "tier"]
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
    same = sum(r["identical"] == "yes" for r in rows)
    print(f"\n{same}/{len(rows)} warm answers identical to cold; median TTFT speedup "
          f"{sorted(r['speedup'] for r in rows)[len(rows) // 2]:.1f}x", flush=True)
