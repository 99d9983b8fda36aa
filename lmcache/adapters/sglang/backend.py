"""``LMCacheHiCacheStorage``: SGLang's HiCache storage backend (``HiCacheStorage``) onto the lmcache core.

    python -m sglang.launch_server --model-path M --page-size 256 --enable-hierarchical-cache \\
      --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
      '{"backend_name":"lmcache","module_path":"lmcache.adapters.sglang.backend","class_name":"LMCacheHiCacheStorage","interface_v1":1}'

Keys: SGLang hands page hashes, never tokens. lmcache's chunk keys are built on the same SHA-256 page
chain (``lmcache.core.keys``), so with SGLang's page size equal to lmcache's chunk_size, page hash i is
exactly the prefix digest of chunk i and both engines name a prefix alike: what vLLM stores, SGLang
finds, and the other way round (same ``model_name`` on both, same KV geometry).
"""

from __future__ import annotations

import logging
import time
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from lmcache.adapters.logs import follow_engine_logging
from lmcache.adapters.sglang import host_layout
from lmcache.core.config import LMCacheConfig, load_engine_config
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KIND_MLA, KVGeometry, ModelIdentity
from lmcache.core.keys import ChunkHasher
from lmcache.core.shared import get_engine, release

log = logging.getLogger("lmcache")


class AlignmentError(ValueError):
    """SGLang's page size and lmcache's chunk size differ: no page maps onto a chunk."""


def config_from(extra: dict | None, env: dict | None = None) -> LMCacheConfig:
    """File (``lmcache.config_file`` in the extra config, else LMCACHE_CONFIG_FILE) < LMCACHE_* env <
    ``lmcache.<key>`` entries of ``--hicache-storage-backend-extra-config``."""
    return load_engine_config(extra, "--hicache-storage-backend-extra-config", env)


class LMCacheHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        self.storage_config = storage_config
        self.config = config_from(storage_config.extra_config)
        follow_engine_logging(self.config.log_level, "sglang")
        self.engine: CacheEngine | None = None
        self.hasher: ChunkHasher | None = None
        self.mem_pool_host = None
        # per batch since the last get_stats(), as SGLang's metrics collector reads them: pages, GB/s
        self._prefetch: list[tuple[int, float]] = []
        self._backup: list[tuple[int, float]] = []
        self._page_bytes = 0

    # -- setup ----------------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        sc, pool = self.storage_config, mem_pool_host
        host_layout.check_layout(pool.layout)
        if pool.page_size != self.config.chunk_size:
            raise AlignmentError(
                f"SGLang --page-size {pool.page_size} differs from lmcache chunk_size {self.config.chunk_size}: one "
                f"SGLang page must be one lmcache chunk. Set chunk_size: {pool.page_size} (a multiple of vLLM's block "
                f"size too, for sharing with vLLM) or start SGLang with --page-size {self.config.chunk_size}")
        buf = pool.kv_buffer
        self.mla = bool(sc.is_mla_model)
        if self.mla:
            geometry = KVGeometry(pool.layer_num, 1, buf.shape[-1], 0, buf.dtype, KIND_MLA)
            self.head_range = (0, 1)
        else:
            total = pool.head_num * sc.tp_size
            geometry = KVGeometry(pool.layer_num, total, pool.head_dim, pool.head_dim, buf.dtype)
            self.head_range = (sc.tp_rank * pool.head_num, (sc.tp_rank + 1) * pool.head_num)
        identity = ModelIdentity(self.config.model_name or sc.model_name or "", geometry)
        self.engine = get_engine(self.config, identity, self.head_range, buf.device)
        self.hasher = self.engine.hasher()
        self._page_bytes = geometry.bytes_per_token(self.head_range[1] - self.head_range[0]) * pool.page_size
        self.page_size = pool.page_size
        self.layout = pool.layout
        if self.layout in host_layout.TOKEN_MAJOR:
            self.kv = host_layout.token_slots(buf, self.layout, self.mla, self.head_range[0])
        log.info("lmcache HiCache backend: model %s, %s layout, page = chunk = %d tokens, heads %s, %s mode",
                 identity.model_name, self.layout, self.page_size, list(self.head_range), self.config.mode)

    def _keys(self, keys: List[str]) -> list[bytes]:
        return [self.hasher.key_of_digest(bytes.fromhex(k[:64])) for k in keys]

    # -- zero-copy v1 path ----------------------------------------------------------------------------

    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        if not keys:
            return 0
        return self.engine.lookup_chunks(self._keys(keys))

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None) -> List[bool]:
        t0 = time.perf_counter()
        done = self._get_v1(keys, host_indices)
        self._record(self._prefetch, sum(done), t0)
        return done

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None) -> List[bool]:
        t0 = time.perf_counter()
        done = self._set_v1(keys, host_indices)
        self._record(self._backup, sum(done), t0)
        return done

    def _record(self, into: list[tuple[int, float]], pages: int, t0: float) -> None:
        if pages and len(into) < 10_000:  # bounded even if nobody ever reads the stats
            seconds = max(time.perf_counter() - t0, 1e-9)
            into.append((pages, pages * self._page_bytes / seconds / 1e9))

    def _get_v1(self, keys: List[str], host_indices: torch.Tensor) -> List[bool]:
        ck = self._keys(keys)
        ps = self.page_size
        if self.layout in host_layout.TOKEN_MAJOR:
            loaded = self.engine.retrieve_chunks(ck, self.kv, host_indices[: len(ck) * ps]) // ps
        else:
            loaded = 0
            for i, key in enumerate(ck):
                page = int(host_indices[i * ps]) // ps
                kv = host_layout.page_slots(self.mem_pool_host.kv_buffer, page, self.mla, self.head_range[0])
                if not self.engine.retrieve_chunks([key], kv, torch.arange(ps)):
                    break
                loaded += 1
        return [i < loaded for i in range(len(ck))]

    def _set_v1(self, keys: List[str], host_indices: torch.Tensor) -> List[bool]:
        if not self.storage_config.is_storage_writer:
            return [True] * len(keys)  # another rank holds the same (MLA) bytes and writes them
        ck = self._keys(keys)
        ps = self.page_size
        dropped = 0
        try:
            if self.layout in host_layout.TOKEN_MAJOR:
                dropped = self.engine.store_chunks(ck, self.kv, host_indices[: len(ck) * ps]).dropped_chunks
            else:
                for i, key in enumerate(ck):
                    page = int(host_indices[i * ps]) // ps
                    kv = host_layout.page_slots(self.mem_pool_host.kv_buffer, page, self.mla, self.head_range[0])
                    dropped += self.engine.store_chunks([key], kv, torch.arange(ps)).dropped_chunks
        except Exception as e:  # a lost write is a future miss; SGLang retries later
            log.error("lmcache: HiCache write of %d pages failed (%s: %s)", len(keys), type(e).__name__, e)
            return [False] * len(keys)
        # only a dropped write (no room) needs asking which pages made it: one lookup each
        return self._present(ck) if dropped else [True] * len(ck)

    def _present(self, ck: list[bytes]) -> List[bool]:
        return [self.engine.lookup_chunks([k]) == 1 for k in ck]

    # -- legacy path (flat data pages) ----------------------------------------------------------------

    def _flat(self, page: torch.Tensor):
        return host_layout.flat_page_slots(page, self.layout, tuple(self.mem_pool_host.kv_buffer.shape), self.mla,
                                           self.head_range[0], self.page_size)

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        if target_location is None:
            target_location = self.mem_pool_host.get_dummy_flat_data_page()
        ok = self.engine.retrieve_chunks(self._keys([key]), self._flat(target_location), torch.arange(self.page_size))
        return target_location if ok else None

    def batch_get(self, keys: List[str], target_locations: Any = None, target_sizes: Any = None) -> List[torch.Tensor | None]:
        out = []
        for i, key in enumerate(keys):
            got = self.get(key, target_locations[i] if target_locations is not None else None)
            out.append(got)
            if got is None:  # a prefix: nothing after a miss is usable
                out.extend([None] * (len(keys) - i - 1))
                break
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        if not self.storage_config.is_storage_writer:
            return True
        ck = self._keys([key])
        return not self.engine.store_chunks(ck, self._flat(value), torch.arange(self.page_size)).dropped_chunks

    def batch_set(self, keys: List[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def clear(self) -> None:
        if self.engine is not None:
            self.engine.clear()

    def get_stats(self):
        """SGLang's own ``StorageMetrics`` (its metrics collector asserts the type): pages and GB/s of each
        prefetch (lmcache -> host pool) and backup (host pool -> lmcache) batch since the last call."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        return self.storage_metrics(StorageMetrics)

    def storage_metrics(self, metrics_type: Any) -> Any:
        """Fill a fresh ``metrics_type`` (SGLang's ``StorageMetrics``: four lists) and start over."""
        metrics = metrics_type()
        for pages, gbps in self._prefetch:
            metrics.prefetch_pgs.append(pages)
            metrics.prefetch_bandwidth.append(gbps)
        for pages, gbps in self._backup:
            metrics.backup_pgs.append(pages)
            metrics.backup_bandwidth.append(gbps)
        self._prefetch, self._backup = [], []
        return metrics

    def tier_stats(self) -> dict:
        """lmcache's per-tier counters (what ``get_stats`` returned before SGLang's metrics type)."""
        return self.engine.tier_stats() if self.engine is not None else {}

    def close(self) -> None:
        """SGLang's shutdown: write-backs flushed, the pool (or the server connection) let go. A process
        killed before this runs is noticed by ``lmcache server`` all the same (its liveness lock goes)."""
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.flush()
            release(engine)
