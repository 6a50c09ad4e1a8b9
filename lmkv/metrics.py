"""Prometheus metrics of lmkv: one registry per process, every name under ``lmkv_`` (docs/metrics.md lists them).

The engine and its tiers already keep plain integer counters (:class:`lmkv.engine.EngineCounters`,
:class:`lmkv.storage.base.TierStats`, :meth:`lmkv.storage.TieredStore.tier_counts`); this module reads them when
someone scrapes, through a custom collector, so the read and write paths never call into prometheus_client. The
three latency histograms (lookup / retrieve / store seconds) are plain bucket counts too (:class:`Latency`), bumped
under the engine's own lock: a prometheus_client ``Histogram.observe`` costs about 1 us and two more locks, which
measured 2-4 % of a 2 MiB memory-tier retrieve (docs/metrics.md, "What it costs").

Engines built with ``metrics.enabled`` register here (:func:`attach`) under their ``model`` label and unregister on
``close``; several engines of one model add up, and the counters of one that closes are kept while the model has
others (a counter must not go down). The first such engine decides, for the whole process:

* the mode: in-process (the collector above), or multiprocess when ``$PROMETHEUS_MULTIPROC_DIR`` or
  ``metrics.multiproc_dir`` names a directory that several processes share (vLLM's scheduler and workers). A custom
  collector cannot work across processes, so there a background thread pushes the counters' increments into
  prometheus_client ``Counter`` / ``Gauge`` / ``Histogram`` objects backed by this process's files every
  ``metrics.interval`` seconds (and on engine ``flush`` / ``close``), and the registry sums every process's files
  (``MultiProcessCollector``). Gauges take the largest live process's value (``livemax``).
* the HTTP endpoint: ``prometheus_client.start_http_server(metrics.port, metrics.host)`` serving :func:`registry`;
  :func:`endpoint` says where it listens (port 0: a free one). A port already taken is a warning, not an error:
  in multiprocess mode another process of the group serves the same sums.

Labels: ``model`` on every metric, plus ``tier``, ``kind`` (an error kind), ``codec`` / ``op``: all bounded by the
configuration, never a key or a request. prometheus_client's global ``REGISTRY`` is not used (vLLM owns it).
"""

from __future__ import annotations

import atexit
import bisect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

log = logging.getLogger("lmkv.metrics")

ERROR_KINDS = ("corrupt", "fingerprint_mismatch", "timeout", "unavailable", "write_failed")
# Seconds: a RAM lookup takes microseconds, a Redis retrieve of a long prompt up to seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)


@dataclass(frozen=True)
class Spec:
    """One metric read from the engines' counters: ``name`` as exposed (a counter adds ``_total``), ``kind``
    (``counter`` | ``gauge``), the labels after ``model``, and its help text."""

    name: str
    kind: str
    labels: tuple[str, ...]
    doc: str


SPECS: tuple[Spec, ...] = (
    Spec("lmkv_lookups", "counter", (), "engine lookups (lookup() calls)"),
    Spec("lmkv_lookup_tokens", "counter", (), "tokens the lookups asked about"),
    Spec("lmkv_hit_tokens", "counter", (), "leading tokens the lookups found stored"),
    Spec("lmkv_stored_tokens", "counter", (), "tokens newly stored (chunks already held are skipped)"),
    Spec("lmkv_retrieved_tokens", "counter", (), "tokens loaded by retrieves"),
    Spec("lmkv_tier_hits", "counter", ("tier",), "reads a tier answered with an object"),
    Spec("lmkv_tier_bytes_read", "counter", ("tier",), "bytes a tier returned"),
    Spec("lmkv_tier_bytes_written", "counter", ("tier",), "bytes a tier stored"),
    Spec("lmkv_tier_objects_written", "counter", ("tier",), "objects a tier stored"),
    Spec("lmkv_tier_promotions", "counter", ("tier",), "hits in a tier copied into the tiers above it"),
    Spec("lmkv_tier_evictions", "counter", ("tier",), "objects a tier evicted for room"),
    Spec("lmkv_tier_errors", "counter", ("tier", "kind"), "failures by kind: " + ", ".join(ERROR_KINDS)),
    Spec("lmkv_codec_seconds", "counter", ("codec", "op"), "seconds spent encoding / decoding objects"),
    Spec("lmkv_tier_usage_bytes", "gauge", ("tier",), "bytes a tier holds"),
    Spec("lmkv_tier_capacity_bytes", "gauge", ("tier",), "bytes a tier may hold (0: unlimited or unknown)"),
    Spec("lmkv_tier_objects", "gauge", ("tier",), "objects a tier holds (not reported for Redis)"),
)
HISTOGRAMS = {  # engine call -> (name, help)
    "lookup": ("lmkv_lookup_seconds", "seconds per engine lookup"),
    "retrieve": ("lmkv_retrieve_seconds", "seconds per engine retrieve (storage read and copy out)"),
    "store": ("lmkv_store_seconds", "seconds per engine store (the top tier's copy; lower tiers write behind)"),
}
# Samples' names -> kind: a histogram is two entries, ``<name>`` {(bucket index,): count} (not cumulative; the last
# bucket is +Inf) and ``<name>_sum`` {(): seconds}.
KINDS = {s.name: s.kind for s in SPECS}
KINDS.update({name: "histogram" for name, _ in HISTOGRAMS.values()})
KINDS.update({name + "_sum": "histogram_sum" for name, _ in HISTOGRAMS.values()})

