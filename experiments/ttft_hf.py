"""TTFT of SmolLM2 under transformers: cold prefill vs warm from lmkv's memory, disk, Redis and memory+CacheGen.

For each prompt length (1k/2k/4k/8k tokens, each k * 256 + 1 so that all but the last token can hit)
the prompt's KV is stored once, then cold and every warm variant are
measured alternately in one process (medians of ``--repeats``). Beside them stands the physical bound of a warm
start: the stored bytes at the copy bandwidth measured in the same run (``copy_`` into a preallocated buffer)
plus one decode step over the same context.

    .venv/bin/python -m experiments.ttft_hf            # full run (~10 min on 2 cores)
    .venv/bin/python -m experiments.ttft_hf --small    # 256/512 tokens, for a smoke test

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

    text = model.config.get_text_config()
    h, d = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    kv = torch.randn(text.num_hidden_layers, 2, ctx, h, d, dtype=model.dtype)
    times = []
    for _ in range(3):
        cache = build_cache(kv, model.config)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args(argv)
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
        for n in tqdm(lengths, desc="prompt lengths"):
            rows.extend(_measure(model, tok, n, variants, args.repeats))
    finally:
        if redis is not None:
            redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    print_table(rows, ["prompt_tokens", "variant", "ttft_s", "speedup_vs_cold", "bound_s", "ttft_over_bound",
                       "identical_to_cold"], title="SmolLM2 TTFT, cold vs warm (median)")
    write_rows("ttft_hf", rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ["cold", *variants]:
        pts = [(r["prompt_tokens"], r["ttft_s"]) for r in rows if r["variant"] == name]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    bpts = sorted({(r["prompt_tokens"], r["bound_s"]) for r in rows})
    ax.plot(*zip(*bpts), linestyle="--", color="gray", label="bound: bytes/copy BW + 1 decode step")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M TTFT on CPU: cold vs warm from lmkv")
    ax.legend()
    ax.grid(alpha=0.3)
    save_plot(fig, "ttft_hf")


if __name__ == "__main__":
    main()
