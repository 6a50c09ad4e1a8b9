"""TTFT of SmolLM2 under transformers: cold prefill vs warm from lmkv's memory, disk, Redis and memory+CacheGen.

Three parts, each cold and warm measured alternately in one process (medians of ``--repeats``):

- ``long``: for each prompt length (1k/2k/4k/8k tokens, each k * 256 + 1 so that all but the last token can
  hit) the prompt's KV is stored once, then cold and every warm variant (memory, disk, Redis, memory+CacheGen).
  Beside them stands the physical bound of a warm start: the stored bytes at the copy bandwidth measured in the
  same run (``copy_`` into a preallocated buffer) plus one decode step over the same context.
- ``short``: a repeated prompt of 64, 200, 256, 257, 1000 tokens at the default chunk size (256): the warm hit
  fraction (of the ``n - 1`` tokens that can hit) and TTFT vs cold. Goal: every repeat hits all but its last token.
- ``batch``: B = 4 left-padded rows sharing a ~2k-token system prompt, each with its own question; the system
  prompt is stored once, then the batch runs cold and warm. Goal: warm TTFT <= 0.3x cold.

    .venv/bin/python -m experiments.ttft_hf                      # all parts (~15 min on 2 cores)
    .venv/bin/python -m experiments.ttft_hf --parts short,batch  # one or two parts
    .venv/bin/python -m experiments.ttft_hf --small              # small sizes, for a smoke test

Writes experiments/results/ttft_hf.jsonl and ttft_hf.png.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from experiments._common import alternate, median, print_table, save_plot, small, write_rows

CHUNK = 256


def _prompt(tokenizer: Any, n: int) -> torch.Tensor:
    from lmkv.tools.demo import make_document

    doc, _ = make_document(n + 64, tokenizer, seed=n)
    ids = tokenizer(doc, return_tensors="pt").input_ids[:, :n]
    return ids


def _copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [0.0] * 5
    for i in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times[i] = time.perf_counter() - t0
    return nbytes / median(times)


def _decode_step_s(model: Any, ctx: int) -> float:
    from lmkv.adapters.hf import build_cache
    from lmkv.adapters.hf.compat import cache_kwargs

    text = model.config.get_text_config()
    h, d = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    kv = torch.randn(text.num_hidden_layers, 2, ctx, h, d, dtype=model.dtype)
    times = []
    for _ in range(3):
        cache = build_cache(kv, model.config)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=torch.tensor([[5]]), **cache_kwargs(cache), use_cache=True,
                  cache_position=torch.tensor([ctx]))
        times.append(time.perf_counter() - t0)
    return median(times)


def _measure(model: Any, tok: Any, n: int, variants: dict[str, dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """Store an n-token prompt in every variant, then time cold and each warm variant alternately."""
    from lmkv import config as lmkv_config
    from lmkv.adapters.hf import generate
    from lmkv.engine import KVEngine

    ids = _prompt(tok, n)
    engines = {name: KVEngine.for_model(model, lmkv_config.load({"chunk_size": CHUNK, **v}))
               for name, v in variants.items()}
    # One cold prefill stores the prompt; the other variants get the same KV copied in (a prefill at 8k costs
    # about a minute here).
    first = next(iter(engines.values()))
    generate(model, ids, engine=first, max_new_tokens=1)
    kv, hit = first.retrieve(ids[0].tolist())
    for eng in list(engines.values())[1:]:
        eng.store(ids[0, :hit].tolist(), kv)
    for eng in engines.values():
        eng.flush()
    stored_bytes = engines["memory"].geometry.bytes_per_token * ((n - 1) // CHUNK * CHUNK)
    results: dict[str, list[float]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def runner(label: str, engine: KVEngine, reuse: bool) -> Any:
        def fn() -> None:
            out = generate(model, ids, engine=engine, reuse=reuse, store=False, max_new_tokens=1)
            results.setdefault(label, []).append(out.stats.ttft_s)
            outputs[label] = out.sequences
        return fn

    candidates = {"cold": runner("cold", engines["memory"], False)}
    candidates.update({name: runner(name, eng, True) for name, eng in engines.items()})
    alternate(candidates, repeats=repeats, warmup=1)
    bw = _copy_bandwidth(max(stored_bytes, 1 << 20))
    bound = stored_bytes / bw + _decode_step_s(model, n - 1)
    cold = median(results["cold"][1:])  # entry 0 is the warm-up round
    rows = []
    for name in ["cold", *engines]:
        t = median(results[name][1:])
        rows.append({
            "backend": "auto", "prompt_tokens": n, "variant": name, "ttft_s": t,
            "speedup_vs_cold": cold / t, "bound_s": bound, "ttft_over_bound": t / bound,
            "stored_bytes": stored_bytes, "copy_GBps": bw / 1e9,
            "identical_to_cold": bool(torch.equal(outputs[name], outputs["cold"])),
        })
    for eng in engines.values():
        eng.close()
    return rows


def _cold_warm(run: Any, repeats: int) -> dict[str, list[Any]]:
    """``run(reuse)`` cold and warm, alternately (``repeats`` rounds after one warm-up): the outputs of each."""
    results: dict[str, list[Any]] = {"cold": [], "warm": []}
    alternate({"cold": lambda: results["cold"].append(run(False)),
               "warm": lambda: results["warm"].append(run(True))}, repeats=repeats, warmup=1)
    return results


def _measure_short(model: Any, tok: Any, lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    """A repeated prompt of each length at the default chunk size: cold vs warm TTFT and the hit fraction."""
    from lmkv import config as lmkv_config
    from lmkv.adapters.hf import generate
    from lmkv.engine import KVEngine

    rows = []
    for n in lengths:
        ids = _prompt(tok, n)
        engine = KVEngine.for_model(model, lmkv_config.load({"memory": {"capacity": "1GiB"},
                                                             "disk": {"enabled": False}}))
        generate(model, ids, engine=engine, max_new_tokens=1)  # the first request stores it
        results = _cold_warm(lambda reuse, _ids=ids, _engine=engine: generate(
            model, _ids, engine=_engine, reuse=reuse, store=False, max_new_tokens=1), repeats)
        cold = median([o.stats.ttft_s for o in results["cold"][1:]])
        warm = median([o.stats.ttft_s for o in results["warm"][1:]])
        hit = results["warm"][-1].stats.hit_tokens
        rows.append({
            "part": "short", "backend": "auto", "prompt_tokens": n, "chunk_size": engine.chunk_size, "batch": 1,
            "variant": "memory", "hit_tokens": hit, "hit_fraction": hit / (n - 1), "ttft_cold_s": cold,
            "ttft_s": warm, "warm_over_cold": warm / cold,
            "identical_to_cold": bool(torch.equal(results["warm"][-1].sequences, results["cold"][-1].sequences)),
        })
        engine.close()
    return rows


def _measure_batch(model: Any, tok: Any, shared_tokens: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """``batch`` left-padded rows sharing a system prompt of ~``shared_tokens``: cold vs warm batch TTFT."""
    from lmkv import config as lmkv_config
    from lmkv.adapters.hf import generate
    from lmkv.engine import KVEngine

    system = _prompt(tok, shared_tokens)[0].tolist()
    questions = ["What color is the flag?", "Which animal is the symbol of the first town?",
                 "How many people live in the largest town?", "What do the farmers grow in the last town?",
                 "Name two towns.", "Which town is the smallest?", "Is there a town with a blue flag?",
                 "What is the symbol of the second town?"]
    rows_ids = [system + tok(" " + questions[i % len(questions)] * (1 + i % 3)).input_ids for i in range(batch)]
    width = max(len(r) for r in rows_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows_ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows_ids])
    engine = KVEngine.for_model(model, lmkv_config.load({"memory": {"capacity": "2GiB"}, "disk": {"enabled": False}}))
    generate(model, torch.tensor([system]), engine=engine, max_new_tokens=1)  # the system prompt, stored once
    results = _cold_warm(lambda reuse: generate(model, ids, attention_mask=mask, engine=engine, reuse=reuse,
                                                store=False, max_new_tokens=1, pad_token_id=pad), repeats)
    cold = median([o.stats.ttft_s for o in results["cold"][1:]])
    warm = median([o.stats.ttft_s for o in results["warm"][1:]])
    last = results["warm"][-1]
    engine.close()
    return [{
        "part": "batch", "backend": "auto", "prompt_tokens": width, "shared_tokens": len(system), "batch": batch,
        "chunk_size": engine.chunk_size, "variant": "memory", "hit_tokens": last.stats.hit_tokens,
        "row_hits": last.stats.row_hits, "hit_fraction": last.stats.hit_tokens / (batch * len(system)),
        "ttft_cold_s": cold, "ttft_s": warm, "warm_over_cold": warm / cold,
        "identical_to_cold": bool(torch.equal(last.sequences, results["cold"][-1].sequences)),
    }]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--parts", default="long,short,batch", help="comma-separated: long, short, batch")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"long", "short", "batch"}:
        parser.error(f"--parts: unknown {sorted(parts - {'long', 'short', 'batch'})}")
    is_small = args.small or small()
    # k * chunk + 1 tokens: every chunk but the last token hits, the case the physical bound describes.
    lengths = args.lengths or ([CHUNK + 1, 2 * CHUNK + 1] if is_small else [1025, 2049, 4097, 7937])
    torch.set_num_threads(2)

    from lmkv.models import load_smollm2

    model, tok = load_smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="lmkv-ttft-"))
    redis = None
    variants: dict[str, dict[str, Any]] = {
        "memory": {"memory": {"capacity": "4GiB"}, "disk": {"enabled": False}},
        "disk": {"memory": {"enabled": False}, "disk": {"path": str(tmp / "disk"), "capacity": "8GiB"}},
        "memory+cachegen": {"memory": {"capacity": "4GiB", "serde": "cachegen"}, "disk": {"enabled": False}},
    }
    if not args.no_redis and shutil.which("redis-server"):
        from lmkv.testing import LocalRedis

        redis = LocalRedis().start()
        variants["redis"] = {"memory": {"enabled": False}, "disk": {"enabled": False},
                             "redis": {"enabled": True, "url": redis.url, "socket_timeout": 30.0}}
    rows: list[dict[str, Any]] = []
    try:
        if "long" in parts:
            for n in tqdm(lengths, desc="prompt lengths"):
                rows.extend({"part": "long", **r} for r in _measure(model, tok, n, variants, args.repeats))
        if "short" in parts:
            short = [64, 200, 256, 257] if is_small else [64, 200, 256, 257, 1000]
            rows.extend(_measure_short(model, tok, short, args.repeats))
        if "batch" in parts:
            rows.extend(_measure_batch(model, tok, 300 if is_small else 2048, 4, args.repeats))
    finally:
        if redis is not None:
            redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    long_rows = [r for r in rows if r["part"] == "long"]
    if long_rows:
        print_table(long_rows, ["prompt_tokens", "variant", "ttft_s", "speedup_vs_cold", "bound_s",
                                "ttft_over_bound", "identical_to_cold"], title="SmolLM2 TTFT, cold vs warm (median)")
    other = [r for r in rows if r["part"] != "long"]
    if other:
        print_table(other, ["part", "batch", "prompt_tokens", "hit_tokens", "hit_fraction", "ttft_cold_s", "ttft_s",
                            "warm_over_cold", "identical_to_cold"],
                    title="Repeated short prompts and a B = 4 batch sharing a system prompt (median)")
    write_rows("ttft_hf", rows)
    _plot(rows, variants)


def _plot(rows: list[dict[str, Any]], variants: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long_rows = [r for r in rows if r["part"] == "long"]
    other = [r for r in rows if r["part"] != "long"]
    panels = int(bool(long_rows)) + int(bool(other))  # only the parts this run measured
    fig, axes = plt.subplots(1, max(1, panels), figsize=(6 * max(1, panels), 4.5), squeeze=False)
    ax = axes[0, 0] if long_rows else None
    ax2 = axes[0, -1] if other else None
    if ax is not None:
        _plot_long(ax, long_rows, variants)
    if ax2 is not None:
        _plot_short(ax2, other)
    save_plot(fig, "ttft_hf")


def _plot_long(ax: Any, long_rows: list[dict[str, Any]], variants: dict[str, Any]) -> None:
    for name in ["cold", *variants]:
        pts = [(r["prompt_tokens"], r["ttft_s"]) for r in long_rows if r["variant"] == name]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    bpts = sorted({(r["prompt_tokens"], r["bound_s"]) for r in long_rows})
    if bpts:
        ax.plot(*zip(*bpts), linestyle="--", color="gray", label="bound: bytes/copy BW + 1 decode step")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M TTFT on CPU: cold vs warm from lmkv")
    ax.legend()
    ax.grid(alpha=0.3)


def _plot_short(ax2: Any, other: list[dict[str, Any]]) -> None:
    labels = [f"{r['prompt_tokens']} tok" if r["part"] == "short" else f"B={r['batch']}, {r['shared_tokens']} shared"
              for r in other]
    x = range(len(other))
    ax2.bar([i - 0.2 for i in x], [r["ttft_cold_s"] for r in other], width=0.4, label="cold")
    ax2.bar([i + 0.2 for i in x], [r["ttft_s"] for r in other], width=0.4, label="warm (memory)")
    for i, r in enumerate(other):
        ax2.annotate(f"hit {r['hit_fraction']:.0%}", (i + 0.2, r["ttft_s"]), ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(list(x), labels, rotation=20, fontsize=8)
    ax2.set_ylabel("TTFT (s), log scale")
    ax2.set_yscale("log")  # warm prompts take ~50 ms beside cold batches of ~20 s
    ax2.set_title("repeated short prompts (chunk 256) and a shared-prefix batch")
    ax2.legend()
    ax2.grid(alpha=0.3, axis="y", which="both")


if __name__ == "__main__":
    main()
