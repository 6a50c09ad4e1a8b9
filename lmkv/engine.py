"""KVEngine: lookup / store / retrieve of KV chunks = hashing + storage (+ codec via serde) + paged ops.

A prompt's tokens are cut into chunks of ``chunk_size``; chunk i is addressed by a prefix-chained digest of
chunks 0..i (``lmkv.ops.hashing``), turned into a storage key that also names the model, the KV geometry and
the tensor-parallel rank (``lmkv.keys``). Each stored object carries a fingerprint of its own tokens, checked
on every read, so a digest collision is a miss and never wrong KV.

Tensors: ``kv`` chunks are ``[L, 2, T, H, D]`` (MLA ``[L, 1, T, D]``) in the geometry's dtype; the paged forms
move KV directly between an engine's paged cache and storage through ``lmkv.ops.paged``.

The engine imports neither transformers nor vLLM: adapters pass tensors and token lists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmkv import config as lmkv_config
from lmkv.errors import GeometryMismatch
from lmkv.keys import KeySpace
from lmkv.ops import hashing
from lmkv.storage import TieredStore
from lmkv.token_db import TokenDatabase
from lmkv.types import KVGeometry


@dataclass
class EngineCounters:
    """Cumulative counters of one engine (``stats()`` returns them with the store's per-tier counters)."""

    lookups: int = 0
    hit_tokens: int = 0
    missed_tokens: int = 0
    stored_tokens: int = 0
    stored_chunks: int = 0
    skipped_chunks: int = 0
    retrieved_tokens: int = 0
    lookup_s: float = 0.0
    retrieve_s: float = 0.0
    store_s: float = 0.0
    load_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _token_list(tokens: Any, name: str = "tokens") -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tokens.shape)}")
        return tokens.tolist()
    if hasattr(tokens, "tolist"):
        return list(tokens.tolist())
    if not isinstance(tokens, Sequence):
        raise TypeError(f"{name} must be a sequence of ints or a 1-D tensor, got {type(tokens).__name__}")
    return list(tokens)


