"""Every registered KV codec on one rate/quality frontier on SmolLM2's KV, and CacheGen's headroom.

``experiments.codec_ratio`` measures the codec's variants on one window of text; this study asks whether the
issue's headline target (>= 3.5x smaller than int8 at < 2 % perplexity increase, i.e. <= 2.31 bits per value)
is within reach on this model, and what would be needed:

1. **Frontier.** Every codec of ``lmkv.ops.codec`` (``names()``: int8, fp8, KIVI, CacheGen, and any a researcher
   registered before calling :func:`main`) with a settings sweep each (:data:`SWEEPS`; CacheGen: a grid of bin
   allocations), each encoded and decoded with the real codec chunk by chunk (the fp16 KV an engine stores),
   perplexity measured over several windows of held-out text (``--windows`` x (1024 context + 256 continuation)
   tokens at spread offsets), so that one window's luck does not decide a row, and greedy agreement: the share
   of ``--greedy`` tokens generated from the decoded KV equal, position by position, to those generated from
   the uncompressed KV. A speed table times encode/decode (values/s) of each codec's default per backend.
2. **Anchor-delta headroom** (CacheGen's optional step): the empirical entropy of the quantized values vs of
   the quantized deltas from an anchor token (every G-th token; deltas taken from the *decoded* anchor, the
   same step, so the error bound is unchanged). Negative = deltas would save bits.
3. **Transform headroom**: the coding gain of a per-(layer, plane) KLT calibrated on one half of the text and
   applied to the other (Gaussian approximation, 0.5 * log2 of the arithmetic/geometric mean of variances).

    .venv/bin/python -m experiments.codec_frontier [--small] [--windows 3] [--greedy 64]

Writes experiments/results/codec_frontier.jsonl and .png.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from experiments._common import print_table, save_plot, small, write_rows
from experiments.codec_ratio import CHUNK, capture_kv, chunks_of, continuation_nll, held_out_ids, int8_absmax
from lmkv._dispatch import use_backend
from lmkv.config import CodecConfig
from lmkv.ops import codec
from lmkv.tools.codec_headroom import anchor_delta_rows, klt_rows

NAME = "codec_frontier"
TARGET_BITS = 8.083 / 3.5  # int8 absmax with its fp16 scale per token vector, over the target ratio

GRID: dict[str, CodecConfig] = {
    "K 64/32, V 64/32": CodecConfig(key_bins_early=64, key_bins_late=32, value_bins_early=64, value_bins_late=32),
    "K 32/24, V 32/24": CodecConfig(key_bins_late=24, value_bins_late=24),
    "default: K 32/16, V 32/16, token 0 exact": CodecConfig(),
    "K 32/16, V 32/16, no exact token": CodecConfig(exact_leading_tokens=0),
    "K 32/16, V 32/12": CodecConfig(value_bins_late=12),
    "K 32/16, V 32/8": CodecConfig(value_bins_late=8),
    "K 32/16, V 32/6": CodecConfig(value_bins_late=6),
    "K 32/12, V 32/8": CodecConfig(key_bins_late=12, value_bins_late=8),
    "K 16/16, V 16/6": CodecConfig(key_bins_early=16, value_bins_early=16, value_bins_late=6),
    "K 32/8, V 32/8": CodecConfig(key_bins_late=8, value_bins_late=8),
    "CacheGen bins, token scales, no exact token": CodecConfig(key_scale_axis="token", exact_leading_tokens=0),
}


# Settings swept for the registry's other codecs: (label, codec name, its config mapping or None for defaults).
SWEEPS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("int8 (per-token absmax)", "int8", None),
    ("fp8 e4m3, per-token scales", "fp8", {"axis": "token"}),
    ("fp8 e4m3, per-channel scales", "fp8", {"axis": "channel"}),
    ("kivi 4-bit, G32, R32", "kivi", {"bits": 4, "group": 32, "residual": 32}),
    ("kivi 4-bit, G128, R0", "kivi", {"bits": 4, "group": 128, "residual": 0}),
    ("kivi 2-bit, G32, R32", "kivi", {"bits": 2, "group": 32, "residual": 32}),
    ("kivi 2-bit, G64, R16", "kivi", {"bits": 2, "group": 64, "residual": 16}),
    ("kivi 2-bit, G128, R0", "kivi", {"bits": 2, "group": 128, "residual": 0}),
]
SPEED_BACKENDS = {"reference": "quant.*=reference", "ext": "quant.*=ext", "auto": None}


def windows(tok: Any, count: int, context: int, continuation: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (context, continuation) windows spread over the held-out text (overlapping if it is short)."""
    ids = held_out_ids(tok, (context + continuation) * count)
    span = context + continuation
    return [(ids[i * span: i * span + context], ids[i * span + context: (i + 1) * span]) for i in range(count)]


