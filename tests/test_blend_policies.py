"""CacheBlend token-selection policies (lmkv.blend_policies): each policy's scores, the registry, both prefill
backends selecting the same tokens, and generate(blend=True) with every policy on a tiny random LLaMA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lmkv.hf
from lmkv import blend_policies as bp
from lmkv import config as lmkv_config
from lmkv.engine import KVEngine
from lmkv.hf import HFSteps, Segment, cache_to_kv, prefill_kv, rope_spec
from lmkv.models import tiny_model
from lmkv.ops import blend
from lmkv.reference import blend_policies as ref

STATIC = ("chunk_head", "attention", "random", "oracle")
_MODEL: list = []


def model():
    if not _MODEL:
        _MODEL.append(tiny_model("llama", seed=5))
    return _MODEL[0]


def prompt(seed: int, lengths: list[int], suffix: int = 3) -> tuple[torch.Tensor, list[Segment]]:
    """Chunks of ``lengths`` each prefilled on its own (positions from 0), then ``suffix`` fresh tokens."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    segs: list[Segment] = []
    for n in lengths:
        tokens = torch.randint(3, 256, (n,), generator=g).tolist()
        segs.append(Segment(len(ids), len(ids) + n, prefill_kv(model(), tokens)[0], 0))
        ids += tokens
    ids += torch.randint(3, 256, (suffix,), generator=g).tolist()
    return torch.tensor(ids), segs


def selected(ids: torch.Tensor, segs: list[Segment], policy: str, ratio: float, backend: str,
             check_layers: tuple[int, ...] = (1,)) -> torch.Tensor:
    _, _, stats = lmkv.hf.blend_prefill(model(), ids, segs, ratio=ratio, check_layers=check_layers, policy=policy,
                                        backend=backend)
    return stats.selected[check_layers[-1]]


# -- chunk_head ---------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), k=st.integers(1, 12), start=st.integers(0, 3))
@example(lengths=[1], k=1, start=0)
@example(lengths=[5, 5, 5], k=5, start=1)  # every cached token
def test_chunk_head_budget_k_per_segment_takes_exactly_the_first_k(lengths: list[int], k: int, start: int) -> None:
    k = min(k, min(lengths))
    segs, pos = [], start
    for n in lengths:
        segs.append(Segment(pos, pos + n, torch.empty(0), 0))
        pos += n
    num_tokens = pos + 2  # an uncached suffix: the last token is never a candidate
    scores = ref.chunk_head_scores(num_tokens, segs)
    assert scores.shape == (num_tokens,) and scores.dtype == torch.float32
    cached = torch.zeros(num_tokens, dtype=torch.bool)
    for s in segs:
        cached[s.start:s.end] = s.start != 0  # an exact prefix (start 0, old_start 0) is never preferred
    candidates = torch.nonzero(cached).flatten()
    reused = [s for s in segs if s.start != 0]
    got = blend.select_tokens(scores, candidates, k * len(reused))
    want = sorted(t for s in reused for t in range(s.start, s.start + k))
    assert got.tolist() == want


def test_chunk_head_in_the_prefill_recomputes_each_chunks_first_tokens() -> None:
    ids, segs = prompt(1, [10, 10, 10])  # the first segment starts at 0: a prefix, never preferred
    moved = [Segment(s.start, s.end, s.kv, s.old_start) for s in segs]
    # 30 candidates, ratio 0.2 -> 6 = 3 tokens of each of the two moved chunks after the prefix chunk
    got = selected(ids, moved, "chunk_head", 0.2, "reference")
    assert got.tolist() == [10, 11, 12, 20, 21, 22]


# -- random -------------------------------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
@example(n=1, seed=0)
def test_random_scores_are_reproducible_by_seed_and_differ_across_seeds(n: int, seed: int) -> None:
    a, b = ref.random_scores(n, seed), ref.random_scores(n, seed)
    assert a.shape == (n,) and torch.equal(a, b) and bool(((a >= 0) & (a < 1)).all())
    if n >= 8:
        assert not torch.equal(a, ref.random_scores(n, seed + 1))


