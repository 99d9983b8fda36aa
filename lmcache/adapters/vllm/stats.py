"""lmcache's figures in vLLM's own metrics: its KV-connector stats interface, so they reach vLLM's log line
("KV Transfer metrics: ..."), its ``/metrics`` and whatever relays that (Dynamo's worker ``/metrics``).

Only tensor-parallel rank 0 reports: every rank loads and stores the same tokens (its own heads), so the
sum over workers that vLLM makes would count each token once per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

#: counter name (vLLM's /metrics adds "_total") -> (data key, documentation)
COUNTERS = {
    "vllm:lmcache_loaded_tokens": ("loaded_tokens", "Prompt tokens loaded from lmcache instead of computed"),
    "vllm:lmcache_failed_load_tokens": ("failed_load_tokens",
                                        "Tokens lmcache had at lookup but could not load (recomputed by vLLM)"),
    "vllm:lmcache_stored_tokens": ("stored_tokens", "Prompt tokens newly stored in lmcache"),
    "vllm:lmcache_load_seconds": ("load_seconds", "Time spent loading chunks into vLLM's KV cache"),
    "vllm:lmcache_save_seconds": ("save_seconds", "Time spent storing chunks from vLLM's KV cache"),
    "vllm:lmcache_save_errors": ("save_errors", "Stores that failed (a future miss, never a failed request)"),
}
FIELDS = tuple(key for key, _ in COUNTERS.values())


@dataclass
class LMCacheConnectorStats(KVConnectorStats):
    """Sums since the last report; plain numbers, so vLLM can ship them between its processes."""

    def __post_init__(self) -> None:
        for key in FIELDS:
            self.data.setdefault(key, 0)

    def reset(self) -> None:
        self.data = {key: 0 for key in FIELDS}

    def aggregate(self, other: KVConnectorStats) -> "LMCacheConnectorStats":
        for key in FIELDS:
            self.data[key] += other.data.get(key, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        return {"lmcache_loaded_tokens": d["loaded_tokens"], "lmcache_stored_tokens": d["stored_tokens"],
                "lmcache_failed_load_tokens": d["failed_load_tokens"], "lmcache_load_ms": round(d["load_seconds"] * 1e3, 1),
                "lmcache_save_ms": round(d["save_seconds"] * 1e3, 1), "lmcache_save_errors": d["save_errors"]}

    def is_empty(self) -> bool:
        return not any(self.data.get(key) for key in FIELDS)


class LMCachePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for name, (key, doc) in COUNTERS.items():
            counter = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            self._counters[key] = {idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self._counters.items():
            value = transfer_stats_data.get(key, 0)
            if value and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)