class KVEngine:
    """Stores and serves KV chunks for one model geometry.

    Args:
        config: an :class:`lmkv.config.LmkvConfig`, a dict, a YAML path, or None (defaults + env).
        geometry: the model's :class:`KVGeometry`; every tensor passed in must match it.
        model_id: identity of the weights (part of every key); defaults to ``config.model_id``.
        rank, world_size: tensor-parallel position (part of the key when world_size > 1).
        store: an existing :class:`lmkv.storage.TieredStore` to share (default: built from config).
    """

    def __init__(
        self,
        config: Any = None,
        geometry: KVGeometry | None = None,
        *,
        model_id: str = "",
        rank: int = 0,
        world_size: int = 1,
        store: TieredStore | None = None,
    ) -> None:
        if not isinstance(geometry, KVGeometry):
            raise TypeError(f"geometry must be a KVGeometry, got {type(geometry).__name__}")
        self.config = lmkv_config.load(config)
        self.geometry = geometry
        self.model_id = model_id or self.config.model_id or "unnamed-model"
        self.chunk_size = self.config.chunk_size
        self.keyspace = KeySpace(self.model_id, geometry, rank=rank, world_size=world_size)
        self.db = TokenDatabase(self.chunk_size, self.keyspace, save_partial=self.config.save_partial_chunks)
        self.storage = store if store is not None else TieredStore.from_config(self.config)
        self._owns_store = store is None
        self.counters = EngineCounters()
        self._lock = threading.Lock()
        self._last_tiers: dict[str, int] = {}
        self._local = threading.local()  # per-thread staging buffer for retrieve

    # -- construction helpers ------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: Any, config: Any = None, *, dtype: torch.dtype | None = None, **kwargs: Any) -> KVEngine:
        """An engine for a transformers model: geometry from ``model.config``, model id from its name/path."""
        geometry = KVGeometry.from_hf_config(model.config, dtype or getattr(model, "dtype", None))
        cfg = lmkv_config.load(config)
        model_id = kwargs.pop("model_id", "") or cfg.model_id or _model_identity(model)
        return cls(cfg, geometry, model_id=model_id, **kwargs)

    def check_model(self, model: Any) -> None:
        """Raise GeometryMismatch when ``model`` does not produce KV of this engine's geometry."""
        got = KVGeometry.from_hf_config(model.config, getattr(model, "dtype", None))
        if got != self.geometry:
            raise GeometryMismatch(f"model KV geometry {got.tag()} does not match the engine's {self.geometry.tag()}")

    # -- core API ------------------------------------------------------------------------------------------
    def lookup(self, tokens: Any) -> int:
        """Number of leading tokens of ``tokens`` whose chunks are all stored (0 .. len(tokens))."""
        toks = _token_list(tokens)
        t0 = time.perf_counter()
        n = self.db.lookup(toks, self.storage.batched_contains)
        with self._lock:
            self.counters.lookups += 1
            self.counters.lookup_s += time.perf_counter() - t0
        return n

    def store(self, tokens: Any, kv: torch.Tensor, *, offset: int = 0) -> int:
        """Store the chunks of ``tokens`` that ``kv`` fully covers; returns the number of tokens newly stored.

        Args:
            tokens: the whole token sequence the chunk keys are computed from (prefix chain).
            kv: ``[L, 2, T, H, D]`` KV of ``tokens[offset : offset + T]``.
            offset: position of kv's first token in ``tokens``.
        Chunks already stored are skipped; a trailing partial chunk is stored only when it ends the sequence
        and ``save_partial_chunks`` is on.
        """
        toks = _token_list(tokens)
        num = self.geometry.check_chunk(kv, "kv")
        if not 0 <= offset <= len(toks) or offset + num > len(toks):
            raise ValueError(f"offset={offset} with kv of {num} tokens does not fit tokens of length {len(toks)}")
        t0 = time.perf_counter()
        stored = 0
        all_chunks = self.db.chunks(toks)
        wanted = [i for i, (s, e, _) in enumerate(all_chunks) if s >= offset and e <= offset + num]
        chunks = [all_chunks[i] for i in wanted]
        missing = [i for i, (_, _, key) in zip(wanted, chunks) if not self.storage.contains(key)]
        skipped = len(chunks) - len(missing)
        if missing:
            # A prefix chunk's KV depends on every token before it: its fingerprint covers tokens[0:end].
            fps = hashing.prefix_fingerprints(toks, [all_chunks[i][1] for i in missing], salt=self.keyspace.salt)
            for i, fp in zip(missing, fps):
                start, end, key = all_chunks[i]
                self.storage.put(key, kv[:, :, start - offset : end - offset].contiguous(), fingerprint=fp)
                stored += end - start
        with self._lock:
            self.counters.stored_tokens += stored
            self.counters.stored_chunks += len(chunks) - skipped
            self.counters.skipped_chunks += skipped
            self.counters.store_s += time.perf_counter() - t0
        return stored

    def retrieve(self, tokens: Any) -> tuple[torch.Tensor, int]:
        """KV of the longest stored prefix of ``tokens``.

        Returns:
            ``(kv [L, 2, n, H, D], n)``; n = 0 gives an empty kv. Reading stops at the first chunk that is
            missing, corrupt, or whose token fingerprint does not match.
        """
        toks = _token_list(tokens)
        t0 = time.perf_counter()
        n = 0
        tiers: dict[str, int] = {}
        chunks = self.db.chunks(toks)
        fps = self.db.fingerprints(toks) if chunks else []
        # One output for every chunk, filled through a reused staging chunk: no per-chunk allocation and no
        # final concatenation (fresh allocations are page-fault bound at a fraction of copy bandwidth).
        out = torch.empty(self.geometry.chunk_shape(chunks[-1][1] if chunks else 0), dtype=self.geometry.dtype)
        for (start, end, key), fp in zip(chunks, fps):
            kv, tier = self._get(key, end - start, fp, staging=self._staging(end - start))
            if kv is None:
                break
            out[:, :, start:end].copy_(kv)
            tiers[tier] = tiers.get(tier, 0) + (end - start)
            n = end
        out = out[:, :, :n]
        with self._lock:
            self.counters.retrieved_tokens += n
            self.counters.hit_tokens += n
            self.counters.missed_tokens += len(toks) - n
            self.counters.retrieve_s += time.perf_counter() - t0
            self._last_tiers = tiers
        return out, n

    def _staging(self, num_tokens: int) -> torch.Tensor | None:
        """A reused contiguous buffer for one full chunk (None for a partial chunk)."""
        if num_tokens != self.chunk_size:
            return None
        buf = getattr(self._local, "staging", None)
        if buf is None:
            buf = self._local.staging = torch.empty(self.geometry.chunk_shape(num_tokens), dtype=self.geometry.dtype)
        return buf

    def _get(self, key: str, num_tokens: int, fingerprint: bytes,
             staging: torch.Tensor | None = None) -> tuple[torch.Tensor | None, str]:
        kv, tier = self.storage.get_with_tier(key, fingerprint=fingerprint, out=staging)
        if kv is None or tier is None:
            return None, ""
        want = self.geometry.chunk_shape(num_tokens)
        if tuple(kv.shape) != want or kv.dtype != self.geometry.dtype:
            # A foreign object under our key: treat as a miss (the key names the geometry, so this is corruption).
            with self._lock:
                self.counters.load_errors += 1
            return None, ""
        return kv, tier

    def last_tiers(self) -> dict[str, int]:
        """Tokens served per tier by the most recent ``retrieve``."""
        return dict(self._last_tiers)

    # -- paged forms ---------------------------------------------------------------------------------------
    def store_paged(self, tokens: Any, kv_caches: Any, slot_mapping: torch.Tensor, *, layout: Any,
                    start: int = 0) -> int:
        """Gather ``tokens[start:len(slot_mapping)]`` from a paged cache and store their chunks.

        ``slot_mapping`` is int64 ``[T]`` aligned with ``tokens[:T]``; only chunks fully inside
        ``[start, T)`` are stored (chunks before ``start`` are assumed stored already).
        """
        from lmkv.ops import paged

        toks = _token_list(tokens)
        total = int(slot_mapping.shape[0])
        if total > len(toks):
            raise ValueError(f"slot_mapping has {total} slots for {len(toks)} tokens")
        first = (start // self.chunk_size) * self.chunk_size
        chunks = [c for c in self.db.chunks(toks[:total]) if c[0] >= first]
        if not chunks:
            return 0
        lo = chunks[0][0]
        kv = paged.gather(kv_caches, slot_mapping[lo:total], layout=layout)
        return self.store(toks[:total], kv, offset=lo)

    def retrieve_paged(self, tokens: Any, kv_caches: Any, slot_mapping: torch.Tensor, *, layout: Any,
                       start: int = 0, end: int | None = None) -> int:
        """Scatter the stored KV of ``tokens[start:end]`` into a paged cache; returns the tokens loaded (<= end).

        ``slot_mapping`` is int64 ``[T]`` aligned with ``tokens[:T]``. Loading stops at the first missing or
        invalid chunk; the return value says how far the cache is now valid (tokens before ``start`` are the
        caller's).
        """
        from lmkv.ops import paged

        toks = _token_list(tokens)
        end = len(toks) if end is None else end
        if end > slot_mapping.shape[0]:
            raise ValueError(f"end={end} exceeds slot_mapping length {slot_mapping.shape[0]}")
        kv, n = self.retrieve(toks[:end])
        n = min(n, end)
        if n > start:
            paged.scatter(kv[:, :, start:n].contiguous(), kv_caches, slot_mapping[start:n], layout=layout)
        return max(n, start) if n > start else start

    # -- housekeeping --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.counters
        out = {k: v for k, v in c.__dict__.items() if k != "extra"}
        out["tiers"] = self.storage.stats()
        return out

    def flush(self) -> None:
        """Wait until asynchronous writes to lower tiers are done."""
        self.storage.flush()

    def close(self) -> None:
        if self._owns_store:
            self.storage.close()

    def __enter__(self) -> KVEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _model_identity(model: Any) -> str:
    """``<name>-<digest>``: the name alone is not enough (two random models share a class name), so a digest of
    the config and a sample of the embedding weights is added; it is stable across processes and machines."""
    import hashlib

    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__).rstrip("/").rsplit("/", 1)[-1]
    h = hashlib.blake2b(digest_size=8)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "rope_theta"):
        h.update(f"{attr}={getattr(text, attr, None)};".encode())
    emb = model.get_input_embeddings().weight
    sample = emb[: min(4, emb.shape[0])].detach().to("cpu", torch.float32).contiguous()
    h.update(sample.numpy().tobytes())
    return f"{name or type(model).__name__}-{h.hexdigest()}"