# {name: {label values after model: value}}
Samples = dict[str, dict[tuple[Any, ...], float]]


def metric_names() -> list[str]:
    """Every metric family this module exposes (counters without ``_total``, histograms without suffixes)."""
    return [s.name for s in SPECS] + [name for name, _ in HISTOGRAMS.values()]


class Latency:
    """Bucket counts and the sum of one engine call's durations (seconds), as a Prometheus histogram keeps them.

    ``observe`` is not thread-safe: the engine calls it under its own lock, with its counters.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: the first bound >= seconds
        self.sum += seconds


def cumulative_buckets(counts: dict[tuple[Any, ...], float]) -> list[tuple[str, float]]:
    """``[(le, observations <= le)]`` for every bound and ``+Inf``, from ``{(bucket index,): count}``."""
    total, out = 0.0, []
    for i, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
        total += counts.get((i,), 0)
        out.append((floatToGoString(bound), total))
    return out


# -- reading the counters ------------------------------------------------------------------------------------
def _engine_samples(m: EngineMetrics) -> Samples:
    """The engine-level counters and latencies of one registration, read under its engine's lock."""
    with m.lock:
        c = m.counters
        out: Samples = {"lmkv_lookups": {(): c.lookups}, "lmkv_lookup_tokens": {(): c.lookup_tokens},
                        "lmkv_hit_tokens": {(): c.lookup_hit_tokens}, "lmkv_stored_tokens": {(): c.stored_tokens},
                        "lmkv_retrieved_tokens": {(): c.retrieved_tokens}}
        for call, (name, _) in HISTOGRAMS.items():
            lat = getattr(m, call)
            out[name] = {(i,): n for i, n in enumerate(lat.counts)}
            out[name + "_sum"] = {(): lat.sum}
    return out


def _ask(fn: Callable[[], int], what: str) -> int:
    """``fn()`` or 0 when it fails: a scrape must not fail because a backend refuses a query (CONFIG GET)."""
    try:
        return int(fn())
    except Exception as exc:
        log.debug("metrics: %s failed (%s); reporting 0", what, exc)
        return 0


def _tier_samples(tier: Any, seen: dict[str, int], out: Samples) -> None:
    """One tier's samples into ``out``; ``seen``: what the store counted of its objects (``tier_counts``)."""
    st = tier.stats()
    t = (tier.name,)
    for name, field in (("lmkv_tier_hits", "hits"), ("lmkv_tier_bytes_read", "bytes_read"),
                        ("lmkv_tier_bytes_written", "bytes_written"), ("lmkv_tier_objects_written", "puts"),
                        ("lmkv_tier_evictions", "evictions")):
        out.setdefault(name, {})[t] = st.get(field, 0)
    out.setdefault("lmkv_tier_promotions", {})[t] = seen.get("promotions", 0)
    errors = {"corrupt": st.get("corrupt", 0) + seen.get("corrupt", 0),
              "fingerprint_mismatch": seen.get("fingerprint_mismatch", 0), "timeout": st.get("timeouts", 0),
              "unavailable": st.get("unavailable", 0), "write_failed": st.get("write_failed", 0)}
    for kind, n in errors.items():
        out.setdefault("lmkv_tier_errors", {})[(tier.name, kind)] = n
    usage = st["usage_bytes"] if "usage_bytes" in st else _ask(tier.usage_bytes, f"{tier.name} usage")
    # the memory tier's configured capacity, not the part its prefaulter has touched so far
    cap = st["capacity_target"] if "capacity_target" in st else _ask(tier.capacity_bytes, f"{tier.name} capacity")
    out.setdefault("lmkv_tier_usage_bytes", {})[t] = usage
    out.setdefault("lmkv_tier_capacity_bytes", {})[t] = cap
    if "objects" in st:  # memory, node, disk count their objects; Redis would need a SCAN
        out.setdefault("lmkv_tier_objects", {})[t] = st["objects"]


