"""CacheBlend quality study on the real SmolLM2-135M-Instruct: fidelity to full prefill vs recompute ratio, and TTFT,
for every token-selection policy (:mod:`lmkv.blend_policies`).

Texts (``--text``). ``synthetic`` (the default), a synthetic RAG set: ``--docs`` short documents about fictional
towns, each with distinct generated facts (mayor, founding year, population, river, export, dish, festival month
...), padded with neutral filler to a few hundred tokens. Every question asks about one town (or compares two);
every prompt holds all documents in a fresh random order, so prefix caching reuses only what happens to come first.
Each document's KV is prefilled once *on its own* (positions from 0), as a KV store would hold it. ``pydoc``: real
text nobody here wrote, the Python Language Reference as CPython ships it in its standard library
(``pydoc_data.topics``, the text ``help("assert")`` shows: English prose with code, on any machine with Python,
fixed per Python version): every document is one topic's text cut at a line end to ``60 + 25 * filler`` words, and
every question asks what one of them says (no known answer: accuracy is NaN; fidelity to full prefill is what
counts).

Methods per question (run one after another per question, so they alternate in one process):
  full      plain full prefill (the reference every fidelity figure is measured against)
  prefix    prefix caching: header + first document reused exactly, the rest prefilled
  reuse     full reuse: every document's cached KV re-rotated and concatenated, only the question computed
  P r       policy P (--policies: deviation = CacheBlend, chunk_head = EPIC, attention, random, oracle)
            recomputing r of the cached tokens after the check layer(s) (BlendConfig's); TTFT includes what the
            policy costs (oracle: a full prefill; attention: a few layers for the suffix)

Fidelity (does not depend on the model's skill): the mean KL(full || method) of the next-token distributions over
the answer, teacher-forced on the full-prefill greedy answer; ROUGE-L F1 and exact match of the method's greedy
answer against the full-prefill answer; greedy agreement = the share of answer positions where the method's argmax,
teacher-forced on the full-prefill answer, is the full prefill's token. Task accuracy (the known fact appears in the
answer) is reported beside them. TTFT is the prefill time up to the first token's logits (cached KV already in RAM).
The metrics and the synthetic documents live in :mod:`lmkv.tools.quality` (the tests use them too).

    .venv/bin/python -m experiments.blend_quality            # ~6 docs, 10 questions, 5 policies x 5 ratios
    .venv/bin/python -m experiments.blend_quality --text pydoc
    .venv/bin/python -m experiments.blend_quality --small    # 3 short docs, 2 questions (tests / notebook)

Writes ``experiments/results/blend_quality.jsonl`` and one plot per metric, ``blend_quality_<metric>.png`` (metric vs
recompute ratio, one line per policy).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from experiments._common import print_table, save_plot, small, write_rows
from lmkv import blend_policies
from lmkv.config import BlendConfig
from lmkv.hf import (
    HFSteps,
    Segment,
    blend_prefill,
    build_cache,
    cache_to_kv,
    kv_deviation_by_layer,
    prefill_kv,
    rope_spec,
)
from lmkv.reference.blend_policies import oracle_scores as _oracle
from lmkv.tools.quality import Doc, Question, kl, make_documents, make_questions, rouge_l

NAME = "blend_quality"
RATIOS = (0.05, 0.10, 0.15, 0.30, 0.50)
METRICS = {"KL": "KL(full || method)", "agree": "greedy agreement", "ROUGE-L": "ROUGE-L vs full", "TTFT s": "TTFT (s)"}


class Prompts:
    """Token-level prompt assembly: header | documents in some order | question, each tokenized on its own."""

    def __init__(self, tokenizer: Any, docs: list[Doc]) -> None:
        self.tok = tokenizer
        self.header = self._ids("<|im_start|>system\nYou are a helpful assistant. Answer the question using the "
                                "documents. Answer briefly.<|im_end|>\n<|im_start|>user\n")
        self.docs = [self._ids(d.text + "\n\n") for d in docs]

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def suffix(self, q: Question) -> list[int]:
        return self._ids(f"Question: {q.text}<|im_end|>\n<|im_start|>assistant\n")


@torch.no_grad()
def greedy(model: Any, kv: torch.Tensor, logits: torch.Tensor, max_new: int, eos: int) -> list[int]:
    cache = build_cache(kv)
    out = [int(logits.argmax())]
    while len(out) < max_new and out[-1] != eos:
        step = model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        out.append(int(step.logits[0, -1].argmax()))
    return out


@torch.no_grad()
def answer_logprobs(model: Any, kv: torch.Tensor, logits: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """``[len(answer), V]`` log-probabilities of each answer position, teacher-forced on ``answer``."""
    first = torch.log_softmax(logits.float(), -1)[None]
    if len(answer) <= 1:
        return first
    out = model(input_ids=torch.tensor([answer[:-1]]), past_key_values=build_cache(kv), use_cache=True)
    return torch.cat((first, torch.log_softmax(out.logits[0].float(), -1)))


# -- real text: the Python Language Reference as the standard library ships it --------------------------------
def pydoc_documents(n_docs: int, filler: int, seed: int = 0) -> list[Doc]:
    """``n_docs`` topics of ``pydoc_data.topics`` (seeded choice among those long enough), each cut at a line end
    to at most ``60 + 25 * filler`` words; ``Doc.town`` holds the topic's title (its first line)."""
    from pydoc_data.topics import topics

    words = 60 + 25 * filler
    names = sorted(k for k, v in topics.items() if len(v.split()) >= words)
    docs = []
    for name in random.Random(seed).sample(names, min(n_docs, len(names))):
        lines, count = [], 0
        for line in topics[name].strip().splitlines():
            count += len(line.split())
            if count > words and lines:
                break
            lines.append(line.rstrip())
        docs.append(Doc(town=lines[0].strip(), facts={}, text="\n".join(lines)))
    return docs