# -- oracle -------------------------------------------------------------------------------------------------------
def _direct_oracle(ids: torch.Tensor, segs: list[Segment]) -> torch.Tensor:
    """The oracle written out: HF's own full prefill vs the re-rotated cache, per layer and plane, normalised."""
    full, _ = prefill_kv(model(), ids)
    num_layers = full.shape[0]
    cached = torch.zeros(ids.shape[0], dtype=torch.bool)
    placed = torch.zeros_like(full)
    for s in segs:
        t = s.end - s.start
        placed[:, 0, s.start:s.end] = blend.rerotate(s.kv[:, 0], torch.arange(s.old_start, s.old_start + t),
                                                     torch.arange(s.start, s.end), rope_spec(model()))
        placed[:, 1, s.start:s.end] = s.kv[:, 1]
        cached[s.start:s.end] = True
    dev = (full - placed)[1:].pow(2).sum(dim=(-2, -1)).sqrt()[:, :, cached]  # [L-1, 2, C], layer 0 has no signal
    dev = dev.reshape(2 * (num_layers - 1), -1)
    out = torch.zeros(ids.shape[0])
    out[cached] = (dev / dev.mean(dim=1, keepdim=True)).mean(dim=0)
    return out


def test_oracle_equals_a_direct_full_prefill_deviation() -> None:
    ids, segs = prompt(2, [7, 9, 6])
    got = ref.oracle_scores(HFSteps(model()), ids, segs, rope_spec(model()))
    want = _direct_oracle(ids, segs)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4), (got - want).abs().max()
    assert float(got[segs[-1].end:].abs().sum()) == 0.0  # the suffix is not cached


# -- attention ----------------------------------------------------------------------------------------------------
def test_attention_at_layer_0_is_the_full_prefills_attention_mass_of_the_suffix() -> None:
    """At layer 0 a token's K and its queries depend on its id and position only, so the placed cache equals the
    full prefill's there: the score is HF's own layer-0 attention, mean over heads and the query tokens."""
    m = model()
    ids, segs = prompt(3, [8, 6], suffix=4)
    got = ref.attention_scores(HFSteps(m), ids, segs, rope_spec(m), layer=0)
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = m(input_ids=ids[None], output_attentions=True).attentions[0][0]  # [Hq, N, N]
    finally:
        m.set_attn_implementation("sdpa")
    queries = torch.arange(segs[-1].end, ids.shape[0])
    want = att[:, queries].mean(dim=(0, 1))
    want[segs[-1].end:] = 0.0
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("layer", [0, 1])
def test_attention_scores_are_a_share_of_the_queries_mass(layer: int) -> None:
    ids, segs = prompt(4, [5, 9, 4])
    got = ref.attention_scores(HFSteps(model()), ids, segs, rope_spec(model()), layer=layer)
    end = segs[-1].end
    assert got.shape == ids.shape and bool((got >= 0).all())
    assert float(got[end:].abs().sum()) == 0.0
    assert 0.0 < float(got.sum()) <= 1.0 + 1e-6  # each query's row sums to 1; the suffix keeps the rest


# -- registry -----------------------------------------------------------------------------------------------------
def test_registry_names_and_config_choices() -> None:
    assert bp.names()[:5] == list(bp.BUILTIN) == ["deviation", "chunk_head", "attention", "random", "oracle"]
    choices = next(f for f in dataclasses.fields(lmkv_config.BlendConfig) if f.name == "policy").metadata["choices"]
    assert tuple(choices) == bp.BUILTIN and lmkv_config.BlendConfig().policy == "deviation"
    assert lmkv_config.load({"blend": {"policy": "chunk_head"}}).blend.policy == "chunk_head"
    with pytest.raises(Exception, match="policy"):
        lmkv_config.load({"blend": {"policy": "nope"}})


def test_registry_errors_name_the_policy(monkeypatch) -> None:
    monkeypatch.setattr(bp, "_POLICIES", dict(bp._POLICIES))
    with pytest.raises(ValueError, match="'chunk_head' is already registered"):
        bp.register("chunk_head", lambda inputs: None)
    with pytest.raises(ValueError, match="unknown blend policy 'nope'"):
        bp.get("nope")
    with pytest.raises(TypeError, match="'x'"):
        bp.register("x", 3)  # type: ignore[arg-type]
    ids, segs = prompt(5, [6, 6])
    with pytest.raises(ValueError, match="unknown blend policy 'nope'"):
        selected(ids, segs, "nope", 0.5, "reference")
    with pytest.raises(ValueError, match="scores or policy"):
        lmkv.hf.blend_prefill(model(), ids, segs, ratio=0.5, policy="random", scores=torch.zeros(ids.shape[0]))
    bp.register("bad_shape", lambda inputs: torch.zeros(2))
    with pytest.raises(ValueError, match="'bad_shape' returned"):
        selected(ids, segs, "bad_shape", 0.5, "reference")


