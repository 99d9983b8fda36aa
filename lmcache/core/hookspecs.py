"""The whole contract between the core and its edges, as pluggy hooks.

Engine adapters, hardware backends and storage tiers register through these hooks; built-ins do it
the same way as outside packages, which list a module (or object) with hook implementations under the
``lmcache`` entry-point group:

    [project.entry-points.lmcache]
    acme = "acme_lmcache.plugin"

Each hook returns a list of the small objects defined here. Names must be unique across plugins; a
plugin that fails to import, raises, or reuses a taken name is reported (``lmcache doctor``) and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import pluggy

from lmcache.core.store import ChunkStoreSpec

__all__ = ["ChunkStoreSpec"]  # part of the hook contract: lmcache_chunk_stores returns these

if TYPE_CHECKING:
    import torch

    from lmcache.core.chunk_format import ChunkHeader
    from lmcache.core.config import LMCacheConfig
    from lmcache.core.convert import SlotPlan
    from lmcache.core.keys import ObjectKey
    from lmcache.core.layouts import KVLayout
    from lmcache.core.memory_pool import MemoryObj
    from lmcache.core.tiers.stats import TierStats

PROJECT = "lmcache"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@runtime_checkable
class HardwareBackend(Protocol):
    """Moves tokens between an engine's paged KV memory and canonical chunks on one kind of device."""

    name: str
    #: tensor device types (torch.device.type) whose KV memory this backend can read and write
    device_types: tuple[str, ...]
    #: among backends that can serve a device type, "auto" picks the highest priority that is available
    priority: int

    def available(self) -> tuple[bool, str]:
        """(usable here, one line saying why or why not): shown by ``lmcache doctor``."""

    def alloc_host(self, nbytes: int, pin: bool) -> "torch.Tensor":
        """A uint8 host buffer for the CPU tier, page-locked when ``pin``."""

    def gather(self, kv: "KVLayout", jobs: list[tuple["SlotPlan", "torch.Tensor"]]) -> None:
        """For each (slots, canonical chunk tensor): copy those tokens of every layer into the chunk."""

    def scatter(self, kv: "KVLayout", jobs: list[tuple["SlotPlan", "torch.Tensor"]]) -> None:
        """For each (slots, canonical chunk tensor): copy the chunk into those slots of every layer."""

    def synchronize(self) -> None:
        """Wait until every copy issued so far has finished."""

    # Optional, for layer-by-layer loads (``layerwise_load``); a backend without them loads all layers at once:
    #   scatter_by_layer(kv, jobs) -> [event per layer]: issue every layer's scatter in layer order, asynchronously
    #   wait_event(event): make the caller's current stream (the forward pass) wait for that layer


class TierUnavailable(RuntimeError):
    """A tier cannot work with its configuration (raised by a tier's constructor); the message names the
    setting and the fix. The stack runs on without that tier and says why (``tier_problems``)."""


@runtime_checkable
class StorageTier(Protocol):
    """A tier below the CPU tier. It stores objects in the canonical chunk format
    (``lmcache.core.chunk_format``) and verifies them on every read: a bad object is a miss. Calls come
    from the engine's thread, the stack's reader threads and the tier's write-back thread(s), so a tier must
    be thread-safe.

    Optional capabilities, each its own protocol below (a minimal tier need not have them):
    ``BatchLookup.contains_many`` (one round trip for a whole prompt; default: ``contains`` per key),
    ``PrefixLookup.leading`` (a prompt's cached run found in a few round trips),
    ``RangedLoad.load_heads`` (read a head sub-range of an object for an engine of another TP size; default:
    the whole object is read and sliced), ``Pingable.ping`` (``lmcache doctor`` checks reachability),
    ``Diagnosable.diagnose`` (doctor's finer checks) and ``ParallelWrites.write_workers`` (several write-back
    threads).

    ``put`` gets the sealed header (header + head checksum table) and the payload; a tier that splits the
    payload records its part size in the header (``part_nbytes``) so every reader finds every part."""

    name: str
    stats: "TierStats"

    def contains(self, key: "ObjectKey") -> bool: ...

    def load(self, key: "ObjectKey", alloc: Callable[[int], "MemoryObj | None"]) -> "tuple[ChunkHeader, MemoryObj] | None":
        """(header, memory object from ``alloc(payload_nbytes)`` filled and verified), or None."""

    def put(self, key: "ObjectKey", header: bytes, payload: memoryview) -> bool: ...

    def remove(self, key: "ObjectKey") -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchLookup(Protocol):
    """A tier that answers many membership questions in one round trip, each exactly."""

    def contains_many(self, keys: list["ObjectKey"]) -> list[bool]: ...


@runtime_checkable
class PrefixLookup(Protocol):
    """A tier that finds how far a prompt's chunks reach faster than by asking for each one (an object store
    with no batched existence check). The stack asks it only about a prompt's chunks, in order."""

    def leading(self, keys: list["ObjectKey"]) -> int:
        """How many of ``keys`` (a prompt's chunks, in order) are stored before the first absent one. A tier may
        take the stored ones to form a prefix; a hole it steps over is found at load time."""


#: dest(header of the stored object) -> where its requested heads go (exactly that many bytes), or None: no room
HeadDest = Callable[["ChunkHeader"], "memoryview | None"]


