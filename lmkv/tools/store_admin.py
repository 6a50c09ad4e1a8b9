"""The work behind ``lmkv ls``, ``inspect``, ``check``, ``clear`` and ``stats`` (``lmkv.cli`` is the argparse layer).

The command runs in a process of its own, so it sees the tiers that outlive a serving process: node (shared RAM
files), disk and Redis (or a Redis Cluster), configured as :meth:`lmkv.storage.TieredStore.from_config` builds
them. The process memory tier exists only inside a serving process, so naming it is a usage error.

Reading commands (``ls``, ``inspect``, ``check``, ``stats``) change nothing: they read the disk directory and the
node index directly (``lmkv.storage.disk.scan_dir``, ``lmkv.storage.node.scan_index``) rather than opening those
tiers, since an opening tier drops the bad files it finds and evicts down to its configured capacity. Removals
(``check --repair``, ``clear``) go through the tiers' own ``remove()``, opened as a serving process opens them.
Stored bytes are parsed as the fixed object header (``lmkv.storage.objects``), never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from lmkv.errors import CorruptObject
from lmkv.events import model_of, tokens_of
from lmkv.storage.disk import ScanEntry, object_path, scan_dir
from lmkv.storage.objects import CSUM_CRC32, CSUM_XXH3, ObjectHeader, parse_header, verify_payload
from lmkv.storage.serde import SERDE_NAMES_BY_CODE
from lmkv.types import DTYPE_NAMES, DTYPES_BY_CODE

PERSISTENT = ("node", "disk", "redis")
TIERS = ("memory", *PERSISTENT)
URL_TIMEOUT_S = 5.0
MIB = 1 << 20


class UsageError(ValueError):
    """A bad argument (exit status 2): the message names the argument."""


class AdminError(RuntimeError):
    """The command could not do its work (exit status 1): a backend it cannot reach, an unreadable index."""


# -- the tiers as the command sees them ------------------------------------------------------------------------
class Source:
    """One persistent tier: ``scan`` lists its objects, ``remove`` deletes some through the tier's own
    ``remove()``, ``usage(entries)`` is ``(bytes used, capacity in bytes (0: unlimited), objects)`` given what
    ``scan`` listed."""

    name = ""

    def scan(self, *, verify: bool = False) -> Iterator[ScanEntry]:
        raise NotImplementedError

    def remove(self, entries: Sequence[ScanEntry]) -> list[ScanEntry]:
        """Remove ``entries``; the ones that are gone afterwards."""
        raise NotImplementedError

    def usage(self, entries: Sequence[ScanEntry]) -> tuple[int, int, int]:
        return sum(e.nbytes for e in entries), 0, len(entries)

    def path_of(self, key: str) -> str:
        """The file that holds ``key`` (file-backed tiers)."""
        raise NotImplementedError

    def read(self, key: str) -> tuple[str, bytes] | None:
        """``(where, stored bytes)`` of ``key``, or None when this tier does not hold it."""
        path = self.path_of(key)
        try:
            with open(path, "rb") as fh:
                return f"{self.name} {path}", fh.read()
        except FileNotFoundError:
            return None

    def close(self) -> None:
        pass


class DiskSource(Source):
    name = "disk"

    def __init__(self, cfg: Any) -> None:
        from lmkv.paths import cache_dir

        self.cfg = cfg.disk
        self.path = cfg.disk.path or str(cache_dir() / "disk")

    def scan(self, *, verify: bool = False) -> Iterator[ScanEntry]:
        return scan_dir(self.path, verify=verify)

    def usage(self, entries: Sequence[ScanEntry]) -> tuple[int, int, int]:
        return sum(e.nbytes for e in entries), self.cfg.capacity, len(entries)

    def remove(self, entries: Sequence[ScanEntry]) -> list[ScanEntry]:
        from lmkv.storage.disk import DiskTier

        # Opening the tier already drops files whose header does not parse or names another key (foreign).
        tier = DiskTier(self.path, self.cfg.capacity, io_threads=1, policy=self.cfg.policy)
        try:
            for e in entries:
                if e.status != "foreign" and e.key:
                    tier.remove(e.key)
        finally:
            tier.close()
        return _files_gone(entries)

    def path_of(self, key: str) -> str:
        return object_path(self.path, key)


class NodeSource(Source):
    name = "node"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg.node
        self.path = cfg.node.path

    def scan(self, *, verify: bool = False) -> Iterator[ScanEntry]:
        import sqlite3

        from lmkv.storage.node import scan_index

        try:
            yield from scan_index(self.path, verify=verify)
        except sqlite3.Error as exc:
            raise AdminError(f"node tier: cannot read the index in {self.path} ({exc})") from None

    def usage(self, entries: Sequence[ScanEntry]) -> tuple[int, int, int]:
        from lmkv.storage.node import index_usage  # pages charged, as the tier accounts them

        used, capacity, n = index_usage(self.path)
        return used, capacity if capacity >= 0 else self.cfg.capacity, n

    def remove(self, entries: Sequence[ScanEntry]) -> list[ScanEntry]:
        from lmkv.storage.node import NodeTier

        # Opened as a serving process opens it: the configured capacity becomes the host-wide one (as any opener's).
        with NodeTier(self.path, self.cfg.capacity, policy=self.cfg.policy) as tier:
            for e in entries:
                tier.remove(e.key)
        return _files_gone(entries)

    def path_of(self, key: str) -> str:
        from lmkv.storage.node import NodeTier

        return os.path.join(self.path, "objects", NodeTier.fname_for(key) + ".obj")


class RedisSource(Source):
    name = "redis"

    def __init__(self, cfg: Any) -> None:
        r = cfg.redis
        try:
            import redis
        except ImportError as exc:
            raise AdminError(f"redis tier: redis-py is not installed ({exc})") from None
        if r.cluster:
            from lmkv.storage.redis_cluster import RedisClusterTier as Tier
        else:
            from lmkv.storage.redis_tier import RedisTier as Tier  # type: ignore[assignment]
        self._errors = (OSError, redis.RedisError)
        self.url = r.url
        self.tier = Tier(r.url, password=r.password, key_prefix=r.key_prefix, socket_timeout=max(r.socket_timeout, 2.0),
                         retry_backoff=r.retry_backoff)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._errors as exc:
            raise AdminError(f"redis tier: cannot reach {self.url} ({exc})") from None

    def scan(self, *, verify: bool = False) -> Iterator[ScanEntry]:
        it = self._guard(lambda: self.tier.scan(verify=verify, batch=16 if verify else 256))
        while True:
            entry = self._guard(lambda: next(it, None))
            if entry is None:
                return
            yield entry

    def usage(self, entries: Sequence[ScanEntry]) -> tuple[int, int, int]:
        # the server's used_memory (every master's in a cluster): all of its memory, not only lmkv's values
        return self.tier.usage_bytes(), self.tier.capacity_bytes(), len(entries)

    def remove(self, entries: Sequence[ScanEntry]) -> list[ScanEntry]:
        if not entries:
            return []
        for e in entries:
            self.tier.remove(e.key)
        self.tier.flush()
        # Asked directly (errors raise): the tier's own lookups turn an unreachable server into "absent".
        client, prefix = self.tier.client, self.tier.prefix
        return [e for e in entries if not self._guard(lambda e=e: client.exists(prefix + e.key))]

    def read(self, key: str) -> tuple[str, bytes] | None:
        data = self._guard(lambda: self.tier.client.get(self.tier.prefix + key))
        return (f"redis {self.tier.prefix}{key}", data) if data is not None else None

    def close(self) -> None:
        self.tier.close()


def _files_gone(entries: Iterable[ScanEntry]) -> list[ScanEntry]:
    return [e for e in entries if not os.path.exists(e.location)]


def load_config(path: str | None) -> Any:
    """The configuration as a serving process would load it (``path``, else ``$LMKV_CONFIG``, plus ``LMKV_*``)."""
    from lmkv.config import load
    from lmkv.errors import ConfigError

    if path is not None and not os.path.isfile(path):
        raise UsageError(f"--config: no such file: {path}")
    try:
        return load(path)
    except ConfigError as exc:
        raise UsageError(f"--config: {exc}") from None


def open_sources(cfg: Any, tier: str | None = None) -> list[Source]:
    """The enabled persistent tiers (``tier``: only that one), coldest last."""
    if tier == "memory":
        raise UsageError("--tier memory: the memory tier lives inside each serving process and is gone when it "
                         "exits; this command sees only node, disk and redis (use `lmkv stats --url` for a live one)")
    if tier is not None and tier not in PERSISTENT:
        raise UsageError(f"--tier: must be one of {', '.join(TIERS)}, got {tier!r}")
    enabled = [name for name in PERSISTENT if getattr(cfg, name).enabled]
    if tier is not None and tier not in enabled:
        raise UsageError(f"--tier {tier}: the {tier} tier is not enabled in the configuration "
                         f"(enable it in the YAML or with LMKV_{tier.upper()}_ENABLED=1)")
    chosen = [tier] if tier is not None else enabled
    if not chosen:
        raise UsageError("--config: the configuration enables no persistent tier (node, disk, redis)")
    makers: dict[str, Callable[[Any], Source]] = {"node": NodeSource, "disk": DiskSource, "redis": RedisSource}
    return [makers[name](cfg) for name in chosen]


def close_all(sources: Iterable[Source]) -> None:
    for s in sources:
        s.close()


# -- rows --------------------------------------------------------------------------------------------------------
def codec_name(header: ObjectHeader | None) -> str:
    if header is None:
        return "?"
    return SERDE_NAMES_BY_CODE.get(header.serde, f"serde{header.serde}")


def entry_model(entry: ScanEntry) -> str:
    """The model id of the key it is stored under, else of the key its header names; '' when neither tells."""
    return model_of(entry.key) or (model_of(entry.header.key) if entry.header is not None else "")


def row(tier: str, entry: ScanEntry) -> dict[str, Any]:
    """The ``lmkv ls --json`` record of one object."""
    h = entry.header
    return {"tier": tier, "key": entry.key or (h.key if h is not None else ""), "model": entry_model(entry),
            "tokens": tokens_of(h.shape if h is not None else None), "bytes": entry.nbytes, "codec": codec_name(h),
            "dtype": DTYPE_NAMES.get(DTYPES_BY_CODE.get(h.dtype_code), "?") if h is not None else "?",
            "shape": list(h.shape) if h is not None else None,
            "age_s": round(entry.age_s, 3) if entry.age_s is not None else None,
            "status": entry.status, "location": entry.location}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def selected(sources: Sequence[Source], model: str | None, *, verify: bool = False
             ) -> Iterator[tuple[Source, ScanEntry]]:
    for s in sources:
        for e in s.scan(verify=verify):
            if model is None or entry_model(e) == model:
                yield s, e


# -- commands ----------------------------------------------------------------------------------------------------
def ls(sources: Sequence[Source], model: str | None, as_json: bool, out: TextIO) -> int:
    """Print every object (one JSON object per line with ``as_json``), sorted by tier then key; exit status 0."""
    rows = sorted((row(s.name, e) for s, e in selected(sources, model)), key=lambda r: (r["tier"], r["key"]))
    if as_json:
        for r in rows:
            print(json.dumps(r), file=out)
        return 0
    print(f"{'TIER':6} {'MODEL':28} {'TOKENS':>7} {'BYTES':>11} {'CODEC':8} {'AGE':>6}  KEY", file=out)
    for r in rows:
        flag = "" if r["status"] == "ok" else f"  [{r['status']}]"
        print(f"{r['tier']:6} {r['model'][:28]:28} {r['tokens']:>7} {r['bytes']:>11} {r['codec']:8} "
              f"{human_age(r['age_s']):>6}  {r['key']}{flag}", file=out)
    total = sum(r["bytes"] for r in rows)
    print(f"{len(rows)} objects, {sum(r['tokens'] for r in rows)} tokens, {human_bytes(total)}", file=out)
    return 0


def _read_object(sources: Sequence[Source], target: str) -> tuple[str, bytes]:
    """``(where, stored bytes)`` of a file path, or of a key in the first configured tier that holds it."""
    if os.path.isfile(target):
        with open(target, "rb") as fh:
            return target, fh.read()
    from lmkv.keys import StorageKey

    try:
        StorageKey.parse(target)
    except ValueError:
        raise UsageError(f"KEY|FILE: {target!r} is neither a file nor a storage key") from None
    for s in sources:
        found = s.read(target)
        if found is not None:
            return found
    raise AdminError(f"{target} is not stored in {', '.join(s.name for s in sources)}")


def object_report(data: bytes) -> tuple[dict[str, Any], bool]:
    """``(fields, checksum verifies)`` of one stored object's bytes; CorruptObject when its header does not
    parse. ``bits_per_value``: payload bits over the number of values the shape holds."""
    h = parse_header(data)
    try:
        verify_payload(h, memoryview(data)[h.header_len:])
        ok = True
    except CorruptObject:
        ok = False
    values = math.prod(h.shape)
    dtype = DTYPES_BY_CODE.get(h.dtype_code)
    raw_bits = dtype.itemsize * 8 if dtype is not None else 0
    bpv = h.payload_len * 8 / values if values else 0.0
    algo = {CSUM_XXH3: "xxh3-64", CSUM_CRC32: "crc32"}.get(h.checksum_algo, f"algo{h.checksum_algo}")
    fields = {"key": h.key, "model": model_of(h.key), "codec": codec_name(h), "dtype": DTYPE_NAMES.get(dtype, "?"),
              "shape": list(h.shape), "tokens": tokens_of(h.shape), "values": values, "header_bytes": h.header_len,
              "payload_bytes": h.payload_len, "fingerprint": h.fingerprint.hex(),
              "checksum": f"{algo} {h.checksum or 0:016x}", "checksum_ok": ok, "bits_per_value": round(bpv, 4),
              "raw_bits_per_value": raw_bits, "ratio": round(raw_bits / bpv, 3) if bpv else None}
    return fields, ok


def inspect(sources: Sequence[Source], target: str, out: TextIO) -> int:
    """Print the header fields, fingerprint, checksum status and bits per value; 0 when the payload verifies."""
    where, data = _read_object(sources, target)
    try:
        fields, ok = object_report(data)
    except CorruptObject as exc:
        print(f"{where}: header does not parse: {exc}", file=out)
        return 1
    print(f"{'object':18} {where}", file=out)
    for name, value in fields.items():
        if name == "checksum_ok":
            value = "verifies" if value else "MISMATCH (payload damaged)"
        print(f"{name:18} {value}", file=out)
    return 0 if ok else 1


def check(sources: Sequence[Source], repair: bool, out: TextIO) -> int:
    """Verify every object (header, key, payload checksum); with ``repair`` remove the bad ones. 0 when all
    were sound, 1 otherwise."""
    total, bad_total = 0, 0
    for s in sources:
        entries = list(s.scan(verify=True))
        bad = [e for e in entries if e.status != "ok"]
        total += len(entries)
        bad_total += len(bad)
        for e in bad:
            print(f"{s.name:6} {e.status:8} {e.location}  {e.key or '-'}: {e.detail}", file=out)
        if repair and bad:
            gone = s.remove(bad)
            for e in gone:
                print(f"{s.name:6} removed  {e.location}", file=out)
            if len(gone) != len(bad):
                print(f"{s.name:6} {len(bad) - len(gone)} bad objects could not be removed", file=out)
    names = ", ".join(s.name for s in sources)
    corrupt = "all sound" if not bad_total else f"{bad_total} bad" + (" (removed)" if repair else "")
    print(f"checked {total} objects in {names}: {corrupt}", file=out)
    return 0 if bad_total == 0 else 1


def clear(sources: Sequence[Source], model: str | None, yes: bool, out: TextIO,
          ask: Callable[[str], str] = input) -> int:
    """Remove the objects (of ``model``); asks first unless ``yes``. 0 when done (or nothing to do), 1 when the
    answer was not yes or some object could not be removed."""
    chosen: dict[str, list[ScanEntry]] = {}
    by_name = {s.name: s for s in sources}
    for s, e in selected(sources, model):
        chosen.setdefault(s.name, []).append(e)
    n = sum(len(v) for v in chosen.values())
    where = ", ".join(by_name) + (f" (model {model})" if model is not None else "")
    if n == 0:
        print(f"nothing to remove from {where}", file=out)
        return 0
    size = sum(e.nbytes for v in chosen.values() for e in v)
    if not yes:
        try:
            answer = ask(f"remove {n} objects ({size / MIB:.1f} MiB) from {where}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed", file=out)
            return 1
    removed = 0
    for name, entries in chosen.items():
        for e in by_name[name].remove(entries):
            print(f"removed {name:6} {e.key or e.location}", file=out)
            removed += 1
    print(f"removed {removed} of {n} objects ({size / MIB:.1f} MiB) from {where}", file=out)
    return 0 if removed == n else 1


# -- stats -------------------------------------------------------------------------------------------------------
def store_stats(sources: Sequence[Source], out: TextIO) -> int:
    """Objects, tokens, usage and capacity per persistent tier, read from the tiers themselves."""
    print(f"{'TIER':6} {'OBJECTS':>8} {'TOKENS':>10} {'USED':>11} {'CAPACITY':>11} {'FILL':>6}", file=out)
    for s in sources:
        entries = list(s.scan())
        used, capacity, n = s.usage(entries)
        tokens = sum(tokens_of(e.header.shape) for e in entries if e.header is not None)
        cap = human_bytes(capacity) if capacity else "unlimited"
        fill = f"{100 * used / capacity:.1f}%" if capacity else "-"
        print(f"{s.name:6} {n:>8} {tokens:>10} {human_bytes(used):>11} {cap:>11} {fill:>6}", file=out)
    return 0


def fetch_metrics(url: str, timeout: float = URL_TIMEOUT_S) -> str:
    """The Prometheus text at ``url``; AdminError (one line) when it cannot be read within ``timeout``."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url: expected http://host:port/metrics, got {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - an http(s) URL, checked above
            return resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot read metrics from {url}: {reason}") from None


