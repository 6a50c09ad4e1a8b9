"""Prometheus metrics (lmkv.metrics): the /metrics endpoint, scraped over HTTP and parsed with
prometheus_client.parser, reports exactly what the test did: tokens, lookups, per-tier bytes, evictions, errors by
kind, latency histogram counts; labels stay bounded; several processes sum through one multiprocess directory;
every metric the Grafana dashboard names exists, and docs/metrics.md lists every metric."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import lmkv.config as lmkv_config
import lmkv.metrics as lmkv_metrics
from lmkv.engine import KVEngine
from lmkv.errors import ConfigError
from lmkv.storage.serde import RawSerde
from lmkv.testing import free_port
from lmkv.types import KVGeometry

ROOT = Path(__file__).resolve().parents[1]
GEO = KVGeometry(2, 2, 8, torch.float32)
CHUNK = 16
PAYLOAD = 2 * 2 * CHUNK * 2 * 8 * 4  # bytes of one chunk's KV [L=2, 2, T=16, H=2, D=8] float32: 4096
LABELS = {"model", "tier", "kind", "codec", "op", "le"}

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module", autouse=True)
def _stop_endpoint() -> Iterator[None]:
    """The endpoint is per process: stop the one these tests started."""
    yield
    lmkv_metrics.stop_endpoint()


def _config(root: str, **sections: dict) -> dict:
    """A small engine's config: 1 MiB of RAM, a disk tier under ``root``, metrics on a free port."""
    cfg: dict = {"chunk_size": CHUNK, "save_partial_chunks": False,
                 "memory": {"capacity": "1MiB", "prefault": False, "pinned": False},
                 "disk": {"path": os.path.join(root, "disk"), "capacity": "4MiB"},
                 "metrics": {"enabled": True, "port": 0}}
    for name, keys in sections.items():
        cfg[name] = {**cfg.get(name, {}), **keys}
    return cfg


def _kv(tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(GEO.chunk_shape(tokens), generator=g, dtype=torch.float32)


def scrape() -> tuple[str, Samples]:
    """The endpoint's text and ``{(sample name, labels): value}``."""
    bound = lmkv_metrics.endpoint()
    assert bound is not None, "no /metrics endpoint is running"
    host, port = bound
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    return text, samples


def val(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def of_model(samples: Samples, model: str) -> Samples:
    return {k: v for k, v in samples.items() if ("model", model) in k[1]}


@settings(max_examples=6, deadline=None)
@given(chunks=st.integers(1, 4), repeats=st.integers(1, 3), unknown=st.integers(1, 40))
def test_a_scrape_reports_exactly_what_the_engine_did(chunks: int, repeats: int, unknown: int) -> None:
    model = f"scrape-{chunks}-{repeats}-{unknown}"
    with tempfile.TemporaryDirectory() as root, KVEngine(_config(root), GEO, model_id=model) as eng:
        tokens = list(range(chunks * CHUNK))
        plan = eng.plan(tokens)
        assert eng.store(plan, _kv(len(tokens))) == len(tokens)
        assert eng.store(plan, _kv(len(tokens))) == 0  # every chunk held: skipped, not stored again
        for _ in range(repeats):
            assert eng.lookup(plan) == len(tokens)
        assert eng.lookup([10_000 + i for i in range(unknown)]) == 0
        assert eng.retrieve(plan)[1] == len(tokens)
        eng.flush()
        text, s = scrape()
        m = {"model": model}
        assert val(s, "lmkv_stored_tokens_total", **m) == chunks * CHUNK
        assert val(s, "lmkv_lookups_total", **m) == repeats + 1
        assert val(s, "lmkv_lookup_tokens_total", **m) == repeats * len(tokens) + unknown
        assert val(s, "lmkv_hit_tokens_total", **m) == repeats * len(tokens)
        assert val(s, "lmkv_retrieved_tokens_total", **m) == len(tokens)
        # the memory tier counts payload bytes, the disk tier whole objects (header + payload)
        disk_bytes = sum(RawSerde().header(k, GEO.chunk_shape(CHUNK), GEO.dtype, fp).total_len
                         for k, fp in zip(plan.keys, plan.fingerprints, strict=True))
        assert val(s, "lmkv_tier_bytes_written_total", tier="memory", **m) == chunks * PAYLOAD
        assert val(s, "lmkv_tier_bytes_written_total", tier="disk", **m) == disk_bytes
        assert val(s, "lmkv_tier_objects_written_total", tier="disk", **m) == chunks
        assert [val(s, "lmkv_tier_objects", tier=t, **m) for t in ("memory", "disk")] == [chunks, chunks]
        assert val(s, "lmkv_tier_hits_total", tier="memory", **m) == chunks  # the retrieve read RAM only
        assert val(s, "lmkv_tier_bytes_read_total", tier="memory", **m) == chunks * PAYLOAD
        assert val(s, "lmkv_tier_hits_total", tier="disk", **m) == 0
        assert val(s, "lmkv_tier_usage_bytes", tier="memory", **m) == chunks * PAYLOAD
        assert val(s, "lmkv_tier_capacity_bytes", tier="memory", **m) == 1 << 20
        assert val(s, "lmkv_tier_capacity_bytes", tier="disk", **m) == 4 << 20
        assert val(s, "lmkv_lookup_seconds_count", **m) == repeats + 1
        assert val(s, "lmkv_store_seconds_count", **m) == 2
        assert val(s, "lmkv_retrieve_seconds_count", **m) == 1
        assert val(s, "lmkv_lookup_seconds_bucket", le="+Inf", **m) == repeats + 1
        assert val(s, "lmkv_lookup_seconds_sum", **m) == eng.counters.lookup_s  # the same additions, in order
        assert val(s, "lmkv_retrieve_seconds_sum", **m) == eng.counters.retrieve_s
        assert all(val(s, "lmkv_tier_errors_total", tier=t, kind=k, **m) == 0
                   for t in ("memory", "disk") for k in lmkv_metrics.ERROR_KINDS)
        # bounded labels: no key, digest or token text anywhere; tiers are the configured ones
        assert not any(k in text or k.rsplit("+", 1)[-1] in text for k in plan.keys)  # nor its digest
        mine = of_model(s, model)
        assert {label for _, labels in mine for label, _ in labels} <= LABELS
        assert {v for _, labels in mine for name, v in labels if name == "tier"} == {"memory", "disk"}
    assert of_model(scrape()[1], model) == {}  # closing the engine unregistered it


@settings(max_examples=30, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(lmkv_metrics.LATENCY_BUCKETS), st.floats(0, 30)), max_size=40))
def test_latency_buckets_match_prometheus_clients_histogram(durations: list[float]) -> None:
    """The engine's plain bucket counts expose what a prometheus_client Histogram fed the same values exposes
    (a duration equal to a bound falls in that bound's bucket, le)."""
    lat = lmkv_metrics.Latency()
    ref = Histogram("ref_seconds", "reference", buckets=lmkv_metrics.LATENCY_BUCKETS, registry=CollectorRegistry())
    for d in durations:
        lat.observe(d)
        ref.observe(d)
    samples = next(iter(ref.collect())).samples
    want = {s.labels["le"]: s.value for s in samples if s.name == "ref_seconds_bucket"}
    got = dict(lmkv_metrics.cumulative_buckets({(i,): n for i, n in enumerate(lat.counts)}))
    assert got == want
    assert [lat.sum] == [s.value for s in samples if s.name == "ref_seconds_sum"]


