"""blend: optimized backends agree with the reference within 2x its own error.

- ``blend.rerotate``: every backend against a float64 rotation; RoPE read from HF configs matches transformers' own
  frequencies, and re-rotated keys equal keys HF rotates at the new position.
- ``blend.prefill``: the fast path (SDPA, batched fused re-rotation) against the reference (explicit fp32 softmax)
  on tiny random LLaMA / Qwen2 / Mistral models, both measured against a float64 run of the reference: KV and
  logits, over ratios, check layers, deviation planes and segment layouts (order, repeats, gaps, moved chunks).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmkv.errors import BackendUnavailable
from lmkv.hf import HFSteps, Segment, prefill_kv, rope_spec
from lmkv.models import tiny_model
from lmkv.ops import blend
from lmkv.rope import RopeSpec

BACKENDS = [b for b in blend.rerotate.backends("cpu") if b != "reference"]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _backend_or_skip(name: str) -> None:
    reason = blend.rerotate.unavailable_reason(name, "cpu")
    if reason:
        pytest.skip(f"{name}: {reason}")


def _oracle(keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """The same rotation in float64 (same fp32 frequencies, exact angle): the yardstick for every backend."""
    half, r = rope.rotary_dim // 2, rope.rotary_dim
    angle = (new - old).double()[:, None] * rope.inv_freq().double()[None, :]
    c, s = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x = keys.double()
    out = x.clone()
    out[..., :half] = x[..., :half] * c - x[..., half:r] * s
    out[..., half:r] = x[..., half:r] * c + x[..., :half] * s
    return out


def _within_twice_reference_error(keys, old, new, rope, backend: str) -> None:
    exact = _oracle(keys, old, new, rope)
    ref = blend.rerotate(keys, old, new, rope, backend="reference")
    out = blend.rerotate(keys, old, new, rope, backend=backend)
    assert out.dtype == keys.dtype and out.shape == keys.shape
    ref_err = (ref.double() - exact).abs().max().item() if keys.numel() else 0.0
    out_err = (out.double() - exact).abs().max().item() if keys.numel() else 0.0
    # An ulp of fp32 at the keys' magnitude covers a reference that happens to be exact (zero deltas).
    floor = torch.finfo(torch.float32).eps * (keys.double().abs().max().item() if keys.numel() else 0.0)
    assert out_err <= 2 * ref_err + floor, f"{backend}: error {out_err:.3g} vs reference {ref_err:.3g}"


ropes = st.builds(
    lambda d, part, theta, kind, factor: RopeSpec(
        head_dim=d, rotary_dim=max(2, int(d * part) // 2 * 2), theta=theta, rope_type=kind, factor=factor,
        low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64,
    ),
    st.sampled_from([8, 16, 64, 20]),
    st.sampled_from([1.0, 0.5, 0.25]),
    st.sampled_from([1e4, 1e5, 5e5]),
    st.sampled_from(["default", "linear", "llama3"]),
    st.sampled_from([2.0, 8.0]),
)


@st.composite
def cases(draw):
    rope = draw(ropes)
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    t = draw(st.integers(0, 9))
    h = draw(st.integers(1, 3))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    max_pos = draw(st.sampled_from([16, 4096, 1 << 17]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(*lead, t, h, rope.head_dim, generator=g) * 3).to(dtype)
    old = torch.randint(0, max_pos, (t,), generator=g)
    new = torch.randint(0, max_pos, (t,), generator=g)
    return keys, old, new, rope


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
@example(case=(torch.randn(4, 3, 64), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
               RopeSpec(64, 64)))  # zero delta: identity
@example(case=(torch.randn(2, 5, 1, 16).half(), torch.arange(5), torch.arange(5) + 100_000, RopeSpec(16, 8)))
@example(case=(torch.randn(0, 2, 8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
               RopeSpec(8, 8)))  # no tokens
def test_backend_within_twice_reference_error(backend: str, case) -> None:
    _backend_or_skip(backend)
    _within_twice_reference_error(*case, backend=backend)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_round_trip_is_identity(backend: str, dtype: str) -> None:
    _backend_or_skip(backend) if backend != "reference" else None
    rope = RopeSpec(64, 32, 1e5, "llama3", 8.0, 1.0, 4.0, 128)
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 7, 3, 64, generator=g).to(DTYPES[dtype])
    p, q = torch.randint(0, 5000, (7,), generator=g), torch.randint(0, 5000, (7,), generator=g)
    there = blend.rerotate(keys, p, q, rope, backend=backend)
    assert (there.float() - keys.float()).abs().max() > 0.1  # it did move
    back = blend.rerotate(there, q, p, rope, backend=backend)
    tol = 1e-4 if dtype == "f32" else 0.1
    torch.testing.assert_close(back.float(), keys.float(), atol=tol, rtol=tol if dtype != "f32" else 1e-4)
    assert torch.equal(back[..., 32:], keys[..., 32:])  # pass-through dims never change


def test_the_agreement_check_can_fail() -> None:
    rope = RopeSpec(16, 16)
    keys, old, new = torch.randn(3, 2, 16), torch.arange(3), torch.arange(3) + 7
    exact = _oracle(keys, old, new, rope)
    wrong = blend.rerotate(keys, new, old, rope, backend="reference")  # rotated the wrong way
    assert (wrong.double() - exact).abs().max() > 1e-2


def _hf_rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """HF's recipe: cos/sin of cat(freqs, freqs), rotate_half on the first rotary dims of [T, H, D]."""
    from transformers.models.llama.modeling_llama import rotate_half

    freqs = pos[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


@pytest.mark.parametrize("kind", ["default", "llama3", "llama3-partial", "linear"])
def test_rope_spec_matches_transformers_and_rerotation_equals_fresh_rotation(kind: str) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    base = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    if kind == "default":
        config = LlamaConfig(rope_theta=1e5, **base)
        hf_inv = LlamaRotaryEmbedding(config).inv_freq
    elif kind == "linear":
        config = LlamaConfig(rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0}, **base)
        hf_inv = ROPE_INIT_FUNCTIONS["linear"](config)[0]
    else:
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
        if kind == "llama3-partial":
            scaling["partial_rotary_factor"] = 0.5
        config = LlamaConfig(rope_theta=5e5, rope_scaling=scaling, **base)
        hf_inv = ROPE_INIT_FUNCTIONS["llama3"](config)[0]
    spec = RopeSpec.from_hf_config(config)
    assert spec.rope_type == kind.split("-")[0]
    assert spec.rotary_dim == (32 if kind == "llama3-partial" else 64)
    assert torch.equal(spec.inv_freq(), hf_inv.float())
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(6, 1, 64, generator=g)
    p, q = torch.tensor([0, 3, 10, 50, 200, 7]), torch.tensor([9, 3, 0, 700, 100, 2000])
    at_p = _hf_rotate(raw, p, hf_inv, spec.rotary_dim)
    at_q = _hf_rotate(raw, q, hf_inv, spec.rotary_dim)
    moved = blend.rerotate(at_p, p, q, spec, backend="reference")
    torch.testing.assert_close(moved, at_q, atol=2e-4, rtol=1e-4)


