"""``lmkv warm`` throughput on SmolLM2-135M: documents/s and tokens/s against a plain prefill of the same documents.

Candidates, alternated in one process (medians of ``--repeats``), over the same ``--docs`` documents of
``--min-tokens``..``--max-tokens`` tokens (written as .txt files, read as ``lmkv warm`` reads them):

- ``prefill``: the model's forward pass over each document (``use_cache=True``, last logits only), nothing stored:
  the compute a warm-up cannot avoid.
- ``warm``: :func:`lmkv.tools.warm.warm_documents` (what ``lmkv warm`` runs after loading the model) into a fresh
  disk tier each time: tokenize, lookup, prefill, store every chunk, flush to disk.
- ``warm, all stored``: the same over a store that already holds every document: the resumability check alone
  (tokenize + one lookup per document, then skip).

Model loading (``lmkv warm``'s start-up, a second or two) is not in the times.

    .venv/bin/python -m experiments.warm_throughput                          # 6 documents of 1-2k tokens
    .venv/bin/python -m experiments.warm_throughput --docs 4 --repeats 3
    .venv/bin/python -m experiments.warm_throughput --small                  # 2 short documents, smoke test

Writes experiments/results/warm_throughput.jsonl and warm_throughput.png.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from experiments._common import alternate_prepared, median, print_table, save_plot, small, write_rows


def _documents(tokenizer: Any, n: int, lo: int, hi: int, root: Path) -> list[Path]:
    """``n`` documents of ``lo``..``hi`` tokens (evenly spaced targets) as .txt files under ``root``."""
    from lmkv.tools.demo import make_document

    paths = []
    for i in range(n):
        target = lo + (hi - lo) * i // max(n - 1, 1)
        text, _ = make_document(target, tokenizer, seed=1000 + i)
        ids = tokenizer(text)["input_ids"][:target]
        path = root / f"doc{i:02d}.txt"
        path.write_text(tokenizer.decode(ids))
        paths.append(path)
    return paths


def _config(root: Path) -> Path:
    cfg = {"memory": {"enabled": False}, "node": {"enabled": False},
           "disk": {"enabled": True, "path": str(root / "disk"), "capacity": "8GiB"}}
    path = root / "lmkv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class _Store:
    """A fresh disk store per ``warm`` round (setup, untimed), so that nothing is skipped."""

    def __init__(self, model: Any, tokenizer: Any, root: Path) -> None:
        self.model, self.tokenizer, self.root, self.round = model, tokenizer, root, 0
        self.warmer: Any = None
        self.summary: Any = None

    def fresh(self) -> None:
        from lmkv.tools.warm import Warmer, engine_for

        self.close()
        self.round += 1
        root = self.root / f"round{self.round}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        self.warmer = Warmer(self.model, self.tokenizer, engine_for(self.model, _config(root)))

    def close(self) -> None:
        if self.warmer is not None:
            self.warmer.engine.close()
            self.warmer = None


def measure(model: Any, tokenizer: Any, docs: list[Path], repeats: int, root: Path) -> list[dict[str, Any]]:
    from lmkv.tools.warm import Warmer, engine_for, warm_documents

    ids = [torch.tensor([tokenizer(p.read_text())["input_ids"]]) for p in docs]
    tokens = sum(t.shape[1] for t in ids)

    @torch.no_grad()
    def prefill() -> None:
        for t in ids:
            model(input_ids=t, use_cache=True, logits_to_keep=1)

    store = _Store(model, tokenizer, root)
    full_root = root / "full"
    full_root.mkdir()
    full = Warmer(model, tokenizer, engine_for(model, _config(full_root)))
    warm_documents(full, docs, progress=False)  # the store every document is found in (and the model's warm-up)
    summaries: dict[str, list[Any]] = {"warm": [], "warm, all stored": []}
    candidates = {
        "prefill": (None, prefill),
        "warm": (store.fresh, lambda: summaries["warm"].append(warm_documents(store.warmer, docs, progress=False))),
        "warm, all stored": (None, lambda: summaries["warm, all stored"].append(
            warm_documents(full, docs, progress=False))),
    }
    times = alternate_prepared(candidates, repeats=repeats, warmup=0)
    store.close()
    full.engine.close()
    base = median(times["prefill"])
    rows = []
    for name, ts in times.items():
        s = median(ts)
        last = summaries[name][-1] if name in summaries else None
        rows.append({"candidate": name, "docs": len(docs), "tokens": tokens, "median_s": s, "min_s": min(ts),
                     "docs_per_s": len(docs) / s, "tokens_per_s": tokens / s, "vs_prefill": s / base,
                     "min_vs_prefill": min(ts) / min(times["prefill"]),
                     "skipped": last.skipped if last else 0, "chunks_stored": last.chunks if last else 0,
                     "times_s": ts})
    return rows


def plot(rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["candidate"] for r in rows]
    ax.bar(names, [r["tokens_per_s"] for r in rows], color=["tab:gray", "tab:blue", "tab:green"][: len(rows)])
    for i, r in enumerate(rows):
        ax.annotate(f"{r['docs_per_s']:.2f} docs/s", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (median)")
    ax.set_title(f"lmkv warm vs plain prefill, SmolLM2-135M fp32, {rows[0]['docs']} docs / {rows[0]['tokens']} tokens")
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--min-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args(argv)
    if args.small or small():
        args.docs, args.min_tokens, args.max_tokens, args.repeats = 2, 300, 600, 2
    from lmkv.tools.models import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2(torch.float32)
    root = Path(tempfile.mkdtemp(prefix="lmkv-warm-"))
    try:
        (root / "docs").mkdir()
        docs = _documents(tokenizer, args.docs, args.min_tokens, args.max_tokens, root / "docs")
        rows = measure(model, tokenizer, docs, args.repeats, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    columns = ["candidate", "docs", "tokens", "median_s", "min_s", "docs_per_s", "tokens_per_s", "vs_prefill",
               "min_vs_prefill", "skipped", "chunks_stored"]
    print_table(rows, columns, title="lmkv warm throughput (SmolLM2-135M, fp32, CPU)")
    write_rows("warm_throughput", rows)
    save_plot(plot(rows), "warm_throughput")


if __name__ == "__main__":
    main()
