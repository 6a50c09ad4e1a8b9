"""lmkv beside LMCache 0.5.6's CPU paths and raw baselines: same chunks, one process, measured alternately.

Run in the peer venv (``scripts/bootstrap_peer.sh`` makes it; LMCache and lmkv side by side, CPU torch):

    .venv-peer/bin/python -m experiments.bench_peer [--small] [--repeats N] [--threads 2|1,2] [--redis-url URL]

Every row is one group of candidates timed interleaved (lmkv, LMCache, raw, lmkv, LMCache, raw, ...) after one
untimed warm-up round; figures are medians. Untimed ``setup`` steps run before each timed call where a call needs
a fresh state (an empty cache before a store, an evicted page cache before a cold read), on every side alike.
torch runs ``--threads`` intra-op threads (default 2, this machine's cores) on every side, raw copies included;
``--threads 1,2`` runs every group once per count (row field ``threads``). On a shared 2-core machine whose other
core is busy, every 2-thread ``copy_`` waits for an OpenMP barrier, about one scheduler tick (~8 ms here) per
call whatever its size: the memory rows then measure the scheduler on all sides alike. Compare with 1 thread.
Chunks are 256 tokens of fp16 KV: "big" L32/H8/D128 = 32 MiB per chunk, "smol" L30/H3/D64 = 5,898,240 bytes
(5.625 MiB) per chunk. lmkv holds a chunk as ``[L, 2, T, H, D]``; LMCache as ``[2, L, T, H*D]`` (its
``KV_2LTD`` memory format). Each side reads and writes its own layout, holding the same values.

Rows (``group`` / ``op``), and what is timed on each side:

* ``token_db / plan`` (8k and 32k tokens, a Python list of ints): lmkv ``KVEngine.plan(tokens)`` (128-bit
  chained digests through the C++ ``ext`` backend, then text keys; token fingerprints are computed lazily, at
  store/retrieve) vs LMCache ``list(ChunkedTokenDatabase.process_tokens(tokens))`` (``CacheEngineKey`` per chunk
  from Python's builtin ``hash`` of ``(prefix_hash, tuple(chunk), ())``: LMCache's default
  ``pre_caching_hash_algorithm``, 64-bit and not stable across processes unless PYTHONHASHSEED is set). No raw
  baseline.
* ``memory / store`` and ``memory / retrieve`` (4 x 32 MiB big chunks; 16 x 5.625 MiB smol chunks), end to end.
  lmkv: ``KVEngine.store(plan, kv)`` + ``flush()`` from the caller's ``kv [L, 2, T, H, D]`` with a memory-only
  config (the plan is made once, untimed: hashing is the token_db row), and ``KVEngine.retrieve(plan,
  out=dst)`` into a reused ``[L, 2, T, H, D]`` (``out=`` when the signature has it, else a fresh tensor: row
  field ``lmkv_out``). LMCache: what ``LMCacheEngine.store`` does after ``process_tokens``, without a GPU
  connector: per chunk ``LocalCPUBackend.allocate`` (``MixedMemoryAllocator`` -> ``TensorMemoryAllocator``
  pool) + ``memory_obj.tensor.copy_(src[:, :, start:end])``, then ``batched_submit_put_task`` and
  ``ref_count_down`` (``StorageManager.batched_put``); retrieve is per chunk ``get_blocking`` +
  ``dst[:, :, start:end].copy_(memory_obj.tensor)`` + ``ref_count_down``. Before each timed store both caches are
  emptied (lmkv ``storage.remove``, LMCache ``backend.remove``), untimed. Raw: one ``dst.copy_(src)`` of the same
  bytes into reused memory.
* ``memory / put`` and ``memory / get`` (one 2 MiB and one 32 MiB object): lmkv ``MemoryTier.put(key,
  RawSerde().encode(...))`` / ``get`` + ``RawSerde().decode(obj, out=dst)`` + release; LMCache allocate + copy in +
  ``submit_put_task`` + ``ref_count_down`` / ``get_blocking`` + copy out + ``ref_count_down``; raw ``copy_``.
* ``disk / get-warm`` and ``get-cold`` (2 MiB, 32 MiB): lmkv ``DiskTier.get`` + ``RawSerde().view`` (checksum
  verified) + release vs LMCache ``LocalDiskBackend.get_blocking`` (allocate from its CPU pool, ``readinto``) +
  ``ref_count_down`` vs raw ``readinto`` of a plain file into a reused buffer. Cold: each side's file is fsynced
  and evicted with ``posix_fadvise(DONTNEED)`` before every timed read. Written once, untimed.
* ``redis / get`` (2 MiB, 32 MiB) on a throwaway ``redis-server``: lmkv ``RedisTier.get`` + ``RawSerde().view``
  + release vs LMCache ``RemoteBackend.get_blocking`` over ``redis://`` (``RedisConnector``: redis.asyncio, GETs
  of ``<key>metadata`` and ``<key>kv_bytes``, copied into an allocated object) and over ``resp://``
  (``RESPConnector``, the native ``lmcache_redis`` client reading into the allocated object; 8 threads, its
  default) vs raw redis-py ``GET`` (hiredis parser). All four alternate in one group; one row per LMCache
  connector.

Ratios are throughput ratios: ``lmkv/lmcache`` = LMCache time / lmkv time, ``lmkv/raw`` = raw time / lmkv time;
above 1 means lmkv is faster. What LMCache does not do and lmkv does: lmkv checksums every object (xxh3) on
write and verifies it on read from disk and Redis, and stores a token fingerprint that reads compare.

LMCache on CPU: everything used here is LMCache's own code, unstubbed (its device layer is ``StubCPUDevice``, so
the allocator pool is ordinary page-aligned host memory). ``lmcache.cuda_ops`` does not load (it needs
libc10_cuda.so) and no path here imports it; ``lmcache_native`` and ``lmcache_redis`` load against the CPU
torch. ``RemoteBackend.close()`` deadlocks in 0.5.6 (a coroutine on its loop blocks on that loop), so it is not
called. ``--small``: big = L4/H8/D128 (4 MiB chunks), smol = L6/H3/D64, 2k/8k tokens, 256 KiB / 2 MiB objects, 3
repeats: under a minute. Prints a Markdown table, appends ``experiments/results/bench_peer.jsonl``, saves
``bench_peer.png``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from experiments._common import alternate_prepared, drop_cache, median, print_table, save_plot, small, write_rows

NAME = "bench_peer"
CHUNK = 256
Setup = Callable[[], None] | None


def _tier_getter(tier: Any, got: dict[str, torch.Tensor]) -> Callable[[], None]:
    """lmkv's side of a disk / Redis get row: the verified object in memory, viewed as its tensor, released."""
    from lmkv.storage.serde import RawSerde

    raw = RawSerde()

    def get() -> None:
        obj = tier.get("k")
        try:
            got["lmkv"] = raw.view(obj)
        finally:
            obj.release()

    return get


