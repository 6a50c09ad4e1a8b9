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

import logging
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

import lmkv.config as lmkv_config  # not `from lmkv import`: the package imports the engine lazily
from lmkv.errors import GeometryMismatch, ModelMismatch
from lmkv.keys import KeySpace
from lmkv.plan import Chunk, ChunkPlan
from lmkv.storage import TieredStore
from lmkv.token_db import TokenDatabase
from lmkv.types import KVGeometry

log = logging.getLogger("lmkv.engine")


@dataclass
class EngineCounters:
    """Cumulative counters of one engine (``stats()`` returns them with the store's per-tier counters)."""

    lookups: int = 0
    lookup_tokens: int = 0  # tokens the lookups asked about
    lookup_hit_tokens: int = 0  # of those, the leading tokens found stored (what lookup returned)
    hit_tokens: int = 0  # tokens retrieves served (hit_tokens + missed_tokens: the tokens retrieves asked for)
    missed_tokens: int = 0
    stored_tokens: int = 0
    stored_chunks: int = 0
    skipped_chunks: int = 0
    retrieved_tokens: int = 0
    lookup_s: float = 0.0
    retrieve_s: float = 0.0
    store_s: float = 0.0
    load_errors: int = 0


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
        # A declared id (argument or config) is the caller's word for the weights; else check_model compares the
        # model's derived identity with model_id.
        self._declared_id = bool(model_id or self.config.model_id)
        self.chunk_size = self.config.chunk_size
        self.keyspace = KeySpace(self.model_id, geometry, rank=rank, world_size=world_size)
        self.db = TokenDatabase(self.chunk_size, self.keyspace, save_partial=self.config.save_partial_chunks)
        self.storage = store if store is not None else TieredStore.from_config(self.config)
        self._owns_store = store is None
        self.counters = EngineCounters()
        self._lock = threading.Lock()
        self._last_tiers: dict[str, int] = {}
        # Prometheus metrics (lmkv.metrics): the counters above are read at scrape time, and so are the latency
        # bucket counts this hook keeps (None when metrics are off: nothing is imported).
        self._metrics: Any = None
        if self.config.metrics.enabled:
            import lmkv.metrics as lmkv_metrics

            self._metrics = lmkv_metrics.attach(self)

    # -- construction helpers ------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: Any, config: Any = None, *, dtype: torch.dtype | None = None, model_id: str = "",
                  rank: int = 0, world_size: int = 1, store: TieredStore | None = None,
                  **overrides: Any) -> KVEngine:
        """An engine for a transformers model: geometry from ``model.config``, identity from its name, config and
        weights (unless ``model_id`` is given or configured).

        Args:
            config: as for :class:`KVEngine`; ``**overrides`` are config keys on top of it
                (``KVEngine.for_model(model, chunk_size=64, memory={"capacity": "1GiB"})``).
        """
        geometry = KVGeometry.from_hf_config(model.config, dtype or getattr(model, "dtype", None))
        cfg = lmkv_config.load(config)
        if overrides:
            cfg = lmkv_config.replace(cfg, **overrides)
        declared = model_id or cfg.model_id
        eng = cls(cfg, geometry, model_id=declared or _model_identity(model), rank=rank, world_size=world_size,
                  store=store)
        eng._declared_id = bool(declared)
        return eng

    def check_model(self, model: Any) -> None:
        """Raise :class:`GeometryMismatch` when ``model`` does not produce KV of this engine's geometry, and
        :class:`ModelMismatch` when it is another model: what :meth:`for_model` derives from the model's name,
        config and weights must be the engine's ``model_id``, unless that id was given (argument or config), which
        declares the weights. Same shapes are not enough: KV computed by other weights would be served as a hit."""
        got = KVGeometry.from_hf_config(model.config, getattr(model, "dtype", None))
        if got != self.geometry:
            raise GeometryMismatch(f"model KV geometry {got.tag()} does not match the engine's {self.geometry.tag()}")
        if self._declared_id:
            return  # the caller named the weights (model_id): their word
        ident = _model_identity(model)
        if ident != self.model_id:
            raise ModelMismatch(f"model {ident!r} is not the model this engine stores KV for ({self.model_id!r}): "
                                "build an engine for it (KVEngine.for_model(model, ...)), or give both the same "
                                "model_id if they really are the same weights")

    # -- core API ------------------------------------------------------------------------------------------
    def plan(self, tokens: Any) -> ChunkPlan:
        """Hash ``tokens`` once: pass the plan to lookup, store and retrieve of the same tokens."""
        if isinstance(tokens, ChunkPlan):
            return tokens
        return self.db.plan(_token_list(tokens))

    def lookup(self, tokens: Any, *, shared_only: bool = False, tiers: Collection[str] | None = None) -> int:
        """Number of leading tokens of ``tokens`` (a sequence or its :class:`ChunkPlan`) whose chunks are stored.

        ``shared_only``: count only what tiers another process sees hold (node, disk, Redis; not this process's
        RAM). ``tiers``: count only what the tiers of these names hold. One batched membership query per tier.
        """
        plan = self.plan(tokens)
        t0 = time.perf_counter()
        n = plan.end_of(self.storage.batched_contains(plan.keys, shared_only=shared_only, tiers=tiers))
        dt = time.perf_counter() - t0
        with self._lock:
            self.counters.lookups += 1
            self.counters.lookup_tokens += len(plan)
            self.counters.lookup_hit_tokens += n
            self.counters.lookup_s += dt
            if self._metrics is not None:  # plain bucket counts (lmkv.metrics.Latency), under this lock
                self._metrics.lookup.observe(dt)
        return n

    def store(self, tokens: Any, kv: torch.Tensor, *, offset: int = 0) -> int:
        """Store the chunks of ``tokens`` that ``kv`` fully covers; returns the number of tokens newly stored.

        Args:
            tokens: the whole token sequence the chunk keys are computed from (prefix chain), or its plan.
            kv: ``[L, 2, T, H, D]`` KV of ``tokens[offset : offset + T]``.
            offset: position of kv's first token in ``tokens``.
        Chunks already stored are skipped (one batched presence query); a trailing partial chunk is stored only
        when it ends the sequence and ``save_partial_chunks`` is on.
        """
        plan = self.plan(tokens)
        num = self.geometry.check_chunk(kv, "kv")
        if not 0 <= offset <= len(plan) or offset + num > len(plan):
            raise ValueError(f"offset={offset} with kv of {num} tokens does not fit tokens of length {len(plan)}")
        t0 = time.perf_counter()
        missing, skipped = self._missing(plan, offset, offset + num)
        if missing:
            # A prefix chunk's KV depends on every token before it: its fingerprint covers tokens[0:end].
            self.storage.put_many([(plan.keys[i], kv[:, :, plan.spans[i][0] - offset:plan.spans[i][1] - offset],
                                    plan.fingerprints[i]) for i in missing])
        return self._count_store(plan, missing, skipped, t0)

    def _missing(self, plan: ChunkPlan, lo: int, hi: int) -> tuple[list[int], int]:
        """``(indices of the chunks inside [lo, hi) that storage lacks, how many it holds)``: one batched query."""
        wanted = [i for i, (s, e) in enumerate(plan.spans) if s >= lo and e <= hi]
        present = self.storage.contains_many([plan.keys[i] for i in wanted])
        missing = [i for i, have in zip(wanted, present, strict=True) if not have]
        return missing, len(wanted) - len(missing)

    def _count_store(self, plan: ChunkPlan, missing: list[int], skipped: int, t0: float) -> int:
        stored = sum(plan.spans[i][1] - plan.spans[i][0] for i in missing)
        dt = time.perf_counter() - t0
        with self._lock:
            self.counters.stored_tokens += stored
            self.counters.stored_chunks += len(missing)
            self.counters.skipped_chunks += skipped
            self.counters.store_s += dt
            if self._metrics is not None:
                self._metrics.store.observe(dt)
        return stored

    def retrieve(self, tokens: Any, *, end: int | None = None, out: torch.Tensor | None = None, start: int = 0,
                 tiers_out: dict[str, int] | None = None) -> tuple[torch.Tensor, int]:
        """KV of the longest stored prefix of ``tokens`` (a sequence or its plan), among the chunks ending at or
        before ``end`` (default: all).

        Args:
            out: where to write, ``[L, 2, >= T, H, D]`` in the geometry's dtype, any strides and device (a view
                into a consumer's own cache tensors, a reused buffer); T is the end of the last chunk asked for.
                Default: a fresh tensor.
            start: the caller holds ``tokens[:start]`` already: chunks ending at or before it are not read (their
                part of ``out`` is left as it is; a chunk that straddles ``start`` is written whole), and ``n`` is
                at least ``start`` (at most T).
            tiers_out: filled with the tokens each tier served, as for :meth:`retrieve_paged`.
        Returns:
            ``(kv [L, 2, n, H, D], n)``, kv a view of ``out``; n = 0 gives an empty kv. Reading stops at the first
            chunk that is missing, corrupt, or whose token fingerprint does not match. Storage is asked once per
            tier for all the chunks (one pipelined round trip to Redis), and each chunk is copied once, from the
            stored bytes straight into ``out``.
        """
        if not (isinstance(start, int) and start >= 0):
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        plan = self.plan(tokens)
        chunks = plan.chunks(end)
        total = chunks[-1].end if chunks else 0
        if out is None:
            out = torch.empty(self.geometry.chunk_shape(total), dtype=self.geometry.dtype)
        else:
            self._check_out(out, total)
        wanted = [c for c in chunks if c.end > start]
        n = max(self._read(plan, wanted, lambda c, kv: out[:, :, c.start:c.end].copy_(kv), tiers_out),
                min(start, total))
        return out[:, :, :n], n

    def prefetch(self, tokens: Any) -> Future:
        """Promote the stored prefix of ``tokens`` (a sequence or its plan) from the slower tiers into the top one,
        in the background, so that a later ``retrieve`` reads RAM: call it as soon as the next prompt is known.

        Returns a Future of the number of leading tokens then in the top tier (fingerprints checked, reading stops at
        the first chunk that is missing).
        """
        plan = self.plan(tokens)
        chunks = plan.chunks()
        fut = self.storage.prefetch([c.key for c in chunks], [c.fingerprint for c in chunks], prefix=True)
        out: Future = Future()

        def done(f: Future) -> None:
            if f.exception() is not None:
                out.set_exception(f.exception())
            else:
                n = f.result()
                out.set_result(chunks[n - 1].end if n else 0)

        fut.add_done_callback(done)
        return out

    def _check_out(self, out: Any, total: int) -> None:
        g = self.geometry
        want = g.chunk_shape(total)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        ok = out.dim() == len(want) and out.shape[2] >= total and all(
            out.shape[d] == want[d] for d in range(len(want)) if d != 2)
        if not ok or out.dtype != g.dtype:
            raise ValueError(f"out must be {g.dtype} of shape {want} (dim 2 >= {total}), got {out.dtype} "
                             f"{tuple(out.shape)}")

    def _read(self, plan: ChunkPlan, chunks: Sequence[Chunk], sink: Any, tiers_out: dict[str, int] | None = None
              ) -> int:
        """Hand each stored chunk of the prefix ``chunks`` (of ``plan``) to ``sink(chunk, kv)``, in order; the
        tokens served, counted as this plan's hits and misses.

        ``kv`` is a zero-copy view of the stored bytes, valid only during the call: the sink copies it to where it
        belongs (one copy). Hits arrive in order and stop at the first miss (a prefix read); a foreign object ends
        the prefix too: no later chunk reaches the sink.
        """
        t0 = time.perf_counter()
        served: list[tuple[Chunk, str]] = []
        broken = False

        def on_hit(i: int, kv: torch.Tensor, tier: str) -> None:
            nonlocal broken
            if broken or not self._fits(kv, chunks[i].num_tokens):
                broken = True  # a foreign object under our key (the key names the geometry): corruption
                return
            sink(chunks[i], kv)
            served.append((chunks[i], tier))

        self.storage.get_many([c.key for c in chunks], [c.fingerprint for c in chunks], prefix=True,
                              on_hit=on_hit, borrow=True)
        tiers: dict[str, int] = {}
        for c, tier in served:
            tiers[tier] = tiers.get(tier, 0) + c.num_tokens
        n = served[-1][0].end if served else 0
        dt = time.perf_counter() - t0
        with self._lock:
            self.counters.retrieved_tokens += n
            self.counters.hit_tokens += n
            self.counters.missed_tokens += len(plan) - n
            self.counters.retrieve_s += dt
            self._last_tiers = tiers
            if self._metrics is not None:
                self._metrics.retrieve.observe(dt)
        if tiers_out is not None:  # this call's own tally: concurrent reads each get theirs
            tiers_out.update(tiers)
        return n

    # -- position-free segments (CacheBlend) ---------------------------------------------------------------
    def segment_plan(self, tokens: Any, separator: Any) -> list[Chunk]:
        """The segments between separators, keyed by their own tokens only (found again at any position)."""
        return self.db.segment_plan(_token_list(tokens), separator)

    def retrieve_segments(self, segments: Sequence[Chunk], *, tiers_out: dict[str, int] | None = None
                          ) -> list[torch.Tensor | None]:
        """The stored KV ``[L, 2, end - start, H, D]`` of each segment (computed on its own), or None: one batched
        read; fingerprints and shapes are checked, so a foreign object is a miss. The tokens each tier served
        are this call's :meth:`last_tiers` (and go into ``tiers_out``)."""
        segments = list(segments)
        t0 = time.perf_counter()
        got = self.storage.get_many([s.key for s in segments], [s.fingerprint for s in segments])
        out = [kv if kv is not None and self._fits(kv, seg.num_tokens) else None
               for seg, (kv, _tier) in zip(segments, got, strict=True)]
        tiers: dict[str, int] = {}
        for seg, kv, (_, tier) in zip(segments, out, got, strict=True):
            if kv is not None:
                tiers[tier] = tiers.get(tier, 0) + seg.num_tokens
        dt = time.perf_counter() - t0
        with self._lock:
            self.counters.retrieved_tokens += sum(tiers.values())
            self.counters.retrieve_s += dt
            self._last_tiers = tiers
            if self._metrics is not None:
                self._metrics.retrieve.observe(dt)
        if tiers_out is not None:
            tiers_out.update(tiers)
        return out

    def _fits(self, kv: torch.Tensor, num_tokens: int) -> bool:
        """Whether a stored object has this engine's geometry; one that does not is corrupt (a load error)."""
        want = self.geometry.chunk_shape(num_tokens)
        ok = tuple(kv.shape) == want and kv.dtype == self.geometry.dtype
        if not ok:
            log.warning("engine: a stored object is %s %s where the chunk is %s %s (a foreign or forged object "
                        "under this key); treating it as a miss", kv.dtype, tuple(kv.shape), self.geometry.dtype, want)
            with self._lock:
                self.counters.load_errors += 1
        return ok

    def store_segment(self, segment: Chunk, kv: torch.Tensor) -> bool:
        """Store the KV ``[L, 2, end - start, H, D]`` of a segment computed on its own (from position 0)."""
        num = self.geometry.check_chunk(kv, "kv")
        if num != segment.num_tokens:
            raise ValueError(f"kv has {num} tokens, segment [{segment.start}, {segment.end}) has {segment.num_tokens}")
        self.storage.put(segment.key, kv, fingerprint=segment.fingerprint)
        with self._lock:
            self.counters.stored_tokens += num
            self.counters.stored_chunks += 1
        return True

    def last_tiers(self) -> dict[str, int]:
        """Tokens served per tier by the most recent ``retrieve``."""
        return dict(self._last_tiers)

    # -- paged forms ---------------------------------------------------------------------------------------
    def store_paged(self, tokens: Any, kv_caches: Any, slot_mapping: torch.Tensor, *, layout: Any = None,
                    start: int = 0) -> int:
        """Gather ``tokens[start:len(slot_mapping)]`` from a paged cache and store their chunks.

        ``tokens`` is the sequence (or its plan) whose first ``T = len(slot_mapping)`` tokens are in the cache;
        ``slot_mapping`` is int64 ``[T]``. Only chunks fully inside ``[start, T)`` are stored (chunks before
        ``start`` are assumed stored already). ``kv_caches``: the engine's tensors in ``layout`` (a layout name
        or :class:`lmkv.layouts.BlockMap`), or a :class:`lmkv.ops.paged.PagedCache` handle (validated once,
        ``layout`` then optional): keep one per registered cache.
        """
        from lmkv.ops import paged

        total = int(slot_mapping.shape[0])
        plan = tokens if isinstance(tokens, ChunkPlan) else None
        toks = plan.tokens if plan is not None else _token_list(tokens)
        if total > len(toks):
            raise ValueError(f"slot_mapping has {total} slots for {len(toks)} tokens")
        if plan is None or total != len(plan):
            plan = self.plan(toks[:total])
        cache = kv_caches if isinstance(kv_caches, paged.PagedCache) else paged.PagedCache(kv_caches, layout)
        self._check_paged(cache, slot_mapping)
        first = (start // self.chunk_size) * self.chunk_size
        if cache.device.type != "cpu":  # one gather on the device, then one copy to host memory per chunk
            spans = [sp for sp in plan.spans if sp[0] >= first]
            if not spans:
                return 0
            return self.store(plan, paged.gather(cache, slot_mapping[spans[0][0]:total]), offset=spans[0][0])
        t0 = time.perf_counter()
        missing, skipped = self._missing(plan, first, total)
        for i in missing:
            lo, hi = plan.spans[i]
            # gathered straight into the memory tier's slot: one copy from the engine's blocks to storage
            self.storage.put_filled(plan.keys[i], self.geometry.chunk_shape(hi - lo), self.geometry.dtype,
                                    plan.fingerprints[i],
                                    lambda dst, lo=lo, hi=hi: paged.gather(cache, slot_mapping[lo:hi], out=dst))
        return self._count_store(plan, missing, skipped, t0)

    def _check_paged(self, cache: Any, slot_mapping: torch.Tensor) -> None:
        """Raise before anything is written unless ``cache`` holds this engine's geometry and ``slot_mapping`` is
        valid for it."""
        cache.check_slots(slot_mapping)
        g = cache.geometry
        if cache.chunk_shape(1) != self.geometry.chunk_shape(1) or g.dtype != self.geometry.dtype:
            raise GeometryMismatch(f"kv_caches hold {cache.chunk_shape(1)} {g.dtype} per token, the engine's "
                                   f"geometry is {self.geometry.tag()}")

    def retrieve_paged(self, tokens: Any, kv_caches: Any, slot_mapping: torch.Tensor, *, layout: Any = None,
                       start: int = 0, end: int | None = None, tiers_out: dict[str, int] | None = None) -> int:
        """Scatter the stored KV of ``tokens[start:end]`` into a paged cache; returns the tokens loaded (<= end).

        ``tokens`` is the sequence whose chunk keys are read (a token list is keyed as ``tokens[:end]``; a plan
        as it is, its chunks ending at or before ``end``); ``slot_mapping`` is int64 ``[T]`` aligned with
        ``tokens[:T]``; ``kv_caches``/``layout`` as for :meth:`store_paged`. Loading stops at the first missing or
        invalid chunk; the return value says how far the cache is now valid (tokens before ``start`` are the
        caller's). ``tiers_out``: filled with the tokens each tier served (as :meth:`last_tiers`, but for this call
        alone, so that loads running in parallel threads each know theirs). Slots of -1 are not written.
        """
        from lmkv.ops import paged

        plan = tokens if isinstance(tokens, ChunkPlan) else None
        toks = plan.tokens if plan is not None else _token_list(tokens)
        end = len(toks) if end is None else end
        if end > slot_mapping.shape[0]:
            raise ValueError(f"end={end} exceeds slot_mapping length {slot_mapping.shape[0]}")
        plan = plan if plan is not None else self.plan(toks[:end])

        def scatter(c: Chunk, kv: torch.Tensor) -> None:
            lo = max(c.start, start)
            if lo < c.end:  # straight from the stored bytes into the paged cache, no intermediate chunk tensor
                src = kv if lo == c.start else kv[:, :, lo - c.start:].contiguous()
                paged.scatter(src, kv_caches, slot_mapping[lo:c.end], layout=layout)

        # Only the chunks that reach past start are read: the caller holds the tokens before it (vLLM's own
        # prefix cache), and reading them would cost the whole prefix's I/O and checksums for nothing.
        wanted = [c for c in plan.chunks(end) if c.end > start]
        n = min(self._read(plan, wanted, scatter, tiers_out), end)
        return max(n, start)

    # -- KV events -----------------------------------------------------------------------------------------
    def subscribe(self, fn: Any) -> Any:
        """Call ``fn(event)`` (an :class:`lmkv.events.KVEvent`: ``stored`` / ``removed``, chunk key, tokens, tier,
        model) whenever a tier stores or loses one of this engine's chunks (its key space: a shared store's other
        engines are filtered out); returns the function that unsubscribes. See docs/storage.md, "KV events"."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        prefix = self.keyspace.prefix

        def mine(event: Any) -> None:
            if event.key.startswith(prefix):
                fn(event)

        return self.storage.subscribe(mine)

    def holds(self, keys: Sequence[str]) -> list[bool]:
        """Whether some tier holds each chunk key (``plan.keys``, a KVEvent's key): one query per tier."""
        return self.storage.contains_many(list(keys))

    # -- housekeeping --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.counters
        out = dict(c.__dict__)
        out["tiers"] = self.storage.stats()
        return out

    def flush(self) -> None:
        """Wait until asynchronous writes to lower tiers are done (and, in multiprocess metrics mode, push the
        counters into this process's metrics files)."""
        self.storage.flush()
        if self._metrics is not None:
            self._metrics.sync()

    def close(self) -> None:
        """Unregister from the metrics (a last push first, in multiprocess mode) and close the store it owns."""
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.close()
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