def test_an_eviction_in_a_tiny_memory_tier_is_counted_once(tmp_path) -> None:
    cfg = _config(str(tmp_path), memory={"capacity": 2 * PAYLOAD})
    with KVEngine(cfg, GEO, model_id="evict") as eng:
        tokens = list(range(3 * CHUNK))
        eng.store(tokens, _kv(len(tokens)))
        eng.flush()
        _, s = scrape()
        assert val(s, "lmkv_tier_evictions_total", model="evict", tier="memory") == 1
        assert val(s, "lmkv_tier_evictions_total", model="evict", tier="disk") == 0
        assert val(s, "lmkv_tier_objects", model="evict", tier="memory") == 2
        assert val(s, "lmkv_tier_objects", model="evict", tier="disk") == 3
        assert val(s, "lmkv_tier_usage_bytes", model="evict", tier="memory") == 2 * PAYLOAD


def test_a_corrupt_disk_object_and_a_fingerprint_mismatch_count_by_kind(tmp_path) -> None:
    cfg = _config(str(tmp_path), memory={"enabled": False})
    with KVEngine(cfg, GEO, model_id="damaged") as eng:
        plan = eng.plan(list(range(2 * CHUNK)))
        eng.store(plan, _kv(2 * CHUNK))
        eng.flush()
        disk = eng.storage.tier("disk")
        path = disk.file_for(plan.keys[1])
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x10  # a payload bit: the checksum catches it
        path.write_bytes(bytes(data))
        assert eng.storage.get(plan.keys[0], fingerprint=b"other tokens") is None
        assert eng.storage.get(plan.keys[0], fingerprint=plan.fingerprints[0]) is not None  # a raw decode
        assert eng.retrieve(plan)[1] == CHUNK  # the damaged second chunk is a miss
        _, s = scrape()
        m = {"model": "damaged", "tier": "disk"}
        assert val(s, "lmkv_tier_errors_total", kind="corrupt", **m) == 1
        assert val(s, "lmkv_tier_errors_total", kind="fingerprint_mismatch", **m) == 1
        assert val(s, "lmkv_tier_errors_total", kind="write_failed", **m) == 0
        got = val(s, "lmkv_codec_seconds_total", model="damaged", codec="raw", op="decode")
        assert got == eng.storage.codec_seconds()[("raw", "decode")] and got > 0  # the store's own figure