def test_a_registered_policy_selects_in_the_prefill(monkeypatch) -> None:
    monkeypatch.setattr(bp, "_POLICIES", dict(bp._POLICIES))
    bp.register("latest_first", lambda inputs: torch.arange(inputs.input_ids.shape[0], dtype=torch.float32))
    ids, segs = prompt(6, [6, 6])  # 12 cached tokens, ratio 0.25 -> the last 3 of them
    for backend in ("reference", "fast"):
        assert selected(ids, segs, "latest_first", 0.25, backend).tolist() == [9, 10, 11]


# -- both backends, and the default ---------------------------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), ratio=st.sampled_from([0.05, 0.15, 0.5]), policy=st.sampled_from(STATIC),
       checks=st.sampled_from([(1,), (0, 1)]))
@example(seed=0, ratio=0.05, policy="chunk_head", checks=(1,))
@example(seed=0, ratio=0.5, policy="oracle", checks=(0, 1))
@example(seed=0, ratio=0.15, policy="attention", checks=(1,))
def test_fast_and_reference_select_the_same_tokens(seed: int, ratio: float, policy: str, checks: tuple) -> None:
    ids, segs = prompt(seed, [9, 7, 8])
    ref_sel = selected(ids, segs, policy, ratio, "reference", checks)
    assert ref_sel.numel() == int(ratio * 24 + 0.5)
    assert torch.equal(ref_sel, selected(ids, segs, policy, ratio, "fast", checks))


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_deviation_policy_is_todays_prefill_bit_for_bit(backend: str) -> None:
    ids, segs = prompt(7, [8, 8])
    kv_a, logits_a, st_a = lmkv.hf.blend_prefill(model(), ids, segs, ratio=0.3, backend=backend)
    kv_b, logits_b, st_b = lmkv.hf.blend_prefill(model(), ids, segs, ratio=0.3, backend=backend, policy="deviation")
    assert torch.equal(cache_to_kv(kv_a), cache_to_kv(kv_b)) and torch.equal(logits_a, logits_b)
    assert torch.equal(st_a.selected[1], st_b.selected[1])


# -- generate(blend=True) -----------------------------------------------------------------------------------------
SEP = [1, 2]


@pytest.mark.parametrize("policy", bp.BUILTIN)
def test_generate_with_every_policy_runs_and_at_ratio_1_is_full_prefill(policy: str, tmp_path: Path) -> None:
    m = model()
    cfg = lmkv_config.load({"chunk_size": 16, "disk": {"path": str(tmp_path / "d")},
                            "blend": {"ratio": 0.3, "policy": policy}})
    engine = KVEngine.for_model(m, cfg)
    a, b, q = (prompt(10 + i, [n], suffix=0)[0].tolist() for i, n in enumerate((12, 9, 4)))
    first = lmkv.hf.generate(m, torch.tensor([a + SEP + b + SEP + q]), engine=engine, blend=True,
                             blend_separator=SEP, max_new_tokens=1)  # the policy selects: b moved behind a
    assert 0.0 < first.stats.blend["recompute_fraction"] < 1.0
    engine.config = lmkv_config.replace(engine.config, blend={"ratio": 1.0})
    ids = torch.tensor([b + SEP + a + SEP + q])  # reordered: both chunks reused away from their positions
    out = lmkv.hf.generate(m, ids, engine=engine, blend=True, blend_separator=SEP, max_new_tokens=4)
    assert out.stats.blend["reused_tokens"] == 21
    plain = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, plain)
    engine.close()


def test_blended_cache_takes_the_config_policy(tmp_path: Path, monkeypatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(bp, "_POLICIES", dict(bp._POLICIES))
    monkeypatch.setitem(bp._POLICIES, "random", lambda inputs: seen.append("random") or ref.random_scores(
        inputs.input_ids.shape[0], 0))
    m = model()
    cfg = lmkv_config.load({"chunk_size": 16, "disk": {"path": str(tmp_path / "d")},
                            "blend": {"ratio": 0.3, "policy": "random"}})
    engine = KVEngine.for_model(m, cfg)
    a, q = prompt(20, [10], suffix=0)[0].tolist(), [5, 6, 7]
    lmkv.hf.generate(m, torch.tensor([a + SEP + q]), engine=engine, blend=True, blend_separator=SEP,
                     max_new_tokens=1)
    assert seen == ["random"]
    engine.close()

