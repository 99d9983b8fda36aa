"""Loads built-in and outside plugins and collects what they register, keeping failures visible."""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from lmcache.core import hookspecs

log = logging.getLogger("lmcache")

# Built-ins register through the same hooks as outside packages.
BUILTIN_PLUGINS = ("lmcache.hardware.cpu", "lmcache.hardware.cuda", "lmcache.hardware.rocm", "lmcache.hardware.ascend",
                   "lmcache.core.tiers.stack", "lmcache.core.tiers.redis_tier", "lmcache.core.tiers.s3_spec",
                   "lmcache.server.client",
                   "lmcache.adapters.vllm", "lmcache.adapters.sglang", "lmcache.adapters.dynamo")
ENTRY_POINT_GROUP = "lmcache"


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    error: str


@dataclass
class Registry:
    hardware: dict[str, hookspecs.HardwareBackend] = field(default_factory=dict)
    tiers: dict[str, hookspecs.StorageTierSpec] = field(default_factory=dict)
    adapters: dict[str, hookspecs.EngineAdapterSpec] = field(default_factory=dict)
    routers: dict[str, hookspecs.RouterEventsSpec] = field(default_factory=dict)
    stores: dict[str, hookspecs.ChunkStoreSpec] = field(default_factory=dict)
    #: plugin name -> where it came from ("builtin" or "entry point <dist>")
    plugins: dict[str, str] = field(default_factory=dict)
    #: which plugin registered each name, per kind
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)


def _load_plugins(pm: pluggy.PluginManager, registry: Registry) -> None:
    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        registry.plugins[modname] = "builtin"
    pm.check_pending()  # a built-in hook implementation without a hookspec is our bug: fail loudly
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point of {ep.dist.name if ep.dist else '?'}"
        try:
            obj = ep.load()
            pm.register(obj, name=ep.name)
            try:
                pm.check_pending()  # a misspelt lmcache_* hook would otherwise be silently never called
            except pluggy.PluginValidationError as e:
                pm.unregister(name=ep.name)
                raise ValueError(f"{e}; known hooks: {', '.join(sorted(n for n in dir(hookspecs) if n.startswith('lmcache_')))}") from None
        except Exception as e:  # a broken plugin must not take the rest down
            registry.failures.append(PluginFailure(ep.name, f"failed to load ({ep.value}): {type(e).__name__}: {e}"))
            log.error("lmcache plugin %r failed to load (%s): %s: %s", ep.name, ep.value, type(e).__name__, e)
            continue
        registry.plugins[ep.name] = origin


def _collect(pm: pluggy.PluginManager, registry: Registry, hook: str, kind: str, target: dict[str, Any],
             name_attr: str) -> None:
    for impl in getattr(pm.hook, hook).get_hookimpls():  # registration order: built-ins first
        try:
            items = impl.function() or []
        except Exception as e:
            registry.failures.append(PluginFailure(impl.plugin_name, f"{hook} raised {type(e).__name__}: {e}"))
            continue
        for item in items:
            name = getattr(item, name_attr, None)
            if not isinstance(name, str) or not name:
                registry.failures.append(PluginFailure(impl.plugin_name, f"{hook} returned {item!r} without a {name_attr}"))
                continue
            owner = registry.owners.get((kind, name))
            if owner is not None:
                registry.failures.append(PluginFailure(
                    impl.plugin_name,
                    f"{kind} name '{name}' is already registered by plugin '{owner}': rename it in the plugin"))
                log.error("lmcache plugin %r: %s '%s' already registered by %r; ignored", impl.plugin_name, kind, name, owner)
                continue
            registry.owners[(kind, name)] = impl.plugin_name
            target[name] = item


def build_registry() -> Registry:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    _load_plugins(pm, registry)
    _collect(pm, registry, "lmcache_hardware_backends", "hardware backend", registry.hardware, "name")
    _collect(pm, registry, "lmcache_storage_tiers", "storage tier", registry.tiers, "scheme")
    _collect(pm, registry, "lmcache_engine_adapters", "engine adapter", registry.adapters, "name")
    _collect(pm, registry, "lmcache_router_events", "router events", registry.routers, "name")
    _collect(pm, registry, "lmcache_chunk_stores", "chunk store", registry.stores, "mode")
    return registry


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry(refresh: bool = False) -> Registry:
    global _registry
    with _lock:
        if _registry is None or refresh:
            _registry = build_registry()
        return _registry


def select_backend(name: str, device_type: str, registry: Registry | None = None) -> Any:
    """The hardware backend for KV memory on ``device_type``: the named one, or the best available."""
    registry = registry or get_registry()
    if name != "auto":
        backend = registry.hardware.get(name)
        if backend is None:
            raise ValueError(f"device_backend '{name}' is not registered: choose auto or one of {', '.join(sorted(registry.hardware))}")
        ok, why = backend.available()
        if not ok:
            raise ValueError(f"device_backend '{name}' is not usable here: {why}")
        if device_type not in backend.device_types:
            raise ValueError(f"device_backend '{name}' handles {', '.join(backend.device_types)} tensors, not {device_type}")
        return backend
    candidates = [b for b in registry.hardware.values() if device_type in b.device_types and b.available()[0]]
    if not candidates:
        raise ValueError(f"no hardware backend can handle KV memory on '{device_type}'; registered: {', '.join(sorted(registry.hardware))}")
    best = max(candidates, key=lambda b: b.priority)
    if best.name == "cpu" and device_type != "cpu":
        why = "; ".join(f"{b.name}: {b.available()[1]}" for b in registry.hardware.values()
                        if device_type in b.device_types and b.name != "cpu") or "none is installed"
        log.warning("lmcache: no accelerator backend for %s tensors is available (%s); using the torch reference "
                    "ops of the 'cpu' backend, which are correct but slower ('lmcache doctor' has more)",
                    device_type, why)
    return best


def open_store(request: Any, registry: Registry | None = None) -> Any:
    """The chunk store for ``request.config.mode`` (``lmcache.core.store``), from whichever plugin provides it."""
    registry = registry or get_registry()
    spec = registry.stores.get(request.config.mode)
    if spec is None:
        raise ValueError(f"mode '{request.config.mode}': no chunk store is registered for it; registered modes: "
                         f"{', '.join(sorted(registry.stores)) or '(none)'}")
    return spec.factory(request)


def open_router_events(config: Any, block_size: int, registry: Registry | None = None) -> Any:
    """The publisher named by ``router_events`` for an engine of ``block_size``-token blocks (None: off)."""
    if not config.router_events:
        return None
    registry = registry or get_registry()
    spec = registry.routers.get(config.router_events)
    if spec is None:
        raise ValueError(f"router_events '{config.router_events}' is not registered: set it to empty (off) or one of "
                         f"{', '.join(sorted(registry.routers)) or '(none)'}")
    return spec.factory(config, block_size)
