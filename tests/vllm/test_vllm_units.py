"""Fast checks of the connector's pieces that need vllm importable but no engine: layout views, slot mappings,
and a store/retrieve round trip through vLLM's CPU cache layout with a real KVEngine."""

from __future__ import annotations

import pytest
import torch

from lmkv.adapters.vllm import UnsupportedVllmSetup, layer_views, slot_mapping_for

pytestmark = pytest.mark.vllm


def _cpu_cache(nb: int = 6, h: int = 3, bs: int = 32, d: int = 16, dtype: torch.dtype = torch.bfloat16,
               seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nb, h, bs, 2 * d, generator=g).to(dtype)


def _vllm_kv(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly how vLLM's CPU attention reads its cache (cpu_attn.py): [NB, H, 2*BS, D] split at dim 2."""
    nb, h, bs, c = cache.shape
    return cache.view(nb, h, 2 * bs, c // 2).chunk(2, dim=2)


def test_cpu_view_is_blocks_first_hnd_and_matches_vllms_reading() -> None:
    caches = {f"layer.{i}": _cpu_cache(seed=i) for i in range(2)}
    views, layout, bs = layer_views(caches, "CPU_ATTN", num_kv_heads=3, head_dim=16)
    assert layout == "blocks_first_hnd" and bs == 32
    for cache, view in zip(caches.values(), views):
        key, value = _vllm_kv(cache)
        assert view.shape == (6, 2, 3, 32, 16)
        assert view.data_ptr() == cache.data_ptr()  # a view, not a copy
        assert torch.equal(view[:, 0], key) and torch.equal(view[:, 1], value)


def test_cpu_view_refuses_wrong_geometry_and_unknown_tensors() -> None:
    caches = {"l0": _cpu_cache()}
    with pytest.raises(UnsupportedVllmSetup, match="CPU layout"):
        layer_views(caches, "CPU_ATTN", num_kv_heads=4, head_dim=16)
    with pytest.raises(UnsupportedVllmSetup, match="FLASH_ATTN"):
        layer_views(caches, "FLASH_ATTN", num_kv_heads=3, head_dim=16)
    with pytest.raises(UnsupportedVllmSetup, match="MLA or unknown"):
        layer_views({"l0": torch.zeros(4, 32, 16)}, "CPU_ATTN", num_kv_heads=1, head_dim=16)
    with pytest.raises(UnsupportedVllmSetup, match="different shapes"):
        layer_views({"a": _cpu_cache(), "b": _cpu_cache(nb=5)}, "CPU_ATTN", num_kv_heads=3, head_dim=16)


def test_slot_mapping_follows_blocks_and_masks_outside_range() -> None:
    slots = slot_mapping_for([5, 2, 7], 4, 10, lo=3, hi=9)
    want = [-1, -1, -1, 23, 8, 9, 10, 11, 28, -1]
    assert slots.tolist() == want and slots.dtype == torch.int64
    with pytest.raises(ValueError, match="need 3 blocks"):
        slot_mapping_for([1, 2], 4, 10)


def test_engine_round_trip_through_cpu_layout(tmp_path) -> None:
    from lmkv.engine import KVEngine
    from lmkv.types import KVGeometry

    geo = KVGeometry(2, 3, 16, torch.bfloat16)
    src = {f"l{i}": _cpu_cache(seed=10 + i) for i in range(2)}
    dst = {f"l{i}": torch.full_like(src[f"l{i}"], float("nan")) for i in range(2)}  # poison
    src_views, layout, bs = layer_views(src, "CPU_ATTN", num_kv_heads=3, head_dim=16)
    dst_views, _, _ = layer_views(dst, "CPU_ATTN", num_kv_heads=3, head_dim=16)
    tokens = list(range(100, 170))  # 70 tokens: two chunks of 32 and a partial one of 6
    src_blocks, dst_blocks = [4, 1, 3], [0, 5, 2]
    cfg = {"chunk_size": 32, "memory": {"enabled": False}, "disk": {"path": str(tmp_path / "disk")}}
    with KVEngine(cfg, geo, model_id="unit") as eng:
        stored = eng.store_paged(tokens, src_views, slot_mapping_for(src_blocks, bs, 70), layout=layout)
        eng.flush()
        assert stored == 70 and eng.lookup(tokens) == 70 and eng.lookup(tokens[:40]) == 32
        # load tokens [32, 69): the first chunk is "local", the last token is left for the model to compute
        slots = slot_mapping_for(dst_blocks, bs, 70, lo=32, hi=69)
        n = eng.retrieve_paged(tokens, dst_views, slots, layout=layout, start=32)
    assert n == 70
    for name in src:
        sk, sv = _vllm_kv(src[name])
        dk, dv = _vllm_kv(dst[name])
        for t in range(70):
            sb, so = src_blocks[t // bs], t % bs
            db, do = dst_blocks[t // bs], t % bs
            loaded = 32 <= t < 69
            for s, d in ((sk, dk), (sv, dv)):
                if loaded:
                    assert torch.equal(d[db, :, do], s[sb, :, so]), (name, t)
                else:
                    assert torch.isnan(d[db, :, do]).all(), (name, t)