def pydoc_questions(docs: list[Doc], n_questions: int, seed: int = 0) -> list[Question]:
    """Questions about what one document says; no known answer (``answer=""``: accuracy is not measured)."""
    rng = random.Random(seed + 1)
    forms = ("What does the documentation say about {}?", "Summarize the section {} in one sentence.",
             "According to the documents, what is explained in {}?")
    return [Question(rng.choice(forms).format(d.town), "", [d.town]) for d in (rng.choice(docs)
                                                                               for _ in range(n_questions))]


TEXTS = {"synthetic": (make_documents, make_questions), "pydoc": (pydoc_documents, pydoc_questions)}


# -- the study --------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    model: Any
    tokenizer: Any
    docs: list[Doc]
    questions: list[Question]
    prompts: Prompts
    doc_kv: list[torch.Tensor]
    header_kv: torch.Tensor
    doc_old_start: int = 0  # positions the cached documents were computed at (len(header) behind the header)


def setup(n_docs: int, n_questions: int, filler: int, seed: int = 0, model_and_tokenizer: Any = None,
          behind_header: bool = False, text: str = "synthetic") -> Setup:
    """Model, documents (``text``: a key of :data:`TEXTS`), questions and each document's cached KV: prefilled on
    its own from position 0, or with ``behind_header`` after the prompt's header (then dropped), so that its first
    token is not an attention sink and its positions already follow the header."""
    from lmkv.models import load_smollm2

    if text not in TEXTS:
        raise ValueError(f"text must be one of {sorted(TEXTS)}, got {text!r}")
    model, tok = model_and_tokenizer or load_smollm2()
    torch.manual_seed(seed)
    make_docs, make_qs = TEXTS[text]
    docs = make_docs(n_docs, filler, seed)
    questions = make_qs(docs, n_questions, seed)
    prompts = Prompts(tok, docs)
    header_kv = prefill_kv(model, prompts.header)[0]
    if behind_header:
        h = len(prompts.header)
        doc_kv = [prefill_kv(model, prompts.header + ids)[0][:, :, h:].contiguous() for ids in prompts.docs]
    else:
        doc_kv = [prefill_kv(model, ids)[0] for ids in prompts.docs]  # each document on its own, from 0
    return Setup(model, tok, docs, questions, prompts, doc_kv, header_kv, len(prompts.header) if behind_header else 0)


def layout(s: Setup, q: Question, order: list[int]) -> tuple[torch.Tensor, list[tuple], int]:
    """(input_ids, segments, length of header + first document)."""
    ids = list(s.prompts.header)
    segs: list[tuple] = [(0, len(ids), s.header_kv, 0)]
    for i in order:
        segs.append((len(ids), len(ids) + len(s.prompts.docs[i]), s.doc_kv[i], s.doc_old_start))
        ids += s.prompts.docs[i]
    first_end = segs[1][1]
    ids += s.prompts.suffix(q)
    return torch.tensor(ids), segs, first_end


