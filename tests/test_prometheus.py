"""A real Prometheus server (Debian's ``prometheus``, installed by ``make test`` through
scripts/install_prometheus.sh) scrapes a loopback lmkv endpoint, and its HTTP query API returns the hit tokens and
tier usage the test produced. The server is started on a free loopback port and killed by its PID."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import torch

import lmkv.metrics as lmkv_metrics
from lmkv.engine import KVEngine
from lmkv.testing import free_port
from lmkv.types import KVGeometry

GEO = KVGeometry(2, 2, 8, torch.float32)
CHUNK = 16
PAYLOAD = 2 * 2 * CHUNK * 2 * 8 * 4  # bytes of one chunk's KV in the memory tier
PROMETHEUS = shutil.which("prometheus")
Query = Callable[[str], list[dict]]


@pytest.fixture
def prometheus(tmp_path) -> Iterator[Callable[[tuple[str, int]], Query]]:
    """``start(target)``: a Prometheus scraping ``host:port`` every second; returns its query function."""
    procs: list[subprocess.Popen] = []

    def start(target: tuple[str, int]) -> Query:
        conf = tmp_path / "prometheus.yml"
        conf.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "lmkv", "scrape_interval": "1s", "scrape_timeout": "1s",
                                "static_configs": [{"targets": [f"{target[0]}:{target[1]}"]}]}]}))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - the server writes it while it runs
        procs.append(subprocess.Popen(
            [PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=log))
        log.close()

        def query(expr: str) -> list[dict]:
            url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.load(resp)
            assert body["status"] == "success", body
            return body["data"]["result"]

        return query

    yield start
    for p in procs:  # exactly the server this test started
        p.kill()
        p.wait(timeout=10)
    lmkv_metrics.stop_endpoint()


def _value(query: Query, expr: str) -> float | None:
    """The single sample ``expr`` selects now, or None (no data yet, or the server not up yet)."""
    try:
        result = query(expr)
    except (urllib.error.URLError, ConnectionError):
        return None
    return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (scripts/install_prometheus.sh)")
def test_prometheus_reads_back_the_hit_tokens_it_scraped(tmp_path, prometheus) -> None:
    cfg = {"chunk_size": CHUNK, "memory": {"capacity": "1MiB", "prefault": False, "pinned": False},
           "disk": {"enabled": False}, "metrics": {"enabled": True, "port": 0}}
    with KVEngine(cfg, GEO, model_id="prom-e2e") as eng:
        tokens = list(range(3 * CHUNK))
        eng.store(tokens, torch.ones(GEO.chunk_shape(len(tokens))))
        assert eng.lookup(tokens) == eng.lookup(tokens) == 3 * CHUNK
        query = prometheus(lmkv_metrics.endpoint())
        deadline = time.monotonic() + 30
        hits = None
        while hits != 2 * 3 * CHUNK:
            assert time.monotonic() < deadline, f"Prometheus reported lmkv_hit_tokens_total = {hits}"
            time.sleep(0.25)
            hits = _value(query, 'lmkv_hit_tokens_total{model="prom-e2e"}')
        assert _value(query, 'lmkv_tier_usage_bytes{model="prom-e2e", tier="memory"}') == 3 * PAYLOAD
        assert _value(query, 'up{job="lmkv"}') == 1
