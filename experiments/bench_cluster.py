"""The cluster tier on a real 6-process Redis Cluster (3 masters + 3 replicas) on loopback: throughput, round trips
through a latency line, and a failover timeline.

1. ``throughput``: batched put (``put_many`` + ``flush``) and get (``get_many``, header + checksum verified) of
   32 MiB worth of objects (16 x 2 MiB, 2 x 32 MiB), lmkv's tier vs a raw redis-py client doing the same
   pipelined work on the same bytes (``RedisCluster.pipeline()`` SET/GET for the cluster, ``Redis.pipeline()``
   for one server), alternating in one process. Topologies: one plain ``redis-server`` (``RedisTier``) and the
   3-master cluster (``RedisClusterTier``). Goal: lmkv >= 80 % of the raw client.
2. ``latency``: a :class:`lmkv.testing.LatencyProxy` in front of every node (the tier reaches the nodes only
   through them, by ``address_remap``) adds ``--delay-ms`` each way; ``KVEngine.lookup`` / ``retrieve`` of N
   chunks, with round trips counted on the wire per node, beside a per-chunk loop (one ``get`` each).
3. ``failover``: every ``--tick-ms`` a reader asks for the 60 stored chunks and a writer stores one new chunk;
   one master is SIGKILLed after 1 s. The timeline (hits per tick) gives the time to the first miss, the time
   until every surviving chunk is served again (by the promoted replica, the tier never restarted), the writes
   that are not readable afterwards (dropped while their slots had no master, or lost by asynchronous
   replication) and the longest call.

    .venv/bin/python -m experiments.bench_cluster [--small] [--parts throughput,latency,failover]
"""

from __future__ import annotations

import argparse
import os
import time

import redis as redis_py
import torch
from redis.cluster import RedisCluster
from tqdm import tqdm

from experiments._common import alternate, median, print_table, save_plot, small, write_rows
from lmkv.engine import KVEngine
from lmkv.storage import TieredStore
from lmkv.storage.redis_cluster import RedisClusterTier
from lmkv.storage.redis_tier import RedisTier
from lmkv.storage.serde import RawSerde
from lmkv.testing import LatencyProxy, LocalRedis, LocalRedisCluster
from lmkv.types import KVGeometry

NAME = "bench_cluster"
TARGET = 0.8
CHUNK = 256
# the latency line: 384 KiB per 256-token chunk (one GET each, below the 512 KiB piece), so that the Python proxy's
# own throughput (~0.3 GB/s) does not hide the round trips
GEOMETRY = KVGeometry(6, 2, 32, torch.bfloat16)


def _tensor(nbytes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)


# -- 1. throughput ------------------------------------------------------------------------------------------------


def throughput(topology: str, url: str, nbytes: int, batch: int, repeats: int) -> list[dict]:
    if topology == "cluster":
        tier: RedisTier = RedisClusterTier(url, key_prefix="tp:", socket_timeout=30.0)
        raw = RedisCluster.from_url(url, socket_timeout=30.0)
    else:
        tier = RedisTier(url, key_prefix="tp:", socket_timeout=30.0)
        raw = redis_py.Redis.from_url(url, socket_timeout=30.0)
    kv = _tensor(nbytes)
    data = kv.numpy().tobytes()
    keys = [f"k{i}" for i in range(batch)]
    serde = RawSerde()

    def lmkv_put() -> None:
        tier.put_many([(k, serde.encode(k, kv, b"fp")) for k in keys])
        tier.flush()

    def raw_put() -> None:
        pipe = raw.pipeline(transaction=False)
        for k in keys:
            pipe.set(f"raw:{k}", data)
        pipe.execute()

    def lmkv_get() -> None:
        for obj in tier.get_many(keys):
            obj.release()

    def raw_get() -> None:
        pipe = raw.pipeline(transaction=False)
        for k in keys:
            pipe.get(f"raw:{k}")
        pipe.execute()

    put = alternate({"lmkv": lmkv_put, "baseline": raw_put}, repeats=repeats)
    get = alternate({"lmkv": lmkv_get, "baseline": raw_get}, repeats=repeats)
    objs = tier.get_many(keys)
    assert all(o is not None for o in objs)
    assert all(torch.equal(serde.decode(o), kv) for o in objs) and tier.stats()["rejected"] == 0
    tier.close()
    raw.close()
    rows = []
    for op, times in (("put", put), ("get", get)):
        a, b = median(times["lmkv"]), median(times["baseline"])
        per_call = nbytes * batch
        rows.append({"part": "throughput", "topology": "3 masters" if topology == "cluster" else "1 node",
                     "op": op, "size_mib": nbytes / 2**20, "objects": batch, "lmkv_gbps": per_call / a / 1e9,
                     "baseline_gbps": per_call / b / 1e9, "ratio": b / a, "target_met": b / a >= TARGET,
                     "baseline": "redis-py pipeline", "repeats": repeats, "lmkv_times_s": times["lmkv"],
                     "baseline_times_s": times["baseline"], "backend": "python", "serde": "raw"})
    return rows


