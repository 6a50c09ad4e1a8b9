"""The calibration that proves a vLLM CPU layout at start-up, tested without vLLM (pure-torch cache writers).

tests/vllm/test_vllm_units.py runs the same calibration on vLLM's own cache-write op; here it is shown to
recover known maps and to refuse writes that no BlockMap describes, so a refusal in the connector means what
it says.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkv.adapters.vllm_layout import calibrate, cpu_attn_block_map
from lmkv.layouts import BlockMap
from lmkv.reference import paged as ref


def writer_for(bm: BlockMap):
    """A cache write that puts K/V where ``bm`` says (through lmkv's reference scatter)."""

    def write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        chunk = torch.stack([key, value])[None]                    # [1, 2, T, H, D]
        ref.scatter(chunk, [cache.view(cache.shape[0], -1)], slots, layout=bm)

    return write


def _cal(write, bs: int = 32, h: int = 2, d: int = 32, dtype: torch.dtype = torch.bfloat16) -> BlockMap:
    return calibrate(write, (h, bs, 2 * d), dtype, block_size=bs, heads=h, head_dim=d, name="test")


@pytest.mark.parametrize("isa", ["vec", "vec16", "amx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_calibration_recovers_the_kernel_formulas(isa: str, dtype: torch.dtype) -> None:
    bm = cpu_attn_block_map(isa, 64, 3, 32, dtype)
    if bm is None:
        assert isa == "amx" and dtype == torch.float32  # AMX packs pairs of 2-byte elements only
        return
    got = calibrate(writer_for(bm), (3, 64, 64), dtype, block_size=64, heads=3, head_dim=32, name=isa)
    assert torch.equal(got.offsets, bm.offsets)


@settings(max_examples=15)
@given(bs=st.sampled_from([1, 3, 16, 33]), h=st.integers(1, 3), d=st.sampled_from([1, 5, 17, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_calibration_recovers_any_permutation(bs: int, h: int, d: int, dtype: torch.dtype, seed: int) -> None:
    """Coordinates past 16 (several base-16 digits) and bf16's 8-bit mantissa: the digits stay exact."""
    cells = 2 * bs * h * d
    perm = torch.randperm(cells, generator=torch.Generator().manual_seed(seed))
    bm = BlockMap(perm.view(2, bs, h, d))
    got = calibrate(writer_for(bm), (h, bs, 2 * d), dtype, block_size=bs, heads=h, head_dim=d)
    assert torch.equal(got.offsets, bm.offsets)


def test_formulas_are_what_the_docs_say() -> None:
    bs, h, d = 32, 2, 64
    vec = cpu_attn_block_map("vec", bs, h, d, torch.float32)
    amx = cpu_attn_block_map("amx", bs, h, d, torch.bfloat16)
    assert vec is not None and amx is not None
    head = 2 * bs * d
    assert int(vec.offsets[0, 5, 1, 7]) == head + 7 * bs + 5            # key: head-dim-major [D, BS]
    assert int(vec.offsets[1, 5, 1, 7]) == head + bs * d + 5 * d + 7    # value: token rows [BS, D]
    # AMX key: 16-token tiles of dim pairs; value: dim tiles of 16 over token pairs
    assert int(amx.offsets[0, 17, 0, 3]) == 1 * 16 * d + 1 * 32 + 1 * 2 + 1
    assert int(amx.offsets[1, 3, 0, 17]) == bs * d + 1 * 16 * bs + 1 * 32 + 1 * 2 + 1
    assert cpu_attn_block_map("neon", bs, h, d, torch.float32) is None
    assert cpu_attn_block_map("amx", bs, h, 80, torch.bfloat16) is None


def _vec_then(edit):
    """vLLM's vec layout written correctly, then ``edit(cache)`` applied: a faulty cache write."""
    bm = cpu_attn_block_map("vec", 32, 2, 32, torch.bfloat16)
    assert bm is not None
    inner = writer_for(bm)

    def write(key, value, cache, slots):
        inner(key, value, cache, slots)
        edit(cache)

    return write


def test_calibration_refuses_writes_outside_the_block() -> None:
    with pytest.raises(ValueError, match="outside the one"):
        _cal(_vec_then(lambda cache: cache[2, 0, 0].fill_(1.0)))


def test_calibration_refuses_lost_or_shared_places() -> None:
    def value_over_key(cache):
        cache[1, 0, 0, 0] = cache[1, 0, 0, 40]

    with pytest.raises(ValueError, match="value elements landed"):
        _cal(_vec_then(lambda cache: cache[1, 1, 31, 63].zero_()))   # drops a value
    with pytest.raises(ValueError, match="elements landed|share a place"):
        _cal(_vec_then(value_over_key))


def test_calibration_refuses_a_write_that_moves_between_calls() -> None:
    calls = []
    a = cpu_attn_block_map("vec", 32, 2, 32, torch.bfloat16)
    assert a is not None
    b = BlockMap(torch.flip(a.offsets, dims=[0]))  # keys and values swap places on later calls

    def unstable(key, value, cache, slots):
        calls.append(1)
        writer_for(a if len(calls) == 1 else b)(key, value, cache, slots)

    with pytest.raises(ValueError, match="different places"):
        _cal(unstable)
