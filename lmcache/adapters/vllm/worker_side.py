"""The connector's worker half: copies chunks between vLLM's paged KV memory and the cache.

Loads run before the forward pass (all layers at once: the ``cpu`` backend has no async copies to
overlap with compute); saves run in ``wait_for_save`` after it, so a block is never freed or reused
while a save still reads it. A failed or short load reports the blocks it could not fill, so vLLM's
``kv_load_failure_policy: recompute`` recomputes exactly those.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lmcache.adapters.vllm.model import ModelView
from lmcache.adapters.vllm.plan import RequestPlan
from lmcache.core.config import LMCacheConfig
from lmcache.core.engine import CacheEngine
from lmcache.core.layouts import BlockPagedKV, LayoutError
from lmcache.core.shared import get_engine

log = logging.getLogger("lmcache")


@dataclass
class StoredChunk:
    """One chunk that reached the cache, in vLLM's terms (for a BlockStored event)."""

    block_hashes: list[bytes]
    parent_hash: bytes | None
    token_ids: list[int]


@dataclass
class WorkerStats:
    loaded_tokens: int = 0
    failed_load_tokens: int = 0
    saved_chunks: int = 0
    existing_chunks: int = 0
    dropped_chunks: int = 0
    save_errors: int = 0


class WorkerSide:
    def __init__(self, config: LMCacheConfig, view: ModelView, tp_rank: int) -> None:
        self.config = config
        self.view = view
        self.tp_rank = tp_rank
        self.head_range = view.head_range(tp_rank)
        self.saver = view.is_saver(tp_rank)
        self.kv: BlockPagedKV | None = None
        self.engine: CacheEngine | None = None
        self.stats = WorkerStats()
        self._load_errors: set[int] = set()
        self._stored: list[StoredChunk] = []

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.view.layer_names if n not in kv_caches]
        if missing:
            raise LayoutError(f"vLLM registered no KV cache for layer {missing[0]!r} of the KV cache config: "
                              f"got {sorted(kv_caches)[:4]}...")
        layers = [kv_caches[n] for n in self.view.layer_names]
        kv = BlockPagedKV(layers, head_start=self.head_range[0])
        kv.check(self.view.geometry)  # one clear error now instead of one per step
        self.kv = kv
        self.engine = get_engine(self.config, self.view.identity, self.head_range, layers[0].device)

    # -- per step -----------------------------------------------------------------------------------

    def load(self, plans: list[RequestPlan]) -> None:
        for plan in plans:
            if plan.load_end <= plan.load_start:
                continue
            slots = plan.slot_mapping(self.view.block_size, plan.load_end)
            slots[: plan.load_start] = -1  # vLLM computed (or prefix-cached) those itself
            n = plan.load_end // self.config.chunk_size
            try:
                loaded = self._engine().retrieve_chunks(plan.chunk_keys[:n], self.kv, slots)
            except Exception as e:  # the engine must go on: report the blocks, vLLM recomputes them
                log.error("lmcache: loading %s failed (%s: %s); its blocks are reported as load errors",
                          plan.req_id, type(e).__name__, e)
                loaded = 0
            good = max(loaded, plan.load_start)
            self.stats.loaded_tokens += good - plan.load_start
            if good < plan.load_end:
                self.stats.failed_load_tokens += plan.load_end - good
                self._load_errors |= plan.blocks_of(good, plan.load_end, self.view.block_size)
                log.warning("lmcache: %s: %d of %d cached tokens could not be loaded (evicted or corrupt since the "
                            "lookup)", plan.req_id, plan.load_end - good, plan.load_end - plan.load_start)

    def save(self, plans: list[RequestPlan]) -> None:
        cs = self.config.chunk_size
        for plan in plans:
            if plan.save_end <= plan.save_first:
                continue
            stored: list[int] = []
            if self.saver:
                slots = plan.slot_mapping(self.view.block_size, plan.save_end * cs)
                try:
                    result = self._engine().store_chunks(plan.chunk_keys[: plan.save_end], self.kv, slots,
                                                         first=plan.save_first)
                except Exception as e:  # a lost save is a future miss, never a failed request
                    self.stats.save_errors += 1
                    log.error("lmcache: saving %s failed (%s: %s)", plan.req_id, type(e).__name__, e)
                    continue
                self.stats.saved_chunks += result.stored_chunks
                self.stats.existing_chunks += result.existing_chunks
                self.stats.dropped_chunks += result.dropped_chunks
                stored = result.stored_indices
            else:
                stored = list(range(plan.save_first, plan.save_end))  # the saver rank stores these heads
            if plan.block_hashes:
                self._stored.extend(self._events_for(plan, stored))

    def _events_for(self, plan: RequestPlan, chunk_indices: list[int]) -> list[StoredChunk]:
        cs, bs = self.config.chunk_size, self.view.block_size
        per = cs // bs
        out = []
        for c in chunk_indices:
            j = c - plan.save_first
            hashes = plan.block_hashes[j * per : (j + 1) * per]
            parent = plan.block_hashes[j * per - 1] if j > 0 else plan.parent_hash
            out.append(StoredChunk(hashes, parent, plan.save_token_ids[j * cs : (j + 1) * cs]))
        return out

    def _engine(self) -> CacheEngine:
        if self.engine is None:
            raise RuntimeError("lmcache: vLLM has not registered its KV caches with the connector yet")
        return self.engine

    # -- results vLLM collects after each step -------------------------------------------------------

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stored(self) -> list[StoredChunk]:
        stored, self._stored = self._stored, []
        return stored
