"""CacheGen codec on real SmolLM2-135M-Instruct KV: size, error, perplexity; and the coders side by side.

Captures the KV cache of a held-out English text (the GPL-3 licence text shipped with the OS, else a built-in
paragraph) with a plain prefill, splits it into 256-token chunks like the engine stores them, and for each
method encodes and decodes every chunk, then continues the text from the decoded KV and measures the
log-likelihood of the next tokens. Methods: fp16, int8 absmax per token vector, CacheGen's design (its bins
and one table per channel), lmkv's default (shared tables) and variants (table groups, fewer bins).
Then, on the same symbols and tables: lmkv's C++ coder vs torchac (int16 CDF API) vs constriction (range coder,
one model per table), size and symbols/s, A/B interleaved in one process.

    .venv/bin/python -m experiments.codec_ratio [--small] [--context 1024] [--continuation 256]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from experiments._common import alternate, median, print_table, save_plot, small, write_rows
from lmkv.config import CodecConfig
from lmkv.ops import codec
from lmkv.reference import codec as ref

NAME = "codec_ratio"
CHUNK = 256
FALLBACK_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from those used to make wine. "
) * 80

VARIANTS: dict[str, CodecConfig | None] = {
    "cachegen (bins, token scales, per-channel tables)": CodecConfig(table_groups=0, key_scale_axis="token",
                                                                     exact_leading_tokens=0),
    "lmkv token scales, 16 tables": CodecConfig(table_groups=16, key_scale_axis="token"),
    "lmkv token scales, 4 tables": CodecConfig(table_groups=4, key_scale_axis="token"),
    "lmkv token scales, 64 tables": CodecConfig(table_groups=64, key_scale_axis="token"),
    "lmkv K per-channel, 16 tables, no exact token": CodecConfig(exact_leading_tokens=0),
    "lmkv K per-channel, 16 tables, token 0 exact (default)": CodecConfig(),
    "lmkv K+V per-channel, 16 tables": CodecConfig(key_scale_axis="channel", value_scale_axis="channel"),
    "lmkv K per-channel, late bins 12": CodecConfig(key_scale_axis="channel", key_bins_late=12, value_bins_late=12),
    "lmkv K per-channel, late bins 8": CodecConfig(key_scale_axis="channel", key_bins_late=8, value_bins_late=8),
}
DEFAULT_VARIANT = "lmkv token scales, 16 tables"


def held_out_ids(tok: Any, n: int) -> torch.Tensor:
    path = Path("/usr/share/common-licenses/GPL-3")
    text = path.read_text() if path.is_file() else FALLBACK_TEXT
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        ids = ids.repeat(math.ceil(n / ids.numel()))
    return ids[:n]


def capture_kv(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Prefill ``ids`` and return its KV as ``[L, 2, T, H, D]`` float32."""
    with torch.no_grad():
        out = model(ids[None], use_cache=True)
    layers = out.past_key_values.layers
    kv = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in layers])  # [L, 2, H, T, D]
    return kv.permute(0, 1, 3, 2, 4).contiguous()


