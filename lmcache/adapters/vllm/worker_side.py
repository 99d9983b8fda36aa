"""The connector's worker half: copies chunks between vLLM's paged KV memory and the cache.

Loads run before the forward pass (all layers at once: the ``cpu`` backend has no async copies to
overlap with compute); saves run in ``wait_for_save`` after it, so a block is never freed or reused
while a save still reads it. A failed or short load reports the blocks it could not fill, so vLLM's
``kv_load_failure_policy: recompute`` recomputes exactly those.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmcache.adapters.vllm.model import ModelView
from lmcache.adapters.vllm.plan import RequestPlan
from lmcache.core.config import LMCacheConfig
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KIND_MHA
from lmcache.core.layouts import BlockPagedKV, KVLayout, LayoutError
from lmcache.core.shared import get_engine

if TYPE_CHECKING:
    from lmcache.adapters.vllm.blend_worker import BlendWorker

log = logging.getLogger("lmcache")
MAX_ANNOUNCED = 1 << 20


@dataclass(frozen=True)
class StoredChunk:
    """One chunk that reached the cache or left a tier, with what a BlockStored/BlockRemoved event needs:
    vLLM's block hashes (vLLM's own event stream) and a router's (``router_events``). Hashable, because
    vLLM's event aggregator counts identical events from every TP worker."""

    block_hashes: tuple[bytes, ...]
    parent_hash: bytes | None
    token_ids: tuple[int, ...]
    #: "cpu" when stored; "disk" when the CPU tier moved it there; None when it left the cache
    medium: str | None = "cpu"
    router_hashes: tuple[int, ...] = ()
    router_parent: int | None = None
    lora_name: str | None = None
    cache_salt: str | None = None

    def moved(self, medium: str | None) -> "StoredChunk":
        return dataclasses.replace(self, medium=medium)


@dataclass
class WorkerStats:
    loaded_tokens: int = 0
    failed_load_tokens: int = 0
    saved_chunks: int = 0
    stored_tokens: int = 0
    existing_chunks: int = 0
    dropped_chunks: int = 0
    save_errors: int = 0
    load_seconds: float = 0.0
    save_seconds: float = 0.0


