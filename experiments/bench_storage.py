"""Put/get throughput of each storage tier beside its raw baseline, measured alternately in one process.

For 2 MiB and 32 MiB objects (``--small``: 256 KiB and 2 MiB) and each tier, the lmkv path (encode with the
``raw`` serde: header + checksum, tier put/get, decode) is timed interleaved with a raw baseline on the same
bytes:

* memory: ``MemoryTier`` put / get-into-a-preallocated-tensor vs ``copy_`` into a preallocated buffer;
* disk: ``DiskTier`` put + flush / get vs a plain ``open().write()`` / ``readinto`` a reused buffer of the same
  bytes in the same directory (both buffered, no fsync). A tier get is the object in memory with its header
  and checksum verified (the tier's pooled read buffer); the copy out of it belongs to the consumer. Reads are
  measured twice: from a warm page cache, and cold (each file fsynced and evicted with
  ``posix_fadvise(DONTNEED)`` before every timed read, on both sides): ops ``get-warm`` and ``get-cold``;
* redis: ``RedisTier`` put + flush / get (verified, as for disk) vs plain redis-py ``SET`` / ``GET`` on the same
  server.

Copies run on torch's intra-op threads, by default as many as the cores this process may use (``--threads``).

Disk and Redis puts are asynchronous, so a put round is ``--batch`` puts (default: 32 MiB worth, i.e. 16 x
2 MiB or 1 x 32 MiB) followed by one ``flush``, against the same number of plain writes / SETs: put GB/s is
throughput to the tier, and the one thread handoff per round does not dominate (on this shared 2-core
machine a handoff can cost milliseconds). Gets are single objects on both sides.

Target: lmkv >= 80 % of each baseline (median GB/s ratio). Prints a Markdown table, writes
``experiments/results/bench_storage.jsonl`` and ``.png``.

``--metrics-ab`` measures instead what Prometheus metrics cost (docs/metrics.md): two engines in one process, one
with ``metrics.enabled`` (registered, latencies counted per call, endpoint up) and one without, sharing one store
that holds one 2 MiB chunk in its memory tier (the same bytes: two pools would differ by their placement, e.g.
huge pages, by more than what is measured); their ``retrieve`` of it (a memory-tier get, copied into a
preallocated tensor) and their ``lookup`` are timed alternately. Target: metrics on within 3 % of off (median
seconds).

    .venv/bin/python -m experiments.bench_storage [--small] [--repeats N] [--redis-url URL] [--metrics-ab]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from experiments._common import (
    alternate,
    alternate_prepared,
    drop_cache,
    median,
    plot_ratio_bars,
    print_table,
    small,
    write_rows,
)
from lmkv.storage.disk import DiskTier
from lmkv.storage.memory import MemoryTier
from lmkv.storage.redis_tier import RedisTier
from lmkv.storage.serde import RawSerde

NAME = "bench_storage"
TARGET = 0.8


@contextmanager
def redis_server(url: str | None):
    """Use ``url``, or start a throwaway redis-server on a free loopback port (no persistence)."""
    if url:
        yield url
        return
    from lmkv.testing import LocalRedis, RedisUnavailable

    try:
        server = LocalRedis().start()
    except RedisUnavailable as exc:
        raise SystemExit(f"{exc}, or pass --redis-url") from None
    try:
        yield server.url
    finally:
        server.cleanup()


def _tensor(nbytes: int) -> torch.Tensor:
    """A bf16 chunk ``[L, 2, T, 8, 64]`` of exactly ``nbytes`` (T = 256 tokens when the size allows)."""
    per_token_layer = 2 * 8 * 64 * 2
    t = min(256, nbytes // per_token_layer)
    layers = nbytes // (per_token_layer * t)
    assert layers * t * per_token_layer == nbytes, nbytes
    return torch.randn(layers, 2, t, 8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def bench_memory(kv: torch.Tensor, repeats: int) -> dict[str, dict[str, list[float]]]:
    raw = RawSerde()
    n = kv.numel() * kv.element_size()
    tier = MemoryTier(4 * n + (1 << 20))
    out = torch.empty_like(kv)
    out.fill_(0)
    src = kv.reshape(-1).view(torch.uint8)
    pool = torch.zeros(n, dtype=torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)

    def lmkv_put() -> None:
        tier.put("k", raw.encode("k", kv, b"fp"))

    def lmkv_get() -> None:
        with tier.get("k") as obj:
            raw.decode(obj, out=out)

    put = alternate({"lmkv": lmkv_put, "baseline": lambda: pool.copy_(src)}, repeats=repeats)
    get = alternate({"lmkv": lmkv_get, "baseline": lambda: dst.copy_(pool)}, repeats=repeats)
    assert torch.equal(out, kv)
    tier.assert_no_leaks()
    return {"put": put, "get": get}


def bench_disk(kv: torch.Tensor, repeats: int, root: Path, batch: int) -> dict[str, dict[str, list[float]]]:
    raw = RawSerde()
    n = kv.numel() * kv.element_size()
    tier = DiskTier(root / "tier", (batch + 2) * (n + 4096), io_threads=2)
    data = kv.reshape(-1).view(torch.uint8).numpy().tobytes()
    plain = root / "plain.bin"
    got: list[torch.Tensor] = []

    def lmkv_put() -> None:  # replaces the objects: unlink the old files, write new ones, wait until written
        for i in range(batch):
            tier.put(f"k{i}", raw.encode(f"k{i}", kv, b"fp"))
        tier.flush()

    def plain_put() -> None:  # the same for plain files (overwriting in place triggers ext4's flush-on-close)
        for i in range(batch):
            path = root / f"plain{i}.bin"
            path.unlink(missing_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)

    reused = bytearray(len(data))

    def lmkv_get() -> None:  # read + header and checksum verification, into the tier's pooled buffer
        with tier.get("k0") as obj:
            got[:] = [obj.header]

    def plain_get() -> None:  # the fastest plain read: into a reused buffer (no page faults)
        with open(plain, "rb", buffering=0) as fh:
            fh.readinto(reused)

    put = alternate({"lmkv": lmkv_put, "baseline": plain_put}, repeats=repeats)
    os.replace(root / "plain0.bin", plain)
    warm = alternate({"lmkv": lmkv_get, "baseline": plain_get}, repeats=repeats)
    with tier.get("k0") as obj:
        assert torch.equal(raw.decode(obj), kv)
    cold = alternate_prepared({"lmkv": (lambda: drop_cache(tier.file_for("k0")), lmkv_get),
                               "baseline": (lambda: drop_cache(plain), plain_get)}, repeats=repeats)
    tier.close()
    return {"put": put, "get-warm": warm, "get-cold": cold}


def bench_redis(kv: torch.Tensor, repeats: int, url: str, batch: int) -> dict[str, dict[str, list[float]]]:
    raw = RawSerde()
    tier = RedisTier(url, key_prefix="bench:", socket_timeout=30.0)
    client = tier.client
    data = kv.reshape(-1).view(torch.uint8).numpy().tobytes()
    got: list[torch.Tensor] = []

    def lmkv_put() -> None:
        for i in range(batch):
            tier.put(f"k{i}", raw.encode(f"k{i}", kv, b"fp"))
        tier.flush()

    def plain_put() -> None:
        for i in range(batch):
            client.set(f"plain{i}", data)

    def lmkv_get() -> None:  # the value in memory, header and checksum verified (the tier's pooled buffer)
        with tier.get("k0") as obj:
            got[:] = [obj.header]

    put = alternate({"lmkv": lmkv_put, "baseline": plain_put}, repeats=repeats)
    get = alternate({"lmkv": lmkv_get, "baseline": lambda: client.get("plain0")}, repeats=repeats)
    with tier.get("k0") as obj:
        assert torch.equal(raw.decode(obj), kv) and tier.stats()["rejected"] == 0
    client.delete(*[f"plain{i}" for i in range(batch)], *[f"bench:k{i}" for i in range(batch)])
    tier.close()
    return {"put": put, "get": get}


BASELINES = {"memory": "copy_ into preallocated", "disk": "plain file write/read", "redis": "redis-py SET/GET"}
METRICS_TARGET_PCT = 3.0


def bench_metrics(nbytes: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per engine ``retrieve`` (op ``get``) and ``lookup`` of one ``nbytes`` chunk held in the memory tier,
    for an engine with metrics on (``"on"``) and one without (``"off"``), interleaved."""
    from lmkv.engine import KVEngine
    from lmkv.storage import TieredStore
    from lmkv.types import KVGeometry

    kv = _tensor(nbytes)  # [L, 2, T, 8, 64] bf16
    geo = KVGeometry(kv.shape[0], kv.shape[3], kv.shape[4], kv.dtype)
    tokens = list(range(kv.shape[2]))
    base = {"chunk_size": len(tokens), "disk": {"enabled": False},
            "memory": {"capacity": 2 * nbytes + (1 << 20), "prefault": False}}
    store = TieredStore.from_config(base)
    engines = {"on": KVEngine({**base, "metrics": {"enabled": True, "port": 0}}, geo, model_id="bench-metrics",
                              store=store),
               "off": KVEngine({**base, "metrics": {"enabled": False}}, geo, model_id="bench-metrics", store=store)}
    out = torch.empty_like(kv)
    try:
        plan = engines["off"].plan(tokens)
        assert engines["off"].store(plan, kv) == len(tokens)

        def get(name: str) -> Callable[[], object]:
            return lambda: engines[name].retrieve(plan, out=out)

        def look(name: str) -> Callable[[], object]:
            return lambda: engines[name].lookup(plan)

        gets = alternate({"on": get("on"), "off": get("off")}, repeats=repeats)
        assert torch.equal(out, kv)
        lookups = alternate({"on": look("on"), "off": look("off")}, repeats=repeats)
        counted = engines["on"].counters
        assert counted.retrieved_tokens == (repeats + 1) * len(tokens) == counted.lookup_hit_tokens  # + warmup
    finally:
        for eng in engines.values():
            eng.close()
        store.close()
    return {"get": gets, "lookup": lookups}