def continuation_nll(model: Any, kv: torch.Tensor, cont: torch.Tensor) -> float:
    """Mean NLL (nats) of cont[1:] when the model continues from the cache ``kv`` ([L, 2, T, H, D])."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0].permute(1, 0, 2)[None].contiguous(), kv[i, 1].permute(1, 0, 2)[None].contiguous(), i)
    T = kv.shape[2]
    with torch.no_grad():
        pos = torch.arange(T, T + cont.numel())[None]
        logits = model(cont[None], past_key_values=cache, position_ids=pos, use_cache=True).logits[0].float()
    return float(torch.nn.functional.cross_entropy(logits[:-1], cont[1:]))


def chunks_of(kv: torch.Tensor) -> list[torch.Tensor]:
    return [kv[:, :, t : t + CHUNK].contiguous() for t in range(0, kv.shape[2], CHUNK)]


def int8_absmax(kv: torch.Tensor) -> torch.Tensor:
    scale = kv.abs().amax(dim=(3, 4), keepdim=True).to(torch.float16).float().clamp_min(1e-30) / 127
    return (torch.round(kv / scale).clamp(-127, 127) * scale).to(kv.dtype)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / a.double().norm())


def method_rows(model: Any, kv: torch.Tensor, cont: torch.Tensor) -> tuple[list[dict], dict]:
    L, _, T, H, D = kv.shape
    values = kv.numel()
    base_nll = continuation_nll(model, kv, cont)
    rows: list[dict] = []
    parts: dict[str, Any] = {}

    def add(name: str, decoded: torch.Tensor, bits: dict[str, float]) -> None:
        nll = continuation_nll(model, decoded, cont)
        total = sum(bits.values())
        rows.append({
            "method": name, **{f"bits_{k}": v for k, v in bits.items()}, "bits_total": total,
            "rel_l2_k": rel_l2(kv[:, 0], decoded[:, 0]), "rel_l2_v": rel_l2(kv[:, 1], decoded[:, 1]),
            "nll": nll, "ppl": math.exp(nll), "ppl_change_pct": 100 * (math.exp(nll - base_nll) - 1),
        })

    add("fp32 (reference)", kv, {"payload": 32.0, "tables": 0.0, "scales": 0.0, "exact": 0.0, "meta": 0.0})
    add("fp16", kv.half().float(), {"payload": 16.0, "tables": 0.0, "scales": 0.0, "exact": 0.0, "meta": 0.0})
    add("int8 absmax", int8_absmax(kv), {"payload": 8.0, "tables": 0.0, "scales": 16 / (H * D), "exact": 0.0,
                                                "meta": 0.0})
    for name, config in tqdm(VARIANTS.items(), desc="codec variants"):
        blobs = [codec.encode(c.half(), config=config) for c in chunks_of(kv)]  # engines store fp16 KV
        decoded = torch.cat([codec.decode(b).float() for b in blobs], dim=2)
        sections = [codec.inspect(b)["bytes"] for b in blobs]
        bits = {k: 8 * sum(s[k] for s in sections) / values for k in ("payload", "tables", "scales", "exact", "meta")}
        add(name, decoded, bits)
        parts[name] = blobs
    int8_bits = rows[2]["bits_total"]
    for r in rows:
        r["x_smaller_than_int8"] = int8_bits / r["bits_total"]
    return rows, parts


def entropy_rows(blobs: list[bytes]) -> dict[str, float]:
    """Payload vs the ideal code length under the blob's own tables, and vs the per-stream empirical entropy."""
    from lmkv.reference import codec_format as fmt

    payload = cross = ent = tables = 0.0
    for b in blobs:
        parsed = fmt.unpack(b)
        cdf = ref.stream_tables(parsed).to(torch.int64)
        syms = codec.ac_decode(parsed.payload, torch.from_numpy(parsed.lengths), cdf.to(torch.int32), parsed.T)
        counts = ref.counts(syms, cdf.shape[1] - 1).double()
        q = cdf.diff(dim=1).double() / 65536
        cross += float(-(counts * torch.where(counts > 0, q.clamp_min(1e-300).log2(), 0.0)).sum()) / 8
        p = counts / counts.sum(-1, keepdim=True)
        ent += float(-(counts * torch.where(counts > 0, p.log2(), 0.0)).sum()) / 8
        payload += len(parsed.payload)
        tables += parsed.section_bytes()["tables"]
    return {"payload_over_cross_entropy": payload / cross, "payload_over_entropy": payload / ent,
            "payload_plus_tables_over_entropy_plus_tables": (payload + tables) / (ent + tables),
            "tables_over_payload": tables / payload}


