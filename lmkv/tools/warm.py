"""``lmkv warm``: tokenize documents and store their KV before any request asks for it.

Each document is tokenized as a prompt would be, and its prefix chunks are stored by :func:`lmkv.hf.generate`
with one new token: one prefill whose KV is stored chunk by chunk (what a serving process would have stored
after answering that document). A document already partly stored reuses its stored prefix, so a run that was
interrupted resumes where it stopped; a document whose chunks are all stored is skipped after a lookup. With
``blend`` the spans followed by the blend separator (``blend.separator`` of the config) are also prefilled each
on its own and stored under their position-free segment keys (CacheBlend), as ``generate(blend=True)`` does.

The engine is built from the configuration without the process memory tier (it would vanish with this
process): what is warmed lands in the persistent tiers (node, disk, Redis), where serving processes find it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lmkv.tools.store_admin import UsageError

DOC_SUFFIXES = (".txt", ".md")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class WarmSummary:
    """What a run did. ``tokens``: tokens of the documents prefilled (skipped ones excluded); ``seconds``: wall
    time from the first document to the last write landing in its tier."""

    documents: int = 0
    skipped: int = 0
    tokens: int = 0
    stored_tokens: int = 0
    chunks: int = 0
    segments: int = 0
    seconds: float = 0.0
    per_doc: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def docs_per_s(self) -> float:
        """Documents handled (skipped ones included) per second of the run."""
        return self.documents / self.seconds if self.seconds else 0.0

    def table(self) -> str:
        cols = [("documents", self.documents), ("skipped", self.skipped), ("tokens", self.tokens),
                ("chunks stored", self.chunks), ("segments stored", self.segments),
                ("seconds", f"{self.seconds:.2f}"), ("documents/s", f"{self.docs_per_s:.2f}"),
                ("tokens/s", f"{self.tokens_per_s:.0f}")]
        width = max(len(name) for name, _ in cols)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in cols)


def find_documents(paths: Sequence[str]) -> list[Path]:
    """The files named, and the ``.txt``/``.md`` files under the directories named (recursively, sorted)."""
    if not paths:
        raise UsageError("FILE|DIR: name at least one document or directory")
    docs: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            docs.append(p)
        elif p.is_dir():
            docs.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DOC_SUFFIXES))
        else:
            raise UsageError(f"FILE|DIR: no such file or directory: {p}")
    if not docs:
        raise UsageError(f"FILE|DIR: no {'/'.join(DOC_SUFFIXES)} documents under {', '.join(paths)}")
    return docs


def load_model(model_dir: str, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local transformers directory, offline, in eval mode on CPU."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not (Path(model_dir) / "config.json").is_file():
        raise UsageError(f"--model: {model_dir} is not a transformers model directory (no config.json)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    return model, tokenizer


def engine_for(model: Any, config: Any) -> Any:
    """A KVEngine for ``model`` on the configured persistent tiers (the memory tier dropped: see the module)."""
    from lmkv import config as lmkv_config
    from lmkv.engine import KVEngine

    cfg = lmkv_config.load(config)
    if not (cfg.node.enabled or cfg.disk.enabled or cfg.redis.enabled):
        raise UsageError("--config: the configuration enables no persistent tier (node, disk, redis) to warm")
    return KVEngine.for_model(model, cfg, memory={"enabled": False})


class Warmer:
    """Stores the KV of documents through one engine (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, engine: Any, *, blend: bool = False,
                 max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens < 2:
            raise UsageError(f"--max-tokens: must be >= 2, got {max_tokens}")
        self.model, self.tokenizer, self.engine, self.blend = model, tokenizer, engine, blend
        self.max_tokens = max_tokens or getattr(model.config, "max_position_embeddings", None)
        self._sep: list[int] | None = None
        if blend:
            from lmkv.adapters.hf.blend import separator_ids

            self._sep = separator_ids(engine, tokenizer)

    def tokens(self, text: str) -> list[int]:
        """``text`` tokenized as a prompt (special tokens included), cut at ``max_tokens``."""
        ids = list(self.tokenizer(text)["input_ids"])
        return ids[: self.max_tokens] if self.max_tokens else ids

    def _segments(self, tokens: list[int]) -> list[Any]:
        from lmkv.adapters.hf.blend import chunk_spans

        return chunk_spans(tokens, self._sep, self.engine) if self._sep is not None else []

    def is_stored(self, tokens: list[int]) -> bool:
        """Whether every prefix chunk (and with ``blend`` every segment) of ``tokens`` is stored: one lookup."""
        plan = self.engine.plan(tokens)
        end = plan.spans[-1][1] if plan.spans else 0
        if self.engine.lookup(plan) < end:
            return False
        segs = self._segments(tokens)
        return all(self.engine.storage.contains_many([s.key for s in segs]))

    def warm(self, tokens: list[int]) -> dict[str, int]:
        """Store what is missing of one document: ``{"stored_tokens", "chunks", "segments"}`` newly stored."""
        import torch

        from lmkv.hf import generate

        before = self.engine.counters.stored_chunks
        out = generate(self.model, torch.tensor([tokens]), engine=self.engine, max_new_tokens=1,
                       pad_token_id=self._pad_id())
        done = {"stored_tokens": out.stats.stored_tokens, "chunks": self.engine.counters.stored_chunks - before,
                "segments": 0}
        if self.blend:
            seg_tokens, done["segments"] = self._warm_segments(tokens)
            done["stored_tokens"] += seg_tokens
        return done

    def _warm_segments(self, tokens: list[int]) -> tuple[int, int]:
        """Prefill each missing segment on its own and store it; ``(tokens, segments)`` stored."""
        from lmkv.adapters.hf.blend import prefill_kv

        segs = list({s.key: s for s in self._segments(tokens)}.values())  # a repeated span is stored once
        have = self.engine.storage.contains_many([s.key for s in segs])
        n_tok = n_seg = 0
        for seg, present in zip(segs, have):
            if present:
                continue
            kv = prefill_kv(self.model, tokens[seg.start:seg.end])[0].to(self.engine.geometry.dtype)
            self.engine.store_segment(seg, kv)
            n_tok += seg.num_tokens
            n_seg += 1
        return n_tok, n_seg

    def _pad_id(self) -> int | None:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def warm_documents(warmer: Warmer, docs: Iterable[Path], *, progress: bool = True) -> WarmSummary:
    """Warm every document (skipping the ones stored already), with a tqdm bar over documents on stderr."""
    from tqdm.auto import tqdm

    docs = list(docs)
    summary = WarmSummary(documents=len(docs))
    t0 = time.perf_counter()
    for path in tqdm(docs, desc="lmkv warm", unit="doc", disable=not progress):
        tokens = warmer.tokens(path.read_text(encoding="utf-8", errors="replace"))
        if len(tokens) < 2 or warmer.is_stored(tokens):
            summary.skipped += 1
            summary.per_doc.append({"document": str(path), "tokens": len(tokens), "skipped": True})
            continue
        done = warmer.warm(tokens)
        summary.tokens += len(tokens)
        summary.stored_tokens += done["stored_tokens"]
        summary.chunks += done["chunks"]
        summary.segments += done["segments"]
        summary.per_doc.append({"document": str(path), "tokens": len(tokens), "skipped": False, **done})
    warmer.engine.flush()  # the writes land in their tiers before the run counts as done
    summary.seconds = time.perf_counter() - t0
    return summary


def run(model_dir: str, paths: Sequence[str], *, config: str | None = None, blend: bool = False,
        dtype: str = "float32", max_tokens: int | None = None, progress: bool = True,
        out: TextIO | None = None) -> WarmSummary:
    """``lmkv warm``: load the model, warm ``paths``, print the summary table to ``out``."""
    from lmkv.tools.store_admin import load_config

    docs = find_documents(paths)
    cfg = load_config(config)
    model, tokenizer = load_model(model_dir, dtype)
    engine = engine_for(model, cfg)
    try:
        summary = warm_documents(Warmer(model, tokenizer, engine, blend=blend, max_tokens=max_tokens), docs,
                                 progress=progress)
    finally:
        engine.close()
    if out is not None:
        print(summary.table(), file=out)
    return summary


__all__ = ["WarmSummary", "Warmer", "find_documents", "load_model", "engine_for", "warm_documents", "run"]
