"""Selective-recompute prefill on tiny random LLaMA / Qwen2 / Mistral models: ratio 1 is a full prefill, ratio 0
is plain reuse of the re-rotated cache, the selection follows the deviation, and the cache drives generate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkv.adapters.hf.compat import cache_kwargs, output_cache
from lmkv.errors import ConfigError
from lmkv.hf import (
    Segment,
    blend_prefill,
    build_cache,
    cache_for_generate,
    cache_to_kv,
    kv_deviation_by_layer,
    prefill_kv,
    rope_spec,
    segments_from_chunks,
)
from lmkv.models import tiny_model
from lmkv.ops import blend

ARCHS = ("llama", "qwen2", "qwen3", "mistral")  # qwen3: q/k norm before RoPE
_MODELS: dict[tuple, object] = {}


def model(arch: str = "llama", **overrides):
    key = (arch, repr(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, seed=3, **overrides)
    return _MODELS[key]


def chunk_tokens(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def full_prefill(m, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = m(input_ids=ids[None], use_cache=True)
    return cache_to_kv(output_cache(out)), out.logits[0, -1]


def plain_reuse(m, ids: torch.Tensor, segs: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    """What reuse without recompute means: re-rotated cached KV for the cached prefix, the rest through HF."""
    covered = max(s.end for s in segs)
    spec = rope_spec(m)
    kv = torch.empty((segs[0].kv.shape[0], 2, covered, *segs[0].kv.shape[3:]))
    for s in segs:
        t = s.end - s.start
        kv[:, 0, s.start:s.end] = blend.rerotate(s.kv[:, 0], torch.arange(s.old_start, s.old_start + t),
                                                 torch.arange(s.start, s.end), spec, backend="reference")
        kv[:, 1, s.start:s.end] = s.kv[:, 1]
    cache = build_cache(kv)
    out = m(input_ids=ids[None, covered:], **cache_kwargs(cache), use_cache=True)
    return cache_to_kv(output_cache(out)), out.logits[0, -1]


def build(m, tokens: list[list[int]], order: list[int], suffix: list[int]):
    kvs = [prefill_kv(m, t)[0] for t in tokens]
    return segments_from_chunks([*((tokens[i], kvs[i]) for i in order), (suffix, None)])


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_one_is_full_prefill_and_ratio_zero_is_plain_reuse(arch: str) -> None:
    m = model(arch)
    tokens = chunk_tokens(0, [9, 13, 6])
    ids, segs = build(m, tokens, [2, 0, 1], [7, 8, 9, 10])
    full_kv, full_logits = full_prefill(m, ids)

    cache, logits, stats = blend_prefill(m, ids, segs, ratio=1.0)
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache_to_kv(cache), full_kv, atol=1e-5, rtol=1e-5)
    assert stats.recompute_fraction == 1.0

    reuse_kv, reuse_logits = plain_reuse(m, ids, segs)
    cache0, logits0, stats0 = blend_prefill(m, ids, segs, ratio=0.0)
    torch.testing.assert_close(logits0, reuse_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache_to_kv(cache0), reuse_kv, atol=1e-5, rtol=1e-5)
    assert stats0.full_layers == 0 and stats0.num_fresh == 4
    # Reuse really differs from a full prefill here (the test would be vacuous otherwise).
    assert (reuse_logits - full_logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_partial_ratio_keeps_the_most_deviating_tokens(arch: str) -> None:
    m = model(arch)
    tokens = chunk_tokens(1, [12, 10, 8])
    ids, segs = build(m, tokens, [1, 2, 0], [3, 4, 5])
    n = ids.shape[0]
    full_kv, full_logits = full_prefill(m, ids)
    _, reuse_logits = plain_reuse(m, ids, segs)
    cache, logits, stats = blend_prefill(m, ids, segs, ratio=0.25, check_layers=(1,), deviation="value")
    kv = cache_to_kv(cache)
    # Layers before the check layer are a full prefill.
    torch.testing.assert_close(kv[:1], full_kv[:1], atol=1e-5, rtol=1e-5)
    # The deviation seen at the check layer is the one a full prefill gives, and the top 25 % are selected.
    dev = kv_deviation_by_layer(m, ids, segs)["value"][1]
    candidates = torch.arange(n - 3)
    torch.testing.assert_close(stats.deviation[1][candidates], dev[candidates], atol=1e-4, rtol=1e-4)
    want = round(0.25 * (n - 3))
    assert stats.selected[1].numel() == want
    assert set(stats.selected[1].tolist()) == set(torch.topk(dev[candidates], want).indices.tolist())
    # Tokens not selected keep the re-rotated cached KV in every later layer.
    _, _, stats0 = blend_prefill(m, ids, segs, ratio=0.0)
    reuse = cache_to_kv(blend_prefill(m, ids, segs, ratio=0.0)[0])
    kept = sorted(set(range(n - 3)) - set(stats.selected[1].tolist()))
    assert torch.equal(kv[2:, :, kept], reuse[2:, :, kept])
    assert stats.active_per_layer == [n, want + 3, want + 3, want + 3]
    # Recomputing some tokens moves the logits toward the full prefill (not a random model fluke: 4 layers).
    assert (logits - full_logits).abs().max() < (reuse_logits - full_logits).abs().max()


def test_given_scores_replace_the_deviation() -> None:
    m = model("llama")
    tokens = chunk_tokens(7, [10, 10])
    ids, segs = build(m, tokens, [1, 0], [2])
    scores = torch.zeros(ids.shape[0])
    scores[[3, 11, 17]] = torch.tensor([1.0, 3.0, 2.0])  # the rule a study wants, whatever the deviation says
    _, _, stats = blend_prefill(m, ids, segs, ratio=0.15, check_layers=(1,), scores=scores)
    assert stats.selected[1].tolist() == [3, 11, 17]
    assert torch.equal(stats.deviation[1][:20], scores[:20])


def test_gradual_filtering_shrinks_the_active_set() -> None:
    m = model("llama")
    tokens = chunk_tokens(2, [10, 10, 10])
    ids, segs = build(m, tokens, [0, 1, 2], [1, 2])
    _, _, stats = blend_prefill(m, ids, segs, ratio=0.2, check_layers=(1, 2), deviation="key")
    first, second = stats.selected[1], stats.selected[2]
    assert first.numel() == round(0.2 ** 0.5 * 30) and second.numel() == 6
    assert set(second.tolist()) <= set(first.tolist())
    assert torch.isnan(stats.deviation[2][[i for i in range(30) if i not in first.tolist()]]).all()
    assert stats.active_per_layer == [32, first.numel() + 2, 8, 8]


@pytest.mark.parametrize(
    "order, suffix",
    [
        ([0], [4, 5]),  # a single chunk (at position 0: its cache is exact)
        ([1, 0, 1], [6]),  # a repeated chunk, chunks in a new order
        ([2, 0, 1], []),  # an empty suffix: the last cached token is recomputed for its logits
    ],
)
def test_layouts(order: list[int], suffix: list[int]) -> None:
    m = model("qwen2")
    tokens = chunk_tokens(3, [8, 5, 11])
    ids, segs = build(m, tokens, order, suffix)
    full_kv, full_logits = full_prefill(m, ids)
    _, logits1, _ = blend_prefill(m, ids, segs, ratio=1.0)
    torch.testing.assert_close(logits1, full_logits, atol=1e-4, rtol=1e-4)
    cache0, logits0, stats0 = blend_prefill(m, ids, segs, ratio=0.0)
    kv0 = cache_to_kv(cache0)
    assert stats0.num_fresh == max(1, len(suffix))
    # The chunk at position 0 reuses exactly what a full prefill computes.
    first = segs[0]
    assert first.start == 0
    torch.testing.assert_close(kv0[:, :, : first.end - (not suffix and len(segs) == 1)],
                               full_kv[:, :, : first.end - (not suffix and len(segs) == 1)], atol=1e-5, rtol=1e-5)
    if len(order) == 1 and suffix:
        torch.testing.assert_close(logits0, full_logits, atol=1e-4, rtol=1e-4)
    if suffix:
        _, reuse_logits = plain_reuse(m, ids, segs)
        torch.testing.assert_close(logits0, reuse_logits, atol=1e-4, rtol=1e-4)
    _, logits_mid, stats_mid = blend_prefill(m, ids, segs, ratio=0.5)
    assert torch.isfinite(logits_mid).all() and stats_mid.active_per_layer[-1] >= stats0.num_fresh


@settings(max_examples=12)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    perm_seed=st.integers(0, 1000),
    suffix_len=st.integers(0, 3),
    gap=st.booleans(),
)
def test_any_arrangement_ratio_one_is_full_prefill(lengths, perm_seed, suffix_len, gap) -> None:
    m = model("llama")
    tokens = chunk_tokens(perm_seed, lengths)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    kvs = [prefill_kv(m, t)[0] for t in tokens]
    chunks = [(tokens[i], kvs[i]) for i in order]
    if gap:  # uncached tokens between chunks are computed fresh
        chunks.insert(1, ([11, 12], None))
    ids, segs = segments_from_chunks([*chunks, (list(range(20, 20 + suffix_len)), None)])
    _, full_logits = full_prefill(m, ids)
    _, logits, _ = blend_prefill(m, ids, segs, ratio=1.0)
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
    _, logits_half, stats = blend_prefill(m, ids, segs, ratio=0.5, check_layers=(2,))
    assert torch.isfinite(logits_half).all()
    assert stats.num_cached == sum(lengths)


def test_scaled_rope_model_reuses_correctly() -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    m = model("llama", rope_scaling=scaling)
    assert rope_spec(m).rope_type == "llama3"
    tokens = chunk_tokens(4, [7, 9])
    ids, segs = build(m, tokens, [1, 0], [1, 2, 3])
    _, reuse_logits = plain_reuse(m, ids, segs)
    _, logits0, _ = blend_prefill(m, ids, segs, ratio=0.0)
    torch.testing.assert_close(logits0, reuse_logits, atol=1e-4, rtol=1e-4)
    # With the wrong (unscaled) rotation the reuse would differ: the rotation really matters here.
    wrong = [Segment(s.start, s.end, s.kv, s.old_start + 3) for s in segs]
    _, logits_wrong, _ = blend_prefill(m, ids, wrong, ratio=0.0)
    assert (logits_wrong - reuse_logits).abs().max() > 1e-4


def test_cache_drives_generate() -> None:
    m = model("llama")
    tokens = chunk_tokens(5, [10, 6])
    ids, segs = build(m, tokens, [1, 0], [9, 8, 7])
    plain = m.generate(ids[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache, logits, _ = blend_prefill(m, ids, segs, ratio=1.0)
    out = m.generate(ids[None], **cache_kwargs(cache_for_generate(cache)), max_new_tokens=6, do_sample=False,
                     pad_token_id=0)
    assert torch.equal(out, plain)
    cache, logits, _ = blend_prefill(m, ids, segs, ratio=0.3)
    out = m.generate(ids[None], **cache_kwargs(cache_for_generate(cache)), max_new_tokens=3, do_sample=False,
                     pad_token_id=0)
    assert out[0, ids.shape[0]].item() == int(logits.argmax())


def test_bad_input_is_refused_with_the_argument_named() -> None:
    m = model("llama")
    tokens = chunk_tokens(6, [5, 5])
    ids, segs = build(m, tokens, [0, 1], [1])
    with pytest.raises(ValueError, match="ratio"):
        blend_prefill(m, ids, segs, ratio=1.5)
    with pytest.raises(ValueError, match="deviation"):
        blend_prefill(m, ids, segs, deviation="query")
    with pytest.raises(ValueError, match="check_layers"):
        blend_prefill(m, ids, segs, check_layers=(7,))
    with pytest.raises(ValueError, match="check_layers"):
        blend_prefill(m, ids, segs, check_layers=(2, 1))
    with pytest.raises(ValueError, match="overlap"):
        blend_prefill(m, ids, [segs[0], Segment(3, 8, segs[1].kv, 0)])
    with pytest.raises(ValueError, match=r"segments\[0\]\.kv"):
        blend_prefill(m, ids, [Segment(0, 5, segs[0].kv[:, :, :4], 0)])
    with pytest.raises(ValueError, match=r"segments\[0\]"):
        blend_prefill(m, ids, [(0, 50, segs[0].kv, 0)])
    with pytest.raises(ValueError, match="input_ids"):
        blend_prefill(m, torch.zeros(0, dtype=torch.long), [])
    with pytest.raises(ValueError, match="scores"):
        blend_prefill(m, ids, segs, ratio=0.5, scores=torch.zeros(ids.shape[0] + 1))
    with pytest.raises(ValueError, match="scores"):
        blend_prefill(m, ids, segs, ratio=0.5, scores=torch.full((ids.shape[0],), float("nan")))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ConfigError, match="model"):
        blend_prefill(gpt2, ids, [])


def test_unsupported_setups_raise_the_one_error() -> None:
    """generate and blend share one support check; what it refuses is lmkv.errors.Unsupported, naming what."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmkv.errors import Unsupported
    from lmkv.hf import refuse_unsupported

    sliding = tiny_model("mistral", seed=1, sliding_window=8)
    refuse_unsupported(sliding)  # prefix reuse serves sliding windows exactly (tests/test_hf_windows.py)
    with pytest.raises(Unsupported, match="sliding"):
        refuse_unsupported(sliding, blend=True)
    with pytest.raises(Unsupported, match="sliding"):
        blend_prefill(sliding, torch.arange(4), [])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    refuse_unsupported(gpt2)  # prefix reuse serves any full-attention model
    with pytest.raises(Unsupported, match="model types"):
        refuse_unsupported(gpt2, blend=True)
    yarn = model("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(Unsupported, match="yarn"):
        blend_prefill(yarn, torch.arange(4), [])
    assert issubclass(Unsupported, NotImplementedError) and issubclass(Unsupported, ConfigError)


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_backend_is_the_same_prefill(arch: str) -> None:
    """blend_prefill(backend=...) A/Bs the spec and the fast path on a real HF model: same selection, close KV."""
    m = model(arch)
    ids, segs = build(m, chunk_tokens(8, [11, 9, 7]), [2, 0, 1], [5, 6])
    runs = {b: blend_prefill(m, ids, segs, ratio=0.3, check_layers=(1, 2), backend=b) for b in ("reference", "fast")}
    (ref_cache, ref_logits, ref_stats), (fast_cache, fast_logits, fast_stats) = runs["reference"], runs["fast"]
    assert ref_stats.active_per_layer == fast_stats.active_per_layer
    assert all(torch.equal(ref_stats.selected[k], fast_stats.selected[k]) for k in ref_stats.selected)
    torch.testing.assert_close(cache_to_kv(fast_cache), cache_to_kv(ref_cache), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-4, rtol=1e-4)