class WorkerSide:
    """One worker's (TP rank's) copies between vLLM's paged KV memory and the cache engine.

    Invariants: a step's loads finish before its forward reads the blocks (or, layer by layer, before
    each layer's attention), and release their chunks after the forward; a save reads only blocks vLLM
    has finished writing (``wait_for_save`` runs after the forward) and holds nothing afterwards, so
    ``request_finished`` never has to delay a block free; every token that was promised but not loaded
    is reported as a load error (vLLM recomputes it). Lock rule: ``_events_lock`` guards the event
    lists, which eviction listeners fill from other threads.
    """

    def __init__(self, config: LMCacheConfig, view: ModelView, tp_rank: int, durable: bool = False,
                 kv_cache_dtype: str = "auto") -> None:
        self.config = config
        #: vLLM's CPU attention backend serves this worker: its blocks are packed (see cpu_layout); the connector
        #: sets it before register_kv_caches, when the model's attention layers exist
        self.cpu_attention = False
        self.cpu_isa: str | None = None  # the instruction set vLLM gave its CPU attention layers, where known
        self.kv_cache_dtype = kv_cache_dtype
        #: a prefill instance (kv_producer): a request's chunks must have reached every tier (the remote one the
        #: decode instances read) before its answer leaves, so saves wait for the write-back queues
        self.durable = durable
        self.view = view
        self.tp_rank = tp_rank
        self.head_range = view.head_range(tp_rank)
        self.saver = view.is_saver(tp_rank)
        self.kv: KVLayout | None = None
        self.engine: CacheEngine | None = None
        self.blend: "BlendWorker | None" = None  # enable_blending: set once the KV caches are registered
        self.stats = WorkerStats()
        self._load_errors: set[int] = set()
        self._stored: list[StoredChunk] = []
        # chunks this worker announced, so an eviction can be announced in vLLM's terms too (bounded: the
        # oldest announcements are forgotten first, and their evictions go unannounced)
        self._announced: OrderedDict[bytes, StoredChunk] = OrderedDict()
        self._events_lock = threading.Lock()
        #: layer-by-layer loads of this step (layerwise_load), finished after the forward
        self._inflight: list = []
        self._layer_index: dict[str, int] = {n: i for i, n in enumerate(view.layer_names)}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.view.layer_names if n not in kv_caches]
        if missing:
            raise LayoutError(f"vLLM registered no KV cache for layer {missing[0]!r} of the KV cache config: "
                              f"got {sorted(kv_caches)[:4]}...")
        layers = [kv_caches[n] for n in self.view.layer_names]
        if self.cpu_attention and self.view.geometry.kind == KIND_MHA:
            from lmcache.adapters.vllm.cpu_layout import cpu_block_area

            # vLLM's CPU attention packs each block its own way: measured, so chunks leave in the canonical format
            kv: KVLayout = cpu_block_area(layers, self.head_range[0], self.kv_cache_dtype, self.cpu_isa)
        else:
            kv = BlockPagedKV(layers, head_start=self.head_range[0])
        kv.check(self.view.geometry)  # one clear error now instead of one per step
        self.kv = kv
        self.engine = get_engine(self.config, self.view.identity, self.head_range, layers[0].device)
        if self.config.enable_blending:
            from lmcache.adapters.vllm.blend_worker import BlendWorker, blend_model_or_fail

            self.blend = BlendWorker(self.config, self.view, self.engine, kv, blend_model_or_fail(self.view.tp_size))
        if self.view.kv_events or self.config.router_events:
            self.engine.stack.eviction_listeners.append(self._on_evict)
            self.engine.stack.poll_evictions()  # mp mode: start reading the server's eviction log from now

    # -- per step -----------------------------------------------------------------------------------

    def load(self, plans: list[RequestPlan]) -> None:
        for plan in plans:
            if plan.load_end <= plan.load_start:
                continue
            if plan.blend is not None:
                self._load_blended(plan)
                continue
            slots = plan.slot_mapping(self.view.block_size, plan.load_end)
            slots[: plan.load_start] = -1  # vLLM computed (or prefix-cached) those itself
            n = plan.load_end // self.config.chunk_size
            t0 = time.perf_counter()
            try:
                # chunks wholly below load_start are vLLM's already: not read at all
                first = plan.load_start // self.config.chunk_size
                if self.config.layerwise_load:
                    inflight = self._engine().retrieve_chunks_by_layer(plan.chunk_keys[:n], self.kv, slots, first)
                    self._inflight.append(inflight)
                    loaded = inflight.end
                else:
                    loaded = self._engine().retrieve_chunks(plan.chunk_keys[:n], self.kv, slots, first=first)
            except Exception as e:  # the engine must go on: report the blocks, vLLM recomputes them
                log.error("lmcache: loading %s failed (%s: %s); its blocks are reported as load errors",
                          plan.req_id, type(e).__name__, e)
                loaded = 0
            good = max(loaded, plan.load_start)
            self.stats.loaded_tokens += good - plan.load_start
            self.stats.load_seconds += time.perf_counter() - t0
            if good > plan.load_start:
                log.info("lmcache: %s: loaded %d cached tokens [%d, %d) in %.1f ms", plan.req_id, good - plan.load_start,
                         plan.load_start, good, (time.perf_counter() - t0) * 1e3)
            if good < plan.load_end:
                self.stats.failed_load_tokens += plan.load_end - good
                self._load_errors |= plan.blocks_of(good, plan.load_end, self.view.block_size)
                log.warning("lmcache: %s: %d of %d cached tokens could not be loaded (evicted or corrupt since the "
                            "lookup)", plan.req_id, plan.load_end - good, plan.load_end - plan.load_start)

    def _load_blended(self, plan: RequestPlan) -> None:
        t0 = time.perf_counter()
        try:
            if self.blend is None:
                raise RuntimeError("a blended load reached a worker without blending")
            outcome = self.blend.load(plan)
        except Exception as e:  # the engine must go on: vLLM recomputes the region's blocks
            log.error("lmcache: blending %s failed (%s: %s); its blocks are reported as load errors", plan.req_id,
                      type(e).__name__, e)
            self.stats.failed_load_tokens += plan.load_end - plan.load_start
            self._load_errors |= plan.blocks_of(plan.load_start, plan.load_end, self.view.block_size)
            return
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.loaded_tokens += plan.load_end - plan.load_start
        self.stats.load_seconds += ms / 1e3
        log.info("lmcache: %s: blended tokens [%d, %d) in %.1f ms: %d from cached segments, %d recomputed",
                 plan.req_id, plan.load_start, plan.load_end, ms, outcome.from_cache, outcome.recomputed)

    def _save_blended(self, plan: RequestPlan) -> None:
        try:
            if self.blend is None:
                raise RuntimeError("a blended save reached a worker without blending")
            stored, existing = self.blend.save(plan)
        except Exception as e:  # a lost save is a future miss, never a failed request
            self.stats.save_errors += 1
            log.error("lmcache: saving the segments of %s failed (%s: %s)", plan.req_id, type(e).__name__, e)
            return
        self.stats.saved_chunks += stored
        self.stats.stored_tokens += stored * self.config.chunk_size
        self.stats.existing_chunks += existing
        if stored:
            log.info("lmcache: %s: stored %d segment chunks (%d cached already)", plan.req_id, stored, existing)
        if self.durable and stored:
            self._engine().flush()

    def wait_layer(self, layer_name: str) -> None:
        """Before layer ``layer_name``'s attention: its KV from this step's loads has arrived."""
        index = self._layer_index.get(layer_name)
        if index is not None:
            for inflight in self._inflight:
                inflight.wait_layer(index)

    def finish_loads(self) -> None:
        loads, self._inflight = self._inflight, []
        for inflight in loads:
            inflight.finish()

    def save(self, plans: list[RequestPlan]) -> None:
        cs = self.config.chunk_size
        for plan in plans:
            if plan.blend is not None:
                if plan.blend.save and self.saver:
                    self._save_blended(plan)
                continue
            if plan.save_end <= plan.save_first:
                continue
            stored: list[int] = []
            if self.saver:
                slots = plan.slot_mapping(self.view.block_size, plan.save_end * cs)
                t0 = time.perf_counter()
                try:
                    result = self._engine().store_chunks(plan.chunk_keys[: plan.save_end], self.kv, slots,
                                                         first=plan.save_first)
                except Exception as e:  # a lost save is a future miss, never a failed request
                    self.stats.save_errors += 1
                    log.error("lmcache: saving %s failed (%s: %s)", plan.req_id, type(e).__name__, e)
                    continue
                self.stats.saved_chunks += result.stored_chunks
                self.stats.stored_tokens += result.stored_tokens
                self.stats.save_seconds += time.perf_counter() - t0
                self.stats.existing_chunks += result.existing_chunks
                self.stats.dropped_chunks += result.dropped_chunks
                if result.stored_chunks or result.dropped_chunks:
                    log.info("lmcache: %s: stored %d tokens (%d chunks new, %d cached already, %d dropped) in %.1f ms",
                             plan.req_id, result.stored_tokens, result.stored_chunks, result.existing_chunks,
                             result.dropped_chunks, (time.perf_counter() - t0) * 1e3)
                stored = result.stored_indices
                if self.durable and result.stored_chunks:
                    self._engine().flush()
            else:
                stored = list(range(plan.save_first, plan.save_end))  # the saver rank stores these heads
            if plan.block_hashes or plan.router_hashes:
                with self._events_lock:
                    for chunk_index, event in zip(stored, self._events_for(plan, stored)):
                        self._stored.append(event)
                        self._announced[plan.chunk_keys[chunk_index]] = event
                        while len(self._announced) > MAX_ANNOUNCED:
                            self._announced.popitem(last=False)

    def _events_for(self, plan: RequestPlan, chunk_indices: list[int]) -> list[StoredChunk]:
        cs, bs = self.config.chunk_size, self.view.block_size
        per = cs // bs
        out = []
        for c in chunk_indices:
            j = c - plan.save_first
            blocks = slice(j * per, (j + 1) * per)
            out.append(StoredChunk(
                tuple(plan.block_hashes[blocks]),
                (plan.block_hashes[j * per - 1] if j > 0 else plan.parent_hash) if plan.block_hashes else None,
                tuple(plan.save_token_ids[j * cs : (j + 1) * cs]),
                router_hashes=tuple(plan.router_hashes[blocks]),
                router_parent=(plan.router_hashes[j * per - 1] if j > 0 else plan.router_parent)
                if plan.router_hashes else None,
                lora_name=plan.lora_name,
                cache_salt=plan.cache_salt,
            ))
        return out

    def _on_evict(self, okey, where: str | None) -> None:
        # runs in whichever thread made room in the CPU tier
        with self._events_lock:
            event = self._announced.pop(okey.chunk, None)
            if event is not None:
                if where == "disk":  # on disk before it leaves the CPU tier: the router never sees a gap
                    self._stored.append(event.moved("disk"))
                self._stored.append(event.moved(None))

    def _engine(self) -> CacheEngine:
        if self.engine is None:
            raise RuntimeError("lmcache: vLLM has not registered its KV caches with the connector yet")
        return self.engine

    # -- results vLLM collects after each step -------------------------------------------------------

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stored(self) -> list[StoredChunk]:
        """Chunk events since the last call, in order: stored (cpu), evicted from cpu (None), on disk."""
        if self.engine is not None and self._announced:  # mp mode: the server evicts, and keeps a log of it
            self.engine.stack.poll_evictions()
        with self._events_lock:
            stored, self._stored = self._stored, []
        return stored
