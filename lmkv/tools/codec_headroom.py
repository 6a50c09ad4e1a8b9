"""Headroom analyses of the CacheGen codec on real KV: would anchor-delta coding or a KLT save bits?

Used by ``experiments/codec_frontier.py`` (the measured figures) and by ``tests/test_codec_headroom.py`` (on KV of
known structure). Tensors: ``kv [L, 2, T, H, D]``.
"""

from __future__ import annotations

from typing import Any

import torch

from lmkv.config import CodecConfig
from lmkv.reference import codec as ref


def _chunks(kv: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    return [kv[:, :, t:t + chunk_size].contiguous() for t in range(0, kv.shape[2], chunk_size)]


def _pooled_entropy_bits(symbols: torch.Tensor) -> float:
    """Total bits of ``symbols`` under their own empirical distribution."""
    _, counts = torch.unique(symbols, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(counts.double() * torch.log2(p)).sum())


def anchor_delta_rows(kv: torch.Tensor, groups: tuple[int, ...] = (2, 4, 10), chunk_size: int = 256
                      ) -> list[dict[str, Any]]:
    """Bits/value of plain vs anchor-delta symbols at the default codec's step, per plane (empirical entropy
    pooled per (layer, plane, chunk, channel table), the alphabet unbounded so deltas are never clipped)."""
    config = CodecConfig()
    rows = []
    for g in groups:
        plain = {0: 0.0, 1: 0.0}
        delta = {0: 0.0, 1: 0.0}
        for chunk in _chunks(kv.half().float(), chunk_size):
            L, P, T = chunk.shape[:3]
            levels = ((ref.resolve_bins(config, L, P) - 1) // 2).float()
            for p in range(P):
                x = chunk[:, p].reshape(L, T, -1)  # [L, T, C]
                per_channel = ref.channel_scaled(config, p)
                scale = ref.round_up_bf16(x.abs().amax(dim=1 if per_channel else 2, keepdim=True)).float()
                step = torch.where(scale > 0, scale / levels[:, p, None, None], 1.0)
                q = torch.round(x / step)
                anchors = (torch.arange(T) % g) == 0
                a_idx = torch.arange(T) - torch.arange(T) % g
                a_hat = q[:, a_idx] * (step if per_channel else step[:, a_idx])  # decoded anchor of each token
                d = torch.where(anchors[None, :, None], q, torch.round((x - a_hat) / step))
                for layer in range(L):
                    plain[p] += _pooled_entropy_bits(q[layer])
                    delta[p] += _pooled_entropy_bits(d[layer])
        n = kv[:, 0].numel()
        for p, name in ((0, "keys"), (1, "values")):
            rows.append({"analysis": "anchor-delta", "plane": name, "group": g, "bits_plain": plain[p] / n,
                         "bits_delta": delta[p] / n, "delta_minus_plain": (delta[p] - plain[p]) / n})
    return rows


def klt_rows(kv: torch.Tensor) -> list[dict[str, Any]]:
    """Coding gain (bits/value, Gaussian approximation) of a KLT fitted on the first half, applied to the second."""
    x = kv.double()
    half = x.shape[2] // 2
    rows = []
    for p, name in ((0, "keys"), (1, "values")):
        gains = []
        for layer in range(x.shape[0]):
            a = x[layer, p, 1:half].flatten(1)  # token 0 is the attention sink: an outlier, left out of the fit
            b = x[layer, p, half:].flatten(1)
            a, b = a - a.mean(0), b - b.mean(0)
            _, u = torch.linalg.eigh(a.T @ a / a.shape[0])
            var_d, var_t = b.var(0).clamp_min(1e-12), (b @ u).var(0).clamp_min(1e-12)
            gains.append(float(0.5 * (torch.log2(var_d).mean() - torch.log2(var_t).mean())))
        rows.append({"analysis": "KLT", "plane": name, "gain_bits_mean": sum(gains) / len(gains),
                     "gain_bits_max": max(gains), "gain_bits_per_layer": [round(v, 3) for v in gains]})
    return rows