def main_metrics_ab(args: argparse.Namespace) -> list[dict]:
    """``--metrics-ab``: the cost of metrics on a memory-tier read, on vs off alternately in one process."""
    nbytes = 2 << 20
    repeats = args.repeats or (5 if args.small or small() else 501)
    rows = []
    for op, times in bench_metrics(nbytes, repeats).items():
        on, off = median(times["on"]), median(times["off"])
        overhead = (on / off - 1) * 100
        rows.append({
            "tier": "memory", "op": op, "size_mib": nbytes / 2**20, "experiment": "metrics_ab",
            "call": "KVEngine.retrieve(out=)" if op == "get" else "KVEngine.lookup",
            "on_us": on * 1e6, "off_us": off * 1e6, "overhead_pct": overhead,
            "target_met": overhead <= METRICS_TARGET_PCT, "repeats": len(times["on"]),
            "on_times_s": times["on"], "off_times_s": times["off"], "torch_threads": args.threads,
        })
    print_table(rows, ["tier", "op", "call", "size_mib", "on_us", "off_us", "overhead_pct", "target_met"],
                title="metrics on vs off, alternating in one process (median microseconds; target <= 3 %)")
    write_rows(NAME, rows)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="test sizes (256 KiB and 2 MiB), few repeats")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds per candidate (default 15 / 7)")
    ap.add_argument("--redis-url", default=None, help="existing server; default: start a throwaway one")
    ap.add_argument("--tiers", default="memory,disk,redis")
    ap.add_argument("--batch", type=int, default=0,
                    help="objects per timed disk/redis put round, then one flush (default: 32 MiB per round)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch intra-op threads (default: every core this process may use, as lmkv runs)")
    ap.add_argument("--metrics-ab", action="store_true",
                    help="only the metrics-cost A/B: engine retrieve/lookup of 2 MiB in RAM, metrics on vs off")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.metrics_ab:
        return main_metrics_ab(args)
    is_small = args.small or small()
    sizes = [256 << 10, 2 << 20] if is_small else [2 << 20, 32 << 20]
    tiers = [t for t in args.tiers.split(",") if t]
    rows: list[dict] = []
    root = Path(tempfile.mkdtemp(prefix="lmkv-bench-disk-", dir=os.environ.get("LMKV_BENCH_DIR")))
    try:
        with redis_server(args.redis_url if "redis" in tiers else "unused") as url:
            jobs: list[tuple[str, int, Callable[[], dict]]] = []
            for size in sizes:
                kv = _tensor(size)
                reps = args.repeats or (3 if is_small else (21 if size <= (4 << 20) else 9))
                batch = max(1, (32 << 20) // size) if args.batch == 0 else args.batch
                for tier in tiers:
                    mem_reps = args.repeats or (3 if is_small else (101 if size <= (4 << 20) else 31))  # cheap: more
                    fn = {"memory": lambda kv=kv, r=mem_reps: bench_memory(kv, r),
                          "disk": lambda kv=kv, r=reps, b=batch: bench_disk(kv, r, root, b),
                          "redis": lambda kv=kv, r=reps, b=batch: bench_redis(kv, r, url, b)}[tier]
                    jobs.append((tier, kv.numel() * kv.element_size(), batch, fn))
            for tier, nbytes, batch, fn in tqdm(jobs, desc="tiers x sizes"):
                for op, times in fn().items():
                    a, b = median(times["lmkv"]), median(times["baseline"])
                    per_call = nbytes * (batch if op == "put" and tier != "memory" else 1)
                    rows.append({
                        "tier": tier, "op": op, "size_mib": round(nbytes / 2**20, 2), "baseline": BASELINES[tier],
                        "objects_per_call": per_call // nbytes,
                        "lmkv_gbps": per_call / a / 1e9, "baseline_gbps": per_call / b / 1e9, "ratio": b / a,
                        "target_met": b / a >= TARGET, "repeats": len(times["lmkv"]),
                        "lmkv_times_s": times["lmkv"], "baseline_times_s": times["baseline"],
                        "serde": "raw", "backend": "python", "torch_threads": args.threads,
                    })
    finally:
        shutil.rmtree(root, ignore_errors=True)
    columns = ["tier", "op", "size_mib", "objects_per_call", "lmkv_gbps", "baseline_gbps", "ratio", "target_met",
               "baseline"]
    print_table(rows, columns, title="lmkv storage tiers vs raw baselines (GB/s, medians; ratio target >= 0.8)")
    write_rows(NAME, rows)
    plot(rows)
    return rows


def plot(rows: list[dict]) -> None:
    labels = [f"{r['tier']}\n{r['op']}\n{r['size_mib']:g} MiB" for r in rows]
    plot_ratio_bars(rows, labels, name=NAME, baseline="raw baseline", candidate="lmkv tier", target=TARGET,
                    log_y=True, title="storage tiers: put/get throughput vs raw baselines (same run, interleaved)")


if __name__ == "__main__":
    main()
