"""The config keys of the peer project (LMCache 0.5.x), which users arrive with.

Its docs tell users to set keys in YAML, as ``LMCACHE_<KEY>`` environment variables and as ``lmcache.<key>``
engine extra-config entries; one stale variable must not stop every command. So each peer key is either
*mapped* to ours (with its value converted), *ignored with a warning* (a meaning we do not have, or not
yet), and only keys nobody knows stay errors. Warnings are logged once per key per process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("lmcache")


def _same(value: Any) -> Any:
    return value


def _strip_file_scheme(value: Any) -> Any:
    text = str(value)
    return text[len("file://"):] if text.startswith("file://") else text


def _remote_scheme(value: Any) -> Any:
    text = str(value)
    return "redis+cluster://" + text[len("redis-cluster://"):] if text.startswith("redis-cluster://") else text


def _first(value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith("["):
        value = [v for v in value.strip("[] ").split(",") if v.strip()]
    return value[0] if isinstance(value, (list, tuple)) and value else value


@dataclass(frozen=True)
class Mapped:
    """A peer key with a meaning here: ``ours`` takes ``convert(value)``; ``note`` is said once."""

    ours: str
    convert: Callable[[Any], Any] = _same
    note: str = ""


#: peer key -> ours
MAPPED: dict[str, Mapped] = {
    "max_local_cpu_size": Mapped("max_cpu_size_gb", note="GB in the peer, GiB here"),
    "local_disk": Mapped("local_disk_path", _strip_file_scheme),
    "max_local_disk_size": Mapped("max_local_disk_size_gb", note="GB in the peer, GiB here"),
    "use_layerwise": Mapped("layerwise_load"),
    "cache_policy": Mapped("eviction_policy"),
    "remote_url": Mapped("remote_url", _remote_scheme),
    "blend_recompute_ratios": Mapped("blend_recompute_ratio", _first, "the peer takes a list; the first ratio is used"),
    "blend_check_layers": Mapped("blend_check_layer", _first, "the peer takes a list; the first layer is used"),  # the peer's redis-cluster:// is our redis+cluster://
}

#: peer keys whose peer default is what lmcache always does: accepted silently at that value, warned otherwise
FIXED: dict[str, tuple[bool, str]] = {
    "local_cpu": (True, "lmcache always keeps a CPU tier (chunks are assembled there); make it small with "
                        "max_cpu_size_gb instead"),
    "save_unfull_chunk": (False, "lmcache never stores partial chunks (no partial object can be loaded for the wrong "
                                 "tokens); at most chunk_size - 1 tokens are recomputed"),
}

#: peer keys with no meaning here (yet): ignored with a warning naming why
IGNORED: dict[str, str] = {
    **{k: "telemetry/usage reporting: lmcache sends nothing anywhere" for k in ("track_usage",)},
    **{k: "no experimental switch: what lmcache has is on" for k in ("use_experimental",)},
    **{k: "blending selects tokens by ratio (blend_recompute_ratio), not by thresholds" for k in ("blend_thresholds",)},
    **{k: "disaggregated prefill goes through the pool here, not a NIXL channel: start the instances with "
          "'lmcache launch-flags vllm --role pd' (kv_producer / kv_consumer) and put 'lmcache pd-proxy' in front" for k in (
        "enable_pd", "pd_role", "pd_buffer_size", "pd_buffer_device", "pd_peer_host", "pd_peer_init_port",
        "pd_peer_alloc_port", "pd_proxy_host", "pd_proxy_port", "nixl_buffer_size", "nixl_buffer_device",
        "transfer_channel")},
    **{k: "peer-to-peer sharing and the controller are not supported: use lmcache server or a remote tier" for k in (
        "enable_p2p", "p2p_host", "p2p_init_ports", "p2p_lookup_ports", "enable_controller", "lmcache_instance_id",
        "controller_url", "controller_pull_url", "controller_reply_url", "lmcache_worker_ports", "lmcache_worker_ids")},
    **{k: "objects are always stored in the canonical format (no serde choice)" for k in ("remote_serde",)},
    **{k: "GPUDirect Storage is not supported" for k in ("gds_path", "cufile_buffer_size")},
    **{k: "the peer's internal API server is not part of lmcache (see lmcache server's HTTP API)" for k in (
        "internal_api_server_enabled", "internal_api_server_host", "internal_api_server_port_start",
        "internal_api_server_include_index_list", "internal_api_server_socket_path_prefix")},
    **{k: "not needed here" for k in (
        "save_decode_cache", "min_retrieve_tokens", "blocking_timeout_secs", "py_enable_gc", "numa_mode",
        "enable_async_loading", "priority_limit", "external_lookup_client", "lookup_timeout_ms", "extra_config",
        "audit_actual_remove", "error_handling", "enable_scheduler_bypass_lookup", "external_backends",
        "storage_plugins", "plugin_locations", "enable_lazy_memory_allocator", "lazy_memory_initial_ratio",
        "lazy_memory_step_ratio", "save_only_first_rank", "hit_miss_ratio", "lookup_server_worker_ids")},
}

PEER_KEYS = set(MAPPED) | set(FIXED) | set(IGNORED)
_said: set[str] = set()


def _once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        log.warning("lmcache: %s", message)


def translate(key: str, value: Any, source: str, our_keys: set[str]) -> tuple[str, Any] | None:
    """(our key, value) for a peer key, or None when it has no effect here (warned once). Only called for
    keys that are not ours, except ``remote_url`` whose peer spellings are converted."""
    if key in MAPPED:
        m = MAPPED[key]
        if key not in our_keys:
            _once(key, f"config key '{key}' (from {source}) is LMCache's name for '{m.ours}'; using it as that"
                       + (f" ({m.note})" if m.note else ""))
        return m.ours, m.convert(value)
    if key in FIXED:
        default, why = FIXED[key]
        if str(value).strip().lower() not in (str(default).lower(), "1" if default else "0"):
            _once(key, f"config key '{key}' = {value!r} (from {source}) is ignored: {why}")
        return None
    if key in IGNORED:
        _once(key, f"config key '{key}' (from {source}) is LMCache's and is ignored here: {IGNORED[key]}")
        return None
    return None