def test_unsupported_rope_types_are_refused() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0}, hidden_size=64, num_attention_heads=2)
    with pytest.raises(ValueError, match="yarn"):
        RopeSpec.from_hf_config(config)
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeSpec(16, 7)


def test_bad_input_names_the_argument() -> None:
    rope = RopeSpec(8, 8)
    k = torch.randn(3, 2, 8)
    with pytest.raises(TypeError, match="keys"):
        blend.rerotate(k.numpy(), torch.arange(3), torch.arange(3), rope)
    with pytest.raises(ValueError, match="new_positions"):
        blend.rerotate(k, torch.arange(3), torch.arange(4), rope)
    with pytest.raises(TypeError, match="old_positions"):
        blend.rerotate(k, torch.arange(3.0), torch.arange(3), rope)
    with pytest.raises(ValueError, match="head dim"):
        blend.rerotate(k, torch.arange(3), torch.arange(3), RopeSpec(16, 16))
    with pytest.raises(ValueError, match="old_positions"):
        blend.rerotate(k, torch.tensor([0, -1, 2]), torch.arange(3), rope)
    with pytest.raises(TypeError, match="rope"):
        blend.rerotate(k, torch.arange(3), torch.arange(3), {"theta": 1e4})
    with pytest.raises(TypeError, match="keys"):
        blend.rerotate(k.long(), torch.arange(3), torch.arange(3), rope)


