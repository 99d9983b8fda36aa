"""``LMCacheConnector``: vLLM's KV connector interface (``KVConnectorBase_V1``) onto the lmcache core.

vLLM creates one instance per role: SCHEDULER (lookups and plans) and WORKER (the copies). This class
only routes vLLM's calls to ``SchedulerSide`` / ``WorkerSide``; vLLM is imported here and nowhere in
the core.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVConnectorKVEvents, KVEventAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from lmcache.adapters.logs import follow_engine_logging
from lmcache.adapters.lookup_channel import LookupClient, LookupServer, channel_address
from lmcache.adapters.vllm.blend_scheduler import BlendScheduler
from lmcache.adapters.vllm.model import UnsupportedModel, config_from, model_view, tp_rank_of
from lmcache.adapters.vllm.plan import RequestPlan
from lmcache.adapters.vllm.scheduler_side import SchedulerSide
from lmcache.adapters.vllm.worker_side import WorkerSide
from lmcache.core.engine import CacheEngine
from lmcache.core.plugins import open_router_events
from lmcache.core.shared import find_engine

log = logging.getLogger("lmcache")
# vLLM's medium names (vllm.distributed.kv_events.MEDIUM_*): the CPU tier is "CPU", the disk tier "STORAGE"
MEDIUM = {"cpu": "CPU", "disk": "STORAGE"}


def check_blending(vllm_config: Any, view: Any) -> None:
    """enable_blending's preconditions, refused at start with the reason (the worker checks the model class)."""
    from lmcache.core.geometry import KIND_MLA

    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
        raise UnsupportedModel(f"enable_blending runs the model's layers inside the connector, which needs "
                               f"tensor_parallel_size 1 and pipeline_parallel_size 1 (got {pc.tensor_parallel_size}, "
                               f"{pc.pipeline_parallel_size}): drop enable_blending or serve on one device")
    if view.geometry.kind == KIND_MLA:
        raise UnsupportedModel("enable_blending re-rotates per-head keys; this model stores latent (MLA) KV: drop enable_blending")
    archs = list(getattr(vllm_config.model_config.hf_config, "architectures", None) or [])
    from lmcache.adapters.vllm.blend_registry import SUPPORTED_ARCHITECTURES, TESTED_VLLM

    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedModel(f"enable_blending supports {', '.join(SUPPORTED_ARCHITECTURES)} (vLLM "
                               f"{', '.join(TESTED_VLLM)}); this model is {', '.join(archs) or 'of no known architecture'}: "
                               "drop enable_blending")


def separator_ids(vllm_config: Any, text: str) -> list[int]:
    """The token ids of ``blend_special_str`` with the served model's tokenizer."""
    from transformers import AutoTokenizer

    mc = vllm_config.model_config
    try:
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code,
                                            revision=getattr(mc, "tokenizer_revision", None))
    except Exception as e:
        raise UnsupportedModel(f"enable_blending: the tokenizer {mc.tokenizer!r} could not be loaded to find "
                               f"blend_special_str {text!r} ({type(e).__name__}: {e})") from e
    ids = list(tok.encode(text, add_special_tokens=False))
    if not ids:
        raise UnsupportedModel(f"blend_special_str {text!r} has no tokens with this tokenizer: set it to a text it keeps")
    return ids


def offset_port(endpoint: str, dp_rank: int) -> str:
    """Data-parallel rank r publishes on port + r, as vLLM's own KV-event publisher does."""
    if dp_rank <= 0 or not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + dp_rank}" if port.isdigit() else endpoint


class LMCacheConnectorMetadata(KVConnectorMetadata):
    def __init__(self, plans: list[RequestPlan]) -> None:
        self.plans = plans


class LMCacheKVEvents(KVConnectorKVEvents):
    """Workers' ``StoredChunk`` events, kept by the scheduler only when every worker reported them (all TP
    shards stored); the scheduler turns them into vLLM events and router events."""

    def __init__(self, num_workers: int = 1) -> None:
        self._aggregator = KVEventAggregator(num_workers)

    def add_events(self, events):
        self._aggregator.add_events(events)

    def aggregate(self):
        common = self._aggregator.get_common_events()
        self._aggregator.clear_events()
        self._aggregator.add_events(common)
        self._aggregator.reset_workers()
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._aggregator.increment_workers(count)

    def get_all_events(self):
        return self._aggregator.get_all_events()

    def get_number_of_workers(self) -> int:
        return self._aggregator.get_number_of_workers()

    def clear_events(self) -> None:
        self._aggregator.clear_events()
        self._aggregator.reset_workers()