def _methods() -> list[tuple[str, str, Any]]:
    """(label, codec name, config) of every row: int8 absmax as the yardstick, each registered codec's sweep
    (a codec registered by a user gets one row at its defaults), CacheGen's bin grid."""
    rows: list[tuple[str, str, Any]] = [("int8 absmax, fp16 scale (yardstick)", "", None)]
    swept = {name for _, name, _ in SWEEPS}
    rows += [(label, name, cfg) for label, name, cfg in SWEEPS if name in codec.names()]
    rows += [(f"{name} (defaults)", name, None) for name in codec.names()
             if name not in swept and name not in ("raw", "cachegen")]
    rows += [(f"cachegen {label}", "cachegen", cfg) for label, cfg in GRID.items()]
    return rows


def greedy_tokens(model: Any, kv: torch.Tensor, first: torch.Tensor, count: int) -> list[int]:
    """``count`` greedy tokens after feeding ``first`` (one token id) to the cache ``kv`` ([L, 2, T, H, D])."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0].permute(1, 0, 2)[None].contiguous(), kv[i, 1].permute(1, 0, 2)[None].contiguous(), i)
    out, token, pos = [], first.view(1, 1), kv.shape[2]
    for _ in range(count):
        step = model(token, past_key_values=cache, position_ids=torch.tensor([[pos]]), use_cache=True).logits
        token = step[:, -1:].argmax(-1)
        out.append(int(token))
        pos += 1
    return out


def _decoded(name: str, config: Any, kv: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(KV after the codec's round trip chunk by chunk, bits per value of its blobs)."""
    if not name:
        return int8_absmax(kv.half().float()), 8.0 + 16 / (kv.shape[3] * kv.shape[4])
    c = codec.get(name)
    blobs = [c.encode(x.half(), config) for x in chunks_of(kv)]
    return torch.cat([c.decode(b).float() for b in blobs], dim=2), 8 * sum(len(b) for b in blobs) / kv.numel()


def frontier_rows(model: Any, wins: list[tuple[torch.Tensor, torch.Tensor]], greedy: int = 0) -> list[dict[str, Any]]:
    kvs = [capture_kv(model, ctx) for ctx, _ in wins]
    base = [continuation_nll(model, kv, cont) for kv, (_, cont) in zip(kvs, wins)]
    ref_tokens = [greedy_tokens(model, kv, cont[0], greedy) if greedy else [] for kv, (_, cont) in zip(kvs, wins)]
    rows = []
    for label, name, config in tqdm(_methods(), desc="frontier"):
        bits, dnll, agree = [], [], []
        for kv, (_, cont), b, want in zip(kvs, wins, base, ref_tokens):
            decoded, total = _decoded(name, config, kv)
            bits.append(total)
            dnll.append(continuation_nll(model, decoded, cont) - b)
            if greedy:
                got = greedy_tokens(model, decoded, cont[0], greedy)
                agree.append(sum(x == y for x, y in zip(got, want)) / greedy)
        mean_bits, mean_dnll = sum(bits) / len(bits), sum(dnll) / len(dnll)
        cfg = config
        if isinstance(config, CodecConfig):
            cfg = {k: getattr(config, k) for k in config.__dataclass_fields__}
        rows.append({
            "method": label, "codec": name or "int8-absmax", "bits_total": mean_bits, "x_smaller_than_int8": None,
            "ppl_change_pct": 100 * (math.exp(mean_dnll) - 1),
            "ppl_change_pct_per_window": [round(100 * (math.exp(d) - 1), 3) for d in dnll],
            "greedy_agreement": sum(agree) / len(agree) if agree else None, "config": cfg,
        })
    int8_bits = rows[0]["bits_total"]
    for r in rows:
        r["x_smaller_than_int8"] = int8_bits / r["bits_total"]
        r["meets_target"] = r["x_smaller_than_int8"] >= 3.5 and r["ppl_change_pct"] < 2.0
        r["meets_goal_2_5x"] = r["x_smaller_than_int8"] >= 2.5 and r["ppl_change_pct"] < 2.0
    for r in rows:  # dominated: another row is at least as small and at least as good, and better in one
        r["dominated_by"] = next((o["method"] for o in rows if o is not r and o["bits_total"] <= r["bits_total"]
                                  and o["ppl_change_pct"] <= r["ppl_change_pct"]
                                  and (o["bits_total"], o["ppl_change_pct"]) != (r["bits_total"],
                                                                                r["ppl_change_pct"])), None)
    return rows