def flushall(ports: list[int]) -> None:
    for port in ports:
        try:
            redis_py.Redis(port=port).flushall()
        except redis_py.ResponseError:  # a replica: it follows its master
            pass


# -- 2. latency line ----------------------------------------------------------------------------------------------


def latency(cluster: LocalRedisCluster, delay_ms: float, num_chunks: int, geometry: KVGeometry,
            repeats: int) -> dict:
    proxies = {n.port: LatencyProxy(n.port, delay_ms / 1000) for n in cluster.nodes}
    try:
        tier = RedisClusterTier(cluster.url, key_prefix=f"lat{delay_ms}-{num_chunks}:", socket_timeout=30.0,
                                address_remap=lambda a: (a[0], proxies[a[1]].port))
        store = TieredStore([tier])
        with KVEngine({"chunk_size": CHUNK}, geometry, model_id="bench-cluster", store=store) as engine:
            tokens = list(range(num_chunks * CHUNK))
            kv = torch.randn(geometry.chunk_shape(len(tokens))).to(geometry.dtype)
            plan = engine.plan(tokens)
            engine.store(plan, kv)
            engine.flush()
            chunks = plan.chunks()

            def per_chunk() -> None:
                for c in chunks:
                    engine.storage.get(c.key, fingerprint=c.fingerprint)

            calls = {"lookup": lambda: engine.lookup(plan), "retrieve": lambda: engine.retrieve(plan),
                     "per_chunk": per_chunk}
            for fn in calls.values():
                fn()  # connections open
            trips = {}
            for name, fn in calls.items():
                for p in proxies.values():
                    p.round_trips = 0
                fn()
                counts = [p.round_trips for p in proxies.values() if p.round_trips]
                trips[name] = (sum(counts), max(counts), len(counts))
            assert engine.retrieve(plan)[1] == len(tokens)
            times = alternate(calls, repeats=repeats, warmup=0)
    finally:
        for p in proxies.values():
            p.close()
    row = {"part": "latency", "delay_ms_each_way": delay_ms, "rtt_ms": 2 * delay_ms, "chunks": num_chunks,
           "bytes": kv.numel() * kv.element_size(), "repeats": repeats}
    for name, ts in times.items():
        total, most, nodes = trips[name]
        row.update({f"{name}_s": median(ts), f"{name}_round_trips": total, f"{name}_max_per_node": most,
                    f"{name}_nodes": nodes})
    return row


# -- 3. failover --------------------------------------------------------------------------------------------------


