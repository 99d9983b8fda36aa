"""Run by tests/test_sglang_backend.py with the Dynamo virtualenv's python, the one place here where SGLang's
metrics module imports (it needs torchvision; see .ci/guard_torchvision.py): lmcache's HiCache backend, built by
SGLang's own factory, serves a batch each way, and its ``get_stats()`` goes through SGLang's own
``StorageMetricsCollector`` exactly as SGLang's scheduler calls it with ``--enable-metrics``. Prints the
collector's histogram counts and sums as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402
from sglang.srt.observability.metrics_collector import StorageMetrics, StorageMetricsCollector  # noqa: E402
from sglangutil import HostPool, make_backend, page_keys  # noqa: E402

PS = 32
pool = HostPool("layer_first", PS, pages=16, layers=2, heads=2, head_dim=16)
backend = make_backend({"lmcache.chunk_size": PS, "lmcache.max_cpu_size_gb": 0.05}, pool)
toks = [(131 + i * 17) % 997 + 3 for i in range(3 * PS)]
keys = page_keys(toks, PS)
assert backend.batch_set_v1(keys, torch.arange(0, 3 * PS)) == [True] * 3
assert backend.batch_get_v1(keys, torch.arange(5 * PS, 8 * PS)) == [True] * 3
collector = StorageMetricsCollector(labels={"model_name": "m", "storage_backend": "lmcache"})
stats = backend.get_stats()
assert isinstance(stats, StorageMetrics), type(stats)
collector.log_storage_metrics(stats)
collector.log_storage_metrics(backend.get_stats())  # drained: a second call adds nothing
out = {}
for name in ("prefetch_pgs", "backup_pgs", "prefetch_bandwidth", "backup_bandwidth"):
    for suffix in ("count", "sum"):
        out[f"{name}_{suffix}"] = REGISTRY.get_sample_value(f"sglang:{name}_{suffix}",
                                                            {"model_name": "m", "storage_backend": "lmcache"})
backend.close()
print(json.dumps(out))