class LMCacheConnector(KVConnectorBase_V1):
    #: the lmcache ``mode`` this class forces (None: whatever the config says)
    forced_mode: str | None = None

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = config_from(vllm_config)
        follow_engine_logging(config.log_level, "vllm")
        if self.forced_mode and config.mode != self.forced_mode:
            config = config.replace(mode=self.forced_mode)
        if kv_cache_config is None:
            raise UnsupportedModel("vLLM passed no kv_cache_config to the connector: this vLLM is older than the "
                                   "0.33 interface lmcache supports (run 'lmcache doctor')")
        self.config = config
        self.view = model_view(vllm_config, kv_cache_config, config)
        kv_role = self._kv_transfer_config.kv_role
        if config.enable_blending:
            check_blending(vllm_config, self.view)
        self._scheduler: SchedulerSide | BlendScheduler | None = None
        self._worker: WorkerSide | None = None
        self._events: LMCacheKVEvents | None = None
        self._lookup_engine: CacheEngine | None = None
        self._lookup_client: LookupClient | None = None
        self._lookup_server: LookupServer | None = None
        self._reported: dict[str, float] | None = None  # worker figures at the last stats report
        self._router = None
        dp_rank = getattr(getattr(vllm_config, "parallel_config", None), "data_parallel_rank", 0) or 0
        self._channel = channel_address(str(self._kv_transfer_config.engine_id), dp_rank)
        if role == KVConnectorRole.SCHEDULER:
            save = kv_role in ("kv_both", "kv_producer")
            if save and config.router_events:
                # one publisher per engine: the scheduler hears every worker's stores and evictions
                self._router = open_router_events(
                    config.replace(router_events_endpoint=offset_port(config.router_events_endpoint, dp_rank)),
                    self.view.block_size)
            if config.enable_blending:
                from lmcache.adapters.vllm.blend_scheduler import BlendScheduler

                self._scheduler = BlendScheduler(config, self.view, self._make_lookup(),
                                                 separator_ids(vllm_config, config.blend_special_str),
                                                 load=kv_role in ("kv_both", "kv_consumer"), save=save)
            else:
                self._scheduler = SchedulerSide(config, self.view, self._make_lookup(),
                                                load=kv_role in ("kv_both", "kv_consumer"), save=save,
                                                router_hash=self._router.block_hashes if self._router else None)
        else:
            self._worker = WorkerSide(config, self.view, tp_rank_of(vllm_config), durable=kv_role == "kv_producer",
                                      kv_cache_dtype=str(getattr(vllm_config.cache_config, "cache_dtype", "auto")))
        log.info("lmcache connector (%s, %s mode): model %s, %d layers, chunk %d tokens", role.name.lower(),
                 config.mode, self.view.identity.model_name, self.view.geometry.num_layers, config.chunk_size)

    def _make_lookup(self):
        view, config = self.view, self.config
        shards = view.shard_ranges()
        if config.mode == "mp":
            # the scheduler asks the server directly; it holds no pool of its own
            self._lookup_engine = CacheEngine(config, view.identity, device="cpu", head_range=view.head_range(0))
            return lambda keys: self._lookup_engine.lookup_chunks(keys, shards)
        if view.tp_size > 1:
            raise UnsupportedModel(
                f"tensor_parallel_size {view.tp_size} with lmcache mode 'inproc': each worker process would own a "
                "pool the scheduler cannot see. Start 'lmcache server' and set mode: mp (kv_connector_extra_config "
                "{\"lmcache.mode\": \"mp\"} or LMCACHE_MODE=mp)")
        # the pool is the worker's: in its process when the executor keeps one process, else asked over the
        # worker's lookup channel (lmcache.adapters.lookup_channel)
        self._lookup_client = LookupClient(self._channel, config.remote_timeout_s)

        def lookup(keys: list[bytes]) -> int:
            engine = find_engine(config, view.identity, view.head_range(0))
            if engine is not None:
                return engine.lookup_chunks(keys, shards)
            return self._lookup_client(keys, shards)

        return lookup

    # ============================== scheduler side ==============================

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return LMCacheConnectorMetadata(self._scheduler.build_plans(scheduler_output))

    def reset_cache(self) -> bool:
        """vLLM resets its prefix cache with the connector's (notably around weight updates): see SchedulerSide.reset."""
        if self._scheduler is not None:
            self._scheduler.reset()
        return True

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler.request_finished(request)
        return False, None

    def update_connector_output(self, connector_output) -> None:
        events = getattr(connector_output, "kv_cache_events", None)
        if isinstance(events, LMCacheKVEvents):
            if self._events is None:
                self._events = events
            else:
                self._events.add_events(events.get_all_events())
                self._events.increment_workers(events.get_number_of_workers())

    def take_events(self) -> Iterable[Any]:
        if self._events is None:
            return
        self._events.aggregate()
        chunks = self._events.get_all_events()
        self._events.clear_events()
        self._events = None
        for chunk in chunks:
            if self._router is not None and chunk.router_hashes:
                self._publish_router(chunk)
            if self.view.kv_events and chunk.block_hashes:
                yield self._vllm_event(chunk)

    def _publish_router(self, chunk) -> None:
        try:
            if chunk.medium is None:
                self._router.removed(list(chunk.router_hashes), "cpu")
            else:
                self._router.stored(list(chunk.router_hashes), chunk.router_parent, list(chunk.token_ids),
                                    chunk.medium, chunk.lora_name, chunk.cache_salt)
        except Exception as e:  # routing hints are advisory: never fail a step over one
            log.warning("lmcache: router event not published: %s: %s", type(e).__name__, e)

    def _vllm_event(self, chunk) -> Any:
        hashes = [maybe_convert_block_hash(h) for h in chunk.block_hashes]
        if chunk.medium is None:
            return BlockRemoved(block_hashes=hashes, medium=MEDIUM["cpu"])
        return BlockStored(
            block_hashes=hashes,
            parent_block_hash=maybe_convert_block_hash(chunk.parent_hash) if chunk.parent_hash else None,
            token_ids=list(chunk.token_ids),
            block_size=self.view.block_size,
            lora_id=None,
            medium=MEDIUM[chunk.medium],
            lora_name=None,
        )

    # ============================== worker side ==============================

    def register_kv_caches(self, kv_caches) -> None:
        from lmcache.adapters.vllm.cpu_layout import cpu_attention

        # the model's attention layers exist by now: they say whether vLLM's CPU backend packs the blocks, and how
        self._worker.cpu_attention, self._worker.cpu_isa = cpu_attention(self._vllm_config, self.view.layer_names)
        self._worker.register_kv_caches(kv_caches)
        engine = self._worker.engine
        if self.config.mode == "inproc" and engine is not None and self._lookup_server is None:
            # the scheduler may run in another process: it asks this worker's pool through the channel
            self._lookup_server = LookupServer(self._channel, engine.lookup_chunks)
        if engine is not None:
            c = self.config
            tiers = " -> ".join(["cpu " + f"{c.max_cpu_size_gb:g} GiB"] + (["disk"] if c.local_disk_path else [])
                                + [u.split("://")[0] for u in c.remote_url.split()])
            log.info("lmcache: worker rank %d ready: mode %s%s, tiers %s, chunk %d tokens, backend %s%s",
                     self._worker.tp_rank, c.mode, f" ({c.server_url})" if c.mode == "mp" else "",
                     "server's" if c.mode == "mp" else tiers, c.chunk_size, engine.backend.name,
                     f", lookups served on {self._channel}" if self._lookup_server else "")

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._worker.load(self._plans())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # layerwise_load: this layer's copies were queued by start_load_kv; otherwise all are done already
        self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None  # all layers are stored together in wait_for_save, after the forward wrote them

    def wait_for_save(self) -> None:
        self._worker.finish_loads()  # the forward is over: this step's loads are complete, their chunks free
        self._worker.save(self._plans())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker else set()

    def get_kv_connector_stats(self):
        """The worker's figures since the last call, for vLLM's metrics (rank 0 only: see stats.py)."""
        if self._worker is None or self._worker.tp_rank != 0:
            return None
        from lmcache.adapters.vllm.stats import FIELDS, LMCacheConnectorStats

        figures = dataclasses.asdict(self._worker.stats)
        now = {key: figures[key] for key in FIELDS}
        last = self._reported or {key: 0 for key in FIELDS}
        self._reported = now
        stats = LMCacheConnectorStats(data={key: now[key] - last[key] for key in FIELDS})
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from lmcache.adapters.vllm.stats import LMCacheConnectorStats

        return LMCacheConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from lmcache.adapters.vllm.stats import LMCachePromMetrics

        return LMCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_kv_cache_events(self) -> LMCacheKVEvents | None:
        stored = self._worker.take_stored() if self._worker else []
        if not stored:
            return None
        events = LMCacheKVEvents(num_workers=1)
        events.add_events(stored)
        return events

    def _plans(self) -> list[RequestPlan]:
        if not self.has_connector_metadata():
            return []
        meta = self._get_connector_metadata()
        return meta.plans if isinstance(meta, LMCacheConnectorMetadata) else []

    # ============================== both ==============================

    def shutdown(self) -> None:
        if self._router is not None:
            self._router.close()
            self._router = None
        if self._lookup_engine is not None:
            self._lookup_engine.close()
            self._lookup_engine = None
        if self._lookup_client is not None:
            self._lookup_client.close()
            self._lookup_client = None
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self._worker is not None and self._worker.engine is not None:
            self._worker.engine.flush()