@pytest.mark.parametrize("backend, kind", [("closed port", "unavailable"), ("silent listener", "timeout")])
def test_a_dead_redis_counts_an_error_of_its_kind(tmp_path, backend: str, kind: str) -> None:
    pytest.importorskip("redis")
    silent = None
    if backend == "silent listener":  # accepts connections (kernel backlog) and never answers
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
    else:
        port = free_port()  # nothing listens there
    cfg = _config(str(tmp_path), disk={"enabled": False},
                  redis={"enabled": True, "url": f"redis://127.0.0.1:{port}/0", "socket_timeout": 0.2,
                         "retry_backoff": 60.0})  # one failure, then the tier stays marked down
    model = f"dead-redis-{kind}"
    try:
        with KVEngine(cfg, GEO, model_id=model) as eng:
            assert eng.lookup(list(range(2 * CHUNK))) == 0
            _, s = scrape()
            m = {"model": model, "tier": "redis"}
            other = "timeout" if kind == "unavailable" else "unavailable"
            assert val(s, "lmkv_tier_errors_total", kind=kind, **m) == 1
            assert val(s, "lmkv_tier_errors_total", kind=other, **m) == 0
            assert val(s, "lmkv_tier_objects", **m) is None  # not counted for Redis (no SCAN at scrape time)
    finally:
        if silent is not None:
            silent.close()


def test_engines_of_one_model_add_up_and_a_closed_one_keeps_its_counts(tmp_path) -> None:
    a = KVEngine(_config(str(tmp_path / "a")), GEO, model_id="pair")
    b = KVEngine(_config(str(tmp_path / "b")), GEO, model_id="pair")
    try:
        a.store(list(range(2 * CHUNK)), _kv(2 * CHUNK))
        b.store(list(range(100, 100 + CHUNK)), _kv(CHUNK))
        assert val(scrape()[1], "lmkv_stored_tokens_total", model="pair") == 3 * CHUNK
        a.close()
        _, s = scrape()
        assert val(s, "lmkv_stored_tokens_total", model="pair") == 3 * CHUNK  # a counter never goes down
        assert val(s, "lmkv_tier_objects_written_total", model="pair", tier="memory") == 3
        assert val(s, "lmkv_store_seconds_count", model="pair") == 2
    finally:
        a.close()
        b.close()
    assert of_model(scrape()[1], "pair") == {}


def test_an_engine_dropped_without_close_is_unregistered_at_the_next_scrape(tmp_path) -> None:
    eng = KVEngine(_config(str(tmp_path)), GEO, model_id="dropped")
    eng.store(list(range(CHUNK)), _kv(CHUNK))
    eng.flush()
    assert val(scrape()[1], "lmkv_stored_tokens_total", model="dropped") == CHUNK
    store = eng.storage
    del eng
    gc.collect()
    assert of_model(scrape()[1], "dropped") == {}
    store.close()


def test_metrics_off_registers_nothing_and_serves_nothing(tmp_path, monkeypatch) -> None:
    before = lmkv_metrics.endpoint()

    def refuse(engine: object) -> None:
        raise AssertionError("attach called with metrics off")

    monkeypatch.setattr(lmkv_metrics, "attach", refuse)
    cfg = _config(str(tmp_path), metrics={"enabled": False})
    with KVEngine(cfg, GEO, model_id="quiet") as eng:
        eng.store(list(range(CHUNK)), _kv(CHUNK))
        assert eng._metrics is None
        assert lmkv_metrics.endpoint() == before
        assert "quiet" not in lmkv_metrics._HUB.snapshot()


def test_metrics_config_keys_env_and_bad_values(monkeypatch) -> None:
    monkeypatch.setenv("LMKV_METRICS_PORT", "9555")
    monkeypatch.setenv("LMKV_METRICS_ENABLED", "1")
    cfg = lmkv_config.load({"metrics": {"host": "0.0.0.0"}})
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port, cfg.metrics.interval) == (True, "0.0.0.0",
                                                                                              9555, 5.0)
    monkeypatch.delenv("LMKV_METRICS_PORT")
    with pytest.raises(ConfigError, match="metrics.port"):
        lmkv_config.load({"metrics": {"port": 70000}})
    with pytest.raises(ConfigError, match="metrics.interval"):
        lmkv_config.load({"metrics": {"interval": 0}})
    with pytest.raises(TypeError, match="engine"):
        lmkv_metrics.attach(object())