@dataclass
class _Hist:
    sum: float = 0.0
    count: float = 0.0
    buckets: dict[float, float] | None = None

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding quantile ``q`` (what a histogram can say); None when empty."""
        if not self.count or not self.buckets:
            return None
        for bound in sorted(self.buckets):
            if self.buckets[bound] >= q * self.count:
                return bound
        return None


LATENCIES = ("lmkv_lookup_seconds", "lmkv_retrieve_seconds", "lmkv_store_seconds")


def parse_metrics(text: str) -> dict[str, Any]:
    """Hit and lookup tokens, per-tier usage and capacity and latency histograms, summed per model label.

    Returns ``{"models": {model: {"hit": tokens, "lookup": tokens, "latency": {name: _Hist}}},
    "tiers": {(model, tier): {"usage": bytes, "capacity": bytes}}}``.
    """
    from prometheus_client.parser import text_string_to_metric_families

    models: dict[str, dict[str, Any]] = {}
    tiers: dict[tuple[str, str], dict[str, float]] = {}
    try:
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    except ValueError as exc:
        raise AdminError(f"the endpoint's answer is not Prometheus text ({exc})") from None
    for s in samples:
        model = s.labels.get("model", "")
        m = models.setdefault(model, {"hit": 0.0, "lookup": 0.0, "latency": {}})
        if s.name == "lmkv_hit_tokens_total":
            m["hit"] += s.value
        elif s.name == "lmkv_lookup_tokens_total":
            m["lookup"] += s.value
        elif s.name in ("lmkv_tier_usage_bytes", "lmkv_tier_capacity_bytes"):
            field = "usage" if s.name == "lmkv_tier_usage_bytes" else "capacity"
            t = tiers.setdefault((model, s.labels.get("tier", "?")), {"usage": 0.0, "capacity": 0.0})
            t[field] += s.value
        else:
            _add_latency(m["latency"], s)
    return {"models": {k: v for k, v in models.items() if v["lookup"] or v["hit"] or v["latency"]}, "tiers": tiers}


def _add_latency(into: dict[str, _Hist], s: Any) -> None:
    for base in LATENCIES:
        if not s.name.startswith(base):
            continue
        h = into.setdefault(base, _Hist(buckets={}))
        if s.name == base + "_sum":
            h.sum += s.value
        elif s.name == base + "_count":
            h.count += s.value
        elif s.name == base + "_bucket":
            bound = float(s.labels.get("le", "inf"))
            h.buckets[bound] = h.buckets.get(bound, 0.0) + s.value  # type: ignore[index]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def endpoint_stats(url: str, out: TextIO, timeout: float = URL_TIMEOUT_S) -> int:
    """Hit rate, tier usage and latencies (mean and p99 bound, in ms, since the server started) from ``url``."""
    parsed = parse_metrics(fetch_metrics(url, timeout))
    print(f"{'MODEL':28} {'LOOKUP TOK':>11} {'HIT TOK':>11} {'HIT RATE':>8}", file=out)
    for model, m in sorted(parsed["models"].items()):
        rate = f"{100 * m['hit'] / m['lookup']:.1f}%" if m["lookup"] else "-"
        print(f"{model[:28]:28} {m['lookup']:>11.0f} {m['hit']:>11.0f} {rate:>8}", file=out)
    print(f"\n{'MODEL':28} {'TIER':6} {'USED':>11} {'CAPACITY':>11}", file=out)
    for (model, tier), t in sorted(parsed["tiers"].items()):
        print(f"{model[:28]:28} {tier:6} {human_bytes(t['usage']):>11} {human_bytes(t['capacity']):>11}", file=out)
    print(f"\n{'MODEL':28} {'OPERATION':9} {'CALLS':>8} {'MEAN ms':>9} {'P99<= ms':>9}", file=out)
    for model, m in sorted(parsed["models"].items()):
        for name in LATENCIES:
            h = m["latency"].get(name)
            if h is not None:
                op = name.removeprefix("lmkv_").removesuffix("_seconds")
                print(f"{model[:28]:28} {op:9} {h.count:>8.0f} {_ms(h.mean()):>9} {_ms(h.quantile(0.99)):>9}",
                      file=out)
    return 0


__all__ = ["UsageError", "AdminError", "Source", "open_sources", "close_all", "load_config", "ls", "inspect",
           "check", "clear", "store_stats", "endpoint_stats", "parse_metrics", "object_report", "row"]
