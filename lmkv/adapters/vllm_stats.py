"""What LmkvConnector reports to vLLM's own metrics: ``KVConnectorStats`` per step, Prometheus counters.

vLLM collects ``get_kv_connector_stats()`` from the scheduler and every worker after each step, ships the
``data`` dict across processes, rebuilds it with ``LmkvConnector.build_kv_connector_stats(data)``, sums the
intervals (``aggregate``), logs ``reduce()`` ("KV Transfer metrics: ...") and feeds ``/metrics`` through
``build_prom_metrics``. The payload is a flat ``{counter: number}`` dict: every field is a count or a sum, so
aggregating is adding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

# name -> help text; all are monotonic counters (``vllm:lmkv_<name>_total`` in /metrics)
COUNTERS: dict[str, str] = {
    "lookups": "prompts the scheduler looked up in lmkv",
    "lookup_tokens": "prompt tokens looked up",
    "hit_tokens": "prompt tokens lmkv promised to load (beyond vLLM's own prefix cache)",
    "lookup_seconds": "seconds spent in lookups",
    "loads": "loads run by the workers",
    "async_loads": "loads run in the background (the request waited, others kept running)",
    "loaded_tokens": "tokens scattered into vLLM's blocks",
    "loaded_bytes": "KV bytes scattered into vLLM's blocks",
    "load_seconds": "seconds the loads took (background ones included)",
    "load_failures": "loads that filled fewer tokens than promised (the rest was recomputed)",
    "failed_blocks": "blocks reported to vLLM for recomputation",
    "saves": "prompts whose KV the workers gathered for storing",
    "saved_tokens": "tokens newly stored",
    "saved_bytes": "KV bytes newly stored",
    "save_seconds": "seconds the saves held the step (the gather; lower-tier writes run in the background)",
    "skipped_saves": "saves skipped because no lookup could ever see them (a RAM-only config across processes)",
}


@dataclass
class LmkvConnectorStats(KVConnectorStats):
    """One interval of LmkvConnector counters; ``data`` is ``{name: number}`` for names in :data:`COUNTERS`."""

    def reset(self) -> None:
        self.data = {}

    def add(self, **counts: float) -> None:
        for k, v in counts.items():
            if k not in COUNTERS:
                raise KeyError(f"unknown lmkv connector counter {k!r}")
            self.data[k] = self.data.get(k, 0) + v

    def aggregate(self, other: KVConnectorStats) -> LmkvConnectorStats:
        for k, v in (other.data or {}).items():
            if k in COUNTERS:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
        if d.get("lookup_tokens"):
            out["hit_rate"] = round(d.get("hit_tokens", 0) / d["lookup_tokens"], 4)
        if d.get("load_seconds"):
            out["load_GBps"] = round(d.get("loaded_bytes", 0) / d["load_seconds"] / 1e9, 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class LmkvPromMetrics(KVConnectorPromMetrics):
    """``vllm:lmkv_<name>_total`` counters in vLLM's ``/metrics``, one child per engine."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._children: dict[str, dict[int, Any]] = {}
        for name, doc in COUNTERS.items():
            counter = self._counter_cls(name=f"vllm:lmkv_{name}", documentation=f"lmkv: {doc}",
                                        labelnames=labelnames)
            self._children[name] = {idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in (transfer_stats_data or {}).items():
            child = self._children.get(name, {}).get(engine_idx)
            if child is not None and value:
                child.inc(value)
