"""blend.rerotate: optimized backends agree with the reference within 2x its own error, RoPE read from HF configs
matches transformers' own frequencies, and re-rotated keys equal keys HF rotates at the new position."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from lmkv.errors import BackendUnavailable
from lmkv.ops import blend
from lmkv.reference.rope import RopeSpec

BACKENDS = [b for b in blend.rerotate.backends() if b != "reference"]
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