def failover(tick_s: float, duration_s: float) -> tuple[dict, list[dict]]:
    with LocalRedisCluster() as cluster:
        tier = RedisClusterTier(cluster.url, key_prefix="fo:", socket_timeout=0.25, retry_backoff=0.1)
        serde = RawSerde()
        kv = _tensor(256 << 10, 1)
        keys = [f"base-{i}" for i in range(60)]
        tier.put_many([(k, serde.encode(k, kv, b"")) for k in keys])
        tier.flush()
        for m in cluster.masters():
            redis_py.Redis(port=m.port).wait(1, 5000)
        victim = cluster.masters()[0]
        written: list[tuple[float, str]] = []
        timeline: list[dict] = []
        t0 = time.monotonic()
        kill_at = t0 + 1.0
        killed = None
        n = 0
        while time.monotonic() - t0 < duration_s:
            tick = time.monotonic()
            if killed is None and tick >= kill_at:
                victim.stop()
                killed = time.monotonic()
            key = f"new-{n}"
            n += 1
            tier.put(key, serde.encode(key, kv, b""))
            tier.flush()
            written.append((tick - t0, key))
            c0 = time.monotonic()
            objs = tier.get_many(keys)
            call = time.monotonic() - c0
            hits = sum(o is not None for o in objs)
            for o in objs:
                if o is not None:
                    o.release()
            timeline.append({"t_s": tick - t0, "hits": hits, "misses": len(keys) - hits, "call_s": call,
                             "killed": killed is not None})
            time.sleep(max(0.0, tick_s - (time.monotonic() - tick)))
        cluster.wait_failover(3, timeout=30)
        time.sleep(1.0)  # let the tier's view settle before counting what is readable
        readable = tier.contains_many([k for _, k in written])
        lost = [(t, k) for (t, k), ok in zip(written, readable) if not ok]
        tier.close()
    k = killed - t0
    after = [r for r in timeline if r["t_s"] >= k]
    first_miss = next((r["t_s"] - k for r in after if r["misses"]), None)
    miss_ticks = [r for r in after if r["misses"]]
    recovered = None
    if miss_ticks:
        last_bad = max(r["t_s"] for r in miss_ticks)
        recovered = next((r["t_s"] - k for r in after if r["t_s"] > last_bad and not r["misses"]), None)
    summary = {"part": "failover", "tick_ms": tick_s * 1000, "socket_timeout_s": 0.25, "chunks_read": 60,
               "kill_at_s": k, "first_miss_after_s": first_miss, "recovered_after_s": recovered,
               "writes": len(written), "writes_unreadable": len(lost),
               "writes_unreadable_at_s": [round(t - k, 3) for t, _ in lost][:40],
               "max_call_s": max(r["call_s"] for r in timeline),
               "median_call_s": median([r["call_s"] for r in timeline]),
               "timeline": timeline}
    return summary, timeline


# -- report -------------------------------------------------------------------------------------------------------


