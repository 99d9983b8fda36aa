"""What the connector needs to know about the served model, read from vLLM's configs.

Both connector halves (scheduler and worker, often in different processes) derive the same identity,
layer order and head shards from the same ``vllm_config`` + ``kv_cache_config``, so they agree on
chunk keys without talking to each other. Attribute access only: this module imports nothing of vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmcache.core.config import LMCacheConfig, load_engine_config
from lmcache.core.geometry import KIND_MHA, KIND_MLA, KVGeometry, ModelIdentity

# kv_connector_extra_config keys this connector reads (besides lmcache config keys, see config_from)
#: keys of vLLM's stock LMCacheMPConnector (``lmcache.mp.host``/``port``; its timeouts are accepted and unused)
STOCK_MP_PREFIX = "lmcache.mp."

# vLLM KV cache specs the connector can store: plain full attention and MLA. Everything else needs
# the hybrid KV cache manager's per-group handling, which this connector does not claim (no SupportsHMA).
SUPPORTED_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")


class UnsupportedModel(ValueError):
    """The model's KV cache cannot be served by this connector; the message says what to change."""


@dataclass(frozen=True)
class ModelView:
    identity: ModelIdentity
    layer_names: tuple[str, ...]
    block_size: int
    tp_size: int
    kv_events: bool

    @property
    def geometry(self) -> KVGeometry:
        return self.identity.geometry

    def head_range(self, tp_rank: int) -> tuple[int, int]:
        """The KV heads a tensor-parallel rank holds (replicated heads: several ranks share one)."""
        total = self.geometry.num_kv_heads
        if total >= self.tp_size:
            per = total // self.tp_size
            return tp_rank * per, (tp_rank + 1) * per
        head = tp_rank * total // self.tp_size
        return head, head + 1

    def shard_ranges(self) -> list[tuple[int, int]]:
        """Every distinct head range of the TP group: a chunk is a hit only if all of them are cached."""
        return sorted({self.head_range(r) for r in range(self.tp_size)})

    def is_saver(self, tp_rank: int) -> bool:
        """Ranks holding the same heads as a lower rank do not store them again."""
        mine = self.head_range(tp_rank)
        return all(self.head_range(r) != mine for r in range(tp_rank))


def config_from(vllm_config: Any, env: dict | None = None) -> LMCacheConfig:
    """lmcache config for this engine: file (``lmcache.config_file`` in kv_connector_extra_config, else
    LMCACHE_CONFIG_FILE) < LMCACHE_* env < ``lmcache.<key>`` entries of kv_connector_extra_config."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    stock = {}
    if (STOCK_MP_PREFIX + "host" in extra or STOCK_MP_PREFIX + "port" in extra) and "lmcache.server_url" not in extra:
        # the stock LMCacheMPConnector's keys: host "tcp://localhost" and port 5555 unless given
        host = str(extra.get(STOCK_MP_PREFIX + "host", "tcp://localhost"))
        host = host if "://" in host else "tcp://" + host
        stock["server_url"] = f"{host}:{extra.get(STOCK_MP_PREFIX + 'port', 5555)}"
    return load_engine_config(extra, "kv_connector_extra_config", env, ignore_prefixes=(STOCK_MP_PREFIX,), overrides=stock)


def model_view(vllm_config: Any, kv_cache_config: Any, config: LMCacheConfig) -> ModelView:
    groups = list(kv_cache_config.kv_cache_groups)
    kinds = [type(g.kv_cache_spec).__name__ for g in groups]
    bad = [k for k in kinds if k not in SUPPORTED_SPECS]
    if bad or len(groups) != 1:
        fix = ("add --disable-hybrid-kv-cache-manager so every layer gets a full-attention KV cache"
               if all(k in SUPPORTED_SPECS + ("SlidingWindowSpec", "ChunkedLocalAttentionSpec") for k in kinds)
               else "this model's KV cache (Mamba/linear-attention state) cannot be cached by lmcache: drop the connector")
        raise UnsupportedModel(f"the model has {len(groups)} KV cache group(s) of kinds {', '.join(kinds)}; the lmcache "
                               f"connector serves one full-attention or MLA group only: {fix}")
    spec = groups[0].kv_cache_spec
    if getattr(spec, "sliding_window", None) or getattr(spec, "attention_chunk_size", None):
        raise UnsupportedModel("the model's layers use sliding-window or chunked-local attention in a full-attention "
                               "KV cache group: add --disable-hybrid-kv-cache-manager")
    model_config = vllm_config.model_config
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    if kinds[0] == "MLAAttentionSpec":
        geometry = KVGeometry(len(groups[0].layer_names), 1, spec.head_size, 0, spec.dtype, KIND_MLA)
    else:
        total = model_config.get_total_num_kv_heads()
        per_rank = spec.num_kv_heads
        if per_rank * tp_size < total or (total >= tp_size and per_rank * tp_size != total):
            raise UnsupportedModel(f"KV heads do not shard evenly: {total} heads, {per_rank} per rank at "
                                   f"tensor_parallel_size {tp_size}")
        v_dim = spec.head_size_v if getattr(spec, "head_size_v", None) else spec.head_size
        geometry = KVGeometry(len(groups[0].layer_names), total, spec.head_size, v_dim, spec.dtype, KIND_MHA)
    if config.chunk_size % spec.block_size:
        raise UnsupportedModel(f"chunk_size {config.chunk_size} is not a multiple of vLLM's block size {spec.block_size}: "
                               f"set lmcache chunk_size to e.g. {max(1, config.chunk_size // spec.block_size) * spec.block_size}")
    name = config.model_name or model_config.model
    events = getattr(vllm_config, "kv_events_config", None)
    return ModelView(
        identity=ModelIdentity(name, geometry),
        layer_names=tuple(groups[0].layer_names),
        block_size=spec.block_size,
        tp_size=tp_size,
        kv_events=bool(events and events.enable_kv_cache_events),
    )


def tp_rank_of(vllm_config: Any) -> int:
    """This worker's tensor-parallel rank: vLLM gives each worker process its own ``parallel_config.rank``."""
    pc = vllm_config.parallel_config
    return pc.rank % pc.tensor_parallel_size