@runtime_checkable
class RangedLoad(Protocol):
    """A tier that reads a head sub-range of a stored object without reading the rest of it."""

    def load_heads(self, key: "ObjectKey", head_start: int, head_end: int, dest: HeadDest) -> "ChunkHeader | None":
        """Read heads [head_start, head_end) (absolute head indices within ``key``'s range) into
        ``dest(header)``, verified against the object's head checksums; the object's header, or None on a
        miss, corruption (deleted, counted) or no room."""


@runtime_checkable
class Pingable(Protocol):
    """A tier whose reachability can be checked."""

    def ping(self) -> bool:
        """True when the store answers within the tier's timeout."""

    def safe_url(self) -> str:
        """Where the tier points, secrets masked (for messages)."""


@runtime_checkable
class ParallelWrites(Protocol):
    """A tier whose stores gain from several objects in flight (an object store): its write-back runs
    ``write_workers`` threads instead of one; ``put`` must be safe to call from all of them at once."""

    write_workers: int


@runtime_checkable
class Diagnosable(Protocol):
    """A tier that can say what is wrong with its store (``lmcache doctor``), beyond whether it answers."""

    def diagnose(self) -> list[tuple[str, str, str]]:
        """(status "ok"|"warn"|"fail", what was found, one-line fix) per aspect checked (endpoint,
        credentials, permissions...); it may write and delete a probe object."""


@dataclass(frozen=True)
class StorageTierSpec:
    """A storage tier reachable by URL scheme (``remote_url: scheme://...``)."""

    scheme: str
    #: factory(url, config) -> a StorageTier (checked against the protocol when opened)
    factory: Callable[[str, "LMCacheConfig"], StorageTier]
    doc: str = ""


@dataclass(frozen=True)
class InterfaceSpec:
    """An engine base class an adapter implements: ``lmcache doctor`` compares the installed engine's
    abstract methods and signatures with the adapter's at run time, so engine drift is reported."""

    #: "module:QualName" of the engine's base class (imported only if the engine is installed)
    base: str
    #: "module:QualName" of the adapter's class implementing it
    impl: str


@dataclass(frozen=True)
class EngineAdapterSpec:
    """An inference engine's adapter: how to launch the engine with lmcache and what to check."""

    name: str
    #: the engine's Python distribution (e.g. "vllm"); imported only when the adapter is used
    engine_package: str
    doc: str = ""
    #: launch_flags(config, model, options) -> [(label, command line), ...] that enable lmcache; options
    #: holds "config_path" (the file the config came from, or None) and "engine" (for multi-engine frontends)
    launch_flags: Callable[["LMCacheConfig", str, dict[str, Any]], list[tuple[str, str]]] | None = None
    #: check() -> list of (status "ok"|"warn"|"fail", what was found, one-line fix)
    check: Callable[[], list[tuple[str, str, str]]] | None = None
    #: engine base classes the adapter implements (checked for drift by ``lmcache doctor``)
    interfaces: tuple[InterfaceSpec, ...] = ()
    #: supported engine versions, a PEP 440 specifier such as "==0.33.*"
    supported_versions: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RouterEventPublisher(Protocol):
    """Tells a KV-aware router which prompt prefixes this engine's lmcache tiers hold.

    Hashes are the router's own, for blocks of ``block_size`` tokens (the router's block size, which is the
    engine's): the adapter asks ``block_hashes`` for them, keeps them with the chunk, and passes them back on
    store and eviction. ``tier`` is "cpu" or "disk". Calls may come from any thread."""

    block_size: int

    def block_hashes(self, token_ids: list[int], parent: int | None, lora_name: str | None = None,
                     cache_salt: str | None = None) -> list[int]:
        """The router's chained hashes of each full block of ``token_ids``, continuing from ``parent``, in the
        request's namespace (LoRA adapter, cache salt)."""

    def stored(self, block_hashes: list[int], parent: int | None, token_ids: list[int], tier: str,
               lora_name: str | None = None, cache_salt: str | None = None) -> None: ...

    def removed(self, block_hashes: list[int], tier: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RouterEventsSpec:
    """A KV-aware router lmcache can publish events to (``router_events: <name>``)."""

    name: str
    #: factory(config, block_size) -> a RouterEventPublisher (opened by the engine adapter that has tokens)
    factory: Callable[["LMCacheConfig", int], RouterEventPublisher]
    doc: str = ""


@hookspec
def lmcache_hardware_backends() -> list[HardwareBackend]:
    """Return the hardware backends this plugin provides."""
    raise NotImplementedError  # a specification: plugins implement it, pluggy never calls this


@hookspec
def lmcache_storage_tiers() -> list[StorageTierSpec]:
    """Return the storage tiers (by URL scheme) this plugin provides."""
    raise NotImplementedError  # a specification: plugins implement it, pluggy never calls this


@hookspec
def lmcache_engine_adapters() -> list[EngineAdapterSpec]:
    """Return the engine adapters this plugin provides."""
    raise NotImplementedError  # a specification: plugins implement it, pluggy never calls this


@hookspec
def lmcache_router_events() -> list[RouterEventsSpec]:
    """Return the KV-aware routers this plugin can publish chunk events to."""
    raise NotImplementedError  # a specification: plugins implement it, pluggy never calls this


@hookspec
def lmcache_chunk_stores() -> list[ChunkStoreSpec]:
    """Return the chunk stores (by config ``mode``) this plugin provides (``lmcache.core.store``)."""
    raise NotImplementedError  # a specification: plugins implement it, pluggy never calls this