def oracle_scores(model: Any, ids: torch.Tensor, segs: list[tuple]) -> torch.Tensor:
    """``[N]`` how far each cached token's K and V are from a full prefill's, averaged over the layers (each
    normalised by its mean): the ``oracle`` policy (:func:`lmkv.reference.blend_policies.oracle_scores`), the
    selection a check layer tries to predict, known only through a full prefill. Not a deployable rule; it bounds
    what any deviation-based selection gets."""
    return _oracle(HFSteps(model), ids, [Segment(*t) for t in segs], rope_spec(model))


def _blend_runs(policies: tuple[str, ...] | None, ratios: tuple[float, ...]) -> list[tuple[str, str, float]]:
    """``(method name, policy, ratio)`` of every blended run: ``reuse`` first (ratio 0, no selection), then
    ``"P r%"`` per policy and ratio, or ``"blend r%"`` without ``policies`` (the single-rule study)."""
    runs = [("reuse", "deviation", 0.0)]
    if policies is None:
        return runs + [(f"blend {r:.0%}", "deviation", r) for r in ratios]
    return runs + [(f"{p} {r:.0%}", p, r) for p in policies for r in ratios]


def run_methods(s: Setup, ratios: tuple[float, ...], max_new: int, seed: int, progress: bool = True,
                blend: BlendConfig | None = None, oracle: bool = False,
                policies: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One row per (question, method): KL, greedy agreement, ROUGE-L, exact match, accuracy, TTFT.

    ``policies``: run every named policy (:mod:`lmkv.blend_policies`) at every ratio, methods ``"P r%"``, TTFT
    including the policy's own cost. Without it, one rule, methods ``"blend r%"``: the check layers' deviation,
    or with ``oracle=True`` :func:`oracle_scores` (TTFT then excludes the oracle's own full prefill)."""
    for p in policies or ():
        blend_policies.get(p)  # an unknown name fails before the model runs
    from tqdm.auto import tqdm

    blend = blend or BlendConfig()
    model, tok = s.model, s.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(seed + 2)
    rows: list[dict[str, Any]] = []
    # Untimed warm-up: builds/loads the C++ re-rotation op and touches every code path once.
    warm_ids, warm_segs, _ = layout(s, s.questions[0], list(range(len(s.docs))))
    blend_prefill(model, warm_ids, warm_segs, ratio=0.15, check_layers=blend.check_layers, deviation=blend.deviation)
    for qi, q in enumerate(tqdm(s.questions, desc="questions", disable=not progress)):
        order = list(range(len(s.docs)))
        rng.shuffle(order)
        ids, segs, first_end = layout(s, q, order)
        # Prefix cache hit: the KV of header + first document as an earlier request with that prefix left it.
        prefix_kv, _ = prefill_kv(model, ids[:first_end])
        results: dict[str, tuple[torch.Tensor, torch.Tensor, float, float]] = {}

        t0 = time.perf_counter()
        full_kv, full_logits = prefill_kv(model, ids)
        results["full"] = (full_kv, full_logits, time.perf_counter() - t0, 1.0)

        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=ids[None, first_end:], past_key_values=build_cache(prefix_kv), use_cache=True,
                        logits_to_keep=1)
        results["prefix"] = (cache_to_kv(out.past_key_values), out.logits[0, -1], time.perf_counter() - t0,
                             1 - first_end / len(ids))

        scores = oracle_scores(model, ids, segs) if oracle and policies is None else None
        for name, policy, ratio in _blend_runs(policies, ratios):
            t0 = time.perf_counter()
            cache, logits, stats = blend_prefill(model, ids, segs, ratio=ratio, check_layers=blend.check_layers,
                                                 deviation=blend.deviation, scores=scores,
                                                 policy=policy if scores is None else "deviation")
            elapsed = time.perf_counter() - t0
            results[name] = (cache_to_kv(cache), logits, elapsed, stats.recompute_fraction)

        full_answer = greedy(model, full_kv, full_logits, max_new, eos)
        full_text = tok.decode(full_answer, skip_special_tokens=True).strip()
        full_lp = answer_logprobs(model, full_kv, full_logits, full_answer)
        run_of = {name: (policy, ratio) for name, policy, ratio in _blend_runs(policies, ratios)}
        for name, (kv, logits, ttft, frac) in results.items():
            ans = full_answer if name == "full" else greedy(model, kv, logits, max_new, eos)
            text = tok.decode(ans, skip_special_tokens=True).strip()
            lp = full_lp if name == "full" else answer_logprobs(model, kv, logits, full_answer)
            policy, ratio = run_of.get(name, (None, {"full": 1.0}.get(name)))
            rows.append({
                "question": qi, "method": name, "policy": policy, "ratio": ratio,
                "tokens": int(ids.shape[0]), "kl": kl(full_lp, lp), "rouge_l": rouge_l(text, full_text),
                "agree": float((lp.argmax(-1) == torch.tensor(full_answer)).float().mean()),
                "exact": float(text == full_text),
                "correct": float(q.answer.lower() in text.lower()) if q.answer else float("nan"),
                "ttft_s": ttft, "ttft_full_s": results["full"][2], "recompute": frac,
                "answer": text, "full_answer": full_text, "truth": q.answer,
            })
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        out.append({
            "method": m, "policy": rs[0].get("policy"), "ratio": rs[0].get("ratio"),
            "KL": statistics.mean(r["kl"] for r in rs),
            "agree": statistics.mean(r["agree"] for r in rs),
            "ROUGE-L": statistics.mean(r["rouge_l"] for r in rs),
            "exact": statistics.mean(r["exact"] for r in rs),
            "accuracy": statistics.mean(r["correct"] for r in rs),
            "TTFT s": statistics.median(r["ttft_s"] for r in rs),
            "speedup": statistics.median(r["ttft_full_s"] / r["ttft_s"] for r in rs),
            "recompute": statistics.mean(r["recompute"] for r in rs),
            "n": len(rs),
        })
    return out


def targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["method"]: r for r in summary}
    b15, reuse = by.get("blend 15%") or by.get("deviation 15%"), by.get("reuse")
    if not b15 or not reuse:
        return {}
    return {
        "kl_ratio_vs_reuse": b15["KL"] / reuse["KL"] if reuse["KL"] > 0 else float("nan"),
        "kl_target_met": reuse["KL"] > 0 and b15["KL"] <= 0.25 * reuse["KL"],
        "rouge_15": b15["ROUGE-L"], "rouge_reuse": reuse["ROUGE-L"],
        "rouge_target_met": b15["ROUGE-L"] >= 0.9,
        "speedup_15": b15["speedup"], "ttft_target_met": b15["speedup"] >= 2.0,
    }