_CHILD = textwrap.dedent("""
    import gc, os, sys, time
    import torch
    from lmkv.engine import KVEngine
    from lmkv.types import KVGeometry
    import lmkv.metrics

    chunks, root, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    geo = KVGeometry(2, 2, 8, torch.float32)
    cfg = {"chunk_size": 16, "memory": {"capacity": "1MiB", "prefault": False, "pinned": False},
           "disk": {"enabled": False}, "metrics": {"enabled": True, "port": 0, "interval": 0.1}}
    eng = KVEngine(cfg, geo, model_id="mp")
    assert lmkv.metrics.mode() == "multiprocess"
    toks = list(range(1000 * chunks, 1000 * chunks + 16 * chunks))
    eng.store(toks, torch.zeros(geo.chunk_shape(len(toks))))
    eng.lookup(toks)
    if mode == "close":  # and a second engine of the model, dropped without close: a push unregisters it
        extra = KVEngine(cfg, geo, model_id="mp")
        extra.store(list(range(16)), torch.zeros(geo.chunk_shape(16)))
        del extra
        gc.collect()
        time.sleep(0.5)
        eng.close()
    else:  # no flush, no close, no atexit: only the background push can have written the counters
        time.sleep(1.0)
        os._exit(0)
""")


def test_two_processes_sum_through_one_multiprocess_directory(tmp_path) -> None:
    mp = tmp_path / "mp"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp)}
    env.pop("LMKV_CONFIG", None)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(n), str(tmp_path), how], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, how in ((2, "close"), (3, "exit"))]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(mp))
    m = {"model": "mp"}
    assert reg.get_sample_value("lmkv_stored_tokens_total", m) == (2 + 1 + 3) * CHUNK
    assert reg.get_sample_value("lmkv_hit_tokens_total", m) == (2 + 3) * CHUNK
    assert reg.get_sample_value("lmkv_lookups_total", m) == 2
    assert reg.get_sample_value("lmkv_tier_bytes_written_total", {**m, "tier": "memory"}) == 6 * PAYLOAD
    assert reg.get_sample_value("lmkv_store_seconds_count", m) == 3
    assert reg.get_sample_value("lmkv_lookup_seconds_count", m) == 2
    # the closed process's gauges went to 0; the one that died without a word keeps its last value (livemax)
    assert reg.get_sample_value("lmkv_tier_usage_bytes", {**m, "tier": "memory"}) == 3 * PAYLOAD


def _dashboard_names() -> set[str]:
    dash = json.loads((ROOT / "docs" / "grafana" / "lmkv.json").read_text())
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            exprs.extend(v for k, v in node.items() if k in ("expr", "query") and isinstance(v, str))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    return {n for e in exprs for n in re.findall(r"\blmkv_[a-z_]+", e)}


def test_every_metric_the_dashboard_names_exists(tmp_path) -> None:
    names = _dashboard_names()
    assert {"lmkv_hit_tokens_total", "lmkv_lookup_tokens_total", "lmkv_tier_usage_bytes",
            "lmkv_tier_capacity_bytes", "lmkv_retrieve_seconds_bucket"} <= names
    with KVEngine(_config(str(tmp_path)), GEO, model_id="dash") as eng:
        eng.store(list(range(CHUNK)), _kv(CHUNK))
        _, s = scrape()
        exposed = {name for name, labels in of_model(s, "dash")}
    assert names - exposed == set()


def test_docs_list_every_metric() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for spec in lmkv_metrics.SPECS:
        shown = spec.name + ("_total" if spec.kind == "counter" else "")
        assert f"`{shown}`" in doc, f"docs/metrics.md does not list {shown}"
    for name, _ in lmkv_metrics.HISTOGRAMS.values():
        assert f"`{name}`" in doc, f"docs/metrics.md does not list {name}"


def test_lmkv_stats_reads_a_live_endpoint(tmp_path, capsys) -> None:
    """``lmkv stats --url`` against lmkv's own endpoint (not a hand-written exposition): the hit rate and the
    lookup count are what the engine did."""
    from lmkv.cli import main

    with KVEngine(_config(str(tmp_path)), GEO, model_id="stats-live") as eng:
        tokens = list(range(3 * CHUNK))
        eng.store(tokens, _kv(3 * CHUNK))
        assert eng.lookup(tokens) == 3 * CHUNK
        assert eng.lookup(list(range(500, 500 + 2 * CHUNK)) + tokens[:CHUNK]) == 0  # 3 chunks asked, none hit
        host, port = lmkv_metrics.endpoint()
        capsys.readouterr()
        assert main(["stats", "--url", f"http://{host}:{port}/metrics"]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["stats-live", str(6 * CHUNK), str(3 * CHUNK), "50.0%"] in rows
    assert any(r[:2] == ["stats-live", "lookup"] and r[2] == "2" for r in rows)