def plot(rows: list[dict], timeline: list[dict] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    tp = [r for r in rows if r["part"] == "throughput"]
    if tp:
        labels = [f"{r['topology']}\n{r['op']} {r['objects']}x{r['size_mib']:g}MiB" for r in tp]
        x = range(len(tp))
        axes[0].bar([i - 0.2 for i in x], [r["baseline_gbps"] for r in tp], 0.4, label="redis-py pipeline")
        axes[0].bar([i + 0.2 for i in x], [r["lmkv_gbps"] for r in tp], 0.4, label="lmkv tier")
        axes[0].set_xticks(list(x), labels, fontsize=6)
        axes[0].set_ylabel("GB/s (median)")
        axes[0].legend(fontsize=7)
        axes[0].set_title("throughput: 1 server vs 3 masters")
    lat = [r for r in rows if r["part"] == "latency"]
    if not lat:
        axes[1].set_visible(False)
    for rtt in sorted({r["rtt_ms"] for r in lat}):
        sel = sorted((r for r in lat if r["rtt_ms"] == rtt), key=lambda r: r["chunks"])
        for name, style in (("retrieve", "-"), ("lookup", ":"), ("per_chunk", "--")):
            axes[1].plot([r["chunks"] for r in sel], [r[f"{name}_s"] * 1000 for r in sel], style, marker="o",
                         markersize=3, label=f"{name}, RTT {rtt:g} ms")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("chunks (256 tokens, 384 KiB each)")
    axes[1].set_ylabel("ms per call (median)")
    if lat:
        axes[1].legend(fontsize=6)
    axes[1].set_title("through a latency line in front of every node")
    if timeline:
        fo = next(r for r in rows if r["part"] == "failover")
        axes[2].plot([r["t_s"] for r in timeline], [r["hits"] for r in timeline], drawstyle="steps-post",
                     label="chunks served (of 60)")
        axes[2].axvline(fo["kill_at_s"], color="r", linestyle="--", label="master SIGKILLed")
        if fo["recovered_after_s"] is not None:
            axes[2].axvline(fo["kill_at_s"] + fo["recovered_after_s"], color="g", linestyle="--",
                            label="served again (promoted replica)")
        ax2 = axes[2].twinx()
        ax2.plot([r["t_s"] for r in timeline], [r["call_s"] * 1000 for r in timeline], color="gray", alpha=0.5,
                 linewidth=0.8)
        ax2.set_ylabel("get_many call (ms)", color="gray")
        axes[2].set_xlabel("seconds")
        axes[2].set_ylabel("hits per read of 60 chunks")
        axes[2].legend(fontsize=7, loc="lower right")
        axes[2].set_title("failover timeline")
    fig.tight_layout()
    save_plot(fig, NAME)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--parts", default="throughput,latency,failover")
    ap.add_argument("--repeats", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=5.0, help="added latency each way for the latency part")
    ap.add_argument("--tick-ms", type=float, default=50.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    is_small = args.small or small()
    parts = set(args.parts.split(","))
    rows: list[dict] = []
    timeline = None
    if "throughput" in parts:
        sizes = [(256 << 10, 8)] if is_small else [(2 << 20, 16), (32 << 20, 2)]
        reps = args.repeats or (3 if is_small else 9)
        with LocalRedis() as one, LocalRedisCluster() as cluster:
            ports = [n.port for n in cluster.nodes]
            for nbytes, batch in tqdm(sizes, desc="throughput"):
                for topology, url in (("single", one.url), ("cluster", cluster.url)):
                    rows += throughput(topology, url, nbytes, batch, reps)
                    flushall([one.port, *ports])
        print_table([r for r in rows if r["part"] == "throughput"],
                    ["topology", "op", "size_mib", "objects", "lmkv_gbps", "baseline_gbps", "ratio", "target_met"],
                    title="cluster tier vs raw redis-py pipelines (GB/s, medians; target >= 0.8)")
    if "latency" in parts:
        geometry = KVGeometry(4, 2, 16, torch.bfloat16) if is_small else GEOMETRY
        counts = (8, 32) if is_small else (8, 32, 128)
        reps = args.repeats or (3 if is_small else 5)
        with LocalRedisCluster() as cluster:
            for delay in tqdm((0.0, args.delay_ms), desc="latency"):
                for n in counts:
                    rows.append(latency(cluster, delay, n, geometry, reps))
                    flushall([m.port for m in cluster.masters()])
        print_table([r for r in rows if r["part"] == "latency"],
                    ["rtt_ms", "chunks", "lookup_s", "lookup_round_trips", "lookup_max_per_node", "retrieve_s",
                     "retrieve_round_trips", "retrieve_max_per_node", "per_chunk_s", "per_chunk_round_trips"],
                    title="cluster tier through a latency line (round trips counted per node on the wire)")
    if "failover" in parts:
        summary, timeline = failover(args.tick_ms / 1000, 6.0 if is_small else 10.0)
        rows.append(summary)
        print_table([summary], ["tick_ms", "kill_at_s", "first_miss_after_s", "recovered_after_s", "writes",
                                "writes_unreadable", "max_call_s", "median_call_s"], title="failover timeline")
    write_rows(NAME, rows)
    plot(rows, timeline)
    return rows


if __name__ == "__main__":
    main()