def coder_rows(blobs: list[bytes], repeats: int) -> list[dict]:
    """lmkv ext vs torchac vs constriction on the same symbols and tables (from the lmkv default blobs)."""
    from lmkv.optimized.codec import ext as codec_ext
    from lmkv.reference import codec_format as fmt

    sym_parts, cdf_parts, ids_parts = [], [], []
    for b in blobs:
        parsed = fmt.unpack(b)
        cdf = ref.stream_tables(parsed)
        sym_parts.append(codec.ac_decode(parsed.payload, torch.from_numpy(parsed.lengths), cdf, parsed.T))
        cdf_parts.append(cdf)
        # table identity per stream, to give constriction one model (and one call) per table
        ids = parsed.ids.astype(np.int64).reshape(parsed.L * parsed.P, parsed.C) if parsed.ids is not None else None
        base = len(ids_parts) * 100000
        ids_parts.append(base + (np.arange(parsed.L * parsed.P)[:, None] * 1000 + ids).reshape(-1)
                         if ids is not None else base + np.arange(parsed.L * parsed.P * parsed.C))
    sym = torch.cat(sym_parts)
    cdf = torch.cat(cdf_parts)
    table_id = np.concatenate(ids_parts)
    S, T = sym.shape
    n_sym = sym.numel()
    rows: list[dict] = []
    threads = torch.get_num_threads()

    # lmkv ext
    data, lengths = codec_ext.ac_encode_tensor(sym, cdf)
    offsets = torch.zeros(S + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    assert torch.equal(torch.ops.lmkv.codec_ac_decode(data, offsets, cdf, T), sym)
    candidates = {
        "lmkv ext encode": lambda: codec_ext.ac_encode_tensor(sym, cdf),
        "lmkv ext decode": lambda: torch.ops.lmkv.codec_ac_decode(data, offsets, cdf, T),
    }
    sizes = {"lmkv ext": int(data.numel())}

    # constriction: one queue range coder, one Categorical model per distinct table, streams grouped by table
    try:
        import constriction

        order = np.argsort(table_id, kind="stable")
        uniq, start = np.unique(table_id[order], return_index=True)
        bounds = list(zip(start, [*start[1:], len(order)], strict=True))
        sym_np = sym.numpy()
        probs = (cdf.diff(dim=1).double() / 65536).numpy()
        groups = [(sym_np[order[a:b]].reshape(-1).astype(np.int32),
                   constriction.stream.model.Categorical(probs[order[a]], perfect=False)) for a, b in bounds]

        def c_encode() -> np.ndarray:
            enc = constriction.stream.queue.RangeEncoder()
            for s, m in groups:
                enc.encode(s, m)
            return enc.get_compressed()

        c_data = c_encode()

        def c_decode() -> list[np.ndarray]:
            dec = constriction.stream.queue.RangeDecoder(c_data)
            return [dec.decode(m, len(s)) for s, m in groups]

        assert all(np.array_equal(a, s) for a, (s, _) in zip(c_decode(), groups, strict=True))
        candidates["constriction encode"] = c_encode
        candidates["constriction decode"] = c_decode
        sizes["constriction"] = int(c_data.nbytes)
    except ImportError as exc:
        rows.append({"coder": "constriction", "note": f"not installed: {exc}"})

    # torchac: one stream over all symbols, the CDF expanded per symbol (its API), float CDF renormalised by it
    try:
        import torchac

        cdf_float = (cdf.double() / 65536).float()
        sym_t = sym.to(torch.int16)
        full_cdf = cdf_float[:, None, :].expand(S, T, cdf.shape[1]).contiguous()
        # torchac needs every symbol >= 1/2**16: it renormalises the float CDF; convert once, outside the timing
        cdf_i16 = torchac.torchac._convert_to_int_and_normalize(full_cdf, True)
        del full_cdf
        t_data = torchac.encode_int16_normalized_cdf(cdf_i16, sym_t)
        assert torch.equal(torchac.decode_int16_normalized_cdf(cdf_i16, t_data), sym_t)
        candidates["torchac encode"] = lambda: torchac.encode_int16_normalized_cdf(cdf_i16, sym_t)
        candidates["torchac decode"] = lambda: torchac.decode_int16_normalized_cdf(cdf_i16, t_data)
        sizes["torchac"] = len(t_data)
    except ImportError as exc:
        rows.append({"coder": "torchac", "note": f"not installed: {exc}"})

    times = alternate(candidates, repeats=repeats, warmup=1)
    for name, ts in times.items():
        coder, _, op = name.rpartition(" ")
        rows.append({"coder": coder, "op": op, "threads": threads if coder == "lmkv ext" else 1,
                     "symbols": n_sym, "streams": S, "bytes": sizes.get(coder),
                     "bits_per_symbol": 8 * sizes.get(coder, 0) / n_sym, "median_s": median(ts),
                     "msym_per_s": n_sym / median(ts) / 1e6})
    by = {(r.get("coder"), r.get("op")): r for r in rows}
    for op in ("encode", "decode"):
        if ("constriction", op) in by:
            by[("lmkv ext", op)]["x_vs_constriction"] = (
                by[("constriction", op)]["median_s"] / by[("lmkv ext", op)]["median_s"])
    return rows


def plot(rows: list[dict], coder: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    codec_rows = [r for r in rows if r["method"] in VARIANTS or "int8" in r["method"]]
    names = [r["method"] for r in codec_rows]
    bottom = np.zeros(len(codec_rows))
    for part in ("payload", "tables", "scales", "exact", "meta"):
        vals = np.array([r[f"bits_{part}"] for r in codec_rows])
        axes[0].barh(names, vals, left=bottom, label=part)
        bottom += vals
    axes[0].set_xlabel("bits per value")
    axes[0].set_xscale("log")
    axes[0].legend()
    axes[0].set_title("size per value (stacked)")
    axes[1].scatter([r["bits_total"] for r in rows], [r["ppl_change_pct"] for r in rows])
    for r in rows:
        axes[1].annotate(r["method"], (r["bits_total"], r["ppl_change_pct"]), fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("bits per value")
    axes[1].set_ylabel("perplexity change %")
    axes[1].set_title("SmolLM2-135M continuation from decoded KV")
    timed = [r for r in coder if "msym_per_s" in r]
    axes[2].bar([f"{r['coder']}\n{r['op']}" for r in timed], [r["msym_per_s"] for r in timed])
    axes[2].set_ylabel("M symbols / s")
    axes[2].set_title("coders on the same symbols and tables")
    axes[2].tick_params(axis="x", labelsize=7)
    save_plot(fig, NAME)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="test sizes")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.small or small():
        args.context, args.continuation, args.repeats = 256, 32, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lmkv.models import load_smollm2

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    model.eval()
    ids = held_out_ids(tok, args.context + args.continuation)
    ctx, cont = ids[: args.context], ids[args.context :]
    kv = capture_kv(model, ctx)
    print(f"SmolLM2 KV {tuple(kv.shape)} captured in {time.perf_counter() - t0:.1f}s (incl. load)", flush=True)
    rows, blobs = method_rows(model, kv, cont)
    common = {"context": args.context, "continuation": args.continuation, "chunk": CHUNK, "model": "SmolLM2-135M"}
    print_table(rows, ["method", "bits_total", "bits_payload", "bits_tables", "bits_scales", "bits_exact", "bits_meta",
                       "x_smaller_than_int8", "rel_l2_k", "rel_l2_v", "ppl", "ppl_change_pct"],
                title=f"KV codecs on SmolLM2-135M ({args.context} context tokens in {CHUNK}-token chunks, "
                      f"perplexity of the next {args.continuation})")
    eff = [{"method": name, **entropy_rows(b)} for name, b in blobs.items()]
    print_table(eff, ["method", "payload_over_cross_entropy", "payload_over_entropy",
                      "payload_plus_tables_over_entropy_plus_tables", "tables_over_payload"],
                title="coder efficiency (1.0 = ideal)")
    coder = coder_rows(blobs[DEFAULT_VARIANT][:1], args.repeats)
    print_table(coder, ["coder", "op", "threads", "symbols", "bytes", "bits_per_symbol", "median_s", "msym_per_s",
                        "x_vs_constriction", "note"],
                title="coders on the same symbols and tables (A/B interleaved, medians)")
    write_rows(NAME, [{**common, "kind": "method", **r} for r in rows]
               + [{**common, "kind": "efficiency", **r} for r in eff]
               + [{**common, "kind": "coder", **r} for r in coder])
    plot(rows, coder)


if __name__ == "__main__":
    main()