def test_triton_cannot_run_on_cuda_here_says_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert blend.rerotate.unavailable_reason("triton", "cuda") is not None
    assert blend.rerotate.unavailable_reason("ext", "cuda") is not None
    with pytest.raises(BackendUnavailable):
        blend.rerotate.implementation("ext", "cuda")


# -- blend.prefill: the fast path against the reference, both against a float64 run -------------------------------
ARCHS = ("llama", "qwen2", "mistral")
PREFILL_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
_PREFILL_MODELS: dict[tuple[str, str], tuple] = {}


def _models(arch: str, dtype: str) -> tuple:
    """``(model in dtype, the same weights in float64)``: the float64 run measures only the compute error."""
    key = (arch, dtype)
    if key not in _PREFILL_MODELS:
        # Built in its dtype (model.to(bf16) would also round the rotary frequencies, which lmkv then refuses).
        m = tiny_model(arch, seed=3, dtype=PREFILL_DTYPES[dtype])
        _PREFILL_MODELS[key] = (m, copy.deepcopy(m).to(torch.float64))
    return _PREFILL_MODELS[key]


@st.composite
def prefill_cases(draw):
    """A prompt of cached chunks (some prefilled behind a few other tokens, so they move from old_start != 0),
    in any order with repeats, optional uncached gap and suffix; a ratio, check layers and deviation plane."""
    arch = draw(st.sampled_from(ARCHS))
    dtype = draw(st.sampled_from(sorted(PREFILL_DTYPES)))
    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    behind = draw(st.lists(st.integers(0, 3), min_size=len(lengths), max_size=len(lengths)))
    order = draw(st.lists(st.integers(0, len(lengths) - 1), min_size=1, max_size=5))
    gap = draw(st.integers(0, 3))
    suffix = draw(st.integers(0, 3))
    ratio = draw(st.sampled_from([0.0, 1.0, 0.5]) | st.floats(0.0, 1.0))
    checks = sorted(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)))
    deviation = draw(st.sampled_from(["key", "value"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return arch, dtype, lengths, behind, order, gap, suffix, ratio, checks, deviation, seed


def _layout(model, lengths, behind, order, gap, suffix, seed) -> tuple[torch.Tensor, list[Segment]]:
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randint(3, 256, (n,), generator=g) for n in lengths]
    cached = []
    for tokens, before in zip(chunks, behind):
        kv = prefill_kv(model, torch.cat((torch.randint(3, 256, (before,), generator=g), tokens)))[0]
        cached.append(kv[:, :, before:].contiguous())  # computed at positions before .. before + len
    ids: list[int] = []
    segments = []
    for j, i in enumerate(order):
        segments.append(Segment(len(ids), len(ids) + lengths[i], cached[i], behind[i]))
        ids += chunks[i].tolist()
        if j == 0 and gap:
            ids += torch.randint(3, 256, (gap,), generator=g).tolist()  # uncached tokens between chunks
    ids += torch.randint(3, 256, (suffix,), generator=g).tolist()
    return torch.tensor(ids), segments


def _errors(out: tuple, exact: tuple) -> tuple[float, float]:
    """Max abs error of (kv, logits) against the float64 run."""
    return tuple((a.double() - b.double()).abs().max().item() for a, b in zip(out[:2], exact[:2]))


def _forced_scores(stats, num_tokens: int) -> torch.Tensor:
    """Scores that make any run select exactly what ``stats``' run selected: a token's score is the number of
    checks it survived (selections are nested, so check i keeps exactly the tokens with score >= i)."""
    scores = torch.zeros(num_tokens)
    for kept in stats.selected.values():
        scores[kept] += 1.0
    return scores


def _same_schedule(a, b) -> None:
    assert (a.num_tokens, a.num_cached, a.num_fresh, a.full_layers) == (b.num_tokens, b.num_cached, b.num_fresh,
                                                                         b.full_layers)
    assert a.active_per_layer == b.active_per_layer and a.recompute_fraction == b.recompute_fraction
    assert a.selected.keys() == b.selected.keys()
    assert all(torch.equal(a.selected[k], b.selected[k]) for k in a.selected)


@settings(max_examples=30)
@given(case=prefill_cases())
@example(case=("llama", "f32", [9, 13, 6], [0, 0, 0], [2, 0, 1], 0, 4, 0.25, [1], "value", 0))
@example(case=("qwen2", "bf16", [8, 5, 11], [2, 0, 1], [1, 0, 1], 2, 0, 0.2, [1, 2], "key", 1))
@example(case=("mistral", "f32", [4], [0], [0], 0, 0, 0.5, [0], "value", 2))  # one chunk, no suffix
def test_prefill_fast_within_twice_reference_error(case) -> None:
    arch, dtype, lengths, behind, order, gap, suffix, ratio, checks, deviation, seed = case
    model, model64 = _models(arch, dtype)
    ids, segments = _layout(model, lengths, behind, order, gap, suffix, seed)
    rope = rope_spec(model)
    kw = dict(rope=rope, ratio=ratio, check_layers=checks, deviation=deviation)
    exact = blend.prefill(HFSteps(model64), ids, segments, backend="reference", **kw)
    # The selection is discrete: a near-tie may flip between dtypes, so both runs select what float64 selected.
    scores = _forced_scores(exact[2], ids.shape[0])
    steps = HFSteps(model)
    ref = blend.prefill(steps, ids, segments, backend="reference", scores=scores, **kw)
    fast = blend.prefill(steps, ids, segments, backend="fast", scores=scores, **kw)
    _same_schedule(fast[2], ref[2])
    _same_schedule(ref[2], exact[2])
    assert fast[0].dtype == ref[0].dtype == model.dtype and fast[0].shape == ref[0].shape == exact[0].shape
    eps = torch.finfo(model.dtype).eps
    for name, f_err, r_err, scale in zip(("kv", "logits"), _errors(fast, exact), _errors(ref, exact),
                                         (exact[0].abs().max().item(), exact[1].abs().max().item())):
        # One ulp of the dtype at the tensor's magnitude covers a reference that happens to be exact.
        assert f_err <= 2 * r_err + eps * scale, f"{name}: fast error {f_err:.3g} vs reference {r_err:.3g}"


@settings(max_examples=15)
@given(case=prefill_cases())
@example(case=("llama", "bf16", [1], [0], [0, 0], 0, 0, 0.125, [0, 1], "key", 0))  # no candidate at a check layer
# A segment at its own place behind nothing: its fresh keys equal the cached ones in exact arithmetic, so the
# deviation is rounding noise of the key plane (float64 ~1e-16; fp32 6.5e-8 reference, 1.5e-7 fast; CI 2026-12-02).
@example(case=("llama", "f32", [2], [0], [0], 0, 3, 0.5, [2], "key", 104288))
def test_prefill_measured_deviation_agrees(case) -> None:
    """Without forced scores: at every check layer the measured deviations agree within 2x the reference's error,
    and the backends select the same tokens unless float64 sees a near-tie at the cut."""
    arch, dtype, lengths, behind, order, gap, suffix, ratio, checks, deviation, seed = case
    model, model64 = _models(arch, dtype)
    ids, segments = _layout(model, lengths, behind, order, gap, suffix, seed)
    kw = dict(rope=rope_spec(model), ratio=ratio, check_layers=checks, deviation=deviation)
    exact_kv, _, exact = blend.prefill(HFSteps(model64), ids, segments, backend="reference", **kw)
    ref = blend.prefill(HFSteps(model), ids, segments, backend="reference", **kw)[2]
    fast = blend.prefill(HFSteps(model), ids, segments, backend="fast", **kw)[2]
    eps = torch.finfo(model.dtype).eps
    for layer in exact.selected:
        e, r, f = exact.deviation[layer].double(), ref.deviation[layer].double(), fast.deviation[layer].double()
        if not (torch.equal(r.isnan(), e.isnan()) and torch.equal(f.isnan(), e.isnan())):
            break  # an earlier check selected differently (a near-tie, checked there): later layers differ
        known = ~e.isnan()
        if not bool(known.any()):
            continue  # nothing was a candidate at this layer (e.g. the only cached token is the last one)
        r_err, f_err = ((x - e)[known].abs().max().item() for x in (r, f))
        # A deviation is a norm of (fresh - cached) plane rows: it cannot be known better than one ulp of the plane
        # it is measured on (the rule "2x the reference's error" needs a floor where both errors are that noise).
        plane = exact_kv[layer, 0 if deviation == "key" else 1].abs().max().item()
        floor = eps * (4 * e[known].abs().max().item() + plane)
        assert f_err <= 2 * r_err + floor, f"layer {layer}: deviation error {f_err:.3g} vs reference {r_err:.3g}"
        if not torch.equal(fast.selected[layer], ref.selected[layer]):
            count = exact.selected[layer].numel()
            ranked = e[known].sort(descending=True).values
            assert ranked[count - 1] - ranked[count] <= 2 * (r_err + f_err) + floor, "selection differs, no tie"


def test_prefill_agreement_check_can_fail() -> None:
    """The yardstick sees a wrong prefill: keys moved from the wrong positions are far beyond 2x."""
    model, model64 = _models("llama", "f32")
    ids, segments = _layout(model, [9, 7], [0, 0], [1, 0], 0, 3, 5)
    kw = dict(rope=rope_spec(model), ratio=0.3, check_layers=[1])
    exact = blend.prefill(HFSteps(model64), ids, segments, backend="reference", **kw)
    scores = _forced_scores(exact[2], ids.shape[0])
    ref = blend.prefill(HFSteps(model), ids, segments, backend="reference", scores=scores, **kw)
    wrong_segments = [Segment(s.start, s.end, s.kv, s.old_start + 5) for s in segments]
    wrong = blend.prefill(HFSteps(model), ids, wrong_segments, backend="fast", scores=scores, **kw)
    (ref_kv, ref_logits), (bad_kv, bad_logits) = _errors(ref, exact), _errors(wrong, exact)
    assert bad_kv > 100 * ref_kv and bad_logits > 100 * ref_logits


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_prefill_backends_refuse_bad_input_alike(backend: str) -> None:
    model, _ = _models("llama", "f32")
    ids, segments = _layout(model, [5, 5], [0, 1], [0, 1], 0, 1, 6)
    steps = HFSteps(model)
    with pytest.raises(ValueError, match="rope"):
        blend.prefill(steps, ids, segments, rope=None, ratio=0.5, check_layers=[1], backend=backend)
    with pytest.raises(ValueError, match="check_layers"):
        blend.prefill(steps, ids, segments, rope=rope_spec(model), ratio=0.5, check_layers=[9], backend=backend)
    with pytest.raises(BackendUnavailable):
        blend.prefill(steps, ids, segments, rope=rope_spec(model), ratio=0.5, check_layers=[1], backend="triton")