def plot(summary: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    blends = [r for r in summary if r["method"].startswith("blend")]
    xs = [float(r["method"].split()[-1].rstrip("%")) for r in blends]
    by = {r["method"]: r for r in summary}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, log in ((axes[0], "KL", True), (axes[1], "ROUGE-L", False)):
        ax.plot(xs, [r[key] for r in blends], "o-", label="CacheBlend")
        for name, style in (("reuse", "r--"), ("prefix", "g:")):
            if name in by:
                ax.axhline(by[name][key], color=style[0], linestyle=style[1:], label=name)
        ax.set_xlabel("recompute ratio (%)")
        ax.set_ylabel(f"{key} vs full prefill")
        if log:
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0)
        ax.legend()
    names = [r["method"] for r in summary]
    axes[2].bar(names, [r["TTFT s"] for r in summary])
    axes[2].set_ylabel("TTFT (s, median)")
    axes[2].tick_params(axis="x", rotation=45)
    fig.suptitle("CacheBlend on SmolLM2-135M: fidelity to full prefill and TTFT")
    fig.tight_layout()
    return fig


def plot_metrics(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure per metric of :data:`METRICS`: the metric vs recompute ratio, one line per policy, with full
    reuse, prefix caching and (TTFT) the full prefill as horizontal lines."""
    import matplotlib.pyplot as plt

    by = {r["method"]: r for r in summary}
    policies = list(dict.fromkeys(r["policy"] for r in summary if r["method"] not in ("reuse", "full", "prefix")
                                  and r["policy"]))
    figs = {}
    for key, label in METRICS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in policies:
            rs = sorted((r for r in summary if r["policy"] == p and r["method"] != "reuse"), key=lambda r: r["ratio"])
            ax.plot([100 * r["ratio"] for r in rs], [r[key] for r in rs], "o-", label=p)
        for name, style in (("reuse", "r--"), ("prefix", "g:"), *((("full", "k-."),) if key == "TTFT s" else ())):
            if name in by:
                ax.axhline(by[name][key], color=style[0], linestyle=style[1:], label=name)
        ax.set_xlabel("recompute ratio (%)")
        ax.set_ylabel(label)
        if key == "KL":
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.set_title(f"{label} by selection policy")
        fig.tight_layout()
        figs[key] = fig
    return figs


def deviation_study(s: Setup, question: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-layer, per-token K and V deviation (full prefill vs re-rotated cache) for one prompt's cached tokens."""
    order = list(range(len(s.docs)))
    random.Random(seed).shuffle(order)
    ids, segs, _ = layout(s, s.questions[question], order)
    dev = kv_deviation_by_layer(s.model, ids, segs)
    return {k: v[:, ~torch.isnan(v[0])] for k, v in dev.items()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="3 short documents, 2 questions")
    p.add_argument("--docs", type=int, default=6)
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--filler", type=int, default=14, help="filler sentences per document (sets its length)")
    p.add_argument("--max-new", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-layers", default=None, help="comma-separated check layers (default: BlendConfig's)")
    p.add_argument("--deviation", choices=("key", "value"), default=None, help="default: BlendConfig's")
    p.add_argument("--behind-header", action="store_true",
                   help="cache each document prefilled after the prompt's header instead of on its own")
    p.add_argument("--oracle", action="store_true",
                   help="only the check-layer rule replaced by the oracle scores, methods 'blend r%%' (the old study)")
    p.add_argument("--policies", default=",".join(blend_policies.BUILTIN),
                   help="comma-separated selection policies (lmkv.blend_policies), each at every ratio")
    p.add_argument("--ratios", default=",".join(str(r) for r in RATIOS), help="comma-separated recompute ratios")
    p.add_argument("--text", choices=sorted(TEXTS), default="synthetic",
                   help="synthetic RAG documents, or pydoc: the Python Language Reference from the stdlib")
    args = p.parse_args(argv)
    policies = None if args.oracle else tuple(x for x in args.policies.split(",") if x)
    ratios = tuple(float(x) for x in args.ratios.split(","))
    overrides: dict[str, Any] = {}
    if args.check_layers:
        overrides["check_layers"] = tuple(int(x) for x in args.check_layers.split(","))
    if args.deviation:
        overrides["deviation"] = args.deviation
    cfg = BlendConfig(**overrides)
    if args.small or small():
        args.docs, args.questions, args.filler, args.max_new = 3, 2, 2, 6
    torch.set_grad_enabled(False)
    s = setup(args.docs, args.questions, args.filler, args.seed, behind_header=args.behind_header, text=args.text)
    rows = run_methods(s, ratios, args.max_new, args.seed, blend=cfg, oracle=args.oracle, policies=policies)
    summary = summarize(rows)
    print_table(summary, ["method", "KL", "agree", "ROUGE-L", "exact", "accuracy", "TTFT s", "speedup", "recompute",
                          "n"],
                title=f"CacheBlend on SmolLM2-135M ({args.text}): {args.docs} docs, {args.questions} questions, "
                      f"~{rows[0]['tokens']} tokens per prompt, check layers {list(cfg.check_layers)}, "
                      f"deviation plane {cfg.deviation}, policies {'oracle scores' if args.oracle else policies}")
    tgt = targets(summary)
    print(f"targets at 15 %: {tgt}")
    sel = {"check_layers": list(cfg.check_layers), "deviation": "oracle" if args.oracle else cfg.deviation,
           "behind_header": args.behind_header, "text": args.text,
           "docs": args.docs, "questions": args.questions, "small": bool(args.small or small())}
    write_rows(NAME, [{**r, "kind": "question", **sel} for r in rows]
               + [{**r, "kind": "summary", **sel} for r in summary] + [{"kind": "targets", **sel, **tgt}])
    if policies is None:
        save_plot(plot(summary), NAME)
    else:
        for key, fig in plot_metrics(summary).items():
            save_plot(fig, f"{NAME}_{args.text}_{key.split()[0].lower().replace('-', '_')}")  # one per text, metric
    return summary


if __name__ == "__main__":
    main()
