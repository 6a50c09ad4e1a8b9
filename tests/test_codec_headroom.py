"""The codec headroom analyses of experiments/codec_frontier.py on KV with known structure (no model needed)."""

from __future__ import annotations

import torch

from lmkv.tools.codec_headroom import anchor_delta_rows, klt_rows


def _by(rows: list[dict], plane: str, group: int) -> dict:
    return next(r for r in rows if r["plane"] == plane and r["group"] == group)


def test_anchor_delta_saves_bits_on_slowly_varying_kv_and_not_on_noise() -> None:
    g = torch.Generator().manual_seed(0)
    # [L, 2, T, H, D]: a random walk over tokens with tiny steps, so neighbours are nearly equal.
    smooth = torch.cumsum(torch.randn(2, 2, 256, 2, 16, generator=g) * 0.01, dim=2) + torch.randn(
        2, 2, 1, 2, 16, generator=g)
    rows = anchor_delta_rows(smooth, groups=(4,))
    assert _by(rows, "keys", 4)["delta_minus_plain"] < -0.5
    noise = torch.randn(2, 2, 256, 2, 16, generator=g)
    rows = anchor_delta_rows(noise, groups=(4,))
    assert _by(rows, "keys", 4)["delta_minus_plain"] > 0.2  # independent tokens: a delta doubles the variance


def test_klt_gain_is_large_for_low_rank_kv_and_small_for_white_kv() -> None:
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(4, 32, generator=g)
    low_rank = (torch.randn(1, 2, 512, 4, generator=g) @ basis).reshape(1, 2, 512, 2, 16)
    low_rank = low_rank + 1e-3 * torch.randn(low_rank.shape, generator=g)
    assert klt_rows(low_rank)[0]["gain_bits_mean"] > 2.0
    white = torch.randn(1, 2, 512, 2, 16, generator=g)
    assert abs(klt_rows(white)[0]["gain_bits_mean"]) < 0.2