def _store_samples(store: Any) -> Samples:
    """Per-tier and codec samples of one :class:`lmkv.storage.TieredStore` (empty if it cannot be read)."""
    out: Samples = {}
    try:
        seen = store.tier_counts()
        for tier in store.tiers:
            _tier_samples(tier, seen.get(tier.name, {}), out)
        out["lmkv_codec_seconds"] = dict(store.codec_seconds())
    except Exception as exc:  # a store closed under an engine that is still registered
        log.debug("metrics: cannot read the store's counters (%s)", exc)
        return {}
    return out


def _add(dst: Samples, src: Samples, sign: float = 1.0) -> None:
    for name, vals in src.items():
        d = dst.setdefault(name, {})
        for lv, v in vals.items():
            d[lv] = d.get(lv, 0) + sign * v


# -- the process's registry -------------------------------------------------------------------------------
class EngineMetrics:
    """One engine's registration: its latencies (``lookup`` / ``retrieve`` / ``store``: :class:`Latency`, observed
    under ``lock``, the engine's), and what the collector reads (its counters and store). It holds no reference to
    the engine: an engine dropped without ``close`` is unregistered later, at the next scrape or registration."""

    def __init__(self, hub: _Hub, model: str, counters: Any, storage: Any, lock: Any) -> None:
        self.model = model
        self.counters = counters
        self.storage = storage
        self.lock = lock
        self.lookup = Latency()
        self.retrieve = Latency()
        self.store = Latency()
        self.dead = False  # set by the engine's finalizer (no locks there: it may run inside any call)
        self._hub = hub

    def sync(self) -> None:
        """Multiprocess mode: push the counters into this process's files now (in-process: nothing to do)."""
        self._hub.push()

    def close(self) -> None:
        """Unregister (after the store's pending writes, so that the last counts are in)."""
        try:
            self.storage.flush()
        except Exception as exc:
            log.debug("metrics: flush before unregistering failed (%s)", exc)
        self._hub.detach(self)


class _Collector:
    """Exposes the registered engines' counters, read at scrape time (in-process mode)."""

    def __init__(self, hub: _Hub) -> None:
        self._hub = hub

    def describe(self) -> list[Metric]:
        return []  # the registry holds nothing else to check names against

    def collect(self) -> Iterator[Metric]:
        data = self._hub.snapshot()
        for spec in SPECS:
            cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            fam = cls(spec.name, spec.doc, labels=("model", *spec.labels))
            for model in sorted(data):
                for lv, v in sorted(data[model].get(spec.name, {}).items()):
                    fam.add_metric((model, *lv), v)
            yield fam
        for name, doc in HISTOGRAMS.values():
            hist = HistogramMetricFamily(name, doc, labels=("model",))
            for model in sorted(data):
                buckets = cumulative_buckets(data[model].get(name, {}))
                hist.add_metric((model,), buckets, data[model].get(name + "_sum", {}).get((), 0.0))
            yield hist