def _kv(layers: int, heads: int, dim: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """fp16 KV ``[L, 2, T, H, D]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, tokens, heads, dim, generator=g).to(torch.float16)


def _to_2ltd(kv: torch.Tensor) -> torch.Tensor:
    """The same values in LMCache's ``KV_2LTD`` layout ``[2, L, T, H*D]`` (contiguous)."""
    n_layers, _, t, h, d = kv.shape
    return kv.permute(1, 0, 2, 3, 4).reshape(2, n_layers, t, h * d).contiguous()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 50_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(geometry: Any, capacity: int) -> Any:
    from lmkv.engine import KVEngine

    cfg = {"chunk_size": CHUNK, "memory": {"capacity": capacity}, "disk": {"enabled": False},
           "redis": {"enabled": False}}
    return KVEngine(cfg, geometry, model_id="bench-peer")


# -- rows --------------------------------------------------------------------------------------------------------
def bench_token_db(n_tokens: int, repeats: int) -> list[dict]:
    from experiments import _peer_lmcache as P
    from lmkv.types import KVGeometry

    geometry = KVGeometry(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16)
    eng = _engine(geometry, 1 << 20)
    md = P.metadata(32, 8, 128, torch.float16)
    db = P.token_database(P.config(cpu_bytes=0), md)
    tokens = _tokens(n_tokens, seed=n_tokens)
    got: dict[str, int] = {}

    def lmkv_plan() -> None:
        got["lmkv"] = len(eng.plan(tokens).keys)

    def lmcache_keys() -> None:
        got["lmcache"] = len(P.chunk_keys(db, tokens))

    times = alternate_prepared({"lmkv": (None, lmkv_plan), "lmcache": (None, lmcache_keys)}, repeats)
    eng.close()
    assert got["lmkv"] == got["lmcache"] == -(-n_tokens // CHUNK), got
    return [_row("token_db", "plan", f"{n_tokens} tokens", times, nbytes=None, tokens=n_tokens,
                 chunks=got["lmkv"], lmkv_side="KVEngine.plan (TokenDatabase, ext backend)",
                 lmcache_side="ChunkedTokenDatabase.process_tokens (builtin hash)", baseline=None)]


def bench_memory_e2e(name: str, dims: tuple[int, int, int], n_chunks: int, repeats: int) -> list[dict]:
    """End-to-end store / retrieve of ``n_chunks`` full chunks through each side's memory tier."""
    from experiments import _peer_lmcache as P
    from lmkv.types import KVGeometry

    layers, heads, dim = dims
    geometry = KVGeometry(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=torch.float16)
    n_tokens = n_chunks * CHUNK
    kv = _kv(layers, heads, dim, n_tokens)
    total = _nbytes(kv)
    pool = 2 * total + (64 << 20)
    tokens = _tokens(n_tokens, seed=1000 + n_chunks)

    eng = _engine(geometry, pool)
    plan = eng.plan(tokens)
    out = torch.zeros_like(kv)
    has_out = "out" in inspect.signature(eng.retrieve).parameters

    mem = P.Memory(P.metadata(layers, heads, dim, torch.float16), pool)
    chunks = mem.keys(tokens)
    lm_src = _to_2ltd(kv)
    lm_dst = torch.zeros_like(lm_src)
    lm_keys = [k for _, _, k in chunks]

    raw_src = _flat(kv)
    raw_dst = torch.zeros_like(raw_src)
    served: dict[str, int] = {}

    def lmkv_clear() -> None:
        for key in plan.keys:
            eng.storage.remove(key)

    def lmkv_store() -> None:
        eng.store(plan, kv)
        eng.flush()

    def lmkv_retrieve() -> None:
        served["lmkv"] = eng.retrieve(plan, out=out)[1] if has_out else eng.retrieve(plan)[1]

    def lmcache_retrieve() -> None:
        served["lmcache"] = mem.retrieve(chunks, lm_dst)

    store = alternate_prepared({"lmkv": (lmkv_clear, lmkv_store),
                                "lmcache": (lambda: mem.remove(lm_keys), lambda: mem.store(chunks, lm_src)),
                                "raw": (None, lambda: raw_dst.copy_(raw_src))}, repeats)
    # both caches hold the chunks now (the last timed store of each side)
    retrieve = alternate_prepared({"lmkv": (None, lmkv_retrieve), "lmcache": (None, lmcache_retrieve),
                                   "raw": (None, lambda: raw_dst.copy_(raw_src))}, repeats)
    assert served == {"lmkv": n_tokens, "lmcache": n_tokens}, served
    if has_out:
        assert torch.equal(out, kv)
    assert torch.equal(lm_dst, lm_src)
    eng.close()
    mem.close()
    common = dict(nbytes=total, tokens=n_tokens, chunks=n_chunks, chunk_bytes=total // n_chunks, dims=dims,
                  lmkv_out=has_out, baseline="dst.copy_(src), same bytes, reused dst")
    return [
        _row("memory", "store", f"{n_chunks} x {total / n_chunks / 2**20:g} MiB ({name})", store,
             lmkv_side="KVEngine.store(plan, kv) + flush, memory-only",
             lmcache_side="LocalCPUBackend: allocate + copy_ + batched_submit_put_task + ref_count_down", **common),
        _row("memory", "retrieve", f"{n_chunks} x {total / n_chunks / 2**20:g} MiB ({name})", retrieve,
             lmkv_side="KVEngine.retrieve(plan, out=dst)" if has_out else "KVEngine.retrieve(plan) (fresh tensor)",
             lmcache_side="LocalCPUBackend: get_blocking + copy_ out + ref_count_down", **common),
    ]


def _tier_kv(layers: int, tokens: int) -> torch.Tensor:
    return _kv(layers, 8, 128, tokens, seed=7)


def bench_memory_tier(layers: int, tokens: int, repeats: int) -> list[dict]:
    from experiments import _peer_lmcache as P
    from lmkv.storage.memory import MemoryTier
    from lmkv.storage.serde import RawSerde

    kv = _tier_kv(layers, tokens)
    n = _nbytes(kv)
    raw = RawSerde()
    tier = MemoryTier(4 * n + (1 << 20))
    out = torch.zeros_like(kv)
    md = P.metadata(layers, 8, 128, torch.float16, chunk_size=tokens)
    mem = P.Memory(md, 4 * n + (1 << 20))
    key = P.key_for(md, "tier")
    lm_src = _to_2ltd(kv)
    lm_dst = torch.zeros_like(lm_src)
    src = _flat(kv)
    pool = torch.zeros_like(src)
    dst = torch.zeros_like(src)

    def lmkv_get() -> None:
        obj = tier.get("k")
        try:
            raw.decode(obj, out=out)
        finally:
            obj.release()

    put = alternate_prepared({
        "lmkv": (lambda: tier.remove("k"), lambda: tier.put("k", raw.encode("k", kv, b"fp"))),
        "lmcache": (lambda: mem.remove([key]), lambda: mem.put(key, lm_src)),
        "raw": (None, lambda: pool.copy_(src))}, repeats)
    get = alternate_prepared({"lmkv": (None, lmkv_get), "lmcache": (None, lambda: mem.get_into(key, lm_dst)),
                              "raw": (None, lambda: dst.copy_(pool))}, repeats)
    assert torch.equal(out, kv) and torch.equal(lm_dst, lm_src)
    tier.close()
    mem.close()
    case = f"{n / 2**20:g} MiB"
    common = dict(nbytes=n, tokens=tokens, chunks=1, chunk_bytes=n, dims=(layers, 8, 128))
    return [
        _row("memory", "put", case, put, lmkv_side="MemoryTier.put(RawSerde.encode)",
             lmcache_side="LocalCPUBackend: allocate + copy_ + submit_put_task + ref_count_down",
             baseline="pool.copy_(src)", **common),
        _row("memory", "get", case, get, lmkv_side="MemoryTier.get + RawSerde.decode(out=) + release",
             lmcache_side="LocalCPUBackend: get_blocking + copy_ out + ref_count_down",
             baseline="dst.copy_(pool)", **common),
    ]


def bench_disk(layers: int, tokens: int, repeats: int, root: Path) -> list[dict]:
    from experiments import _peer_lmcache as P
    from lmkv.storage.disk import DiskTier
    from lmkv.storage.serde import RawSerde

    kv = _tier_kv(layers, tokens)
    n = _nbytes(kv)
    raw = RawSerde()
    case_dir = root / f"disk-{n}"
    tier = DiskTier(case_dir / "lmkv", 4 * (n + 4096), io_threads=2)
    tier.put("k", raw.encode("k", kv, b"fp"))
    tier.flush()
    md = P.metadata(layers, 8, 128, torch.float16, chunk_size=tokens)
    loop = P.Loop()
    disk = P.Disk(md, str(case_dir / "lmcache"), 4 * n, 4 * n + (1 << 20), loop)
    key = P.key_for(md, "disk")
    lm_src = _to_2ltd(kv)
    disk.put(key, lm_src)
    plain = case_dir / "plain.bin"
    plain.write_bytes(_flat(kv).numpy().tobytes())
    buf = memoryview(torch.zeros(n, dtype=torch.uint8).numpy()).cast("B")
    got: dict[str, torch.Tensor] = {}

    lmkv_get = _tier_getter(tier, got)

    def lmcache_get() -> None:
        got["lmcache"] = disk.get(key)

    def plain_get() -> None:
        with open(plain, "rb", buffering=0) as fh:
            fh.readinto(buf)

    cands = {"lmkv": lmkv_get, "lmcache": lmcache_get, "raw": plain_get}
    warm = alternate_prepared({k: (None, fn) for k, fn in cands.items()}, repeats)
    files = {"lmkv": tier.file_for("k"), "lmcache": disk.path(key), "raw": plain}
    cold = alternate_prepared({k: (lambda p=files[k]: drop_cache(p), fn) for k, fn in cands.items()}, repeats)
    assert torch.equal(got["lmcache"], lm_src)
    tier.close()
    disk.close()
    loop.close()
    case = f"{n / 2**20:g} MiB"
    common = dict(nbytes=n, tokens=tokens, chunks=1, chunk_bytes=n, dims=(layers, 8, 128),
                  lmkv_side="DiskTier.get + RawSerde.view + release",
                  lmcache_side="LocalDiskBackend.get_blocking + ref_count_down",
                  baseline="open().readinto(reused buffer)")
    return [_row("disk", "get-warm", case, warm, **common), _row("disk", "get-cold", case, cold, **common)]


def bench_redis(layers: int, tokens: int, repeats: int, url: str) -> list[dict]:
    from experiments import _peer_lmcache as P
    from lmkv.storage.redis_tier import RedisTier
    from lmkv.storage.serde import RawSerde

    kv = _tier_kv(layers, tokens)
    n = _nbytes(kv)
    raw = RawSerde()
    tier = RedisTier(url, key_prefix="peer:", socket_timeout=30.0)
    tier.put("k", raw.encode("k", kv, b"fp"))
    tier.flush()
    client = tier.client
    client.set("peer:plain", _flat(kv).numpy().tobytes())
    md = P.metadata(layers, 8, 128, torch.float16, chunk_size=tokens)
    lm_src = _to_2ltd(kv)
    key = P.key_for(md, f"redis-{n}")
    parsed = urlparse(url)
    loop = P.Loop()
    remotes: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for scheme in ("redis", "resp"):
        lm_url = url if scheme == "redis" else f"resp://{parsed.hostname}:{parsed.port or 6379}"
        if scheme == "resp" and P.native_status()["lmcache_redis"] != "ok":
            skipped[scheme] = P.native_status()["lmcache_redis"]
            continue
        remotes[scheme] = P.Remote(md, lm_url, 4 * n + (1 << 20), loop)
        remotes[scheme].put(key, lm_src)
    got: dict[str, torch.Tensor] = {}

    lmkv_get = _tier_getter(tier, got)

    cands: dict[str, tuple[Setup, Callable[[], Any]]] = {"lmkv": (None, lmkv_get)}
    for scheme, remote in remotes.items():
        cands[f"lmcache_{scheme}"] = (None, lambda r=remote, s=scheme: got.__setitem__(s, r.get(key)))
    cands["raw"] = (None, lambda: client.get("peer:plain"))
    times = alternate_prepared(cands, repeats)
    assert torch.equal(got["lmkv"], kv)
    for scheme in remotes:
        assert torch.equal(got[scheme], lm_src), scheme
    client.delete("peer:plain", "peer:k")
    for remote in remotes.values():
        remote.close()
    loop.close()
    tier.close()
    case = f"{n / 2**20:g} MiB"
    rows = []
    for scheme in remotes:
        connector = "RedisConnector (redis.asyncio)" if scheme == "redis" else "RESPConnector (native lmcache_redis)"
        rows.append(_row("redis", "get", case, {"lmkv": times["lmkv"], "lmcache": times[f"lmcache_{scheme}"],
                                                "raw": times["raw"]},
                         nbytes=n, tokens=tokens, chunks=1, chunk_bytes=n, dims=(layers, 8, 128),
                         lmkv_side="RedisTier.get + RawSerde.view + release",
                         lmcache_side=f"RemoteBackend.get_blocking, {scheme}:// {connector} + ref_count_down",
                         lmcache_connector=f"{scheme}://", baseline="redis-py GET (hiredis)"))
    for scheme, why in skipped.items():
        print(f"[bench_peer] LMCache {scheme}:// skipped: {why}")
    return rows


# -- rows, table, plot ---------------------------------------------------------------------------------------
_VERSIONS: dict[str, Any] = {}


def _row(group: str, op: str, case: str, times: dict[str, list[float]], *, nbytes: int | None,
         lmkv_side: str, lmcache_side: str, baseline: str | None, **extra: Any) -> dict:
    row: dict[str, Any] = {"group": group, "op": op, "case": case, "bytes": nbytes,
                           "size_mib": None if nbytes is None else round(nbytes / 2**20, 3),
                           "lmkv_side": lmkv_side, "lmcache_side": lmcache_side, "baseline": baseline,
                           "repeats": len(times["lmkv"]), **_VERSIONS, **extra}
    for side in ("lmkv", "lmcache", "raw"):
        ts = times.get(side)
        med = median(ts) if ts else None
        row[f"{side}_ms"] = None if med is None else med * 1e3
        row[f"{side}_gbps"] = None if med is None or nbytes is None else nbytes / med / 1e9
        row[f"{side}_times_s"] = ts
    lm = median(times["lmkv"])
    row["lmkv/lmcache"] = median(times["lmcache"]) / lm
    row["lmkv/raw"] = median(times["raw"]) / lm if times.get("raw") else None
    if extra.get("tokens") and group == "token_db":
        row["lmkv_mtok_s"] = extra["tokens"] / lm / 1e6
        row["lmcache_mtok_s"] = extra["tokens"] / median(times["lmcache"]) / 1e6
    return row


COLUMNS = ["group", "op", "case", "threads", "lmkv_ms", "lmcache_ms", "raw_ms", "lmkv_gbps", "lmcache_gbps", "raw_gbps",
           "lmkv/lmcache", "lmkv/raw", "lmcache_side"]


def plot(rows: list[dict]) -> Any:
    """One horizontal panel per thread count: lmkv / LMCache and lmkv / raw per row (log scale, > 1 = lmkv faster),
    so a reader sees at a glance which paths lmkv wins, ties or loses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["threads"] for r in rows}, reverse=True)
    per = [[r for r in rows if r["threads"] == c] for c in counts]
    height = max(4, 0.32 * max(len(p) for p in per))
    fig, axes = plt.subplots(1, len(counts), figsize=(7 * len(counts), height), sharey=True, squeeze=False)
    for ax, count, part in zip(axes[0], counts, per, strict=True):
        labels = [f"{r['group']} {r['op']} {r['case']}"
                  + (" vs resp://" if r.get("lmcache_connector") == "resp://" else "") for r in part]
        y = list(range(len(part)))
        ax.barh([i - 0.2 for i in y], [r["lmkv/lmcache"] for r in part], 0.4, label="lmkv / LMCache 0.5.6")
        ax.barh([i + 0.2 for i in y], [r["lmkv/raw"] or 0 for r in part], 0.4, label="lmkv / raw baseline")
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
        ax.axvline(0.8, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel("throughput ratio (> 1: lmkv faster; dotted: 0.8)")
        ax.set_title(f"{count} torch thread{'s' if count > 1 else ''}")
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].invert_yaxis()  # the table's order, top down (the axes share y: invert once)
    fig.suptitle("lmkv vs LMCache 0.5.6 CPU paths and raw baselines (one process, interleaved, medians)")
    fig.tight_layout()
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="test sizes, 3 repeats: under a minute")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds per candidate (default: per group)")
    ap.add_argument("--threads", default="2",
                    help="torch intra-op threads on every side; a comma-separated list runs every group once per "
                         "count (default 2; '1,2' shows what OpenMP barriers cost on a loaded machine)")
    ap.add_argument("--redis-url", default=None, help="existing server; default: start a throwaway one")
    ap.add_argument("--groups", default="token_db,memory,disk,redis", help="comma-separated subset")
    args = ap.parse_args(argv)
    from experiments import _peer_lmcache as P  # exits with instructions when LMCache is missing

    thread_counts = [int(t) for t in str(args.threads).split(",") if t]
    is_small = args.small or small()
    groups = {g for g in args.groups.split(",") if g}
    _VERSIONS.update({"lmkv_version": version("lmkv"), "lmcache_version": P.version(),
                      "lmcache_native": P.native_status(), "small": is_small})

    def reps(full: int) -> int:
        return args.repeats or (3 if is_small else full)

    if is_small:
        token_counts, big, smol = [2048, 8192], (4, 8, 128), (6, 3, 64)
        tier_sizes = [(2, 32), (2, 256)]  # (layers, tokens) of [L, 2, T, 8, 128] fp16: 256 KiB, 2 MiB
    else:
        token_counts, big, smol = [8192, 32768], (32, 8, 128), (30, 3, 64)
        tier_sizes = [(2, 256), (32, 256)]  # 2 MiB, 32 MiB
    root = Path(tempfile.mkdtemp(prefix="lmkv-bench-peer-", dir=os.environ.get("LMKV_BENCH_DIR")))
    rows: list[dict] = []
    from experiments.bench_storage import redis_server

    try:
        with redis_server(args.redis_url if "redis" in groups else "unused") as url:
            jobs: list[tuple[str, Callable[[], list[dict]]]] = []
            if "token_db" in groups:
                jobs += [(f"token_db {n}", lambda n=n: bench_token_db(n, reps(21))) for n in token_counts]
            if "memory" in groups:
                jobs += [("memory e2e big", lambda: bench_memory_e2e("big", big, 4, reps(11))),
                         ("memory e2e smol", lambda: bench_memory_e2e("smol", smol, 16, reps(11)))]
                jobs += [(f"memory tier {lt}", lambda lt=lt: bench_memory_tier(*lt, reps(21))) for lt in tier_sizes]
            if "disk" in groups:
                jobs += [(f"disk {lt}", lambda lt=lt: bench_disk(*lt, reps(9), root)) for lt in tier_sizes]
            if "redis" in groups:
                jobs += [(f"redis {lt}", lambda lt=lt: bench_redis(*lt, reps(9), url)) for lt in tier_sizes]
            for threads, (_label, fn) in tqdm([(t, job) for t in thread_counts for job in jobs],
                                              desc="bench_peer"):
                torch.set_num_threads(threads)
                _VERSIONS.update(threads=threads, torch_threads=threads)
                rows.extend(fn())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    title = (f"lmkv {_VERSIONS['lmkv_version']} vs LMCache {_VERSIONS['lmcache_version']} CPU paths vs raw (medians; "
             f"ratios are throughput, > 1 = lmkv faster)")
    print_table([{k: ("-" if v is None else v) for k, v in r.items()} for r in rows], COLUMNS, title=title)
    write_rows(NAME, rows)
    save_plot(plot(rows), NAME)
    return rows


if __name__ == "__main__":
    main()
