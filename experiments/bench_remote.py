"""Lookup and retrieve of 8 / 32 / 128 chunks from the Redis tier through a line with added latency.

A real ``redis-server`` on loopback sits behind :class:`lmkv.testing.LatencyProxy`, which delays every packet by
0, 1 or 5 ms each way and counts round trips (request bursts) on the wire. For each (latency, chunks) we time,
alternating in one process:

* ``lookup``: ``KVEngine.lookup`` of the stored prompt (one pipelined EXISTS batch);
* ``retrieve``: ``KVEngine.retrieve`` (one pipelined GET batch, then decode);
* ``per_chunk``: the pre-[2/9] ``retrieve``, one ``get`` per chunk into a staging buffer copied into the output
  (N round trips), for the ratio.

``*_round_trips`` are counted on the wire (request bursts), ``*_implied_rt`` from the timings: (time at this RTT -
time without added latency) / RTT. Goal ([2/9]): retrieve of N chunks <= 3 round trips + transfer time at every N.

    .venv/bin/python -m experiments.bench_remote [--small]
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from experiments._common import alternate, median, report, small
from lmkv.engine import KVEngine
from lmkv.testing import LatencyProxy, LocalRedis
from lmkv.types import KVGeometry

NAME = "bench_remote"
CHUNK = 256
GEOMETRY = KVGeometry(30, 3, 64, torch.bfloat16)  # SmolLM2-135M: 30 layers, 3 KV heads, D 64 (2.9 MiB/chunk)
SMALL_GEOMETRY = KVGeometry(4, 2, 16, torch.bfloat16)


def measure(redis: LocalRedis, delay_ms: float, num_chunks: int, geometry: KVGeometry, repeats: int) -> dict:
    with LatencyProxy(redis.port, delay_ms / 1000) as proxy:
        cfg = {"chunk_size": CHUNK, "memory": {"enabled": False}, "disk": {"enabled": False},
               "redis": {"enabled": True, "url": f"redis://127.0.0.1:{proxy.port}/0", "socket_timeout": 30.0,
                         "key_prefix": f"bench-{delay_ms}-{num_chunks}:"}}
        with KVEngine(cfg, geometry, model_id="bench-remote") as engine:
            tokens = list(range(num_chunks * CHUNK))
            kv = torch.randn(geometry.chunk_shape(len(tokens))).to(geometry.dtype)
            plan = engine.plan(tokens)
            engine.store(plan, kv)
            engine.flush()
            chunks = plan.chunks()

            def per_chunk() -> torch.Tensor:
                """The pre-[2/9] ``KVEngine.retrieve``: one ``get`` per chunk into a reused staging buffer,
                copied into the output (one round trip per chunk)."""
                out = torch.empty(geometry.chunk_shape(len(tokens)), dtype=geometry.dtype)
                staging = torch.empty(geometry.chunk_shape(CHUNK), dtype=geometry.dtype)
                for c in chunks:
                    kv = engine.storage.get(c.key, fingerprint=c.fingerprint,
                                            out=staging if c.num_tokens == CHUNK else None)
                    out[:, :, c.start:c.end].copy_(kv)
                return out

            trips = {}
            for name, fn in (("lookup", lambda: engine.lookup(plan)), ("retrieve", lambda: engine.retrieve(plan)),
                             ("per_chunk", per_chunk)):
                proxy.reset()
                fn()
                trips[name] = proxy.round_trips
            assert engine.retrieve(plan)[1] == len(tokens)
            times = alternate({"lookup": lambda: engine.lookup(plan), "retrieve": lambda: engine.retrieve(plan),
                               "per_chunk": per_chunk}, repeats=repeats, warmup=1)
    nbytes = kv.numel() * kv.element_size()
    row = {"delay_ms_each_way": delay_ms, "rtt_ms": 2 * delay_ms, "chunks": num_chunks, "chunk_tokens": CHUNK,
           "bytes": nbytes, "L": geometry.num_layers, "H": geometry.num_kv_heads, "D": geometry.head_dim,
           "dtype": str(geometry.dtype).removeprefix("torch."), "tier": "redis", "repeats": repeats}
    for name, ts in times.items():
        row[f"{name}_s"] = median(ts)
        row[f"{name}_round_trips"] = trips[name]
    row["per_chunk/retrieve"] = row["per_chunk_s"] / row["retrieve_s"]
    # what the round trips alone cost: retrieve minus this is transfer + decode
    row["retrieve_rtt_share_s"] = trips["retrieve"] * 2 * delay_ms / 1000
    return row


def run(delays=(0.0, 1.0, 5.0), chunk_counts=(8, 32, 128), geometry: KVGeometry = GEOMETRY,
        repeats: int = 5) -> list[dict]:
    torch.set_num_threads(2)
    rows = []
    with LocalRedis() as redis:
        jobs = [(d, n) for d in delays for n in chunk_counts]
        for d, n in tqdm(jobs, desc=NAME, leave=False):
            rows.append(measure(redis, d, n, geometry, repeats))
            redis_flush(redis)
    return implied_round_trips(rows)


def implied_round_trips(rows: list[dict]) -> list[dict]:
    """Round trips implied by the timings: (time at this RTT - time without added latency) / RTT."""
    base = {r["chunks"]: r for r in rows if r["rtt_ms"] == 0}
    for r in rows:
        b = base.get(r["chunks"])
        for name in ("lookup", "retrieve", "per_chunk"):
            if b is not None and r["rtt_ms"] > 0:
                r[f"{name}_implied_rt"] = (r[f"{name}_s"] - b[f"{name}_s"]) / (r["rtt_ms"] / 1000)
    return rows


def redis_flush(redis: LocalRedis) -> None:
    """Empty the server between sizes (128 chunks of SmolLM2 KV are 370 MiB)."""
    import redis as redis_py

    redis_py.Redis.from_url(redis.url).flushall()


COLUMNS = ["rtt_ms", "chunks", "lookup_s", "lookup_round_trips", "retrieve_s", "retrieve_round_trips",
           "retrieve_implied_rt", "per_chunk_s", "per_chunk_round_trips", "per_chunk_implied_rt", "per_chunk/retrieve"]


def plot(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for delay in sorted({r["rtt_ms"] for r in rows}):
        sel = sorted((r for r in rows if r["rtt_ms"] == delay), key=lambda r: r["chunks"])
        x = [r["chunks"] for r in sel]
        for name, style in (("retrieve", "-"), ("per_chunk", "--"), ("lookup", ":")):
            axes[0].plot(x, [r[f"{name}_s"] * 1000 for r in sel], style, marker="o", markersize=3,
                         label=f"{name}, RTT {delay:g} ms")
            axes[1].plot(x, [r[f"{name}_round_trips"] for r in sel], style, marker="o", markersize=3,
                         label=f"{name}, RTT {delay:g} ms")
    for ax, label in zip(axes, ("time per call (ms, median)", "round trips per call"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("chunks (256 tokens of SmolLM2 bf16 KV each)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=1)
    axes[0].set_title("Redis tier behind an added-latency line")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="test sizes (also LMKV_SMALL=1)")
    args = parser.parse_args(argv)
    quick = args.small or small()
    rows = run((0.0, 1.0), (2, 8), SMALL_GEOMETRY, repeats=2) if quick else run()
    return report(NAME, rows, COLUMNS, "Redis lookup / retrieve through added latency (medians)", plot)


if __name__ == "__main__":
    main()