class _Pusher:
    """Multiprocess mode: prometheus_client metrics backed by this process's files, fed the counters' increments
    (and the gauges' values) since the last push."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        for s in SPECS:
            labels = ("model", *s.labels)
            self.metrics[s.name] = (Counter(s.name, s.doc, labels, registry=None) if s.kind == "counter" else
                                    Gauge(s.name, s.doc, labels, registry=None, multiprocess_mode="livemax"))
        for name, doc in HISTOGRAMS.values():
            self.metrics[name] = Histogram(name, doc, ("model",), buckets=LATENCY_BUCKETS, registry=None)
        self.pushed: dict[tuple[str, str, tuple[Any, ...]], float] = {}  # (name, model, labels) -> counter value

    def apply(self, data: dict[str, Samples]) -> None:
        for model, samples in data.items():
            for name, vals in samples.items():
                for lv, v in vals.items():
                    if KINDS[name] == "gauge":
                        self.metrics[name].labels(model, *lv).set(v)
                        continue
                    key = (name, model, lv)
                    delta = v - self.pushed.get(key, 0.0)
                    if delta > 0:
                        self._value(name, model, lv).inc(delta)
                        self.pushed[key] = v

    def _value(self, name: str, model: str, lv: tuple[Any, ...]) -> Any:
        """What to increment: a counter's child, or a histogram child's bucket or sum value. The bucket counts
        are kept by the engine (see :class:`Latency`), so they go into the file-backed values a ``Histogram``
        child holds (``_buckets``, ``_sum``: prometheus_client's own attributes; ``observe`` increments the same)."""
        kind = KINDS[name]
        if kind == "counter":
            return self.metrics[name].labels(model, *lv)
        if kind == "histogram":
            return self.metrics[name].labels(model)._buckets[lv[0]]
        return self.metrics[name.removesuffix("_sum")].labels(model)._sum

    def forget(self, model: str, last: Samples) -> None:
        """The model's last engine is gone: its gauges drop to 0, a later engine of it counts from 0 again."""
        for name, vals in last.items():
            if KINDS[name] == "gauge":
                for lv in vals:
                    self.metrics[name].labels(model, *lv).set(0)
        self.pushed = {k: v for k, v in self.pushed.items() if k[1] != model}


class _Hub:
    """The process's registry, its registered engines and the endpoint; every method takes ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.members: list[EngineMetrics] = []
        self.retired: dict[str, Samples] = {}  # counters of closed engines whose model still has engines
        self.mode: str | None = None  # "process" | "multiprocess", fixed by the first attach
        self.pusher: _Pusher | None = None
        self.stop = threading.Event()
        self.server: Any = None
        self.bound: tuple[str, int] | None = None

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self, cfg: Any) -> None:
        """Fix the mode on the first registration; later configurations cannot change it (warned)."""
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or cfg.multiproc_dir
        if self.mode is not None:
            if (self.mode == "multiprocess") != bool(path):
                log.warning("metrics: the process's metrics mode is %s (fixed by its first engine); ignoring "
                            "multiproc_dir=%r", self.mode, cfg.multiproc_dir)
            return
        if path:
            self._setup_multiprocess(path, cfg)
        else:
            self.mode = "process"
            self.registry.register(_Collector(self))

    def _setup_multiprocess(self, path: str, cfg: Any) -> None:
        env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if env and cfg.multiproc_dir and os.path.abspath(env) != os.path.abspath(cfg.multiproc_dir):
            log.warning("metrics: $PROMETHEUS_MULTIPROC_DIR=%s wins over metrics.multiproc_dir=%s", env,
                        cfg.multiproc_dir)
        os.makedirs(path, exist_ok=True)
        # prometheus_client picks file-backed values once, at import, from this variable: set it (child
        # processes inherit it) and switch the value class if the import came first.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        if not getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass = values.MultiProcessValue()
        self.mode = "multiprocess"
        MultiProcessCollector(self.registry, path=path)
        self.pusher = _Pusher()
        interval = float(cfg.interval)
        threading.Thread(target=self._push_loop, args=(interval,), name="lmkv-metrics-push", daemon=True).start()
        atexit.register(self._at_exit, path)

    def _push_loop(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                self.push()
            except Exception as exc:  # pragma: no cover - a push must never kill the thread
                log.warning("metrics: push failed (%s)", exc)

    def _at_exit(self, path: str) -> None:
        self.stop.set()
        self.push()
        mark_process_dead(os.getpid(), path)  # this process's live gauges leave the sums

    def serve(self, host: str, port: int) -> None:
        """Start the process's endpoint (once)."""
        if self.server is not None:
            if (host, port) != self.bound and port != 0:
                log.info("metrics: the endpoint already listens on %s:%d; not starting %s:%d", *self.bound, host, port)
            return
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            # multiprocess: the group's other processes try the same port, and whichever got it serves the sums
            level = logging.INFO if self.mode == "multiprocess" else logging.WARNING
            log.log(level, "metrics: cannot listen on %s:%d (%s); metrics are counted, not served from here", host,
                    port, exc)
            return
        self.bound = (host, int(self.server.server_address[1]))
        log.info("metrics: serving /metrics on http://%s:%d", *self.bound)

    def stop_serving(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server, self.bound = None, None

    # -- registrations ------------------------------------------------------------------------------------
    def attach(self, engine: Any) -> EngineMetrics:
        cfg = engine.config.metrics
        with self.lock:
            self.setup(cfg)
            self._reap()
            model = str(engine.model_id)
            member = EngineMetrics(self, model, engine.counters, engine.storage, engine._lock)
            self.members.append(member)
            self.serve(cfg.host, cfg.port)
        weakref.finalize(engine, _mark_dead, member)
        return member

    def detach(self, member: EngineMetrics) -> None:
        """Unregister ``member``, keeping its counters while its model has other engines."""
        with self.lock:
            if member not in self.members:
                return
            self.push(reap=False)  # not reaping here: the dead member being detached would be detached again
            before = self._snapshot(reap=False).get(member.model, {})
            self.members.remove(member)
            if any(m.model == member.model for m in self.members):
                after = self._snapshot(reap=False).get(member.model, {})
                gone = {name: {lv: v - after.get(name, {}).get(lv, 0) for lv, v in vals.items()}
                        for name, vals in before.items() if KINDS.get(name) != "gauge"}
                _add(self.retired.setdefault(member.model, {}), gone)
                return
            self.retired.pop(member.model, None)
            if self.pusher is not None:
                self.pusher.forget(member.model, before)

    def _reap(self) -> None:
        for m in [m for m in self.members if m.dead]:
            self.detach(m)

    # -- reading ------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Samples]:
        with self.lock:
            return self._snapshot()

    def _snapshot(self, reap: bool = True) -> dict[str, Samples]:
        """``{model: samples}``: each model's engines summed (plus its closed engines' counters); a store shared
        by several engines counts once, under the model of the first one registered."""
        if reap:
            self._reap()
        out: dict[str, Samples] = {}
        for model, samples in self.retired.items():
            _add(out.setdefault(model, {}), samples)
        stores: dict[int, EngineMetrics] = {}
        for m in self.members:
            _add(out.setdefault(m.model, {}), _engine_samples(m))
            stores.setdefault(id(m.storage), m)
        for m in stores.values():
            _add(out[m.model], _store_samples(m.storage))
        return out

    def push(self, reap: bool = True) -> None:
        """Multiprocess mode: apply the counters' increments since the last push (in-process: nothing to do)."""
        with self.lock:
            if self.pusher is not None:
                self.pusher.apply(self._snapshot(reap=reap))


def _mark_dead(member: EngineMetrics) -> None:
    member.dead = True


_HUB = _Hub()


def registry() -> CollectorRegistry:
    """The process's lmkv registry (what the endpoint serves): the engines' counters in-process, or the sum of
    every process's files in multiprocess mode."""
    return _HUB.registry


def attach(engine: Any) -> EngineMetrics:
    """Register ``engine`` (an :class:`lmkv.engine.KVEngine`, done by its constructor when ``metrics.enabled``) and
    start the endpoint on its first call; ``engine.close()`` unregisters it."""
    for attr in ("config", "model_id", "counters", "storage", "_lock"):
        if not hasattr(engine, attr):
            raise TypeError(f"engine must be a KVEngine (it has no {attr!r}), got {type(engine).__name__}")
    return _HUB.attach(engine)


def endpoint() -> tuple[str, int] | None:
    """``(host, port)`` the process's /metrics endpoint listens on, or None when it serves none."""
    return _HUB.bound


def stop_endpoint() -> None:
    """Stop the process's endpoint (tests; a server process keeps it until it exits)."""
    with _HUB.lock:
        _HUB.stop_serving()


def mode() -> str | None:
    """``"process"``, ``"multiprocess"``, or None before any engine registered."""
    return _HUB.mode


__all__ = ["registry", "attach", "endpoint", "stop_endpoint", "mode", "metric_names", "SPECS", "HISTOGRAMS",
           "ERROR_KINDS", "EngineMetrics"]
