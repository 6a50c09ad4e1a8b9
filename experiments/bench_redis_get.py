"""Redis get throughput: the lean RESP reader (pooled buffers, GETRANGE pieces) against redis-py, in one process.

For 2 MiB and 32 MiB objects (``--small``: 256 KiB and 2 MiB) on a throwaway loopback ``redis-server`` (or
``--redis-url``), timed interleaved with ``_common.alternate``:

* ``redis-py GET``: plain ``client.get`` (hiredis parser) of the same bytes: the raw baseline (it only
  returns ``bytes``; no header check, no checksum, no copy into a tensor);
* ``lmkv redis-py``: ``RedisTier(lean_reads=False)``, the pre-[3/9] read path (redis-py ``read_response``,
  reply wrapped zero-copy), decoded into a preallocated tensor;
* ``lmkv lean GET``: the lean reader with plain GETs (``window=None``: what a slow link gets), into the pool;
* ``lmkv lean pieces``: the default on a fast link (GETRANGE pieces, bounded window), into the pool;

each lmkv candidate includes header parse, xxh3 check and the ``raw`` decode into a preallocated tensor (the
engine's retrieve path). ``op=get`` is one object per call; ``op=batch`` is 64 MiB worth of objects per call
(``get_many``-style: one pipelined stream, each object decoded as it arrives), where ``lmkv lean x2`` reads
alternate keys on two connections in two threads (the parallel-connection option of the issue) and the
baseline is a redis-py pipeline of GETs. Ratios are median GB/s over the ``redis-py GET`` baseline; the
targets are >= 0.8 of it and >= 0.745 GB/s (LMCache's redis-py connector on this machine).

``--sweep`` instead times the lean reader's GETRANGE piece size and window (bytes in flight) against each other
(rows with ``op=sweep``, written to ``bench_redis_get_sweep.jsonl`` / ``.png``), which is how
:data:`lmkv.storage.resp.PIECE` and ``WINDOW`` were chosen.

    .venv/bin/python -m experiments.bench_redis_get [--small] [--repeats N] [--redis-url URL] [--sweep]

Writes ``experiments/results/bench_redis_get.jsonl`` and ``.png``.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable

import torch

from experiments._common import alternate, median, report, small
from experiments.bench_storage import _tensor, redis_server
from lmkv.storage.redis_tier import RedisTier
from lmkv.storage.resp import PIECE, WINDOW
from lmkv.storage.serde import RawSerde

NAME = "bench_redis_get"
BASELINE = "redis-py GET"
LMCACHE_GBPS = 0.745
TARGET = 0.8


def _candidates(url: str, kv: torch.Tensor, count: int) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """The timed callables for ``count`` objects per call, and a cleanup."""
    raw = RawSerde()
    data = kv.reshape(-1).view(torch.uint8).numpy().tobytes()
    writer = RedisTier(url, key_prefix="bench-get:", socket_timeout=30.0)
    keys = [f"k{i}" for i in range(count)]
    writer.put_many([(k, raw.encode(k, kv, b"fp")) for k in keys])
    writer.flush()
    client = writer.client
    for k in keys:
        client.set(f"plain:{k}", data)
    old = RedisTier(url, key_prefix="bench-get:", socket_timeout=30.0, lean_reads=False)
    lean_get = RedisTier(url, key_prefix="bench-get:", socket_timeout=30.0)
    lean_get.reader.window = None  # plain GETs into the pool
    lean = RedisTier(url, key_prefix="bench-get:", socket_timeout=30.0)
    outs = [torch.empty_like(kv) for _ in range(2)]
    for o in outs:
        o.fill_(0)

    def tier_read(tier: RedisTier, ks: list[str], out: torch.Tensor) -> None:
        for obj in tier.iter_many(ks):
            assert obj is not None, "miss in a benchmark read"
            with obj:
                raw.decode(obj, out=out)

    def baseline() -> None:
        if count == 1:
            client.get("plain:k0")
            return
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.get(f"plain:{k}")
        pipe.execute()

    cands: dict[str, Callable[[], None]] = {
        BASELINE: baseline,
        "lmkv redis-py": lambda: tier_read(old, keys, outs[0]),
        "lmkv lean GET": lambda: tier_read(lean_get, keys, outs[0]),
        "lmkv lean pieces": lambda: tier_read(lean, keys, outs[0]),
    }
    if count > 1:
        def two_connections() -> None:
            halves = [keys[0::2], keys[1::2]]
            threads = [threading.Thread(target=tier_read, args=(lean, h, outs[i])) for i, h in enumerate(halves)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        cands["lmkv lean x2"] = two_connections

    def check_and_cleanup() -> None:
        for o in outs[:1]:
            assert torch.equal(o, kv)
        client.delete(*[f"plain:{k}" for k in keys], *[writer.prefix + k for k in keys])
        for t in (old, lean_get, lean, writer):
            t.close()

    return cands, check_and_cleanup


def _sweep_candidates(url: str, kv: torch.Tensor, count: int) -> tuple[dict[str, Callable[[], None]],
                                                                        Callable[[], None]]:
    raw = RawSerde()
    writer = RedisTier(url, key_prefix="bench-sweep:", socket_timeout=30.0)
    keys = [f"k{i}" for i in range(count)]
    writer.put_many([(k, raw.encode(k, kv, b"fp")) for k in keys])
    writer.flush()
    data = kv.reshape(-1).view(torch.uint8).numpy().tobytes()
    writer.client.set("plain:k0", data)
    out = torch.empty_like(kv)
    tiers = []
    cands: dict[str, Callable[[], None]] = {BASELINE: lambda: writer.client.get("plain:k0")}

    def read(tier: RedisTier) -> None:
        for obj in tier.iter_many(keys):
            with obj:
                raw.decode(obj, out=out)

    for piece in (256 << 10, 512 << 10, 1 << 20, 2 << 20):
        for mult in (1, 2, 4):
            tier = RedisTier(url, key_prefix="bench-sweep:", socket_timeout=30.0)
            tier.reader.piece, tier.reader.window = piece, piece * mult
            tiers.append(tier)
            cands[f"piece {piece >> 10} KiB, window {mult}"] = lambda t=tier: read(t)

    def done() -> None:
        assert torch.equal(out, kv)
        writer.client.delete("plain:k0", *[writer.prefix + k for k in keys])
        for t in (*tiers, writer):
            t.close()

    return cands, done


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="test sizes (256 KiB and 2 MiB), few repeats")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds per candidate (default 21 / 11)")
    ap.add_argument("--redis-url", default=None, help="existing server; default: start a throwaway one")
    ap.add_argument("--ops", default="get,batch")
    ap.add_argument("--sweep", action="store_true", help="time piece sizes x windows of the lean reader instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread saturates memory bandwidth here (see bench_storage --threads)
    is_small = args.small or small()
    sizes = [256 << 10, 2 << 20] if is_small else [2 << 20, 32 << 20]
    ops = [o for o in args.ops.split(",") if o]
    rows: list[dict] = []
    with redis_server(args.redis_url) as url:
        for size in sizes:
            kv = _tensor(size)
            for op in (["sweep"] if args.sweep else ops):
                count = 1 if op in ("get", "sweep") else max(2, (64 << 20) // size // (8 if is_small else 1))
                reps = args.repeats or (3 if is_small else (21 if size * count <= (8 << 20) else 11))
                cands, done = (_sweep_candidates if op == "sweep" else _candidates)(url, kv, count)
                times = alternate(cands, repeats=reps, warmup=2)
                done()
                base = median(times[BASELINE])
                for name, ts in times.items():
                    gbps = size * count / median(ts) / 1e9
                    rows.append({
                        "op": op, "size_mib": round(size / 2**20, 3), "objects_per_call": count, "path": name,
                        "gbps": gbps, "ratio": base / median(ts), "vs_lmcache": gbps / LMCACHE_GBPS,
                        "target_met": name == BASELINE or (base / median(ts) >= TARGET and gbps >= LMCACHE_GBPS),
                        "repeats": len(ts), "times_s": ts, "piece": PIECE, "window": WINDOW, "serde": "raw",
                        "backend": "python",
                    })
    columns = ["op", "size_mib", "objects_per_call", "path", "gbps", "ratio", "vs_lmcache", "target_met"]
    return report(NAME + ("_sweep" if args.sweep else ""), rows, columns,
                  f"Redis get paths (GB/s, medians; ratio over {BASELINE}; targets >= {TARGET} and >= "
                  f"{LMCACHE_GBPS} GB/s)", plot)


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["op"], r["size_mib"], r["objects_per_call"]) for r in rows}, key=lambda g: (g[0], g[1]))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(groups)), 4.5))
    width = 0.8 / len(paths)
    for pi, path in enumerate(paths):
        ys = [next((r["gbps"] for r in rows if (r["op"], r["size_mib"], r["objects_per_call"]) == g
                    and r["path"] == path), 0.0) for g in groups]
        ax.bar([gi + pi * width - 0.4 + width / 2 for gi in range(len(groups))], ys, width, label=path)
    ax.axhline(LMCACHE_GBPS, color="k", linestyle="--", linewidth=1, label="LMCache redis-py connector")
    ax.set_xticks(range(len(groups)), [f"{op}\n{size:g} MiB x {n}" for op, size, n in groups])
    ax.set_ylabel("GB/s (median)")
    ax.legend(fontsize=8)
    ax.set_title("Redis reads on loopback: redis-py vs the lean RESP reader (interleaved in one process)")
    plt.close(fig)
    return fig


if __name__ == "__main__":
    main()