def speed_rows(kv: torch.Tensor, repeats: int = 5) -> list[dict[str, Any]]:
    """Encode / decode values per second of each codec's defaults on one fp16 chunk, per backend (medians,
    backends alternating). CacheGen's pure-Python reference coder is left out (minutes per chunk)."""
    chunk = chunks_of(kv)[0].half()
    out = []
    for name in [n for n in codec.names() if n != "raw"]:
        c = codec.get(name)
        backends = {"auto": None} if name == "cachegen" or name not in ("int8", "fp8", "kivi") else SPEED_BACKENDS
        times: dict[str, tuple[list[float], list[float]]] = {b: ([], []) for b in backends}
        for _ in range(repeats):
            for b, sel in backends.items():
                with use_backend(sel or {}):
                    t0 = time.perf_counter()
                    blob = c.encode(chunk, None)
                    t1 = time.perf_counter()
                    c.decode(blob)
                    t2 = time.perf_counter()
                times[b][0].append(t1 - t0)
                times[b][1].append(t2 - t1)
        for b, (enc, dec) in times.items():
            out.append({"codec": name, "backend": b, "values": chunk.numel(),
                        "encode_mvalues_s": chunk.numel() / statistics.median(enc) / 1e6,
                        "decode_mvalues_s": chunk.numel() / statistics.median(dec) / 1e6})
    return out


def plot(rows: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    for i, name in enumerate(codecs):
        pts = [r for r in rows if r["codec"] == name]
        ax.scatter([r["bits_total"] for r in pts], [r["ppl_change_pct"] for r in pts], color=f"C{i}", label=name,
                   marker="*" if name == "int8-absmax" else "o")
    for r in rows:
        ax.annotate(r["method"], (r["bits_total"], r["ppl_change_pct"]), fontsize=6)
    ax.axvline(TARGET_BITS, color="red", linestyle="--", label=f"3.5x smaller than int8 ({TARGET_BITS:.2f} bits)")
    ax.axhline(2.0, color="orange", linestyle="--", label="+2 % perplexity")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("bits per value (payload + tables + scales + meta)")
    ax.set_ylabel("perplexity change % (mean over windows)")
    ax.axvline(8.083 / 2.5, color="gray", linestyle=":", label="2.5x smaller than int8")
    ax.set_title("KV codecs: rate vs perplexity on SmolLM2-135M (lower left is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="test sizes")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--greedy", type=int, default=64, help="greedy tokens compared per window (0: skip)")
    args = ap.parse_args(argv)
    if args.small or small():
        args.windows, args.context, args.continuation, args.greedy = 1, 256, 32, 4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lmkv.models import load_smollm2

    torch.set_grad_enabled(False)
    model, tok = load_smollm2()
    model.eval()
    wins = windows(tok, args.windows, args.context, args.continuation)
    rows = frontier_rows(model, wins, args.greedy)
    print_table(rows, ["method", "bits_total", "x_smaller_than_int8", "ppl_change_pct", "greedy_agreement",
                       "meets_goal_2_5x", "dominated_by"],
                title=f"rate vs perplexity, {args.windows} windows of {args.context}+{args.continuation} tokens "
                      f"({CHUNK}-token chunks); target <= {TARGET_BITS:.2f} bits at < 2 %")
    kv = capture_kv(model, wins[0][0])
    speed = speed_rows(kv)
    print_table(speed, ["codec", "backend", "encode_mvalues_s", "decode_mvalues_s"],
                title=f"codec speed on one {CHUNK}-token fp16 chunk (Mvalues/s, medians of 5, backends alternating)")
    delta = anchor_delta_rows(kv)
    print_table(delta, ["plane", "group", "bits_plain", "bits_delta", "delta_minus_plain"],
                title="anchor-delta coding at the default step (negative = deltas save bits)")
    klt = klt_rows(capture_kv(model, torch.cat([c for c, _ in wins])[: 2 * args.context]))
    print_table(klt, ["plane", "gain_bits_mean", "gain_bits_max"],
                title="KLT coding gain (bits/value a calibrated transform could save, Gaussian approximation)")
    common = {"model": "SmolLM2-135M", "windows": args.windows, "context": args.context,
              "continuation": args.continuation, "chunk": CHUNK, "backend": "auto"}
    write_rows(NAME, [{**common, "kind": "frontier", **r} for r in rows]
               + [{**common, "kind": "speed", **r, "backend": r["backend"]} for r in speed]
               + [{**common, "kind": "headroom", **r} for r in delta + klt])
    save_plot(plot(rows), NAME)
    return rows


if __name__ == "__main__":
    main()
