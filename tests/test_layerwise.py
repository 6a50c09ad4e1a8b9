"""The vLLM connector's layerwise pieces (``lmkv.adapters.vllm_layerwise``, no vLLM needed) and the engine's
``retrieve(start=)`` they read through: layer-by-layer loads write exactly what ``retrieve_paged`` writes, a layer's
waiter is released only once that layer is in place, layer-by-layer gathers equal one whole gather."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmkv.adapters.vllm_layerwise import LayerLoads, LayerSaves, StagingBuffer, layer_caches
from lmkv.engine import KVEngine
from lmkv.ops import paged
from lmkv.reference import paged as ref_paged
from lmkv.types import KVGeometry

GEOM = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float16)
CHUNK, BS, NB = 16, 5, 24
LAYOUT = "flash_attn"  # [2, NB, BS, H, D] per layer


def _engine(tmp: Path) -> KVEngine:
    return KVEngine({"chunk_size": CHUNK, "memory": {"capacity": "64MiB"}, "disk": {"path": str(tmp / "d")},
                     "node": {"enabled": False}}, GEOM, model_id="layerwise-test")


def _kv(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(GEOM.chunk_shape(tokens), generator=torch.Generator().manual_seed(seed)).to(GEOM.dtype)


def _caches(fill: float = -3.0) -> list[torch.Tensor]:
    return [torch.full((2, NB, BS, GEOM.num_kv_heads, GEOM.head_dim), fill, dtype=GEOM.dtype)
            for _ in range(GEOM.num_layers)]


@given(tokens=st.integers(2, 70), start=st.integers(0, 69), stored=st.integers(0, 5), seed=st.integers(0, 3))
@example(tokens=3 * CHUNK + 5, start=CHUNK + 3, stored=5, seed=0)  # start inside a chunk, all stored
@example(tokens=3 * CHUNK, start=2 * CHUNK, stored=1, seed=1)  # start past what is stored: n is start
@example(tokens=CHUNK + 1, start=0, stored=0, seed=2)  # nothing stored
@settings(deadline=None, max_examples=25)
def test_retrieve_from_start_reads_the_chunks_past_it(tmp_path_factory, tokens: int, start: int, stored: int,
                                                      seed: int) -> None:
    start = min(start, tokens - 1)
    eng = _engine(tmp_path_factory.mktemp("r"))
    toks = [3 + seed * 1000 + i for i in range(tokens)]
    kv = _kv(tokens, seed)
    plan = eng.plan(toks)
    keep = min(stored, len(plan.spans))
    if keep:
        eng.store(toks[:plan.spans[keep - 1][1]], kv[:, :, :plan.spans[keep - 1][1]])
    eng.storage.remove(plan.keys[0])  # chunk 0 is gone: a read that starts past it must not care
    out = torch.full(GEOM.chunk_shape(tokens), 7.0, dtype=GEOM.dtype)
    tiers: dict[str, int] = {}
    _, n = eng.retrieve(toks, out=out, start=start, tiers_out=tiers)
    first = start // CHUNK * CHUNK  # the chunk that holds `start` is read whole
    held = plan.spans[keep - 1][1] if keep and start >= CHUNK else 0  # chunk 0 missing: nothing from 0
    want = max(start, held)
    assert n == want
    assert torch.equal(out[:, :, first:held], kv[:, :, first:held])
    assert (out[:, :, :min(first, tokens)] == 7.0).all(), "chunks before start were written"
    assert (out[:, :, max(held, first):] == 7.0).all()
    assert sum(tiers.values()) == max(0, held - first)
    eng.close()


def test_retrieve_start_is_checked_before_anything() -> None:
    eng = KVEngine({"chunk_size": CHUNK, "memory": {"capacity": "16MiB"}, "disk": {"enabled": False},
                    "node": {"enabled": False}}, GEOM, model_id="x")
    with pytest.raises(ValueError, match="start"):
        eng.retrieve([1, 2, 3], start=-1)
    eng.close()


@given(tokens=st.integers(2, 60), skip=st.integers(0, 59), seed=st.integers(0, 3), twice=st.booleans())
@example(tokens=2 * CHUNK + 3, skip=CHUNK + 2, seed=0, twice=True)
@example(tokens=CHUNK, skip=0, seed=1, twice=False)
@settings(deadline=None, max_examples=25)
def test_layer_loads_write_what_retrieve_paged_writes(tmp_path_factory, tokens: int, skip: int, seed: int,
                                                      twice: bool) -> None:
    """Two loads in one step (``twice``), each written into its own slots from ``skip``: every layer equals the
    whole-load path bit for bit, and nothing outside the loaded slots changes."""
    skip = min(skip, tokens - 1)
    eng = _engine(tmp_path_factory.mktemp("l"))
    specs, expect = [], _caches()
    gen = torch.Generator().manual_seed(seed)
    slots_all = torch.randperm(NB * BS, generator=gen).to(torch.int64)
    for j in range(2 if twice else 1):
        toks = [7 + j * 500 + seed * 1000 + i for i in range(tokens)]
        eng.store(toks, _kv(tokens, seed + 10 * j))
        slots = slots_all[j * tokens:(j + 1) * tokens].clone()
        slots[:skip] = -1
        end = tokens - 1 if j == 0 else tokens  # a full hit leaves the last token to vLLM
        slots[end:] = -1
        assert eng.retrieve_paged(toks, expect, slots, layout=LAYOUT, start=skip, end=tokens) >= end
        specs.append((toks, slots, skip, end))
    got = _caches()
    layers, index = layer_caches({f"l{i}": t for i, t in enumerate(got)}, LAYOUT)
    assert list(index) == ["l0", "l1", "l2"]

    def read(toks: list[int], out: torch.Tensor, start: int) -> tuple[int, dict[str, int]]:
        tiers: dict[str, int] = {}
        return eng.retrieve(toks, out=out, start=start, tiers_out=tiers)[1], tiers

    with ThreadPoolExecutor(1) as pool:
        job = LayerLoads(specs, read, layers, StagingBuffer(GEOM.chunk_shape, GEOM.dtype), pool)
        for layer in range(GEOM.num_layers):
            job.wait(layer)
            assert torch.equal(got[layer], expect[layer]), f"layer {layer} not in place when released"
        results = job.future.result()
    assert [r[0] for r in results] == [s[3] for s in specs]
    assert all(sum(r[1].values()) > 0 or s[2] >= s[3] for r, s in zip(results, specs, strict=True))
    eng.close()


def test_a_layer_waits_for_its_load_and_a_failed_read_releases_every_layer() -> None:
    gate, calls = threading.Event(), []
    caches = _caches()
    layers, _ = layer_caches({f"l{i}": t for i, t in enumerate(caches)}, LAYOUT)

    def slow(toks: list[int], out: torch.Tensor, start: int) -> tuple[int, dict[str, int]]:
        calls.append(len(toks))
        gate.wait()
        raise OSError("the tier went away")

    slots = torch.arange(CHUNK, dtype=torch.int64)
    with ThreadPoolExecutor(1) as pool:
        job = LayerLoads([(list(range(CHUNK)), slots, 0, CHUNK - 1)], slow, layers,
                         StagingBuffer(GEOM.chunk_shape, GEOM.dtype), pool)
        waiter = threading.Thread(target=job.wait, args=(0,))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive(), "layer 0 was released before its load"
        gate.set()
        waiter.join(5)
        assert not waiter.is_alive()
        for layer in range(GEOM.num_layers):
            job.wait(layer)
        ((valid, tiers, _),) = job.future.result()
        assert (valid, tiers) == (0, {}) and calls == [CHUNK]
    assert all((c == -3.0).all() for c in caches), "a failed read wrote into the cache"


@given(tokens=st.integers(1, 60), first=st.integers(0, 3), seed=st.integers(0, 3))
@example(tokens=2 * CHUNK + 3, first=1, seed=0)
@settings(deadline=None, max_examples=20)
def test_layer_saves_equal_one_whole_gather(tokens: int, first: int, seed: int) -> None:
    first = min(first * CHUNK, (tokens - 1) // CHUNK * CHUNK)
    gen = torch.Generator().manual_seed(seed)
    caches = [torch.randn(2, NB, BS, GEOM.num_kv_heads, GEOM.head_dim, generator=gen).to(GEOM.dtype)
              for _ in range(GEOM.num_layers)]
    slots = torch.randperm(NB * BS, generator=gen)[:tokens].to(torch.int64)
    layers, _ = layer_caches({f"l{i}": t for i, t in enumerate(caches)}, LAYOUT)
    stage = StagingBuffer(GEOM.chunk_shape, GEOM.dtype)
    stage.take(3 * tokens).fill_(9.0)  # a reused buffer holds older data
    saves = LayerSaves([(slots[first:], first)], layers, [stage])
    for layer in reversed(range(GEOM.num_layers)):
        assert not saves.complete()
        saves.gather(layer)
    assert saves.complete()
    (buf,) = saves.buffers()
    assert torch.equal(buf, ref_paged.gather(caches, slots[first:], layout=LAYOUT))
    assert torch.equal(buf, paged.gather(paged.PagedCache(caches, LAYOUT), slots[first:]))


def test_staging_grows_and_is_reused() -> None:
    st_ = StagingBuffer(lambda t: (GEOM.num_layers, 2, t, 2, 4), torch.float32)
    a = st_.take(10)
    b = st_.take(4)
    assert a.data_ptr() == b.data_ptr() and b.shape == (3, 2, 4, 2, 4)
    c = st_.take(30)
    assert c.shape[2] == 30 and st_.take(25).data_ptr() == c.data_ptr()
